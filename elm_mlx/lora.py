"""LoRA and DoRA adapters for an elm-mlx Model, in mlx-lm's format.

Design decision: the adapter layers, their parameter names (lora_a [in, r],
lora_b [r, out], m [out]) and their arithmetic are mlx-lm's (mlx_lm/tuner), and
elm-mlx's module paths are the same as mlx-lm's OpenELM (transformer.layers.N.
attn.qkv_proj, ...), so an adapters.safetensors + adapter_config.json pair
written here is one mlx-lm loads, and the reverse. The layers wrap whatever
base module is there (nn.Linear, nn.QuantizedLinear for QLoRA, nn.Embedding or
nn.QuantizedEmbedding); the base stays frozen and is never copied.

The paper (CoreNet's PEFT configs) adapts the tied token embedding with LoRA
even in a DoRA run (an embedding takes no DoRA there). Training a DoRA adapter
therefore keeps a LoRAEmbedding, and saving it also writes the embedding's `m`
as the row norms of the adapted embedding: mlx-lm's DoRAEmbedding with that m
computes exactly the LoRA embedding (m / ||row|| = 1), so the file still loads
into mlx-lm unchanged. Loading a DoRA adapter for inference builds a
DoRAEmbedding (mlx-lm's arithmetic), which is right for both kinds of file.
"""

import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .errors import ElmError
from .files import atomic_write, atomic_write_text, read_text

# Short names the CLI takes -> module paths (inside a layer; the embedding is model-level).
LAYER_KEYS = {"qkv_proj": "attn.qkv_proj", "out_proj": "attn.out_proj",
              "proj_1": "ffn.proj_1", "proj_2": "ffn.proj_2"}
EMBEDDING_KEY = "transformer.token_embeddings"
SHORT_KEYS = {**LAYER_KEYS, "token_embeddings": EMBEDDING_KEY}
ADAPTER_LEAVES = ("lora_a", "lora_b", "m")
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapters.safetensors"


def _dequantized(module) -> mx.array:
    w = module.weight
    if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        w = mx.dequantize(w, module.scales, module.biases, group_size=module.group_size,
                          bits=module.bits, mode=getattr(module, "mode", "affine"))
    return w


def _dims(module) -> tuple[int, int]:
    """(rows, columns) of the base's weight as floats (a packed weight holds 32 / bits per uint32)."""
    rows, cols = module.weight.shape
    if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        cols = cols * 32 // module.bits
    return rows, cols


def _requantize(like, fused):
    if isinstance(like, nn.QuantizedLinear):
        return nn.QuantizedLinear.from_linear(fused, like.group_size, like.bits)
    if isinstance(like, nn.QuantizedEmbedding):
        return nn.QuantizedEmbedding.from_embedding(fused, like.group_size, like.bits)
    return fused


class LoRALinear(nn.Module):
    """y = base(x) + scale * (dropout(x) @ lora_a) @ lora_b; lora_b starts at zero."""

    def __init__(self, base, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        out_dims, in_dims = _dims(base)
        self.linear = base
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))

    def delta(self) -> mx.array:
        """The update of the weight [out, in]."""
        return (self.scale * self.lora_b.T) @ self.lora_a.T

    def __call__(self, x):
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b
        return self.linear(x) + (self.scale * z).astype(x.dtype)

    def fuse(self, dequantize: bool = False):
        w = _dequantized(self.linear)
        fused = nn.Linear(w.shape[1], w.shape[0], bias=False)
        fused.weight = w + self.delta().astype(w.dtype)
        return fused if dequantize else _requantize(self.linear, fused)


class DoRALinear(LoRALinear):
    """DoRA: the LoRA-updated weight's rows renormalized to a learned magnitude
    m (initialized to the base rows' norms). The norm is a constant to the
    gradient (stop_gradient), as the DoRA paper and mlx-lm do."""

    def __init__(self, base, rank: int, scale: float, dropout: float = 0.0):
        super().__init__(base, rank, scale, dropout)
        self.m = mx.linalg.norm(_dequantized(base).astype(mx.float32), axis=1)

    def __call__(self, x):
        w = _dequantized(self.linear)
        out = x @ w.T + (self.scale * ((self.dropout(x) @ self.lora_a) @ self.lora_b)).astype(x.dtype)
        denom = mx.stop_gradient(mx.linalg.norm(w + self.delta(), axis=1))
        return (self.m / denom).astype(x.dtype) * out

    def fuse(self, dequantize: bool = False):
        w = _dequantized(self.linear)
        w = w + self.delta().astype(w.dtype)
        fused = nn.Linear(w.shape[1], w.shape[0], bias=False)
        fused.weight = ((self.m / mx.linalg.norm(w, axis=1))[:, None] * w).astype(w.dtype)
        return fused if dequantize else _requantize(self.linear, fused)


