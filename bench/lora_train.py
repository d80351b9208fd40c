"""LoRA training speed: trained tokens/s and peak memory of elm-mlx's trainer (elm_mlx/tune.py)
beside mlx-lm's (mlx_lm.tuner.trainer), on the same model, the same data and the same LoRA, in
one process, engines alternated after a warm-up of each.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python bench/lora_train.py 270M 450M --quant fp32 q4 --steps 2 --repeats 2

What is measured. For each model (a preset or a folder with a config.json; random weights of
its exact architecture: a step's work does not depend on the values) and each base (fp32, or
a quantized base for QLoRA: q4 is `elm-mlx convert --quant q4`'s recipe), the model is built
once. mlx-lm's own OpenELM (mlx_lm.models.openelm) is quantized layer by layer like ours and
loads the very same base arrays (no copy). Then each gets fresh adapters by its own code:
ours by tune.prepare (elm_mlx.lora), mlx-lm's by linear_to_lora_layers; the same rank, scale,
dropout, keys and last --num-layers layers (16, both CLIs' default; -1: all), and each an
AdamW with the same learning rate, betas and weight decay 0 (mlx_lm.lora --optimizer adamw).

The data: --rows random token rows of --seq-len + 1 ids (BOS first), all one length, so no
row is padded and every step trains on batch_size x seq_len target tokens in both engines.
Each engine draws its batches by its own code from that one list of (ids, offset 0) rows:
ours by tune.batch_indices + make_batch, mlx-lm's by its iterate_batches with
max_seq_length = seq_len + 1 (its padding to 1 + a multiple of 32 is then capped at the row
length; without the cap it would pad every row and count one pad target per row, its mask
being steps <= length).

A step. Ours is tune.run_step on tune.make_step: what `elm-mlx lora` runs per iteration
(value_and_grad of the token-weighted loss sums, opt.update, mx.eval of the adapters, the
optimizer state and the loss), plus the .item() reads its loop makes. mlx-lm's is the body of
mlx_lm.tuner.trainer.train per iteration, with its own pieces: nn.value_and_grad of its
default_loss, average_gradients, optimizer.update, compiled with mx.compile over
[model.state, optimizer.state, mx.random.state] as it compiles it (gradient accumulation 1),
then mx.eval(state, losses, n_tokens, grad_accum). It is written out here, not called
through trainer.train, because train() also saves adapter files, draws a progress UI and
reports tokens/s only per report window that includes its compile. Not timed: the build,
the adapters, the warm-up step of each engine (the compile, first allocations).

Reported per engine: median over --repeats of trained tokens / wall seconds of --steps steps
(batch creation included, as in both trainers' loops), the same per CPU-second of this
process (the machine may be shared), and the peak memory: mx.get_peak_memory over the
engine's runs, each after mx.clear_cache and mx.reset_peak_memory. The base weights are
shared and resident throughout, so both peaks include them once; the other engine's
adapters and optimizer state (a few MB) are resident too. Before training, both engines'
loss on one same batch (rows 0..batch_size-1) is recorded: with lora_b = 0 at the start the
adapted models are the base, so equal losses show the same model, data and loss mask.

Results: bench/results/<machine>/lora-train.json (or --json). A configuration (model, base)
measured again replaces its entry there; entries of other configurations are kept, each
with its own settings and date, so fp32 and q4 may be run with different lengths (MLX's CPU
quantized matmul is ~50x slower than the BLAS one)."""

import argparse
import gc
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import elm_mlx  # noqa: F401  (first: it binds an optimized BLAS before MLX loads)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map

from elm_mlx import lora, tune
from elm_mlx.bench import load_bench_model
from elm_mlx.bench.machine import environment, machine_label
from elm_mlx.errors import ElmError
from elm_mlx.quant import LEVELS, quant_label, quantize_like

HERE = Path(__file__).resolve().parent
BASES = ["fp32", *LEVELS]
ENGINES = ["elm-mlx", "mlx-lm"]


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        raise SystemExit(f"lora_train.py: error: {message}")


