"""load(): a folder, a preset or a hub id -> (model, tokenizer)."""

import json
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .chat_template import find_template
from .checkpoint import DTYPE_NAMES, load_weights, parse_dtype, quant_params
from .config import OpenELMConfig, read_config
from .errors import ElmError
from .hub import resolve
from .model import Model
from .tokenizer import load_tokenizer


def read_quantization(raw: dict, source: str) -> dict | None:
    """mlx-lm's "quantization" entry of config.json: {"group_size", "bits", "mode",
    optional per-module overrides}; None for an unquantized folder."""
    q = raw.get("quantization")
    if q is None:
        return None
    if not isinstance(q, dict) or not isinstance(q.get("bits"), int) or not isinstance(q.get("group_size"), int):
        raise ElmError(f"{source}: \"quantization\" must be an object with integer bits and group_size, got {q!r}")
    if q.get("mode", "affine") != "affine":
        raise ElmError(f"{source}: quantization mode {q['mode']!r} is not supported (expected 'affine')")
    return q


def quantize_modules(model: Model, quantization: dict, weights: dict) -> None:
    """Swap in quantized layers where the weights have `.scales`, with the
    per-module bits and group size, as mlx-lm's loader does."""
    def params(path, module):
        if f"{path}.scales" not in weights or not hasattr(module, "to_quantized"):
            return False
        bits, group_size = quant_params(quantization, path)
        return {"bits": bits, "group_size": group_size, "mode": "affine"}

    nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"], class_predicate=params)


def load_model(folder: Path, dtype=None) -> Model:
    """dtype None: as stored for a folder elm-mlx wrote (its dtype was chosen
    at conversion) and for quantized folders, bfloat16 for anything else.
    Never float16 by default: the 3B's activations overflow it, so a quantized
    3B stored with float16 scales computes in bfloat16 too."""
    folder = Path(folder)
    raw = read_config(folder / "config.json")
    cfg = OpenELMConfig.from_dict(raw, source=str(folder / "config.json"))
    quantization = read_quantization(raw, str(folder / "config.json"))
    dtype = parse_dtype(dtype)
    overflows_fp16 = cfg.model_dim >= 3072
    if dtype is None and "elm_mlx" not in raw and (quantization is None or overflows_fp16):
        dtype = mx.bfloat16
    if dtype is not None and dtype == mx.float16 and overflows_fp16:
        print("warning: OpenELM-3B's activations overflow float16; use bf16", file=sys.stderr)
    weights = load_weights(folder, cfg, dtype, quantization)
    model = Model(cfg)
    if quantization is not None:
        quantize_modules(model, quantization, weights)
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    return model


def load(name_or_path: str, dtype: str | None = None, tokenizer: str | None = None):
    """(model, tokenizer) from a model folder (Apple's HF layout or one
    `elm-mlx convert` wrote), a preset ("270M", "1_1B-Instruct", ...) or a hub
    id ("apple/OpenELM-3B"); hub models are downloaded and converted once.
    dtype: "bf16" (default), "fp16" or "fp32". tokenizer: a tokenizer.model
    used when the model folder has none."""
    folder = resolve(str(name_or_path), dtype, tokenizer)
    model, tok = load_model(folder, dtype), load_tokenizer(folder, tokenizer)
    check_tokenizer_json(folder, tok)
    tok.chat_template = find_template(folder, str(name_or_path))
    return model, tok


def check_tokenizer_json(folder: Path, tok) -> None:
    """mlx-lm folders written with recent transformers carry tokenizer.json and
    no tokenizer.model; the SentencePiece model then comes from --tokenizer or
    the hub copy, and must be the one tokenizer.json describes."""
    path = Path(folder) / "tokenizer.json"
    if (Path(folder) / "tokenizer.model").exists() or not path.exists():
        return
    try:
        vocab = json.loads(path.read_text())["model"]["vocab"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise ElmError(f"{path}: not a Hugging Face tokenizer.json (no model.vocab)") from None
    pieces = tok.pieces()
    differ = [p for p, i in vocab.items() if not (0 <= i < len(pieces) and pieces[i] == p)]
    if differ or len(vocab) != len(pieces):
        raise ElmError(f"{path} is not the tokenizer in {tok.path} (e.g. piece {differ[:1] or len(vocab)!r}): "
                       "this model was trained with another vocabulary; pass its tokenizer.model with --tokenizer")


def dtype_name(model: Model) -> str:
    return DTYPE_NAMES.get(model.transformer.norm.weight.dtype, str(model.transformer.norm.weight.dtype))


