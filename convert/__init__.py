"""`elm-mlx convert`: an OpenELM checkpoint in Apple's HF layout -> one folder
with MLX safetensors, config.json and tokenizer.model. Output is written to a
temporary folder beside the target and renamed at the end, so an interrupted
conversion leaves nothing that loads."""

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
from tqdm import tqdm

from ..chat_template import TEMPLATE_FILE, find_template
from ..checkpoint import DTYPE_NAMES, load_weights, parse_dtype
from ..config import OpenELMConfig, read_config
from ..errors import ElmError
from ..tokenizer import Tokenizer, resolve_tokenizer


@contextmanager
def atomic_folder(out: Path):
    """Yields a temporary folder that becomes `out` only if the block succeeds.
    Raises FileExistsError if `out` appeared meanwhile."""
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        yield tmp
        os.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if out.exists():
            raise FileExistsError(out) from None
        raise ElmError(f"could not write {out}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert(src, out, dtype: str = "bf16", tokenizer=None, progress: bool = True, label: str | None = None) -> Path:
    """label names the source on the progress bar (default: its folder name)."""
    src, out = Path(src), Path(out)
    if out.exists():
        raise ElmError(f"{out} already exists: remove it or choose another -o")
    cfg_path = src / "config.json"
    raw = read_config(cfg_path)
    config = OpenELMConfig.from_dict(raw, source=str(cfg_path))
    mx_dtype = parse_dtype(dtype)
    name = DTYPE_NAMES[mx_dtype]
    tok = Tokenizer(resolve_tokenizer(src, tokenizer)).path  # before the slow part: fail fast
    template = find_template(src)  # kept with the output, so it stays -Instruct whatever it is named
    weights = load_weights(src, config, mx_dtype)
    with atomic_folder(out) as tmp:
        for key in tqdm(weights, desc=f"{label or src.name} -> {name}", unit="tensor", disable=not progress):
            mx.eval(weights[key])
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        # The source's own fields stay (num_gqa_groups, qkv_multipliers, ...);
        # auto_map goes: it points at remote code we don't copy.
        meta = {k: v for k, v in raw.items() if k != "auto_map"}
        meta |= {"torch_dtype": name, "elm_mlx": {"dtype": name}}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        shutil.copyfile(tok, tmp / "tokenizer.model")
        if template is not None:
            (tmp / TEMPLATE_FILE).write_text(template.source)
    return out