def synthetic_rows(n: int, seq_len: int, vocab: int, seed: int) -> list:
    """n rows of seq_len + 1 ids (BOS, then uniform ids above the specials), as (ids, offset 0)."""
    rng = np.random.default_rng(seed)
    return [([1] + rng.integers(3, vocab, size=seq_len).tolist(), 0) for _ in range(n)]


class Elm:
    """elm-mlx's trainer: tune.prepare, make_step, run_step, batches by batch_indices + make_batch."""

    name = "elm-mlx"

    def __init__(self, model, cfg: tune.TrainConfig, data):
        self.model, self.cfg, self.data = model, cfg, data
        self.opt = tune.prepare(model, cfg)
        model.train()
        self.step_fn = tune.make_step(model, self.opt, cfg)
        self.order = tune.batch_indices(len(data), cfg.batch_size, cfg.seed)
        self.it = 0

    def first_loss(self) -> float:
        s, c = tune.loss_sums(self.model, *tune.make_batch(self.data, list(range(self.cfg.batch_size))))
        return (s / c).item()

    def step(self) -> tuple[float, int]:
        self.it += 1
        loss, ntok = tune.run_step(self.step_fn, self.model, self.opt, self.cfg, self.it,
                                   tune.make_batch(self.data, next(self.order)))
        return loss.item(), int(ntok.item())

    def trainable(self) -> int:
        return sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))


class MlxLm:
    """mlx-lm's trainer, as mlx_lm.lora sets it up and mlx_lm.tuner.trainer.train steps it."""

    name = "mlx-lm"

    def __init__(self, model, cfg: tune.TrainConfig, data):
        import mlx.optimizers as optim
        from mlx.nn.utils import average_gradients
        from mlx_lm.tuner.trainer import default_loss, iterate_batches
        from mlx_lm.tuner.utils import linear_to_lora_layers

        self.model, self.cfg, self.data, self.default_loss = model, cfg, data, default_loss
        mx.random.seed(cfg.seed)  # as mlx_lm.lora's train_model
        model.freeze()
        linear_to_lora_layers(model, cfg.num_layers, {"rank": cfg.rank, "scale": cfg.scale, "dropout": cfg.dropout,
                                                      "keys": lora.module_keys(cfg.keys)})
        opt = optim.AdamW(learning_rate=cfg.learning_rate, betas=list(cfg.betas), weight_decay=cfg.weight_decay)
        self.opt = opt
        model.train()
        loss_value_and_grad = nn.value_and_grad(model, default_loss)
        state = [model.state, opt.state, mx.random.state]
        self.state = state

        @partial(mx.compile, inputs=state, outputs=state)
        def step(batch, prev_grad, do_update):  # mlx_lm.tuner.trainer.train's, grad_accumulation_steps 1
            (lvalue, toks), grad = loss_value_and_grad(model, *batch)
            if prev_grad is not None:
                grad = tree_map(lambda x, y: x + y, grad, prev_grad)
            if do_update:
                grad = average_gradients(grad)
                opt.update(model, grad)
                grad = None
            return lvalue, toks, grad

        self._step = step
        self.batches = iterate_batches(dataset=data, batch_size=cfg.batch_size,
                                       max_seq_length=len(data[0][0]), loop=True, seed=cfg.seed)
        self.grad_accum = None

    def first_loss(self) -> float:
        tokens, offsets, lengths = tune.make_batch(self.data, list(range(self.cfg.batch_size)))
        # iterate_batches' second array: (offset, length) per row
        loss, _ = self.default_loss(self.model, tokens, mx.stack([offsets, lengths], axis=1))
        return loss.item()

    def step(self) -> tuple[float, int]:
        batch = next(self.batches)
        lvalue, toks, self.grad_accum = self._step(batch, self.grad_accum, True)
        mx.eval(self.state, lvalue, toks, self.grad_accum)  # train()'s eval (its losses, n_tokens: sums of these)
        return lvalue.item(), int(toks.item())

    def trainable(self) -> int:
        return sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))


def mlx_lm_twin(model):
    """mlx-lm's OpenELM on the very same base arrays, quantized like `model`."""
    from mlx_lm.models import openelm

    theirs = openelm.Model(openelm.ModelArgs.from_dict(model.config.to_dict()))
    quantize_like(theirs, model)
    theirs.load_weights(tree_flatten(model.parameters()))
    return theirs


