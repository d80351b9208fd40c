"""The generation loop: prefill, then one token per step through the KV cache,
with the next step queued (mx.async_eval) before the current token is handed
to Python."""

import time
from dataclasses import asdict, dataclass

import mlx.core as mx

from .cache import make_cache
from .errors import ElmError, check_max_tokens, is_integer, quoted
from .sample import SamplingParams, SequenceSampler
from .speculative import DEFAULT_DRAFT_TOKENS, DEFAULT_NGRAM, SpecStats, check_options, make_proposer, speculative_tokens
from .step import decode_step


@dataclass
class GenerationResponse:
    text: str  # the new piece of text (may be "" while a character is incomplete)
    token: int
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float  # prompt tokens / time to first token
    generation_tps: float  # tokens after the first / time after the first
    peak_memory_gb: float
    finish_reason: str | None  # "stop" (EOS), "length" (max_tokens or context), else None
    # Speculative decoding only (None otherwise): guesses the model kept, and
    # tokens produced per forward pass of the model (1.0 is plain decoding's).
    acceptance_rate: float | None = None
    tokens_per_forward: float | None = None


class ContextError(ElmError):
    """A prompt that leaves no room in the context window for the tokens to generate."""

    def __init__(self, prompt_tokens: int, window: int, cached: int = 0, what: str = "the prompt", new_tokens: int = 1):
        used = f" after {cached} cached tokens" if cached else ""
        need = "at least one more" if new_tokens == 1 else f"{new_tokens} more"
        super().__init__(f"{what} is {prompt_tokens} tokens{used}; OpenELM's context is {window} tokens "
                         f"and generation needs {need}: shorten it")
        self.prompt_tokens, self.window, self.cached = prompt_tokens, window, cached


def check_context(prompt_tokens: int, window: int, cached: int = 0, what: str = "the prompt",
                  new_tokens: int = 1) -> None:
    """The one check of a prompt against the context window (API, chat, server, bench)."""
    if cached + prompt_tokens + new_tokens > window:
        raise ContextError(prompt_tokens, window, cached, what, new_tokens)


def encode_prompt(tokenizer, prompt, cached: int, window: int, vocab_size: int | None = None) -> list:
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    check_context(len(ids), window, cached)
    if vocab_size is not None:
        check_ids(ids, vocab_size)
    return ids


def check_ids(ids: list, vocab_size: int) -> None:
    """Token ids given directly must be rows of the embedding: MLX's gather does not
    check bounds, so an id past them would read other memory."""
    for i, t in enumerate(ids):
        if not is_integer(t) or not 0 <= t < vocab_size:
            raise ElmError(f"prompt token {i} is {quoted(t)}: expected token ids from 0 to {vocab_size - 1}")


def generate_tokens(model, prompt_ids: list, *, temp=0.0, top_k=0, top_p=1.0, min_p=0.0,
                    repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0, seed=None, cache=None,
                    context=(), compile=True, constraint=None):
    """Yields token ids forever (the caller stops); the cache ends up holding
    the context. `context`: ids the cache already holds, which the repetition
    penalty counts as it would without a cache. The prompt goes through the
    eager forward; each later token through the compiled step
    (elm_mlx/step.py), or the eager forward too with compile=False (the
    reference it equals; also used for the frequency and presence penalties,
    which the compiled step does not have). The draws come from the sequence's
    own random key (see sample.py), as in the server's batches. `constraint`
    (structured output, see sample.py) masks every token; the next step then
    waits for this token, since its mask depends on it. Validation is the caller's."""
    sampler = SequenceSampler(model.config.vocab_size, list(context) + list(prompt_ids), temp=temp, top_k=top_k,
                              top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                              frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, seed=seed,
                              constraint=constraint)
    cache = make_cache(model) if cache is None else cache

    def step(tokens):
        return sampler(model(tokens[None], cache, last_only=True)[:, -1, :])[0]

    y = step(mx.array(prompt_ids))
    mx.async_eval(y)
    if compile and sampler.counts is None:
        fast = decode_step(model, temp=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                           repetition_penalty=repetition_penalty, constrained=constraint is not None)

        def step(tokens):
            y, sampler.seen = fast(tokens, cache, sampler.seen, sampler.next_key(), sampler.allowed())
            return y

    if constraint is not None:  # no step ahead: the next mask needs this token
        while True:
            token = y.item()
            sampler.accept(token)
            yield token
            y = step(y)
    while True:
        next_y = step(y)
        mx.async_eval(next_y)
        yield y.item()
        y = next_y


