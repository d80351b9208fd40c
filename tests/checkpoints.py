"""Write OpenELM checkpoints in Apple's exact Hugging Face layout (test fixtures).

Independent of the engine and of MLX: a hand-written safetensors writer, the
config.json Apple ships, per-layer sizes derived as in the reference
(/work/shared/reference/openelm.md, sections 1.2, 2.1), and random weights at
realistic scales. Shapes are PyTorch [out_features, in_features].
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------- safetensors

_ST_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round-to-nearest-even."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    bits64 = bits.astype(np.uint64)
    rounded = (bits64 + 0x7FFF + ((bits64 >> 16) & 1)) >> 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():  # keep NaN a (quiet) NaN with its sign
        out[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return out


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def round_to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 values a tensor has after being stored as `dtype`."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "F32":
        return x
    if dtype == "F16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16).astype(np.float32)
    if dtype == "BF16":
        return bf16_bits_to_f32(f32_to_bf16_bits(x))
    raise ValueError(f"unsupported dtype {dtype!r}")


def _encode(x: np.ndarray, dtype: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if dtype == "F32":
        arr = x.astype("<f4", copy=False)
    elif dtype == "F16":
        with np.errstate(over="ignore"):  # |x| > 65504 becomes inf, as in torch
            arr = x.astype("<f2")
    elif dtype == "BF16":
        arr = f32_to_bf16_bits(x).astype("<u2", copy=False)
    else:
        raise ValueError(f"unsupported dtype {dtype!r}")
    return np.ascontiguousarray(arr)


def write_safetensors(
    path,
    tensors: Mapping[str, np.ndarray],
    dtype: str,
    metadata: dict | None = None,
) -> None:
    """Write `tensors` (float arrays) to `path`, all stored as `dtype` (F32/F16/BF16).

    Layout: u64 little-endian header length N, N bytes of JSON header (space
    padded to a multiple of 8), then the raw little-endian tensor bytes.
    """
    if dtype not in _ST_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}")
    itemsize = _ST_DTYPES[dtype]
    names = sorted(tensors)
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name in names:
        shape = [int(s) for s in np.shape(tensors[name])]
        nbytes = math.prod(shape) * itemsize
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:  # one tensor at a time: no whole-file buffer
            f.write(_encode(tensors[name], dtype).tobytes())


# ---------------------------------------------------------------- configs

def make_divisible(v, divisor, min_value=None):
    """Round v to the nearest multiple of divisor, >= min_value (default divisor),
    and never more than 10% below v (reference 1.2)."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def ffn_dim(cfg: dict, i: int) -> int:
    """FFN intermediate width of layer i (proj_1 has twice this many outputs)."""
    return int(make_divisible(cfg["ffn_multipliers"][i] * cfg["model_dim"], cfg["ffn_dim_divisor"]))


def hf_config(
    *,
    layers: int,
    model_dim: int,
    head_dim: int,
    num_query_heads,
    num_kv_heads,
    ffn_multipliers,
    vocab_size: int = 32000,
    ffn_dim_divisor: int = 256,
    tied: bool = True,
    qk_norm: bool = True,
    rope_freq_constant=10000,
    torch_dtype: str = "float32",
    num_gqa_groups: int | None = None,
) -> dict:
    """A config.json dict with every field Apple's OpenELM config.json has."""
    q, kv, fm = list(num_query_heads), list(num_kv_heads), list(ffn_multipliers)
    if not (len(q) == len(kv) == len(fm) == layers):
        raise ValueError("per-layer lists must have `layers` entries")
    for a, b in zip(q, kv):
        if b <= 0 or a % b:
            raise ValueError(f"num_query_heads {a} not a multiple of num_kv_heads {b}")
    if num_gqa_groups is None:
        num_gqa_groups = q[0] // kv[0]
    return {
        "activation_fn_name": "swish",
        "architectures": ["OpenELMForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_openelm.OpenELMConfig",
            "AutoModelForCausalLM": "modeling_openelm.OpenELMForCausalLM",
        },
        "bos_token_id": 1,
        "eos_token_id": 2,
        "ffn_dim_divisor": ffn_dim_divisor,
        "ffn_multipliers": fm,
        "ffn_with_glu": True,
        "head_dim": head_dim,
        "initializer_range": 0.02,
        "max_context_length": 2048,
        "model_dim": model_dim,
        "model_type": "openelm",
        "normalization_layer_name": "rms_norm",
        "normalize_qk_projections": qk_norm,
        "num_gqa_groups": num_gqa_groups,
        "num_kv_heads": kv,
        "num_query_heads": q,
        "num_transformer_layers": layers,
        "qkv_multipliers": [0.5, 1.0],
        "rope_freq_constant": rope_freq_constant,
        "rope_max_length": 4096,
        "share_input_output_layers": tied,
        "torch_dtype": torch_dtype,
        "transformers_version": "4.39.3",
        "use_cache": True,
        "vocab_size": vocab_size,
    }


