"""Turning logits into the next token, with Hugging Face's semantics and order:
a structured-output mask first (tokens a grammar forbids go to -inf), then the
repetition penalty (then OpenAI's frequency and presence penalties), then
temperature, top-k, top-p, min-p, then a draw.

The mask is the one hook structured output has into every decode path (eager,
compiled, batched): a sequence's `constraint` says which tokens may come next
(`allowed()`: bool [vocab] as an mx.array) and is told each token drawn
(`advance(token)`). Every engine applies `apply_allowed` before any other
transform, and calls `SequenceSampler.accept` with the token as a Python int.

Each sequence draws from its own random key, made from its seed and split once
per token (`SequenceSampler`), never from MLX's global generator: a sequence
then gets the same tokens for the same seed whether it runs alone
(`generate_tokens`) or batched beside others (`elm_mlx.batch`)."""

import math
from dataclasses import dataclass

import mlx.core as mx

from .errors import ArgumentError, is_integer


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
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self):
        for name, ok, want in [
            ("temp", _number(self.temp) and 0 <= self.temp <= 2, "a number in [0, 2] (0 means greedy)"),
            ("top_k", is_integer(self.top_k) and self.top_k >= 0, "an integer >= 0 (0 means off)"),
            ("top_p", _number(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1] (1 means off)"),
            ("min_p", _number(self.min_p) and 0 <= self.min_p < 1, "a number in [0, 1) (0 means off)"),
            ("repetition_penalty", _number(self.repetition_penalty) and self.repetition_penalty > 0,
             "a number > 0 (1 means off; Apple suggests 1.2)"),
            ("frequency_penalty", _number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             "a number in [-2, 2] (0 means off)"),
            ("presence_penalty", _number(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             "a number in [-2, 2] (0 means off)"),
            ("seed", self.seed is None or (is_integer(self.seed) and 0 <= self.seed < SEED_LIMIT),
             f"an integer from 0 to {SEED_LIMIT - 1}"),
        ]:
            if not ok:
                raise ArgumentError(name, getattr(self, name), want)


def _number(v) -> bool:
    return (is_integer(v) or isinstance(v, float)) and math.isfinite(v)


def make_filter(temp, top_k=0, top_p=1.0, min_p=0.0, values=None):
    """logits[B, V] -> float32 logits / temp with the tokens top-k, top-p and min-p drop at -inf
    (temp > 0). values: arrays standing in for (temp, top_p, min_p) in the arithmetic while the
    numbers pick which filters run, so that a compiled step (elm_mlx/step.py) traces once for
    every temperature instead of once per value."""
    t, p, m = (temp, top_p, min_p) if values is None else values

    def filter_(logits):
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

    return filter_


def make_sampler(temp=0.0, top_k=0, top_p=1.0, min_p=0.0, values=None):
    """(logits[B, V], key=None) -> token ids[B]. Greedy when temp is 0; without a key
    the draw uses MLX's global generator. values: as make_filter's."""
    if temp == 0:
        return lambda logits, key=None: mx.argmax(logits, axis=-1)
    filter_ = make_filter(temp, top_k, top_p, min_p, values)
    return lambda logits, key=None: mx.random.categorical(filter_(logits), key=key)


def apply_repetition_penalty(logits, seen, penalty):
    """CTRL penalty as in transformers: every token id already in the context
    (prompt and output, each counted once) has its logit divided by the
    penalty when positive and multiplied when negative. seen: bool[V]."""
    penalized = mx.where(logits > 0, logits / penalty, logits * penalty)
    return mx.where(seen, penalized, logits)


def apply_frequency_presence(logits, counts, frequency, presence):
    """OpenAI's penalties: logit[j] -= frequency * c[j] + presence * (c[j] > 0), c[j] being how
    often token j was generated so far (the output only, as OpenAI and vLLM count)."""
    return logits - (frequency * counts + presence * (counts > 0))


def apply_allowed(logits, allowed):
    """logits with every token outside `allowed` (bool [V] or [B, V]) at -inf; None: unchanged.
    Applied before the penalties and filters, so they only ever see allowed tokens."""
    return logits if allowed is None else mx.where(allowed, logits, -mx.inf)


def log_softmax(logits):
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def seen_mask(ids, vocab_size: int):
    """The repetition penalty's set: bool[vocab], True for every id in `ids`."""
    seen = mx.zeros((vocab_size,), mx.bool_)
    if len(ids):
        seen[mx.array(list(ids))] = True
    return seen


def penalize(logits, seen, counts, repetition_penalty, frequency_penalty=0.0, presence_penalty=0.0):
    """The penalties, in HF's order, for whichever state is kept (None: that penalty is off)."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if counts is not None:
        logits = apply_frequency_presence(logits, counts, frequency_penalty, presence_penalty)
    return logits


class SequenceSampler:
    """One sequence's sampling: its penalties' state (ids seen, output counts), its random key
    and its constraint (None, or an object with allowed() -> bool [V] and advance(token)).

    `sampler(logits[1, V]) -> (token[1], logits after every transform)`: the second is
    what `log_softmax` turns into the logprobs a server reports. With seed None the
    key comes from MLX's global generator (so `mx.random.seed` still decides)."""

    def __init__(self, vocab_size: int, context=(), *, temp=0.0, top_k=0, top_p=1.0, min_p=0.0,
                 repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0, seed=None,
                 constraint=None):
        self.constraint = constraint
        self.seen = seen_mask(context, vocab_size) if repetition_penalty != 1.0 else None
        self.counts = mx.zeros((vocab_size,), mx.float32) if (frequency_penalty or presence_penalty) else None
        self.repetition_penalty = repetition_penalty
        self.frequency_penalty, self.presence_penalty = frequency_penalty, presence_penalty
        self.filter = make_filter(temp, top_k, top_p, min_p) if temp > 0 else None
        if self.filter is None:
            self.key = None
        elif seed is None:
            self.key = mx.random.randint(0, 2**31 - 1, (2,)).astype(mx.uint32)
        else:
            self.key = mx.random.key(seed)

    def allowed(self):
        """The mask for the next token (bool [V]), None without a constraint."""
        return None if self.constraint is None else self.constraint.allowed()

    def accept(self, token: int):
        """Told by the engine which token was drawn (a Python int): the constraint moves on."""
        if self.constraint is not None:
            self.constraint.advance(token)

    def transform(self, logits, allowed=None):
        logits = apply_allowed(logits, allowed)
        logits = penalize(logits, self.seen, self.counts, self.repetition_penalty, self.frequency_penalty,
                          self.presence_penalty)
        return logits.astype(mx.float32) if self.filter is None else self.filter(logits)

    def next_key(self):
        """The key for this token's draw (None when greedy); the sequence's key moves on."""
        if self.key is None:
            return None
        self.key, key = mx.random.split(self.key)
        return key

    def __call__(self, logits):
        logits = self.transform(logits, self.allowed())
        if self.filter is None:
            y = mx.argmax(logits, axis=-1)
        else:
            y = mx.random.categorical(logits, key=self.next_key())
        if self.seen is not None:
            self.seen[y] = True
        if self.counts is not None:
            self.counts = self.counts.at[y].add(1.0)
        return y, logits
