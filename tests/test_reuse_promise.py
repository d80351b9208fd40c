"""What the batch engine promises a prompt partly read from a kept row (README, Serve): the
same tokens as a fresh read, greedy and seeded, and log-probabilities within
REUSE_LOGPROB_TOL. The reused positions' keys and values came from another request's
forward (other chunk shapes), so bit-identity is not promised."""

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import TINY, random_weights
from engine import REUSE_LOGPROB_TOL, build

from elm_mlx.batch import BatchEngine


@pytest.fixture(scope="module", params=list(TINY))
def model(request):
    return build(TINY[request.param], random_weights(TINY[request.param], seed=21))


def finish(engine, seq):
    records = []
    while engine.has_work():
        records += [t for t in engine.step() if t.seq is seq]
    return records


def read(engine, ids, n, **sampling):
    seq = engine.add(ids, n, logprobs=3, **sampling)
    return seq, finish(engine, seq)


@pytest.mark.parametrize("sampling", [{}, dict(temp=0.9, top_p=0.95, seed=5)], ids=["greedy", "seeded"])
def test_a_prompt_read_partly_from_a_kept_row_keeps_tokens_and_logprobs(model, sampling):
    rng = np.random.default_rng(3)
    conversation = [1] + rng.integers(3, 512, 30).tolist()
    longer = conversation + rng.integers(3, 512, 9).tolist()
    warm = BatchEngine(model, max_batch=2)
    read(warm, conversation, 6)  # leaves the conversation in a kept row
    seq, reused = read(warm, longer, 10, **sampling)
    assert seq.reused == len(conversation)  # the reuse really happened
    fresh_seq, fresh = read(BatchEngine(model, max_batch=2), longer, 10, **sampling)
    assert fresh_seq.reused == 0
    assert [t.token for t in reused] == [t.token for t in fresh]
    for a, b in zip(reused, fresh):
        assert abs(a.logprob - b.logprob) <= REUSE_LOGPROB_TOL
        assert [i for i, _ in a.top_logprobs] == [i for i, _ in b.top_logprobs]
        assert np.allclose([v for _, v in a.top_logprobs], [v for _, v in b.top_logprobs], atol=REUSE_LOGPROB_TOL,
                           rtol=0)
