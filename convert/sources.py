"""What the converter reads: one `Source` per checkpoint, whatever its format
(Apple's HF folder, an elm-mlx or mlx-lm / mlx-community folder, quantized or
not, or a CoreNet .pt). Tensors are read lazily, one at a time, under Apple's
HF key names."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx

from ..checkpoint import check_weights
from ..config import OpenELMConfig, read_config
from ..errors import ElmError
from ..files import regular_file
from ..quant import read_quantization


@dataclass
class Source:
    path: Path
    config: OpenELMConfig
    meta: dict  # config.json fields carried into the output
    keys: list  # stored tensor names (HF names; quantized modules add .scales/.biases)
    read: Callable[[str], mx.array]
    quantization: dict | None = None
    tokenizer_dir: Path | None = None
    close: Callable[[], None] = field(default=lambda: None)


def open_folder(folder: Path) -> Source:
    raw = read_config(folder / "config.json")
    cfg = OpenELMConfig.from_dict(raw, source=str(folder / "config.json"))
    quantization = read_quantization(raw, str(folder / "config.json"))
    files = check_weights(folder, cfg, quantization)

    def read(key):
        # A fresh lazy array each time: one kept in a dict would stay in
        # memory once evaluated, and averaging would hold every checkpoint.
        return mx.load(str(files[key]))[key]

    # auto_map points at remote code we don't copy; the quantization entries
    # are rewritten by whoever quantizes; our own marker is rewritten on save.
    meta = {k: v for k, v in raw.items() if k not in ("auto_map", "quantization", "quantization_config", "elm_mlx")}
    return Source(folder, cfg, meta, list(files), read, quantization, folder)


def open_source(path, preset: str | None = None, yaml: Path | None = None) -> Source:
    """A folder (Apple HF / elm-mlx / mlx-lm layout) or a CoreNet .pt file."""
    path = Path(path).expanduser()
    if path.is_dir():
        if preset or yaml:
            raise ElmError(f"--preset/--config describe CoreNet .pt checkpoints; {path} is a folder with its own "
                           "config.json: leave them out")
        return open_folder(path)
    if path.is_file():
        from .corenet import open_corenet

        return open_corenet(path, preset, yaml)
    if path.exists():
        regular_file(path, "checkpoint (a folder or a .pt file)")  # a FIFO, socket or device: never opened
    raise ElmError(f"{path}: no such file or folder")


def same_architecture(sources: list) -> None:
    first = sources[0]
    for s in sources[1:]:
        if s.config != first.config:
            raise ElmError(f"{s.path} and {first.path} are different architectures "
                           f"({s.config.num_transformer_layers} vs {first.config.num_transformer_layers} layers, "
                           f"model_dim {s.config.model_dim} vs {first.config.model_dim}); "
                           "only checkpoints of one model can be averaged")
