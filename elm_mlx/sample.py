"""Turning logits into the next token, with Hugging Face's semantics and order:
repetition penalty, then temperature, top-k, top-p, min-p, then a draw."""

import math
from dataclasses import dataclass

import mlx.core as mx

from .errors import ArgumentError


SEED_LIMIT = 2**64  # what mx.random.seed takes


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is drawn, validated once here for every front end
    (the API, the CLI, the server). temp 0 is greedy; 0 / 1 turn the others off."""

    temp: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        for name, ok, want in [
            ("temp", _number(self.temp) and 0 <= self.temp <= 2, "a number in [0, 2] (0 means greedy)"),
            ("top_k", _integer(self.top_k) and self.top_k >= 0, "an integer >= 0 (0 means off)"),
            ("top_p", _number(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1] (1 means off)"),
            ("min_p", _number(self.min_p) and 0 <= self.min_p < 1, "a number in [0, 1) (0 means off)"),
            ("repetition_penalty", _number(self.repetition_penalty) and self.repetition_penalty > 0,
             "a number > 0 (1 means off; Apple suggests 1.2)"),
            ("seed", self.seed is None or (_integer(self.seed) and 0 <= self.seed < SEED_LIMIT),
             f"an integer from 0 to {SEED_LIMIT - 1}"),
        ]:
            if not ok:
                raise ArgumentError(name, getattr(self, name), want)


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return (_integer(v) or isinstance(v, float)) and math.isfinite(v)


def make_sampler(temp=0.0, top_k=0, top_p=1.0, min_p=0.0, values=None):
    """logits[B, V] -> token ids[B]. Greedy when temp is 0. values: arrays
    standing in for (temp, top_p, min_p) in the arithmetic while the numbers
    pick which filters run, so that a compiled step (elm_mlx/step.py) traces
    once for every temperature instead of once per value."""
    if temp == 0:
        return lambda logits: mx.argmax(logits, axis=-1)
    return lambda logits: mx.random.categorical(filter_logits(logits, temp, top_k, top_p, min_p, values))


def filter_logits(logits, temp, top_k=0, top_p=1.0, min_p=0.0, values=None):
    """logits[B, V] -> the float32 logits the draw uses (temp > 0): scaled by
    1/temp, the tokens top-k, top-p and min-p drop set to -inf. Their softmax is
    the distribution a sample follows (speculative decoding's acceptance reads it).
    values: arrays standing in for (temp, top_p, min_p) in the arithmetic (make_sampler)."""
    t, p, m = (temp, top_p, min_p) if values is None else values
    logits = logits.astype(mx.float32) / t
    if 0 < top_k < logits.shape[-1]:
        kth = mx.sort(logits, axis=-1)[..., -top_k, None]
        logits = mx.where(logits < kth, -mx.inf, logits)
    if top_p < 1.0:
        order = mx.argsort(-logits, axis=-1)
        probs = mx.softmax(mx.take_along_axis(logits, order, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always the first token).
        drop = (mx.cumsum(probs, axis=-1) - probs) >= p
        logits = mx.put_along_axis(logits, order, mx.where(drop, -mx.inf, mx.take_along_axis(logits, order, axis=-1)), axis=-1)
    if min_p > 0.0:
        probs = mx.softmax(logits, axis=-1)
        logits = mx.where(probs < m * probs.max(axis=-1, keepdims=True), -mx.inf, logits)
    return logits


def apply_repetition_penalty(logits, seen, penalty):
    """CTRL penalty as in transformers: every token id already in the context
    (prompt and output, each counted once) has its logit divided by the
    penalty when positive and multiplied when negative. seen: bool[V]."""
    penalized = mx.where(logits > 0, logits / penalty, logits * penalty)
    return mx.where(seen, penalized, logits)
