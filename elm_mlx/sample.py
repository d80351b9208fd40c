"""Turning logits into the next token, with Hugging Face's semantics and order:
repetition penalty, then temperature, top-k, top-p, min-p, then a draw."""

import mlx.core as mx

from .errors import ElmError


SEED_LIMIT = 2**64  # what mx.random.seed takes


def check_sampling(temp=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, seed=None):
    for ok, flag, value, want in [
        (seed is None or (isinstance(seed, int) and 0 <= seed < SEED_LIMIT), "--seed", seed,
         "an integer from 0 to 2**64-1"),
        (temp >= 0, "--temp", temp, ">= 0 (0 means greedy)"),
        (top_k >= 0, "--top-k", top_k, ">= 0 (0 means off)"),
        (0 < top_p <= 1, "--top-p", top_p, "in (0, 1] (1 means off)"),
        (0 <= min_p < 1, "--min-p", min_p, "in [0, 1) (0 means off)"),
        (repetition_penalty > 0, "--repetition-penalty", repetition_penalty, "> 0 (1 means off; Apple suggests 1.2)"),
    ]:
        if not ok:
            raise ElmError(f"{flag} {value}: expected {want}")


def make_sampler(temp=0.0, top_k=0, top_p=1.0, min_p=0.0):
    """logits[B, V] -> token ids[B]. Greedy when temp is 0."""
    if temp == 0:
        return lambda logits: mx.argmax(logits, axis=-1)

    def sample(logits):
        logits = logits.astype(mx.float32) / temp
        if 0 < top_k < logits.shape[-1]:
            kth = mx.sort(logits, axis=-1)[..., -top_k, None]
            logits = mx.where(logits < kth, -mx.inf, logits)
        if top_p < 1.0:
            order = mx.argsort(-logits, axis=-1)
            probs = mx.softmax(mx.take_along_axis(logits, order, axis=-1), axis=-1)
            # Keep the smallest prefix whose mass reaches top_p (always the first token).
            drop = (mx.cumsum(probs, axis=-1) - probs) >= top_p
            logits = mx.put_along_axis(logits, order, mx.where(drop, -mx.inf, mx.take_along_axis(logits, order, axis=-1)), axis=-1)
        if min_p > 0.0:
            probs = mx.softmax(logits, axis=-1)
            logits = mx.where(probs < min_p * probs.max(axis=-1, keepdims=True), -mx.inf, logits)
        return mx.random.categorical(logits)

    return sample


def apply_repetition_penalty(logits, seen, penalty):
    """CTRL penalty as in transformers: every token id already in the context
    (prompt and output, each counted once) has its logit divided by the
    penalty when positive and multiplied when negative. seen: bool[V]."""
    penalized = mx.where(logits > 0, logits / penalty, logits * penalty)
    return mx.where(seen, penalized, logits)
