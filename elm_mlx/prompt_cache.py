"""Prompt cache files: a KV cache kept on disk, so that a long prompt (or a
chat's history) is read once and reused by the next run.

One safetensors file: per layer the keys and values of the positions held,
and metadata saying what they belong to: the model folder, a fingerprint of
its weight files (name, size, mtime), the compute dtype, the tokenizer's
sha256 and the token ids held (plus, for chat, the conversation). A file made
for another model, dtype or tokenizer is refused, never silently reused; a
damaged one is an ElmError. Loading reads arrays only (safetensors runs no
code). Writes go to a temporary file renamed at the end, so an interrupted
save leaves the old file whole. What is reused is the longest prefix the new
prompt shares with the ids held (context.CachedContext).
"""

import hashlib
import json
from pathlib import Path

import mlx.core as mx

from .checkpoint import dtype_label, weight_files
from .context import CachedContext
from .errors import ElmError
from .files import atomic_write

FORMAT = "elm-mlx prompt cache 1"
IDENTITY = ("model", "weights", "dtype", "tokenizer")  # what must match for a file to be reused


def identity(folder: Path, model, tokenizer) -> dict:
    """What a cache file must have been made with: the model folder, its weight
    files (path + size + mtime, hashed: cheap, and changes when they do), the
    dtype, the tokenizer file's sha256."""
    folder = Path(folder).resolve()
    files = sorted(weight_files(folder)) or sorted(folder.glob("*.safetensors"))
    stamp = hashlib.sha256()
    for f in files:
        st = f.stat()
        stamp.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return {"model": str(folder), "weights": stamp.hexdigest()[:16], "dtype": dtype_label(model.dtype),
            "tokenizer": hashlib.sha256(Path(tokenizer.path).read_bytes()).hexdigest()[:16]}


def save(path, context: CachedContext, ident: dict, extra: dict | None = None):
    """Writes what `context` holds (its ids and KV arrays) to `path`, atomically."""
    path = Path(path)
    n = min([len(context.ids)] + [c.offset for c in context.cache])
    arrays = {}
    for i, c in enumerate(context.cache):
        if n:
            keys, values = c.state
            arrays[f"layers.{i}.keys"], arrays[f"layers.{i}.values"] = keys[..., :n, :], values[..., :n, :]
    metadata = {"format": FORMAT, **ident, "token_ids": json.dumps(context.ids[:n]),
                "extra": json.dumps(extra or {})}
    atomic_write(path, lambda f: mx.save_safetensors(f, arrays, metadata=metadata))


def load(path, context: CachedContext, ident: dict) -> dict:
    """Fills `context` from `path` (nothing when it does not exist) and returns
    the file's extra data. Raises ElmError when the file is damaged or was made
    for another model, dtype or tokenizer."""
    path = Path(path)
    if path.is_dir():
        raise ElmError(f"--prompt-cache {path} is a folder: expected a file name (such as {path / 'cache.safetensors'})")
    if not path.parent.is_dir():
        raise ElmError(f"--prompt-cache {path}: the folder {path.parent} does not exist; create it first "
                       "(a prompt cache is never given new folders)")
    if not path.exists():
        return {}
    try:
        arrays, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
    except Exception as e:  # MLX reports a damaged file as RuntimeError/ValueError
        raise ElmError(f"--prompt-cache {path}: not a readable prompt cache ({e}); delete it to start afresh") from None
    if metadata.get("format") != FORMAT:
        raise ElmError(f"--prompt-cache {path}: not an elm-mlx prompt cache (format {metadata.get('format')!r}, "
                       f"expected {FORMAT!r})")
    for key in IDENTITY:
        if metadata.get(key) != ident[key]:
            raise ElmError(f"--prompt-cache {path} was made with another {key} ({metadata.get(key)}, this run has "
                           f"{ident[key]}): use another file, or delete it to start afresh")
    try:
        ids = json.loads(metadata["token_ids"])
        extra = json.loads(metadata.get("extra", "{}"))
        if not (isinstance(ids, list) and all(isinstance(t, int) for t in ids) and isinstance(extra, dict)):
            raise ValueError("token_ids must be a list of integers")
    except (KeyError, ValueError) as e:
        raise ElmError(f"--prompt-cache {path}: damaged metadata ({e}); delete it to start afresh") from None
    model = context.model
    layers = []
    for i, layer in enumerate(model.layers):
        want = (1, layer.attn.n_kv, len(ids), layer.attn.head_dim)
        kv = [arrays.get(f"layers.{i}.keys"), arrays.get(f"layers.{i}.values")]
        if ids and any(a is None or tuple(a.shape) != want or a.dtype != model.dtype for a in kv):
            got = [None if a is None else (tuple(a.shape), a.dtype) for a in kv]
            raise ElmError(f"--prompt-cache {path}: layer {i} holds {got}, expected {want} {model.dtype}; "
                           "delete it to start afresh")
        layers.append(kv)
    if len(arrays) != (2 * len(layers) if ids else 0) or len(ids) >= model.config.max_context_length:
        raise ElmError(f"--prompt-cache {path}: damaged ({len(arrays)} arrays for {len(layers)} layers, "
                       f"{len(ids)} tokens); delete it to start afresh")
    context.keep(0)
    if ids:
        for c, (keys, values) in zip(context.cache, layers):
            c.update_and_fetch(keys, values)
    context.ids = list(ids)
    return extra


def open_cache(path, model_name: str, dtype, tokenizer_file, model, tokenizer, compile: bool = True):
    """(CachedContext filled from `path` if it exists, its identity, the file's extra data)."""
    from .hub import resolve

    ident = identity(resolve(model_name, dtype, tokenizer_file), model, tokenizer)
    context = CachedContext(model, compile)
    extra = load(path, context, ident)
    return context, ident, extra