_TINY_COMMON = dict(vocab_size=512, ffn_dim_divisor=32)

# Every architecture has non-uniform heads, q/kv ratios and FFN widths per layer.
TINY: dict[str, dict] = {
    # q/kv ratios 4, 2, 4; ffn 64, 128, 192
    "tied": hf_config(layers=3, model_dim=128, head_dim=64, num_query_heads=[4, 4, 8],
                      num_kv_heads=[1, 2, 2], ffn_multipliers=[0.5, 1.0, 1.5], **_TINY_COMMON),
    # extra lm_head.weight; ffn 128, 64, 256
    "untied": hf_config(layers=3, model_dim=128, head_dim=64, num_query_heads=[4, 8, 4],
                        num_kv_heads=[2, 2, 1], ffn_multipliers=[1.0, 0.5, 2.0], tied=False,
                        **_TINY_COMMON),
    # no q_norm / k_norm keys; ffn 96, 160, 64
    "no_qk_norm": hf_config(layers=3, model_dim=128, head_dim=64, num_query_heads=[4, 4, 8],
                            num_kv_heads=[2, 1, 2], ffn_multipliers=[0.75, 1.25, 0.5],
                            qk_norm=False, **_TINY_COMMON),
    # the 3B's head_dim; ffn 64, 256, 128
    "head_dim_128": hf_config(layers=3, model_dim=128, head_dim=128, num_query_heads=[2, 4, 4],
                              num_kv_heads=[1, 1, 2], ffn_multipliers=[0.5, 2.0, 1.0],
                              **_TINY_COMMON),
    # 5 layers, q/kv ratios 1, 2, 4, 4, 1, model_dim 96 (not a power of two),
    # head_dim 32, q*head_dim up to 256 > model_dim, non-default RoPE base.
    "odd_layers": hf_config(layers=5, model_dim=96, head_dim=32, num_query_heads=[2, 4, 4, 8, 4],
                            num_kv_heads=[2, 2, 1, 2, 4],
                            ffn_multipliers=[0.5, 1.0, 1.5, 2.0, 0.75],
                            rope_freq_constant=50000, **_TINY_COMMON),
}


def with_llama_vocab(cfg: dict) -> dict:
    """cfg with the Llama-2 tokenizer's 32000-row vocabulary: for tests that load a model
    together with its tokenizer (elm_mlx.load refuses vocabularies that disagree)."""
    return {**cfg, "vocab_size": 32000}


def openelm_270m_config(torch_dtype: str = "float32") -> dict:
    """The real apple/OpenELM-270M config.json (reference 1.3 table)."""
    return hf_config(
        layers=16, model_dim=1280, head_dim=64,
        num_query_heads=[12] * 5 + [16] * 7 + [20] * 4,
        num_kv_heads=[3] * 5 + [4] * 7 + [5] * 4,
        ffn_multipliers=[0.5, 0.73, 0.97, 1.2, 1.43, 1.67, 1.9, 2.13,
                         2.37, 2.6, 2.83, 3.07, 3.3, 3.53, 3.77, 4.0],
        vocab_size=32000, ffn_dim_divisor=256, tied=True, qk_norm=True,
        rope_freq_constant=10000, torch_dtype=torch_dtype, num_gqa_groups=4,
    )


# ---------------------------------------------------------------- weights

def weight_shapes(cfg: dict) -> dict[str, tuple]:
    """HF key -> PyTorch shape, in a fixed order (reference 2.1)."""
    d, hd, V = cfg["model_dim"], cfg["head_dim"], cfg["vocab_size"]
    shapes: dict[str, tuple] = {"transformer.token_embeddings.weight": (V, d)}
    for i in range(cfg["num_transformer_layers"]):
        q, kv, f = cfg["num_query_heads"][i], cfg["num_kv_heads"][i], ffn_dim(cfg, i)
        p = f"transformer.layers.{i}."
        shapes[p + "attn_norm.weight"] = (d,)
        shapes[p + "attn.qkv_proj.weight"] = ((q + 2 * kv) * hd, d)
        if cfg["normalize_qk_projections"]:
            shapes[p + "attn.q_norm.weight"] = (hd,)
            shapes[p + "attn.k_norm.weight"] = (hd,)
        shapes[p + "attn.out_proj.weight"] = (d, q * hd)
        shapes[p + "ffn_norm.weight"] = (d,)
        shapes[p + "ffn.proj_1.weight"] = (2 * f, d)
        shapes[p + "ffn.proj_2.weight"] = (d, f)
    shapes["transformer.norm.weight"] = (d,)
    if not cfg["share_input_output_layers"]:
        shapes["lm_head.weight"] = (V, d)
    return shapes