def stream_generate(model, tokenizer, prompt, max_tokens: int = 256, *, cache=None, context=(),
                    sampling: SamplingParams | None = None, compile: bool = True, prompt_lookup: int = 0,
                    ngram: int = DEFAULT_NGRAM, draft_model=None, num_draft_tokens: int = DEFAULT_DRAFT_TOKENS,
                    constraint=None, json_schema=None, grammar=None, regex=None, ignore_eos: bool = False,
                    stop: list[str] | str | None = None, **sampling_args):
    """Yields a GenerationResponse per generated token; the last one has
    finish_reason set. `prompt` is text (BOS is added) or a list of ids.
    Sampling: `sampling=SamplingParams(...)`, or its fields as keywords
    (temp=0.7, top_p=0.9, repetition_penalty=1.2, seed=0, ...); greedy by default.
    With `cache` (from make_cache, possibly holding earlier turns) the prompt
    continues what the cache holds, and the cache keeps the new context; the
    repetition penalty then sees this prompt, its output and `context` (pass
    the ids the cache holds to penalize them too). compile=False decodes
    with the eager forward (the reference; see generate_tokens).
    ignore_eos=True: EOS does not stop it (it is generated as any token, and
    prints nothing): exactly max_tokens, as llama.cpp's --ignore-eos.
    stop=["\n\n", ...]: text stop strings, as the server's "stop": generation ends
    where one first appears, which is cut off with what follows it (finish_reason
    "stop"); text that may begin one is held back until it is told apart.

    Speculative decoding (elm_mlx/speculative.py; same output, greedy token for
    token): `prompt_lookup=N` guesses N tokens by matching the last `ngram`
    tokens earlier in the text; `draft_model=` a smaller OpenELM (or the model
    quantized) guesses `num_draft_tokens`; guesses are checked in one forward
    (compiled, as the plain steps are; eager with compile=False). The cache may then end one token short of the text (CachedContext
    handles that).

    `constraint`: structured output's per-token mask (see sample.py); or build one with
    `json_schema=` (a dict or JSON text), `grammar=` (Lark) or `regex=` (elm_mlx/constrain.py)."""
    sampling = sampling or SamplingParams(**sampling_args)
    if json_schema is not None or grammar is not None or regex is not None:
        if constraint is not None:
            raise ElmError("give constraint= or one of json_schema= / grammar= / regex=, not both")
        from .constrain import Constraint

        constraint = Constraint(tokenizer, json_schema=json_schema, grammar=grammar, regex=regex,
                                vocab_size=model.config.vocab_size)
    if constraint is not None and (prompt_lookup or draft_model is not None):
        raise ElmError("structured output and speculative decoding together are not supported yet: "
                       "drop --prompt-lookup / --draft-model")
    if constraint is not None and ignore_eos:
        raise ElmError("structured output ends at EOS once the format is complete: drop --ignore-eos")
    check_options(prompt_lookup, ngram, draft_model, num_draft_tokens, model)
    stop_text = StopText(check_stops(stop)) if stop else None
    max_tokens = check_max_tokens(max_tokens)
    window = model.config.max_context_length
    cached = cache[0].offset if cache else 0
    ids = encode_prompt(tokenizer, prompt, cached, window, model.config.vocab_size)
    max_tokens = min(max_tokens, window - cached - len(ids))
    if max_tokens == 0:
        return
    detok = tokenizer.detokenizer(continuation=cached > 0 or any(t != tokenizer.bos_id for t in ids))
    mx.reset_peak_memory()
    tic = time.perf_counter()
    prompt_tps = gen_tps = 0.0
    stats = None
    if prompt_lookup or draft_model is not None:
        stats = SpecStats()
        proposer = make_proposer(model, prompt_lookup, ngram, draft_model, num_draft_tokens,
                                 sampling.repetition_penalty)
        tokens = speculative_tokens(model, ids, proposer, cache=cache, context=context, max_tokens=max_tokens,
                                    stats=stats, compile=compile, **asdict(sampling))
    else:
        tokens = generate_tokens(model, ids, cache=cache, context=context, compile=compile, constraint=constraint,
                                 **asdict(sampling))
    for n, token in enumerate(tokens, start=1):
        now = time.perf_counter()
        if n == 1:
            first, prompt_tps = now, len(ids) / (now - tic)
        else:
            gen_tps = (n - 1) / (now - first)
        finish = "stop" if token == tokenizer.eos_id and not ignore_eos else "length" if n == max_tokens else None
        text = detok.finalize() if finish == "stop" else detok.add_token(token)
        if finish == "length":
            text += detok.finalize()
        if stop_text is not None:
            text, hit = stop_text.add(text)
            if hit:
                finish = "stop"
            elif finish:
                text += stop_text.flush()
        spec = (stats.acceptance_rate, stats.tokens_per_forward) if stats else (None, None)
        yield GenerationResponse(text, token, len(ids), n, prompt_tps, gen_tps,
                                 mx.get_peak_memory() / 1e9, finish, *spec)
        if finish:
            break


def check_stops(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(s, str) and s for s in stops):
        raise ElmError(f"stop strings must be non-empty text, not {stops!r}")
    return stops


class StopText:
    """Cuts streamed text at the first stop string; holds back a tail that may begin one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""

    def add(self, text: str) -> tuple[str, bool]:
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.pending = self.pending[: min(found)], ""
            return out, True
        held = next((k for k in range(len(self.pending), 0, -1)
                     if any(s.startswith(self.pending[-k:]) for s in self.stops)), 0)
        out, self.pending = self.pending[: len(self.pending) - held], self.pending[len(self.pending) - held:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def generate(model, tokenizer, prompt, max_tokens: int = 256, *, verbose: bool = False, **kwargs) -> str:
    """The continuation of `prompt` (not the prompt itself). verbose: print the
    text as it streams and a stats line after it, as mlx_lm.generate does."""
    parts, last = [], None
    for last in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs):
        parts.append(last.text)
        if verbose:
            print(last.text, end="", flush=True)
    if verbose:
        print()
        print("=" * 10)
        if last is not None:
            print(stats_line(last))
    return "".join(parts)


def stats_line(r: GenerationResponse) -> str:
    """The speed summary the CLI prints after a generation."""
    return (f"prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tok/s | "
            f"generation: {r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s | "
            f"peak memory: {r.peak_memory_gb:.2f} GB"
            + ("" if r.acceptance_rate is None else
               f" | speculative: {100 * r.acceptance_rate:.0f}% of guesses accepted, "
               f"{r.tokens_per_forward:.2f} tokens per forward"))
