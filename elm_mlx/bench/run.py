"""What is timed: the model (loaded, or random weights of the exact
architecture, optionally quantized), the engines run on it (elm-mlx, mlx-lm's
own OpenELM, a naive-RMSNorm copy) and the alternating, warmed-up runs."""

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..checkpoint import dtype_label
from ..errors import ElmError, need_extra
from ..quant import LEVELS, quant_label, quantize_in_memory, quantize_like, quantized_paths
from .metrics import Stamps, bandwidth, kv_bytes_per_token, run_metrics, weight_bytes_per_token

# The OpenELM paper's Apple-silicon method is Apple's CoreNet inference.py:
# BOS + this Treasure Island sentence, greedy, KV cache, 1024 new tokens.
PAPER_PROMPT = ("Squire Trelawney, Dr. Livesey, and the rest of these gentlemen having asked me to write down "
                "the whole particulars about Treasure Island, from the")
# Its Llama-2 ids (BOS first; a test checks them against the tokenizer), so a
# benchmark needs no tokenizer file: every OpenELM shares this vocabulary.
PAPER_PROMPT_IDS = [1, 317, 1548, 6479, 10653, 3801, 29892, 4942, 29889, 16238, 968, 29891, 29892, 322, 278, 1791,
                    310, 1438, 26703, 2534, 4433, 592, 304, 2436, 1623, 278, 3353, 3153, 29879, 1048, 6479, 3745,
                    7935, 29892, 515, 278]
METHODS = {"paper": dict(gen_tokens=1024, repeats=1), "pp-tg": dict(gen_tokens=128, prompt_tokens=512, repeats=5)}
WARMUP_TOKENS = 4  # covers the prefill and the decode step; the KV cache grows alike in both engines


def quantize(model, quant: str | None):
    """In place, by the plan `elm-mlx convert --quant` uses (q4, q8: the recipe;
    q4-uniform, q8-uniform: every Linear and the embedding alike, as mlx-lm's
    convert does). A model that is already quantized (a quantized folder) is
    kept as it is, recipe included, if `quant` names one of its widths."""
    if quant is None:
        return model
    if quant not in LEVELS:
        raise ElmError(f"--quant {quant!r}: expected one of {', '.join(LEVELS)}")
    done = quantized_paths(model)
    if done:
        if LEVELS[quant] not in {b for b, _ in done.values()}:
            raise ElmError(f"--quant {quant}: the model is already quantized ({quant_label(model)}); "
                           "drop --quant to measure it as it is")
        return model
    return quantize_in_memory(model, quant)


def load_bench_model(name: str, dtype: str | None, random_weights: bool, quant: str | None, clock=time.perf_counter):
    """(model, load seconds). Random weights build the exact architecture of
    a preset (or of a folder's config.json) without reading any weights:
    decode speed does not depend on their values."""
    from pathlib import Path

    from ..checkpoint import parse_dtype
    from ..config import OpenELMConfig, preset_name
    from ..load import compute_dtype, load_model
    from ..model import Model

    start = clock()
    if random_weights:
        folder = Path(name).expanduser()
        if (folder / "config.json").is_file():
            cfg = OpenELMConfig.from_file(folder / "config.json")
        elif preset_name(name):
            cfg = OpenELMConfig.from_preset(name)
        else:
            raise ElmError(f"--model {name!r} with --random-weights: expected a preset (270M, 450M, 1_1B, 3B) "
                           "or a folder with a config.json")
        check_fits(cfg, parse_dtype(dtype or "bf16"), name)
        model = Model(cfg)  # nn.Linear/nn.Embedding initialise random weights
        model.set_dtype(parse_dtype(compute_dtype(dtype) or "bf16"))
        for _, p in tree_flatten(model.parameters()):  # one tensor at a time: no float32 copy of the whole model
            mx.eval(p)
    else:
        from ..hub import resolve

        model = load_model(resolve(name, dtype), compute_dtype(dtype))
    quantize(model, quant)
    return model, clock() - start


def check_fits(cfg, dtype, name: str) -> None:
    """Random weights are built from the config alone: estimate their memory first
    (a config from anywhere can ask for terabytes; MLX would crash, not fail)."""
    from .machine import available_memory

    need = cfg.num_parameters() * dtype.size + max(math.prod(s) for s in cfg.weight_shapes().values()) * 4
    free = available_memory()
    if free is not None and need > free:
        raise ElmError(f"--model {name} --random-weights: that architecture needs {need / 1e9:,.1f} GB for its "
                       f"weights ({cfg.num_parameters():,} parameters), and {free / 1e9:.1f} GB of memory is "
                       "available: pick a smaller model")


