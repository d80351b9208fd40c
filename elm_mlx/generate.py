"""The generation loop: prefill, then one token per step through the KV cache,
with the next step queued (mx.async_eval) before the current token is handed
to Python."""

import time
from dataclasses import dataclass

import mlx.core as mx

from .cache import make_cache
from .errors import ElmError
from .sample import SequenceSampler, check_sampling


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


def encode_prompt(tokenizer, prompt, room: int, max_context: int) -> list:
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if len(ids) >= room:
        used = f" after {max_context - room} cached tokens" if room < max_context else ""
        raise ElmError(f"the prompt is {len(ids)} tokens{used}; OpenELM's context is {max_context} tokens "
                       "and generation needs at least one more: shorten the prompt")
    return ids


def generate_tokens(model, prompt_ids: list, *, temp=0.0, top_k=0, top_p=1.0, min_p=0.0,
                    repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0, seed=None, cache=None,
                    context=()):
    """Yields token ids forever (the caller stops); the cache ends up holding
    the context. `context`: ids the cache already holds, which the repetition
    penalty counts as it would without a cache. Validation is the caller's."""
    sampler = SequenceSampler(model.config.vocab_size, list(context) + list(prompt_ids), temp=temp, top_k=top_k,
                              top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                              frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, seed=seed)
    cache = make_cache(model) if cache is None else cache

    def step(tokens):
        return sampler(model(tokens[None], cache, last_only=True)[:, -1, :])[0]

    y = step(mx.array(prompt_ids))
    mx.async_eval(y)
    while True:
        next_y = step(y)
        mx.async_eval(next_y)
        yield y.item()
        y = next_y


def stream_generate(model, tokenizer, prompt, max_tokens: int = 256, *, cache=None, context=(), **sampling):
    """Yields a GenerationResponse per generated token; the last one has
    finish_reason set. `prompt` is text (BOS is added) or a list of ids.
    With `cache` (from make_cache, possibly holding earlier turns) the prompt
    continues what the cache holds, and the cache keeps the new context; the
    repetition penalty then sees this prompt, its output and `context` (pass
    the ids the cache holds to penalize them too)."""
    check_sampling(**{k: v for k, v in sampling.items() if k != "seed"})
    if max_tokens < 0:
        raise ElmError(f"--max-tokens {max_tokens}: expected >= 0")
    max_context = model.config.max_context_length
    cached = cache[0].offset if cache else 0
    ids = encode_prompt(tokenizer, prompt, max_context - cached, max_context)
    max_tokens = min(max_tokens, max_context - cached - len(ids))
    if max_tokens == 0:
        return
    detok = tokenizer.detokenizer(continuation=cached > 0 or any(t != tokenizer.bos_id for t in ids))
    mx.reset_peak_memory()
    tic = time.perf_counter()
    prompt_tps = gen_tps = 0.0
    for n, token in enumerate(generate_tokens(model, ids, cache=cache, context=context, **sampling), start=1):
        now = time.perf_counter()
        if n == 1:
            first, prompt_tps = now, len(ids) / (now - tic)
        else:
            gen_tps = (n - 1) / (now - first)
        finish = "stop" if token == tokenizer.eos_id else "length" if n == max_tokens else None
        text = detok.finalize() if finish == "stop" else detok.add_token(token)
        if finish == "length":
            text += detok.finalize()
        yield GenerationResponse(text, token, len(ids), n, prompt_tps, gen_tps,
                                 mx.get_peak_memory() / 1e9, finish)
        if finish:
            break


def generate(model, tokenizer, prompt, max_tokens: int = 256, **sampling) -> str:
    """The continuation of `prompt` (not the prompt itself)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens, **sampling))