class LoRAEmbedding(nn.Module):
    """The (tied) token embedding: rows E + scale * lora_a @ lora_b, both as a
    lookup and as the output head (as_linear)."""

    def __init__(self, base, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        vocab, dims = _dims(base)
        self.embedding = base
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        bound = 1 / math.sqrt(vocab)
        self.lora_a = mx.random.uniform(-bound, bound, (vocab, rank))
        self.lora_b = mx.zeros((rank, dims))

    def delta(self) -> mx.array:
        return (self.scale * self.lora_a) @ self.lora_b

    def __call__(self, x):
        y = self.embedding(x)
        z = self.dropout(self.lora_a[x] @ self.lora_b)
        return y + (self.scale * z).astype(y.dtype)

    def as_linear(self, x):
        z = (self.dropout(x) @ self.lora_b.T) @ self.lora_a.T
        return self.embedding.as_linear(x) + (self.scale * z).astype(x.dtype)

    def fuse(self, dequantize: bool = False):
        w = _dequantized(self.embedding)
        fused = nn.Embedding(*w.shape)
        fused.weight = w + self.delta().astype(w.dtype)
        return fused if dequantize else _requantize(self.embedding, fused)


class DoRAEmbedding(LoRAEmbedding):
    """mlx-lm's DoRA embedding (rows renormalized to m), for DoRA adapter files
    that carry an embedding `m` (see the module docstring)."""

    def __init__(self, base, rank: int, scale: float, dropout: float = 0.0):
        super().__init__(base, rank, scale, dropout)
        self.m = mx.linalg.norm(_dequantized(base).astype(mx.float32), axis=1)

    def __call__(self, x):
        y = self.embedding(x)
        z = self.scale * self.lora_a[x] @ self.lora_b
        out = y + self.dropout(z).astype(y.dtype)
        denom = mx.stop_gradient(mx.linalg.norm(y + z, axis=-1))
        return (self.m[x] / denom)[..., None].astype(y.dtype) * out

    def as_linear(self, x):
        out = super().as_linear(x)
        denom = mx.stop_gradient(mx.linalg.norm(_dequantized(self.embedding) + self.delta(), axis=1))
        return (self.m / denom).astype(x.dtype) * out

    def fuse(self, dequantize: bool = False):
        w = _dequantized(self.embedding)
        w = w + self.delta().astype(w.dtype)
        fused = nn.Embedding(*w.shape)
        fused.weight = ((self.m / mx.linalg.norm(w, axis=1))[:, None] * w).astype(w.dtype)
        return fused if dequantize else _requantize(self.embedding, fused)


ADAPTED = (LoRALinear, LoRAEmbedding)


def module_keys(keys) -> list[str]:
    """CLI key names (qkv_proj, ..., token_embeddings) or mlx-lm paths -> mlx-lm paths."""
    out = []
    for k in keys:
        path = SHORT_KEYS.get(k, k)
        if path not in SHORT_KEYS.values():
            raise ElmError(f"LoRA key {k!r} is not one of {', '.join(SHORT_KEYS)}")
        if path not in out:
            out.append(path)
    return out


def apply_adapters(model, fine_tune_type: str = "lora", rank: int = 8, scale: float = 20.0, dropout: float = 0.0,
                   num_layers: int = 16, keys=("qkv_proj", "out_proj", "proj_1", "proj_2"),
                   embedding_dora: bool = False):
    """Freeze the model and wrap the `keys` modules of its last `num_layers`
    layers (-1: all; the embedding whenever named) in fresh adapters, in place.
    An embedding gets DoRA only with embedding_dora (loading an mlx-lm file)."""
    if fine_tune_type not in ("lora", "dora"):
        raise ElmError(f"fine-tune type {fine_tune_type!r}: expected lora or dora")
    if not (isinstance(rank, int) and rank > 0):
        raise ElmError(f"LoRA rank {rank!r}: expected an integer >= 1")
    if not 0 <= dropout < 1:
        raise ElmError(f"LoRA dropout {dropout!r}: expected 0 <= dropout < 1")
    n = len(model.layers)
    if num_layers > n or num_layers == 0 or num_layers < -1:
        raise ElmError(f"num_layers {num_layers}: the model has {n} layers (expected 1..{n}, or -1 for all)")
    paths = module_keys(keys)
    dora = fine_tune_type == "dora"
    linear = DoRALinear if dora else LoRALinear
    embedding = DoRAEmbedding if dora and embedding_dora else LoRAEmbedding
    model.freeze()
    first = 0 if num_layers == -1 else n - num_layers
    for layer in model.layers[first:]:
        swaps = [(p, linear(m, rank, scale, dropout)) for p, m in layer.named_modules() if p in paths]
        layer.update_modules(tree_unflatten(swaps))
    if EMBEDDING_KEY in paths:
        base = model.transformer.token_embeddings
        model.transformer.token_embeddings = embedding(base, rank, scale, dropout)
    return model


def adapter_weights(model, fine_tune_type: str) -> dict:
    """The adapter's arrays by mlx-lm's names (plus the embedding's m for a DoRA
    run that kept it LoRA: see the module docstring)."""
    weights = {k: v for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] in ADAPTER_LEAVES}
    emb = model.transformer.token_embeddings
    if fine_tune_type == "dora" and isinstance(emb, LoRAEmbedding) and not isinstance(emb, DoRAEmbedding):
        w = _dequantized(emb.embedding)
        weights[EMBEDDING_KEY + ".m"] = mx.linalg.norm((w + emb.delta()).astype(mx.float32), axis=1)
    return weights