@dataclass
class Engine:
    """A name and a function from prompt ids to an endless iterator of greedy
    token ids (EOS ignored), each id already evaluated."""
    name: str
    model: object
    tokens: Callable[[list], Iterator[int]]
    # prompt ids -> a function that builds one decode step's graph and
    # returns its lazy token, unevaluated: what the host pays per token.
    issue: Callable[[list], Callable[[], mx.array]] | None = None


def elm_engine(model, name=None, compile=True) -> Engine:
    """elm-mlx's generation loop: the compiled decode step, or with
    compile=False the eager forward ("elm-mlx eager")."""
    from ..cache import make_cache
    from ..generate import generate_tokens
    from ..step import decode_step

    def issue(ids):
        cache = make_cache(model)
        y = mx.argmax(model(mx.array([ids]), cache, last_only=True)[:, -1, :], axis=-1)
        step = decode_step(model) if compile else None

        def one():
            nonlocal y
            if compile:
                y, _ = step(y, cache, None)
            else:
                y = mx.argmax(model(y[None], cache, last_only=True)[:, -1, :], axis=-1)
            return y
        return one

    name = name or ("elm-mlx" if compile else "elm-mlx eager")
    return Engine(name, model, lambda ids: generate_tokens(model, ids, compile=compile), issue)


def mlx_lm_engine(model) -> Engine:
    """mlx-lm's own OpenELM on the very same weight arrays (no copy), driven
    by mlx-lm's generate_step: what mlx-lm's users get."""
    need_extra("mlx_lm", "mlx-lm", "--compare mlx-lm")
    from mlx_lm.generate import generate_step, generation_stream
    from mlx_lm.models import openelm

    theirs = openelm.Model(openelm.ModelArgs.from_dict(model.config.to_dict()))
    quantize_like(theirs, model)
    theirs.load_weights(tree_flatten(model.parameters()))  # replaces their lazy random init before it exists

    def tokens(ids):
        try:
            for y, _ in generate_step(mx.array(ids), theirs, max_tokens=-1, sampler=lambda x: mx.argmax(x, axis=-1)):
                yield y
        finally:
            mx.synchronize(generation_stream)  # mlx-lm queues its steps on its own stream

    def issue(ids):
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(theirs)
        y = mx.argmax(theirs(mx.array([ids]), cache=cache)[:, -1, :], axis=-1)

        def one():  # the body of generate_step's _step for a greedy sampler
            nonlocal y
            y = mx.argmax(theirs(y[None], cache=cache)[:, -1, :], axis=-1)
            return y
        return one

    return Engine("mlx-lm", theirs, tokens, issue)


class NaiveRMSNorm(nn.Module):
    """The paper's baseline: RMSNorm composed of separate ops (square, mean,
    rsqrt, two products) in float32, then cast, instead of one fused kernel."""

    def __init__(self, weight: mx.array, eps: float):
        super().__init__()
        self.weight, self.eps = weight, eps

    def __call__(self, x):
        xf = x.astype(mx.float32)
        y = xf * mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return y.astype(x.dtype) * self.weight


def naive_norm_engine(model) -> Engine:
    """The same model and weight arrays with every one of its 4·L+1 RMSNorms
    (per-head q/k norms included) composed of separate ops: the RMSNorm
    ablation of the paper's Table 10."""
    from ..model import Model

    naive = Model(model.config)
    quantize_like(naive, model)
    naive.load_weights(tree_flatten(model.parameters()))
    norms = [(path, m) for path, m in naive.named_modules() if isinstance(m, nn.RMSNorm)]
    for path, m in norms:
        *parents, leaf = path.split(".")
        owner = naive
        for p in parents:
            owner = owner[int(p)] if p.isdigit() else getattr(owner, p)
        setattr(owner, leaf, NaiveRMSNorm(m.weight, m.eps))
    return elm_engine(naive, name="naive RMSNorm")


HOST_STEPS = 32


def host_ms(issue: Callable[[], mx.array], steps: int = HOST_STEPS, clock=time.perf_counter) -> float:
    """Mean milliseconds the host spends building one decode step's graph
    (Python and MLX graph construction, nothing evaluated inside the window);
    each step is evaluated after its reading so the next one starts idle."""
    mx.eval(issue())  # a first step: traces a compiled step, grows caches
    total = 0.0
    for _ in range(steps):
        t = clock()
        y = issue()
        total += clock() - t
        mx.eval(y)
    return 1e3 * total / steps


def time_run(tokens: Iterator[int], n: int, clock=time.perf_counter, out: list | None = None) -> Stamps:
    """Draw n tokens (appended to `out` when given); the iterator does no
    work before it is first advanced."""
    out = [] if out is None else out
    start = clock()
    out.append(next(tokens))
    first = clock()
    for _ in range(n - 1):
        out.append(next(tokens))
    end = clock()
    tokens.close()
    mx.synchronize()  # the step queued behind the last token finishes outside the window
    return Stamps(start, first, end)


