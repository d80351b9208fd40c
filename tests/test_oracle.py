"""Checks of the test oracle itself: checkpoint writer, HF layout, float64 forward.

The NumPy forward (tests/reference.py) is cross-checked against mlx-lm's
independent MLX OpenELM implementation before the engine is compared with it.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import (
    TINY,
    ffn_dim,
    make_divisible,
    make_hf_checkpoint,
    openelm_270m_config,
    param_count,
    random_weights,
    weight_shapes,
    write_safetensors,
)
from reference import reference_logits
from safetensors import safe_open
from safetensors.numpy import load_file

TOKENS = [1, 17, 300, 5, 511, 42, 42, 7, 256, 3, 99, 2]


def _mlx_lm_logits(folder, tokens) -> np.ndarray:
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(folder))
    out = model(mx.array([list(tokens)]))
    return np.array(out[0].astype(mx.float32), dtype=np.float64)


def _sample_tensors(rng):
    special = np.array(
        [0.0, -0.0, 1.0, -2.5, 1e-8, -3e-41, 65504.0, 1e30, np.inf, -np.inf,
         # float32 values exactly half-way between two bf16 values (ties to even)
         np.uint32(0x3F808000).view(np.float32), np.uint32(0x3F818000).view(np.float32),
         np.uint32(0xBF808000).view(np.float32), np.uint32(0x3F80FFFF).view(np.float32)],
        dtype=np.float32)
    return {
        "a.weight": rng.standard_normal((7, 5), dtype=np.float32),
        "b": rng.standard_normal((3,), dtype=np.float32) * 100,
        "scalar_like": rng.standard_normal((1, 1, 2), dtype=np.float32),
        "special": special,
    }


# ---------------------------------------------------------------- writer

def test_safetensors_header_layout(tmp_path):
    t = _sample_tensors(np.random.default_rng(0))
    path = tmp_path / "x.safetensors"
    write_safetensors(path, t, "F16", metadata={"format": "pt"})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"] == {"format": "pt"}
    end = 0
    for k, v in t.items():
        assert header[k]["dtype"] == "F16" and header[k]["shape"] == list(v.shape)
        a, b = header[k]["data_offsets"]
        assert b - a == v.size * 2
        end = max(end, b)
    assert len(raw) == 8 + n + end


@pytest.mark.parametrize("dtype", ["F32", "F16"])
def test_writer_roundtrip_safetensors_lib(tmp_path, dtype):
    t = _sample_tensors(np.random.default_rng(1))
    t.pop("special") if dtype == "F16" else None  # F16 overflows 1e30 by design
    path = tmp_path / "x.safetensors"
    write_safetensors(path, t, dtype, metadata={"format": "pt", "n": 3})
    back = load_file(path)
    with safe_open(path, "np") as f:
        assert f.metadata() == {"format": "pt", "n": "3"}
    assert set(back) == set(t)
    for k, v in t.items():
        if dtype == "F32":
            assert back[k].dtype == np.float32
            np.testing.assert_array_equal(back[k], v)
        else:
            assert back[k].dtype == np.float16
            np.testing.assert_array_equal(back[k], v.astype(np.float16))
            np.testing.assert_allclose(back[k].astype(np.float32), v, rtol=2 ** -11, atol=1e-7)


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_writer_roundtrip_mlx(tmp_path, dtype):
    t = _sample_tensors(np.random.default_rng(2))
    if dtype == "F16":
        t.pop("special")
    path = tmp_path / "x.safetensors"
    write_safetensors(path, t, dtype)
    back = mx.load(str(path))
    want = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16}[dtype]
    assert set(back) == set(t)
    for k, v in t.items():
        assert back[k].dtype == want and tuple(back[k].shape) == v.shape
        got = np.array(back[k].astype(mx.float32))
        if dtype == "F32":
            np.testing.assert_array_equal(got, v)
        else:
            rtol = 2 ** -11 if dtype == "F16" else 2 ** -8
            finite = np.isfinite(v)
            np.testing.assert_allclose(got[finite], v[finite], rtol=rtol, atol=1e-7)
            np.testing.assert_array_equal(got[~finite], v[~finite])
        if dtype == "BF16":
            # bit-identical to MLX's own float32 -> bfloat16 cast (round to nearest even)
            ours = np.array(back[k].view(mx.uint16))
            theirs = np.array(mx.array(v).astype(mx.bfloat16).view(mx.uint16))
            np.testing.assert_array_equal(ours, theirs)


def test_bf16_ties_round_to_even(tmp_path):
    v = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF], dtype=np.uint32).view(np.float32)
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"v": v}, "BF16")
    bits = np.array(mx.load(str(path))["v"].view(mx.uint16))
    np.testing.assert_array_equal(bits, np.array([0x3F80, 0x3F82, 0x3F81, 0x3F80], dtype=np.uint16))


# ---------------------------------------------------------------- configs / shapes

CONFIG_FIELDS = {
    "activation_fn_name", "architectures", "auto_map", "bos_token_id", "eos_token_id",
    "ffn_dim_divisor", "ffn_multipliers", "ffn_with_glu", "head_dim", "initializer_range",
    "max_context_length", "model_dim", "model_type", "normalization_layer_name",
    "normalize_qk_projections", "num_gqa_groups", "num_kv_heads", "num_query_heads",
    "num_transformer_layers", "qkv_multipliers", "rope_freq_constant", "rope_max_length",
    "share_input_output_layers", "torch_dtype", "transformers_version", "use_cache", "vocab_size",
}


@pytest.mark.parametrize("name", sorted(TINY) + ["270M"])
def test_config_fields(name):
    cfg = openelm_270m_config() if name == "270M" else TINY[name]
    assert set(cfg) == CONFIG_FIELDS
    L = cfg["num_transformer_layers"]
    assert len(cfg["num_query_heads"]) == len(cfg["num_kv_heads"]) == len(cfg["ffn_multipliers"]) == L
    # OpenELM's point: per-layer heads and FFN widths are not uniform
    assert len(set(cfg["num_query_heads"])) > 1 and len(set(ffn_dim(cfg, i) for i in range(L))) > 1
    if name != "270M":
        assert len({q // kv for q, kv in zip(cfg["num_query_heads"], cfg["num_kv_heads"])}) > 1
        assert param_count(cfg) * 4 < 3e6  # tiny (fp32 < 3 MB): fast to write, load and run


def test_make_divisible():
    assert make_divisible(640, 256) == 768    # 270M layer 0 ffn (0.5 * 1280)
    assert make_divisible(934.4, 256) == 1024
    assert make_divisible(10, 256) == 256     # never below divisor
    assert make_divisible(1150, 256) == 1280  # round-down by >10% is bumped (1024 < 1035)
    assert make_divisible(7, 8, min_value=16) == 16


def test_270m_matches_reference_tables():
    cfg = openelm_270m_config()
    assert [ffn_dim(cfg, i) for i in range(16)] == [
        768, 1024, 1280, 1536, 1792, 2048, 2560, 2816, 3072, 3328, 3584, 3840, 4352, 4608, 4864, 5120]
    # the stored lists equal the derivation of reference 1.2
    alphas = [round(float(v), 2) for v in np.linspace(0.5, 1.0, num=16, dtype=float)]
    betas = [round(float(v), 2) for v in np.linspace(0.5, 4.0, num=16)]
    q = [int(make_divisible(1280 * a, 64 * 4)) // 64 for a in alphas]
    assert cfg["num_query_heads"] == q
    assert cfg["num_kv_heads"] == [h // 4 for h in q]
    assert cfg["ffn_multipliers"] == betas
    shapes = weight_shapes(cfg)
    assert shapes["transformer.layers.12.attn.qkv_proj.weight"] == (1920, 1280)
    assert shapes["transformer.layers.15.ffn.proj_1.weight"] == (10240, 1280)
    assert "lm_head.weight" not in shapes


def test_270m_param_count_from_shapes():
    cfg = openelm_270m_config()
    shapes = weight_shapes(cfg)  # no weights generated
    total = sum(math.prod(s) for s in shapes.values())
    assert total == param_count(cfg) == 271_527_168
    assert total - math.prod(shapes["transformer.token_embeddings.weight"]) == 230_567_168
    assert sum(math.prod(s) for s in shapes.values() if len(s) == 1) == 44_288
    assert len(shapes) == 1 + 16 * 8 + 1


def test_key_sets_per_variant():
    assert "lm_head.weight" in weight_shapes(TINY["untied"])
    assert "lm_head.weight" not in weight_shapes(TINY["tied"])
    assert not any("q_norm" in k or "k_norm" in k for k in weight_shapes(TINY["no_qk_norm"]))
    assert "transformer.layers.0.attn.k_norm.weight" in weight_shapes(TINY["tied"])


def test_random_weights_scales():
    cfg = TINY["tied"]
    w = random_weights(cfg, seed=0)
    assert all(v.dtype == np.float32 for v in w.values())
    assert {k: v.shape for k, v in w.items()} == weight_shapes(cfg)
    norm = w["transformer.layers.0.attn_norm.weight"]
    assert abs(norm.mean() - 1) < 0.05 and 0.05 < norm.std() < 0.15
    qkv = w["transformer.layers.0.attn.qkv_proj.weight"]
    assert abs(qkv.std() - 128 ** -0.5) < 0.01
    p2 = w["transformer.layers.2.ffn.proj_2.weight"]
    assert abs(p2.std() - 192 ** -0.5 * 6 ** -0.5) < 0.01
    w2 = random_weights(cfg, seed=0)
    assert all(np.array_equal(w[k], w2[k]) for k in w)
    assert not np.array_equal(qkv, random_weights(cfg, seed=1)["transformer.layers.0.attn.qkv_proj.weight"])


# ---------------------------------------------------------------- HF folder layout

def test_single_file_layout(tmp_path):
    cfg = TINY["untied"]
    written = make_hf_checkpoint(tmp_path, cfg, dtype="BF16")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text()) == cfg
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {
        "_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2,
        "transformers_version": "4.39.3"}
    with safe_open(tmp_path / "model.safetensors", "np") as f:
        assert f.metadata() == {"format": "pt"}
    loaded = mx.load(str(tmp_path / "model.safetensors"))
    assert set(loaded) == set(written) == set(weight_shapes(cfg))
    for k, v in written.items():  # returned weights are exactly what was stored
        assert loaded[k].dtype == mx.bfloat16
        np.testing.assert_array_equal(np.array(loaded[k].astype(mx.float32)), v)


def test_sharded_layout(tmp_path):
    cfg = TINY["odd_layers"]
    written = make_hf_checkpoint(tmp_path, cfg, dtype="F16", shards=3)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert files == [f"model-0000{j}-of-00003.safetensors" for j in (1, 2, 3)]
    assert not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"}
    wm = index["weight_map"]
    assert set(wm) == set(weight_shapes(cfg)) and set(wm.values()) == set(files)
    total = 0
    for fname in files:
        with safe_open(tmp_path / fname, "np") as f:
            keys = set(f.keys())
            assert keys == {k for k, v in wm.items() if v == fname}
            for k in keys:
                t = f.get_tensor(k)
                assert t.dtype == np.float16
                np.testing.assert_array_equal(t.astype(np.float32), written[k])
                total += t.nbytes
    assert index["metadata"]["total_size"] == total == param_count(cfg) * 2


def test_sharded_equals_single(tmp_path):
    cfg = TINY["tied"]
    make_hf_checkpoint(tmp_path / "one", cfg)
    make_hf_checkpoint(tmp_path / "three", cfg, shards=3)
    np.testing.assert_array_equal(_mlx_lm_logits(tmp_path / "one", TOKENS),
                                  _mlx_lm_logits(tmp_path / "three", TOKENS))


# ---------------------------------------------------------------- forward vs mlx-lm


@pytest.mark.parametrize("name", sorted(TINY))
def test_reference_matches_mlx_lm(tmp_path, name):
    cfg = TINY[name]
    weights = make_hf_checkpoint(tmp_path, cfg, seed=3)
    ref = reference_logits(weights, cfg, TOKENS)
    assert ref.shape == (len(TOKENS), cfg["vocab_size"]) and ref.dtype == np.float64
    assert 0.3 < ref.std() < 3.0  # O(1), non-trivial logits
    got = _mlx_lm_logits(tmp_path, TOKENS)
    err = float(np.max(np.abs(ref - got)))
    print(f"{name}: max abs err {err:.3g}")
    assert err <= 1e-4


def test_reference_is_sensitive():
    """The comparison above would catch a dropped norm weight or a wrong RoPE base."""
    cfg = TINY["odd_layers"]
    w = random_weights(cfg, seed=3)
    base = reference_logits(w, cfg, TOKENS)
    w2 = dict(w, **{"transformer.layers.1.attn.k_norm.weight": np.ones(32, np.float32)})
    assert np.max(np.abs(reference_logits(w2, cfg, TOKENS) - base)) > 1e-2
    assert np.max(np.abs(reference_logits(w, dict(cfg, rope_freq_constant=10000), TOKENS) - base)) > 1e-2
    # causality: logits at position t do not depend on later tokens
    np.testing.assert_allclose(reference_logits(w, cfg, TOKENS[:5]), base[:5], rtol=0, atol=1e-12)


@pytest.mark.slow
def test_270m_reference_matches_mlx_lm(tmp_path):
    cfg = openelm_270m_config()
    weights = make_hf_checkpoint(tmp_path, cfg, seed=0)
    tokens = [1, 450, 4996, 17354, 1701, 31999]
    ref = reference_logits(weights, cfg, tokens)
    del weights
    got = _mlx_lm_logits(tmp_path, tokens)
    err = float(np.max(np.abs(ref - got)))
    print(f"270M: max abs err {err:.3g}, logits std {ref.std():.3g}")
    assert 0.3 < ref.std() < 3.0
    assert err <= 1e-4
