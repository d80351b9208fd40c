"""Reading OpenELM weights from a folder: Apple's HF layout (one
model.safetensors, or shards with an index), folders elm-mlx wrote and mlx-lm /
mlx-community folders, which all use the same key names (quantized ones add
`.scales`/`.biases` and a "quantization" entry in config.json). Every file is checked against the config before MLX
reads it, so a bad file fails with its name, the key and the expected shape."""

import json
import math
import struct
from pathlib import Path

import mlx.core as mx

from .config import OpenELMConfig
from .errors import ArgumentError, ElmError, quoted
from .files import describe_os_error, member_name, read_text, regular_file
from .quant import GROUP_SIZES, STORED_BITS, module_params

# The float dtypes: (flag name, the name config.json / transformers use, MLX dtype).
DTYPES = [("bf16", "bfloat16", mx.bfloat16), ("fp16", "float16", mx.float16), ("fp32", "float32", mx.float32)]
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U32": 4, "BOOL": 1}
_FLOATS = {"F32", "F16", "BF16"}
INDEX = "model.safetensors.index.json"
HEADER_LIMIT = 100 << 20  # what the safetensors format itself allows
INDEX_LIMIT = 64 << 20


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
    """The safetensors files of a checkpoint folder, in Apple's HF naming: regular
    files inside the folder only."""
    index = folder / INDEX
    if index.exists() or index.is_symlink():
        text = read_text(index, "safetensors index (JSON)", INDEX_LIMIT)
        try:
            weight_map = json.loads(text)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, RecursionError) as e:
            raise ElmError(f"{index}: not a safetensors index (expected a 'weight_map' object): "
                           f"{quoted(str(e))}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in weight_map.items()):
            raise ElmError(f"{index}: 'weight_map' must be an object of tensor name -> file name strings, "
                           f"got {quoted(weight_map)}")
        files = [member_name(folder, name, str(index)) for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.exists():
                raise ElmError(f"{index} lists {f.name}, which is missing from {folder}: "
                               "the download or copy is incomplete")
            regular_file(f, "safetensors file")
        return files
    single = folder / "model.safetensors"
    if single.exists() or single.is_symlink():
        return [regular_file(single, "safetensors file")]
    if not folder.is_dir():
        raise ElmError(f"{folder}: not a folder")
    raise ElmError(f"no weights in {folder}: expected model.safetensors, or model-0000N-of-0000M.safetensors "
                   f"shards with {INDEX}")


def _nonneg_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_header(path: Path) -> dict:
    """{key: (dtype, shape)} from a safetensors header, validated against the file
    size: everything MLX will trust (offsets, shapes, dtypes) is checked here."""
    regular_file(path, "safetensors file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if n <= 0 or n > size - 8 or n > HEADER_LIMIT:
                raise ElmError(f"{path}: not a safetensors file (bad header length)")
            raw = f.read(n)
    except OSError as e:
        raise ElmError(f"{path}: cannot read it ({describe_os_error(e)})") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ElmError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise ElmError(f"{path}: not a safetensors file (the header is a JSON {type(header).__name__}, "
                       "expected an object)")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ElmError(f"{path}: not a safetensors file (__metadata__ must be an object of strings, "
                       f"got {quoted(meta)})")
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            ok = (isinstance(dtype, str) and dtype in _ITEMSIZE and isinstance(shape, list)
                  and all(_nonneg_int(s) for s in shape) and isinstance(offsets, list) and len(offsets) == 2
                  and all(_nonneg_int(o) for o in offsets))
            if ok:
                (start, end), numel = offsets, math.prod(shape)
                ok = start <= end and end - start == numel * _ITEMSIZE[dtype] and 8 + n + end <= size
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ElmError(f"{path}: tensor {quoted(key)} has a malformed or truncated entry; the file is damaged")
        tensors[key] = (dtype, tuple(shape))
    return tensors


def _quantized(key: str, shape: tuple, quantization: dict, source: str) -> dict:
    """The stored tensors of one quantized module: packed uint32 weight, scales, biases."""
    module = key.removesuffix(".weight")
    bits, group = module_params(quantization, module)
    out, inp = shape
    if bits not in STORED_BITS or group not in GROUP_SIZES or inp % group or inp * bits % 32:
        raise ElmError(f"{source}: quantization of {module} is bits={quoted(bits)}, group_size={quoted(group)}; expected "
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
                raise ElmError(f"{path}: unexpected key {quoted(key)}{hint}; is this an OpenELM checkpoint of this config?")
            want, dtypes = expected[key]
            if shape != want:
                raise ElmError(f"{path}: {key} has shape {quoted(list(shape))}, expected {list(want)} "
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
        try:
            arrays = mx.load(str(path))
        except (RuntimeError, ValueError, OSError) as e:  # checked above, so: changed or unreadable since
            raise ElmError(f"{path}: MLX could not read it ({quoted(str(e), 200)})") from None
        for key, value in arrays.items():
            cast = dtype is not None and value.dtype != dtype and mx.issubdtype(value.dtype, mx.floating)
            weights[key] = value.astype(dtype) if cast else value
    return weights