def timed(engine, steps: int) -> dict:
    mx.clear_cache()
    mx.reset_peak_memory()
    tokens, losses = 0, []
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        loss, n = engine.step()
        tokens += n
        losses.append(loss)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return {"tokens": tokens, "seconds": wall, "cpu_seconds": cpu, "tps": tokens / wall, "tps_cpu": tokens / cpu,
            "peak_memory_bytes": mx.get_peak_memory(), "losses": losses}


def bench_config(size: str, base: str, args, say) -> dict:
    quant = None if base == "fp32" else base
    model, _ = load_bench_model(size, "fp32", True, quant)
    n = len(model.layers)
    if args.num_layers > n:
        raise ElmError(f"--num-layers {args.num_layers}: {size} has {n} layers (expected 1..{n}, or -1 for all)")
    theirs = mlx_lm_twin(model)
    cfg = tune.TrainConfig(rank=args.rank, scale=args.scale, num_layers=args.num_layers, keys=args.keys,
                           batch_size=args.batch_size, learning_rate=args.learning_rate, weight_decay=0.0,
                           iters=args.warmup + args.steps * args.repeats, seed=args.seed)
    data = synthetic_rows(args.rows, args.seq_len, model.config.vocab_size, args.seed)
    engines = {"elm-mlx": Elm(model, cfg, data), "mlx-lm": MlxLm(theirs, cfg, data)}
    first = {k: e.first_loss() for k, e in engines.items()}
    say(f"{size} {base}: loss before training on rows 0..{args.batch_size - 1}: "
        + ", ".join(f"{k} {v:.6f}" for k, v in first.items()))
    for name, e in engines.items():  # warm-up: traces, the compile, first allocations
        for _ in range(args.warmup):
            e.step()
        say(f"{size} {base}: {name} warmed up")
    runs = {k: [] for k in engines}
    for r in range(args.repeats):
        for name in ENGINES if r % 2 == 0 else ENGINES[::-1]:
            run = timed(engines[name], args.steps)
            runs[name].append(run)
            say(f"{size} {base}: {name:7} {run['tokens']} tokens in {run['seconds']:.2f} s: {run['tps']:.1f} tok/s, "
                f"peak {run['peak_memory_bytes'] / 2**30:.3f} GiB, loss {run['losses'][-1]:.4f}")
    out = {"model": size, "base": base, "base_label": quant_label(model) if quant else "fp32",
           "layers": n, "initial_loss": first, "initial_loss_diff": abs(first["elm-mlx"] - first["mlx-lm"]),
           "trainable_parameters": {k: e.trainable() for k, e in engines.items()},
           "settings": settings(args), "date": time.strftime("%Y-%m-%d"), "engines": {}}
    for name, rs in runs.items():
        out["engines"][name] = {"tps": statistics.median(r["tps"] for r in rs),
                                "tps_cpu": statistics.median(r["tps_cpu"] for r in rs),
                                "peak_memory_bytes": max(r["peak_memory_bytes"] for r in rs), "runs": rs}
    e, m = out["engines"]["elm-mlx"], out["engines"]["mlx-lm"]
    out["ratio_tps"] = e["tps"] / m["tps"]
    out["ratio_tps_cpu"] = e["tps_cpu"] / m["tps_cpu"]
    out["ratio_peak_memory"] = e["peak_memory_bytes"] / m["peak_memory_bytes"]
    del engines, model, theirs
    gc.collect()
    mx.clear_cache()
    return out


def settings(args) -> dict:
    return {k: getattr(args, k) for k in ("seq_len", "batch_size", "steps", "repeats", "warmup", "rows", "rank",
                                          "scale", "num_layers", "keys", "learning_rate", "seed")}


