"""fuse: a model with an adapter -> a plain converted folder whose logits are the adapted model's.

Design decision: the adapter is folded into the weights in memory (lora.fuse:
W + scale * B^T A^T, DoRA's rows rescaled to m), then the model's own
parameters are written under their module paths, which are Apple's HF names,
so the folder is an ordinary `elm-mlx convert` output that every command (and
mlx-lm, for the float layout) loads with no adapter. A quantized base is
re-quantized with its own bits and group sizes unless dequantize; a float
base can be quantized on the way (quant). The folder appears whole or not at
all (convert's atomic_folder)."""

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from . import lora
from .checkpoint import dtype_name, parse_dtype
from .config import read_config
from .errors import ElmError


def fuse_to_folder(model, tok, source: Path, out: Path, dtype: str = "bf16", dequantize: bool = False,
                   quant: str | None = None) -> Path:
    from .chat_template import TEMPLATE_FILE, self_contained
    from .convert import OutputExists, atomic_folder, save_safetensors
    from .quant import config_entry_of, quantize_in_memory

    out = Path(out)
    if out.exists():
        raise OutputExists(f"{out} already exists: remove it or choose another -o")
    if not any(isinstance(m, lora.ADAPTED) for _, m in model.named_modules()):
        raise ElmError("fuse: the model has no adapter layers (pass --adapter-path)")
    mx_dtype = parse_dtype(dtype)
    lora.fuse(model, dequantize=dequantize)
    if quant is not None:
        if config_entry_of(model) is not None:
            raise ElmError("fuse --quant: the base is already quantized (its layers are re-quantized as they were)")
        model.set_dtype(mx_dtype)
        quantize_in_memory(model, quant)
    weights = {k: (v.astype(mx_dtype) if mx.issubdtype(v.dtype, mx.floating) else v)
               for k, v in tree_flatten(model.parameters())}
    mx.eval(weights)
    meta = {k: v for k, v in read_config(Path(source) / "config.json").items()
            if k not in ("quantization", "quantization_config")}
    name = dtype_name(mx_dtype)
    meta |= {"torch_dtype": name, "elm_mlx": {"dtype": name}}
    entry = config_entry_of(model)
    if entry is not None:
        meta |= {"quantization": entry, "quantization_config": entry}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out) as tmp:
        save_safetensors(tmp / "model.safetensors", weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "tokenizer.model").write_bytes(tok.model_bytes())
        if tok.chat_template is not None:
            (tmp / TEMPLATE_FILE).write_text(self_contained(tok.chat_template))
    return out
