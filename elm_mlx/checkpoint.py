"""Reading OpenELM weights from a folder: Apple's HF layout (one
model.safetensors, or shards with an index), folders elm-mlx wrote and mlx-lm /
mlx-community folders, which all use the same key names (quantized ones add
`.scales`/`.biases` and a "quantization" entry in config.json). Every file is checked against the config before MLX
reads it, so a bad file fails with its name, the key and the expected shape."""

import json
import struct
from pathlib import Path

import mlx.core as mx

from .config import OpenELMConfig
from .errors import ArgumentError, ElmError
from .quant import GROUP_SIZES, STORED_BITS, module_params

# The float dtypes: (flag name, the name config.json / transformers use, MLX dtype).
DTYPES = [("bf16", "bfloat16", mx.bfloat16), ("fp16", "float16", mx.float16), ("fp32", "float32", mx.float32)]
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U32": 4, "BOOL": 1}
_FLOATS = {"F32", "F16", "BF16"}
INDEX = "model.safetensors.index.json"


def parse_dtype(name: str | None):
    """'bf16' or 'bfloat16' -> mx.bfloat16; None stays None."""
    if name is None:
        return None
    for short, long, dtype in DTYPES:
        if name in (short, long):
            return dtype
    raise ArgumentError("dtype", name, f"one of {', '.join(short for short, _, _ in DTYPES)}")


def dtype_label(dtype) -> str:
    """mx.bfloat16 -> 'bf16' (what the CLI and benchmarks print)."""
    return next((short for short, _, d in DTYPES if d == dtype), str(dtype))


def dtype_name(dtype) -> str:
    """mx.bfloat16 -> 'bfloat16' (what config.json's torch_dtype says)."""
    return next((long for _, long, d in DTYPES if d == dtype), str(dtype))


def weight_files(folder: Path) -> list:
    """The safetensors files of a checkpoint folder, in Apple's HF naming."""
    index = folder / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ElmError(f"{index}: not a safetensors index (expected a 'weight_map' object): {e}") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.exists():
                raise ElmError(f"{index} lists {f.name}, which is missing from {folder}: "
                               "the download or copy is incomplete")
        return files
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    raise ElmError(f"no weights in {folder}: expected model.safetensors, or model-0000N-of-0000M.safetensors "
                   f"shards with {INDEX}")


def read_header(path: Path) -> dict:
    """{key: (dtype, shape)} from a safetensors header, validated against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n <= 0 or n > size - 8:
            raise ElmError(f"{path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ElmError(f"{path}: not a safetensors file (header is not JSON)") from None
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            numel = 1
            for s in shape:
                numel *= s
            ok = end - start == numel * _ITEMSIZE[dtype] and 8 + n + end <= size
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ElmError(f"{path}: tensor {key!r} has a malformed or truncated entry; the file is damaged")
        tensors[key] = (dtype, shape)
    return tensors


def _quantized(key: str, shape: tuple, quantization: dict, source: str) -> dict:
    """The stored tensors of one quantized module: packed uint32 weight, scales, biases."""
    module = key.removesuffix(".weight")
    bits, group = module_params(quantization, module)
    out, inp = shape
    if bits not in STORED_BITS or group not in GROUP_SIZES or inp % group or inp * bits % 32:
        raise ElmError(f"{source}: quantization of {module} is bits={bits!r}, group_size={group!r}; expected "
                       f"bits in {STORED_BITS} and a group_size in {GROUP_SIZES} dividing its {inp} inputs")
    packed = {key: ((out, inp * bits // 32), {"U32"})}
    packed |= {f"{module}.{part}": ((out, inp // group), _FLOATS) for part in ("scales", "biases")}
    return packed


def expected_tensors(cfg: OpenELMConfig, quantization: dict | None, stored: set, source: str) -> dict:
    """{key: (shape, allowed safetensors dtypes)} for a folder. With quantization
    (mlx-lm's layout), a 2-D weight is quantized exactly when its `.scales` is stored."""
    expected = {}
    for key, shape in cfg.weight_shapes().items():
        module = key.removesuffix(".weight")
        if quantization is not None and len(shape) == 2 and f"{module}.scales" in stored:
            expected |= _quantized(key, shape, quantization, source)
        else:
            expected[key] = (shape, _FLOATS)
    return expected


def check_weights(folder: Path, cfg: OpenELMConfig, quantization: dict | None = None) -> dict:
    """{key: file} after checking every key, shape and dtype of the folder's
    safetensors headers against cfg and the quantization entry of config.json."""
    headers = {path: read_header(path) for path in weight_files(folder)}
    stored = {key for h in headers.values() for key in h}
    expected = expected_tensors(cfg, quantization, stored, str(folder / "config.json"))
    found = {}
    for path, header in headers.items():
        for key, (st_dtype, shape) in header.items():
            if key not in expected:
                hint = ""
                if key == "lm_head.weight":
                    hint = " (config.json says share_input_output_layers=true: the head is the embedding)"
                elif key.endswith((".scales", ".biases")) and quantization is None:
                    hint = " (a quantized tensor, but config.json has no \"quantization\" entry)"
                raise ElmError(f"{path}: unexpected key {key!r}{hint}; is this an OpenELM checkpoint of this config?")
            want, dtypes = expected[key]
            if shape != want:
                raise ElmError(f"{path}: {key} has shape {list(shape)}, expected {list(want)} "
                               f"from {folder / 'config.json'}")
            if st_dtype not in dtypes:
                raise ElmError(f"{path}: {key} is stored as {st_dtype}, expected {' or '.join(sorted(dtypes))}")
            found[key] = path
    missing = [k for k in expected if k not in found]
    if missing:
        files = ", ".join(p.name for p in headers)
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ElmError(f"{folder}: key {missing[0]} with shape {list(expected[missing[0]][0])} is missing "
                       f"from {files}{more}")
    return found


def load_weights(folder: Path, cfg: OpenELMConfig, dtype=None, quantization: dict | None = None) -> dict:
    """All weights as (lazy) MLX arrays, floats in `dtype` (None: as stored),
    after check_weights."""
    found = check_weights(folder, cfg, quantization)
    weights = {}
    for path in sorted(set(found.values())):
        for key, value in mx.load(str(path)).items():
            cast = dtype is not None and value.dtype != dtype and mx.issubdtype(value.dtype, mx.floating)
            weights[key] = value.astype(dtype) if cast else value
    return weights
