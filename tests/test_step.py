"""The compiled decode step (elm_mlx/step.py) against the eager forward it
replaces: logits, greedy and sampled tokens, across cache-bucket boundaries,
and interleaved with eager multi-token forwards and trims on one cache (what
speculative decoding does)."""

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import TINY, random_weights
from engine import build

from elm_mlx.cache import KVCache, make_cache
from elm_mlx.generate import generate_tokens
from elm_mlx.step import decode_step

rng = np.random.default_rng(0)
SEQ = rng.integers(0, 512, 40).tolist()


@pytest.fixture(params=list(TINY))
def model(request):
    cfg = TINY[request.param]
    return build(cfg, random_weights(cfg, seed=2))


@pytest.fixture
def small_buckets(monkeypatch):
    """Buckets of 8 positions, so short sequences cross several boundaries."""
    monkeypatch.setattr(KVCache, "step", 8)


def eager_logits(model, ids) -> np.ndarray:
    return np.array(model(mx.array([ids]))[0])


def compiled_logits(model, cache, token: int) -> np.ndarray:
    """Logits of one compiled step (greedy; the token it picks is returned by
    the step, the logits are read from the traced forward itself)."""
    for c in cache:
        c.reserve(1, c.keys, c.values)
    offset = mx.array([cache[0].offset], mx.int32)
    logits, keys, values = mx.compile(model.decode)(mx.array([[token]]), offset, [c.keys for c in cache],
                                                    [c.values for c in cache])
    for c, k, v in zip(cache, keys, values):
        c.keys, c.values, c.offset = k, v, c.offset + 1
    return np.array(logits[0].astype(mx.float32))


def test_compiled_logits_equal_eager_across_buckets(model, small_buckets):
    ref = eager_logits(model, SEQ)
    cache = make_cache(model)
    model(mx.array([SEQ[:5]]), cache)
    for i in range(5, len(SEQ)):  # positions 5..39: buckets of 8 grow four times
        err = np.abs(compiled_logits(model, cache, SEQ[i]) - ref[i]).max()
        assert err <= 1e-5, (i, err)
    assert cache[0].capacity == 40 and all(c.offset == len(SEQ) for c in cache)


def test_compiled_step_crosses_the_default_256_bucket():
    cfg = TINY["odd_layers"]
    model = build(cfg, random_weights(cfg, seed=4))
    ids = rng.integers(0, 512, 260).tolist()
    ref = eager_logits(model, ids)
    cache = make_cache(model)
    model(mx.array([ids[:250]]), cache)
    assert cache[0].capacity == 256
    errs = [np.abs(compiled_logits(model, cache, ids[i]) - ref[i]).max() for i in range(250, 260)]
    assert max(errs) <= 1e-5 and cache[0].capacity == 512


def tokens(model, n, **kw):
    it = generate_tokens(model, SEQ[:7], **kw)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


@pytest.mark.parametrize("sampling", [
    {},
    {"repetition_penalty": 1.3},
    {"temp": 0.8, "top_p": 0.9, "top_k": 50, "min_p": 0.02, "repetition_penalty": 1.2, "seed": 7},
    {"temp": 1.3, "top_p": 0.6, "min_p": 0.1, "repetition_penalty": 0.9, "seed": 8},  # same trace, other values
])
def test_generated_tokens_equal_eager(model, small_buckets, sampling):
    assert tokens(model, 30, compile=True, **sampling) == tokens(model, 30, compile=False, **sampling)


def test_interleaved_with_eager_verify_and_trim(model, small_buckets):
    # What speculative decoding does to the target's cache: compiled steps,
    # an eager forward of several tokens, a rollback, more compiled steps.
    ids = list(SEQ[:6])
    cache = make_cache(model)
    model(mx.array([ids]), cache)

    def check(logits, upto):
        ref = eager_logits(model, ids[:upto])
        assert np.abs(logits - ref[-1]).max() <= 1e-5

    for t in SEQ[6:9]:  # compiled steps
        ids.append(t)
        check(compiled_logits(model, cache, t), len(ids))
    verify = SEQ[9:14]  # an eager verify of 5 tokens across the bucket boundary at 16
    out = np.array(model(mx.array([verify]), cache)[0])
    ids += verify
    assert np.abs(out - eager_logits(model, ids)[-5:]).max() <= 1e-5
    for c in cache:  # 3 of them rejected
        assert c.trim(3) == 3
    ids = ids[:-3]
    for t in SEQ[20:30]:  # compiled steps overwrite the rolled-back positions and grow the cache
        ids.append(t)
        check(compiled_logits(model, cache, t), len(ids))
    assert all(c.offset == len(ids) for c in cache)
    out = np.array(model(mx.array([SEQ[30:33]]), cache)[0])  # eager again after compiled steps
    ids += SEQ[30:33]
    assert np.abs(out - eager_logits(model, ids)[-3:]).max() <= 1e-5


def test_step_writes_the_cache_generate_tokens_can_continue(model, small_buckets):
    # A cache left by compiled decoding continues with the eager path, and back.
    cache = make_cache(model)
    first = generate_tokens(model, SEQ[:5], cache=cache)
    a = [next(first) for _ in range(6)]
    first.close()
    held = cache[0].offset  # the prompt, the tokens yielded and the one queued behind them
    fresh = make_cache(model)
    ref = generate_tokens(model, SEQ[:5], cache=fresh, compile=False)
    b = [next(ref) for _ in range(6)]
    ref.close()
    assert a == b and held == fresh[0].offset
    # Equal to float32 rounding, not bit for bit: the compiled step rotates by a matrix product
    # (Model.rope_matrix), which an FMA-using BLAS such as OpenBLAS rounds in the last bit where
    # mx.fast.rope does not (the reference BLAS happened to agree exactly).
    for c, f in zip(cache, fresh):
        for x, y in zip(c.state, f.state):
            assert x.shape == y.shape and np.abs(np.array(x) - np.array(y)).max() <= 1e-5