def table(results: list) -> str:
    lines = ["| model | base | tokens/step | engine | tokens/s | tokens per CPU-s | peak memory (GiB) | "
             "elm/mlx-lm tokens/s | elm/mlx-lm peak |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in results:
        per_step = r["settings"]["batch_size"] * r["settings"]["seq_len"]
        for name in ENGINES:
            e = r["engines"][name]
            ratio = f"**{r['ratio_tps']:.2f}**" if name == "elm-mlx" else ""
            mem = f"{r['ratio_peak_memory']:.2f}" if name == "elm-mlx" else ""
            lines.append(f"| {r['model']} | {r['base_label']} | {per_step} | {name} | {e['tps']:.1f} | "
                         f"{e['tps_cpu']:.1f} | {e['peak_memory_bytes'] / 2**30:.3f} | {ratio} | {mem} |")
    return "\n".join(lines)


def parse(argv):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="presets (270M, 450M, ...) or folders with a config.json")
    p.add_argument("--quant", nargs="+", default=["fp32"], help=f"bases: {', '.join(BASES)} (default fp32)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per run")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per engine, alternating")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per engine first")
    p.add_argument("--seq-len", type=int, default=256, help="target tokens per row (rows hold seq_len + 1 ids)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rows", type=int, default=32, help="rows of synthetic data")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--scale", type=float, default=20.0)
    p.add_argument("--num-layers", type=int, default=16, help="adapted layers, the last ones (-1: all)")
    p.add_argument("--keys", nargs="+", default=["qkv_proj", "out_proj", "proj_1", "proj_2"],
                   choices=list(lora.LAYER_KEYS))
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="default: bench/results/<machine>/lora-train.json")
    args = p.parse_args(argv)
    for q in args.quant:
        if q not in BASES:
            p.error(f"--quant {q}: expected {', '.join(BASES)}")
    for flag, value, low in (("--steps", args.steps, 1), ("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0),
                             ("--seq-len", args.seq_len, 1), ("--batch-size", args.batch_size, 1),
                             ("--rank", args.rank, 1)):
        if value < low:
            p.error(f"{flag} {value}: expected at least {low}")
    if args.rows < args.batch_size:
        p.error(f"--rows {args.rows}: expected at least --batch-size ({args.batch_size})")
    if args.num_layers == 0 or args.num_layers < -1:
        p.error(f"--num-layers {args.num_layers}: expected a count >= 1, or -1 for all")
    return args


def merge(path: Path, env: dict, results: list) -> dict:
    """The file's entries of other (model, base) configurations, then this run's."""
    old = []
    if path.exists():
        try:
            old = json.loads(path.read_text()).get("results", [])
        except (json.JSONDecodeError, AttributeError):
            old = []
    done = {(r["model"], r["base"]) for r in results}
    kept = [r for r in old if (r.get("model"), r.get("base")) not in done]
    return {"environment": env, "results": kept + results}


def main(argv=None):
    args = parse(argv)
    say = lambda s: print(f"[{time.strftime('%H:%M:%S')}] {s}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        from elm_mlx.errors import need_extra

        need_extra("mlx_lm", "mlx-lm", "bench/lora_train.py")
        env = environment()
        env["date"] = time.strftime("%Y-%m-%d")
        results = []
        for size in args.models:
            for base in args.quant:
                results.append({**bench_config(size, base, args, say), "environment": env})
    except ElmError as e:
        raise SystemExit(f"lora_train.py: error: {e}") from None
    path = args.json or HERE / "results" / machine_label(env) / "lora-train.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = merge(path, env, results)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(table(results))
    for r in results:
        s = r["settings"]
        print(f"{r['model']} {r['base_label']}: batch {s['batch_size']} x {s['seq_len']} tokens, {s['steps']} steps x "
              f"{s['repeats']} runs per engine (median), LoRA rank {s['rank']} scale {s['scale']:g} on the last "
              f"{s['num_layers'] if s['num_layers'] > 0 else r['layers']} of {r['layers']} layers; "
              f"loss before training: elm-mlx {r['initial_loss']['elm-mlx']:.6f}, "
              f"mlx-lm {r['initial_loss']['mlx-lm']:.6f}")
    print(f"{env['backend']}, MLX {env['mlx_version']}, mlx-lm {env.get('mlx_lm_version')}, "
          f"BLAS {env.get('blas', '-')}, {env['cpus']} CPUs ({env['device_name']}); written to {path}")
    return doc


if __name__ == "__main__":
    main()