def prompt_ids(method: str, prompt_tokens: int | None, vocab_size: int) -> list:
    if method == "paper":
        if prompt_tokens is not None:
            raise ElmError("--prompt-tokens: the paper method's prompt is fixed (BOS + Treasure Island, 36 tokens); "
                           "use --method pp-tg for another length")
        if vocab_size <= max(PAPER_PROMPT_IDS):
            raise ElmError(f"the paper method's prompt needs the Llama-2 vocabulary (32000 tokens); this model has "
                           f"{vocab_size}: use --method pp-tg")
        return list(PAPER_PROMPT_IDS)
    # mlx_lm.benchmark's prompt: uniform random ids, seed 0.
    return mx.random.randint(0, vocab_size, (prompt_tokens,), key=mx.random.key(0)).tolist()


def measure(engines: list, ids: list, gen_tokens: int, repeats: int, info: dict, progress=None,
            clock=time.perf_counter) -> list:
    """Warm every engine up, then alternate them (ABBA order, so a drift of the
    machine falls on both alike). One dict per run: `info` (model, dtype,
    method, load_s, machine bandwidth, ...) plus the run's metrics. Bytes are
    counted on the first engine's model: all engines share its arrays."""
    progress = progress or (lambda msg: None)
    weights, kv = weight_bytes_per_token(engines[0].model), kv_bytes_per_token(engines[0].model)
    host = {}
    for e in engines:
        progress(f"warm-up: {e.name}")
        time_run(e.tokens(ids), min(WARMUP_TOKENS, gen_tokens), clock)
        host[e.name] = host_ms(e.issue(ids)) if e.issue else float("nan")
    runs, first_output = [], None
    for r in range(repeats):
        for e in engines if r % 2 == 0 else engines[::-1]:
            progress(f"run {r + 1}/{repeats}: {e.name}, {len(ids)} prompt + {gen_tokens} generated tokens")
            mx.reset_peak_memory()
            drawn = []
            stamps = time_run(e.tokens(ids), gen_tokens, clock, drawn)
            first_output = first_output or drawn
            m = run_metrics(stamps, len(ids), gen_tokens, info["load_s"])
            m.update(bandwidth(weights, kv, len(ids), gen_tokens, m["generation_tps"], info["machine_bandwidth_gbps"]))
            runs.append({**info, "engine": e.name, "repeat": r, "prompt_tokens": len(ids),
                         "gen_tokens": gen_tokens, **m, "peak_memory_gb": mx.get_peak_memory() / 1e9,
                         "host_ms_per_token": host[e.name], "same_output": drawn == first_output})
    return runs


def run_bench(model: str, *, random_weights=False, method="paper", dtype=None, quant=None, gen_tokens=None,
              prompt_tokens=None, repeats=None, compare=None, json_file=None, say=print, compile=True) -> list:
    """`elm-mlx bench`: load (or build) the model, time the engines, print the
    table (stderr when the JSON goes to stdout) and write the JSON runs."""
    import json
    import sys
    from pathlib import Path

    from ..generate import check_context
    from .machine import environment
    from .metrics import table

    defaults = METHODS[method]
    gen_tokens = defaults["gen_tokens"] if gen_tokens is None else gen_tokens
    repeats = defaults["repeats"] if repeats is None else repeats
    if method == "pp-tg" and prompt_tokens is None:
        prompt_tokens = defaults["prompt_tokens"]
    say(f"loading {model}{' (random weights)' if random_weights else ''} ...")
    model_, load_s = load_bench_model(model, dtype, random_weights, quant)
    ids = prompt_ids(method, prompt_tokens, model_.config.vocab_size)
    check_context(len(ids), model_.config.max_context_length, what=f"the {method} method's prompt",
                  new_tokens=gen_tokens)
    say("probing memory bandwidth ...")
    info = {"model": model, "dtype": dtype_label(model_.dtype), "quant": quant_label(model_), "method": method,
            "load_s": load_s, **environment()}
    engines = [elm_engine(model_, compile=compile)] + ([mlx_lm_engine(model_)] if compare else [])
    runs = measure(engines, ids, gen_tokens, repeats, info, progress=say)
    print(table(runs), file=sys.stderr if json_file == "-" else sys.stdout)
    if json_file:
        text = json.dumps(runs, indent=1)
        if json_file == "-":
            print(text)
        else:
            from ..files import atomic_write_text

            atomic_write_text(Path(json_file), text + "\n")
    mx.clear_cache()
    return runs
