"""The structured-output hook (sample.py): a sequence's constraint masks the logits before
every other transform in each decode path (eager, compiled, batched), and is told every
token drawn. A constraint here is a fixed schedule of allowed sets, so the expected tokens
are the argmax (or draws) over the masked float64 reference logits."""

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import TINY, random_weights
from engine import build

from elm_mlx.batch import BatchEngine
from elm_mlx.generate import generate_tokens

PROMPT = [1, 17, 99, 3, 250, 8]


class Schedule:
    """Token n may be only one of sets[n % len(sets)]; records what it was told."""

    def __init__(self, vocab: int, sets: list[list[int]]):
        self.masks = []
        for s in sets:
            m = np.zeros(vocab, bool)
            m[s] = True
            self.masks.append(m)
        self.told = []

    def allowed(self):
        return mx.array(self.masks[len(self.told) % len(self.masks)])

    def advance(self, token: int):
        self.told.append(token)


def sets_for(vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [sorted(rng.choice(vocab, size=int(rng.integers(1, 6)), replace=False).tolist()) for _ in range(5)]


def masked_greedy(model, prompt, schedule_sets, n) -> list[int]:
    """The reference: full eager forwards over the whole text, argmax over the allowed set."""
    ids, out = list(prompt), []
    for i in range(n):
        logits = np.array(model(mx.array([ids]))[0, -1].astype(mx.float32), dtype=np.float64)
        allowed = schedule_sets[i % len(schedule_sets)]
        token = allowed[int(np.argmax(logits[allowed]))]
        out.append(token)
        ids.append(token)
    return out


@pytest.fixture(params=list(TINY)[:3])
def model(request):
    cfg = TINY[request.param]
    return build(cfg, random_weights(cfg, seed=4))


@pytest.mark.parametrize("compile", [True, False])
def test_generate_tokens_keeps_to_the_mask(model, compile):
    vocab = model.config.vocab_size
    sets = sets_for(vocab, 0)
    c = Schedule(vocab, sets)
    gen = generate_tokens(model, PROMPT, constraint=c, compile=compile)
    got = [next(gen) for _ in range(12)]
    gen.close()
    assert got == masked_greedy(model, PROMPT, sets, 12)
    assert c.told == got


def test_sampled_tokens_stay_inside_the_mask(model):
    vocab = model.config.vocab_size
    sets = sets_for(vocab, 1)
    c = Schedule(vocab, sets)
    gen = generate_tokens(model, PROMPT, constraint=c, temp=1.5, seed=3, repetition_penalty=1.3)
    got = [next(gen) for _ in range(15)]
    assert all(t in sets[i % len(sets)] for i, t in enumerate(got))


def test_batch_engine_masks_its_row_only(model):
    vocab = model.config.vocab_size
    sets = sets_for(vocab, 2)
    c = Schedule(vocab, sets)
    engine = BatchEngine(model, max_batch=4)
    constrained = engine.add(PROMPT, 10, constraint=c)
    free = engine.add(PROMPT[::-1], 10)
    while engine.has_work():
        engine.step()
    assert constrained.tokens == masked_greedy(model, PROMPT, sets, 10) == c.told
    alone = generate_tokens(model, PROMPT[::-1])
    assert free.tokens == [next(alone) for _ in range(10)]
