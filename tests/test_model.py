"""Logits of the MLX model against two independent implementations: a float64
NumPy forward (tests/reference.py) and mlx-lm's openelm model."""

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import TINY, openelm_270m_config, random_weights
from engine import build, mlx_lm_model
from engine import logits as run
from reference import reference_logits

from elm_mlx.cache import make_cache

TOKENS = [1, 17, 300, 42, 42, 5, 511, 250, 3, 99, 128, 7]




@pytest.fixture(scope="module", params=list(TINY))
def arch(request):
    cfg = TINY[request.param]
    return cfg, random_weights(cfg, seed=1)


def test_matches_numpy_float64(arch):
    cfg, w = arch
    err = np.abs(run(build(cfg, w), TOKENS) - reference_logits(w, cfg, TOKENS)).max()
    assert err <= 1e-4, err


def test_matches_mlx_lm(arch):
    cfg, w = arch
    err = np.abs(run(build(cfg, w), TOKENS) - run(mlx_lm_model(cfg, w), TOKENS)).max()
    assert err <= 1e-4, err


def test_output_shape_and_batch_rows_are_independent(arch):
    cfg, w = arch
    model = build(cfg, w)
    batch = mx.array([TOKENS, TOKENS[::-1]])
    logits = model(batch)
    assert logits.shape == (2, len(TOKENS), cfg["vocab_size"])
    assert np.allclose(np.array(logits[1]), run(model, TOKENS[::-1]), atol=1e-5)


@pytest.mark.parametrize("chunks", [[len(TOKENS)], [1] * len(TOKENS), [5, 1, 4, 2]])
def test_cached_decoding_equals_full_forward(arch, chunks):
    cfg, w = arch
    model = build(cfg, w)
    full = run(model, TOKENS)
    cache, pieces, start = make_cache(model), [], 0
    for n in chunks:
        pieces.append(np.array(model(mx.array([TOKENS[start:start + n]]), cache))[0])
        start += n
    assert cache[0].offset == len(TOKENS)
    assert np.abs(np.concatenate(pieces) - full).max() <= 1e-5


def test_cache_grows_past_its_step_in_place():
    cfg = TINY["odd_layers"]
    model = build(cfg, random_weights(cfg))
    cache = make_cache(model)
    tokens = np.random.default_rng(0).integers(0, cfg["vocab_size"], 300).tolist()
    model(mx.array([tokens[:250]]), cache)
    before = cache[2].keys.shape[2]
    last = [model(mx.array([[t]]), cache) for t in tokens[250:]][-1]
    assert before == 256 and cache[2].keys.shape[2] == 512  # grew once, by one step
    assert cache[2].keys.shape[1] == cfg["num_kv_heads"][2]  # each layer its own KV heads
    assert np.abs(np.array(last)[0, -1] - run(model, tokens)[-1]).max() <= 1e-4


def test_bf16_stays_close_to_fp32(arch):
    # bf16 keeps 8 mantissa bits, so weights and activations round at ~4e-3
    # relative. Measured max |bf16 - fp32| here: 0.041-0.057 for logits of std
    # ~1. Bound: 0.15. Where fp32's best token leads by more than twice that,
    # bf16 must pick the same one.
    cfg, w = arch
    fp32 = run(build(cfg, w), TOKENS)
    bf16 = run(build(cfg, w, mx.bfloat16), TOKENS)
    assert np.abs(bf16 - fp32).max() <= 0.15
    top2 = np.sort(fp32, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.3
    assert (bf16.argmax(-1) == fp32.argmax(-1))[clear].all()


@pytest.mark.slow
def test_full_270m_architecture_fp32():
    cfg = openelm_270m_config()
    w = random_weights(cfg, seed=0)
    tokens = [1, 9038, 2501, 263, 931, 727, 471, 263]
    ours = build(cfg, w)
    logits = run(ours, tokens)
    assert np.abs(logits - reference_logits(w, cfg, tokens)).max() <= 1e-4
    assert np.abs(logits - run(mlx_lm_model(cfg, w), tokens)).max() <= 1e-4
    cache = make_cache(ours)
    steps = [np.array(ours(mx.array([[t]]), cache))[0, 0] for t in tokens]
    assert np.abs(np.stack(steps) - logits).max() <= 1e-4