def test_traces_are_kept_per_sampling_setup(model):
    step = decode_step(model)
    assert decode_step(model, repetition_penalty=1.2) is not None
    assert len(model.__dict__["_elm_decode_steps"]) == 3  # two traces and the weights they hold
    decode_step(model, temp=0.7, top_p=0.9)
    decode_step(model, temp=0.31, top_p=0.5)  # other values, the same filters: the same trace
    assert len(model.__dict__["_elm_decode_steps"]) == 4
    cache = make_cache(model)
    y = mx.argmax(model(mx.array([SEQ[:3]]), cache)[:, -1, :], axis=-1)
    y, seen = step(y, cache, None)
    assert seen is None and y.shape == (1,) and cache[0].offset == 4


def test_quantized_weights_decode_the_same_tokens(small_buckets):
    import mlx.nn as nn

    cfg = TINY["tied"]
    model = build(cfg, random_weights(cfg, seed=5))
    nn.quantize(model, group_size=32, bits=4)
    assert tokens(model, 20) == tokens(model, 20, compile=False)


def test_bf16_compiled_logits_stay_close():
    cfg = TINY["untied"]
    model = build(cfg, random_weights(cfg, seed=6), dtype=mx.bfloat16)
    ids = SEQ[:20]
    ref = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    cache = make_cache(model)
    model(mx.array([ids[:12]]), cache)
    for i in range(12, 20):
        got = compiled_logits(model, cache, ids[i])
        assert np.abs(got.astype(np.float32) - ref[i]).max() <= 0.1


def test_new_weights_are_traced_again(small_buckets):
    cfg = TINY["untied"]
    model = build(cfg, random_weights(cfg, seed=8))
    before = tokens(model, 12)
    model.load_weights([(k, mx.array(v)) for k, v in random_weights(cfg, seed=9).items()])
    after = tokens(model, 12)
    assert after == tokens(model, 12, compile=False) and after != before


def test_the_gpu_variant_with_fused_kernels_equals_eager(small_buckets):
    # On a GPU the step uses mx.fast.rope (array offset) and SDPA with an
    # array mask; their CPU fallbacks check the same arithmetic here.
    cfg = TINY["odd_layers"]
    model = build(cfg, random_weights(cfg, seed=10))
    ref = eager_logits(model, SEQ[:30])
    cache = make_cache(model)
    model(mx.array([SEQ[:5]]), cache)
    step = mx.compile(lambda *a: model.decode(*a, fused_kernels=True))
    for i in range(5, 30):
        for c in cache:
            c.reserve(1, c.keys, c.values)
        logits, keys, values = step(mx.array([[SEQ[i]]]), mx.array([cache[0].offset], mx.int32),
                                    [c.keys for c in cache], [c.values for c in cache])
        for c, k, v in zip(cache, keys, values):
            c.keys, c.values, c.offset = k, v, c.offset + 1
        assert np.abs(np.array(logits[0]) - ref[i]).max() <= 1e-5


@pytest.mark.slow
def test_full_size_270m_compiled_logits_equal_eager():
    from elm_mlx.config import OpenELMConfig
    from elm_mlx.model import Model

    model = Model(OpenELMConfig.from_preset("270M"))
    mx.eval(model.parameters())  # random float32 weights
    ids = rng.integers(0, 32000, 24).tolist()
    ref = eager_logits(model, ids)
    cache = make_cache(model)
    model(mx.array([ids[:16]]), cache)
    errs = [np.abs(compiled_logits(model, cache, ids[i]) - ref[i]).max() for i in range(16, 24)]
    assert max(errs) <= 1e-5 * max(1.0, np.abs(ref).max()), errs


@pytest.mark.parametrize("fused", [False, True])  # the CPU's explicit RoPE/attention, and a GPU's mx.fast kernels
def test_compiled_verification_equals_the_eager_forward_across_buckets(model, small_buckets, fused):
    """speculative_tokens' fixed-width block (step.verify_block): the logits at every position of
    a block of guesses, full or shorter than the width (padded), equal the eager forward's, and
    the cache continues as the eager one does, across 8-position buckets."""
    from elm_mlx.step import verify_block

    width = 5
    ref = eager_logits(model, SEQ)
    cache = make_cache(model)
    model(mx.array([SEQ[:3]]), cache)
    verify = verify_block(model, width)
    if fused:
        compiled = mx.compile(lambda *a: model.decode(*a, fused_kernels=True))
        model.__dict__["_elm_decode_steps"]["batch"] = compiled  # the trace verify_block runs
        verify = verify_block(model, width)
    at = 3
    for n in [5, 2, 5, 1, 4, 5, 3, 5]:  # block lengths: the padding changes position by position
        logits = np.array(verify(mx.array(SEQ[at: at + n], mx.int32), cache))
        assert logits.shape == (n, ref.shape[-1])
        err = np.abs(logits - ref[at: at + n]).max()
        assert err <= 1e-5, (at, n, err)
        at += n
        assert all(c.offset == at for c in cache)
    # a rejected tail is trimmed as speculative_tokens trims it; the eager forward continues from there
    for c in cache:
        c.trim(2)
    at -= 2
    assert np.abs(np.array(model(mx.array([SEQ[at: at + 3]]), cache)[0]) - ref[at: at + 3]).max() <= 1e-5