def adapter_config(fine_tune_type, rank, scale, dropout, num_layers, keys, **extra) -> dict:
    """adapter_config.json as mlx-lm writes it (what its load_adapters reads), with our extras."""
    return {"fine_tune_type": fine_tune_type, "num_layers": num_layers,
            "lora_parameters": {"rank": rank, "scale": scale, "dropout": dropout, "keys": module_keys(keys)},
            **extra}


def save_adapters(folder: Path, model, config: dict, weights_name: str = WEIGHTS_FILE) -> None:
    """Write the config and the weights atomically (a reader sees old or new files, never half)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = adapter_weights(model, config["fine_tune_type"])
    mx.eval(weights)
    atomic_write_text(folder / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    tmp = folder / f".{weights_name}.partial.safetensors"
    try:
        mx.save_safetensors(str(tmp), weights)
        atomic_write(folder / weights_name, lambda f: f.write(tmp.read_bytes()))
    finally:
        tmp.unlink(missing_ok=True)


def read_adapter_config(folder: Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise ElmError(f"adapter path {folder} is not a folder (expected one holding {CONFIG_FILE} and {WEIGHTS_FILE})")
    file = folder / CONFIG_FILE
    if not file.exists():
        raise ElmError(f"{file} is missing: an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        cfg = json.loads(read_text(file, "adapter config", 1 << 20))
    except json.JSONDecodeError as e:
        raise ElmError(f"{file}: not JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ElmError(f"{file}: expected a JSON object")
    kind = cfg.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora"):
        raise ElmError(f"{file}: fine_tune_type {kind!r} is not supported (expected lora or dora)")
    params = cfg.get("lora_parameters")
    if not isinstance(params, dict) or not all(k in params for k in ("rank", "scale")):
        raise ElmError(f"{file}: lora_parameters with rank and scale are missing")
    if not isinstance(cfg.get("num_layers"), int):
        raise ElmError(f"{file}: num_layers is missing or not an integer")
    return cfg


def load_adapters(model, folder: Path):
    """Apply the adapter in `folder` (ours or mlx-lm's) to model, in place, in
    eval mode. Every stored tensor must be an adapter parameter of this
    model with the same shape, and every adapter parameter must be stored."""
    folder = Path(folder)
    cfg = read_adapter_config(folder)
    p = cfg["lora_parameters"]
    keys = p.get("keys") or list(LAYER_KEYS.values())  # mlx-lm's default: every linear in a layer
    file = folder / WEIGHTS_FILE
    if not file.exists():
        raise ElmError(f"{file} is missing: an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        weights = mx.load(str(file))
    except Exception as e:
        raise ElmError(f"{file}: cannot read it as safetensors ({e})") from None
    try:
        apply_adapters(model, cfg.get("fine_tune_type", "lora"), p["rank"], p["scale"], p.get("dropout", 0.0),
                       cfg["num_layers"], keys, embedding_dora=True)
    except ElmError as e:
        raise ElmError(f"{folder / CONFIG_FILE}: {e}") from None
    want = {k: v.shape for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] in ADAPTER_LEAVES}
    problems = [f"{k} is not an adapter parameter of this model" for k in weights if k not in want]
    problems += [f"{k} has shape {tuple(v.shape)}, the model's is {tuple(want[k])}"
                 for k, v in weights.items() if k in want and v.shape != want[k]]
    problems += [f"{k} is missing" for k in want if k not in weights and not k.endswith(".m")]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ElmError(f"{file} does not fit this model: {problems[0]}{more}; "
                       "was it trained on another model, rank or set of keys?")
    model.load_weights(list(weights.items()), strict=False)
    model.eval()
    mx.eval(model.parameters())
    return cfg


def fuse(model, dequantize: bool = False):
    """Replace every adapter layer by a plain (or re-quantized) layer holding the adapted weight, in place."""
    swaps = [(p, m.fuse(dequantize)) for p, m in model.named_modules() if isinstance(m, ADAPTED)]
    model.update_modules(tree_unflatten(swaps))
    model.unfreeze()
    return model