def param_count(cfg: dict) -> int:
    return sum(math.prod(s) for s in weight_shapes(cfg).values())


def random_weights(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 weights with realistic scales (logits O(1)).

    Linear: std in_features**-0.5 (out_proj / proj_2 additionally x (2L)**-0.5);
    embeddings / lm_head: std model_dim**-0.5; norm weights: 1 + 0.1*N(0,1).
    """
    rng = np.random.default_rng(seed)
    resid = (2 * cfg["num_transformer_layers"]) ** -0.5
    out: dict[str, np.ndarray] = {}
    for name, shape in weight_shapes(cfg).items():
        w = rng.standard_normal(shape, dtype=np.float32)
        if len(shape) == 1:  # RMSNorm weight
            w *= np.float32(0.1)
            w += np.float32(1.0)
        elif name.endswith(("token_embeddings.weight", "lm_head.weight")):
            w *= np.float32(cfg["model_dim"] ** -0.5)
        else:
            std = shape[1] ** -0.5
            if name.endswith(("out_proj.weight", "proj_2.weight")):
                std *= resid
            w *= np.float32(std)
        out[name] = w
    return out


# ---------------------------------------------------------------- HF folder

GENERATION_CONFIG = {
    "_from_model_config": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "transformers_version": "4.39.3",
}


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _shard_bounds(sizes: list[int], shards: int) -> list[int]:
    """Contiguous split of len(sizes) items into `shards` non-empty runs of ~equal bytes."""
    n, total = len(sizes), sum(sizes)
    if shards > n:
        raise ValueError(f"cannot split {n} tensors into {shards} shards")
    cum = np.cumsum([0] + sizes)
    bounds = [0]
    for k in range(1, shards):
        b = int(np.searchsorted(cum, total * k / shards))
        b = max(b, bounds[-1] + 1)
        b = min(b, n - (shards - k))
        bounds.append(b)
    bounds.append(n)
    return bounds


def make_hf_checkpoint(folder, cfg: dict, weights=None, dtype: str = "F32", shards: int = 1,
                       seed: int = 0) -> dict[str, np.ndarray]:
    """Write an HF-layout OpenELM checkpoint into `folder`.

    Files: config.json, generation_config.json and model.safetensors, or for
    shards > 1 model-0000N-of-0000M.safetensors + model.safetensors.index.json.
    Returns the written weights as float32, rounded to the stored dtype.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if weights is None:
        weights = random_weights(cfg, seed)
    expected = weight_shapes(cfg)
    if set(weights) != set(expected):
        raise ValueError(f"weight keys differ from config: {set(weights) ^ set(expected)}")
    for k, s in expected.items():
        if tuple(np.shape(weights[k])) != s:
            raise ValueError(f"{k}: shape {np.shape(weights[k])} != {s}")

    _write_json(folder / "config.json", cfg)
    _write_json(folder / "generation_config.json", GENERATION_CONFIG)
    meta = {"format": "pt"}
    if shards <= 1:
        write_safetensors(folder / "model.safetensors", weights, dtype, meta)
    else:
        names = list(expected)
        itemsize = _ST_DTYPES[dtype]
        sizes = [math.prod(expected[k]) * itemsize for k in names]
        bounds = _shard_bounds(sizes, shards)
        weight_map = {}
        for j in range(shards):
            fname = f"model-{j + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: weights[k] for k in names[bounds[j]:bounds[j + 1]]}
            write_safetensors(folder / fname, part, dtype, meta)
            weight_map.update({k: fname for k in part})
        index = {"metadata": {"total_size": sum(sizes)},
                 "weight_map": dict(sorted(weight_map.items()))}
        _write_json(folder / "model.safetensors.index.json", index)
    if dtype == "F32":
        return {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}
    return {k: round_to_dtype(v, dtype) for k, v in weights.items()}
