"""load(): a folder, a preset or a hub id -> (model, tokenizer)."""

import sys
from pathlib import Path

import mlx.core as mx

from .checkpoint import DTYPE_NAMES, load_weights, parse_dtype
from .config import OpenELMConfig, read_config
from .hub import resolve
from .model import Model
from .tokenizer import load_tokenizer


def load_model(folder: Path, dtype=None) -> Model:
    """dtype None: as stored for a folder elm-mlx wrote (its dtype was chosen
    at conversion), bfloat16 for anything else. Never float16 by default: the
    3B's activations overflow it."""
    folder = Path(folder)
    raw = read_config(folder / "config.json")
    cfg = OpenELMConfig.from_dict(raw, source=str(folder / "config.json"))
    dtype = parse_dtype(dtype)
    if dtype is None and "elm_mlx" not in raw:
        dtype = mx.bfloat16
    if dtype is not None and dtype == mx.float16 and cfg.model_dim >= 3072:
        print("warning: OpenELM-3B's activations overflow float16; use bf16", file=sys.stderr)
    model = Model(cfg)
    model.load_weights(list(load_weights(folder, cfg, dtype).items()))
    mx.eval(model.parameters())
    return model


def load(name_or_path: str, dtype: str | None = None, tokenizer: str | None = None):
    """(model, tokenizer) from a model folder (Apple's HF layout or one
    `elm-mlx convert` wrote), a preset ("270M", "1_1B-Instruct", ...) or a hub
    id ("apple/OpenELM-3B"); hub models are downloaded and converted once.
    dtype: "bf16" (default), "fp16" or "fp32". tokenizer: a tokenizer.model
    used when the model folder has none."""
    folder = resolve(str(name_or_path), dtype, tokenizer)
    return load_model(folder, dtype), load_tokenizer(folder, tokenizer)


def dtype_name(model: Model) -> str:
    return DTYPE_NAMES.get(model.transformer.norm.weight.dtype, str(model.transformer.norm.weight.dtype))


