"""CoreNet's OpenELM .pt checkpoints (the training run's own files, including
the intermediate ones the paper averages) as a converter Source.

They differ from Apple's HF files in three ways: keys lack the `transformer.`
prefix, the embedding has 32128 rows (32000 Llama-2 tokens, a padding token
and rows to a round size) of which only the first 32000 are real, and there is
no config.json: the size comes from a preset name or CoreNet's training YAML
(`model.language_modeling.general_gpt.model_name: OpenELM-270M`).
"""

from pathlib import Path

import mlx.core as mx
import yaml as pyyaml

from ..config import OpenELMConfig, preset_name
from ..errors import ElmError
from .sources import Source
from .torch_zip import TensorRef, TorchCheckpoint

EMBEDDING = "transformer.token_embeddings.weight"


def preset_from_yaml(path: Path) -> str:
    try:
        doc = pyyaml.safe_load(Path(path).read_text())
        name = doc["model"]["language_modeling"]["general_gpt"]["model_name"]
    except FileNotFoundError:
        raise ElmError(f"--config {path}: no such file") from None
    except (pyyaml.YAMLError, KeyError, TypeError) as e:
        raise ElmError(f"--config {path}: not a CoreNet OpenELM YAML (expected "
                       f"model.language_modeling.general_gpt.model_name): {e}") from None
    if preset_name(str(name)) is None:
        raise ElmError(f"--config {path}: model_name {name!r} is not an OpenELM size (270M, 450M, 1_1B, 3B)")
    return str(name)


def _state_dict(objects, path: Path) -> dict:
    # A bare state_dict (CoreNet's checkpoint files), or a training checkpoint wrapping one.
    if isinstance(objects, dict) and isinstance(objects.get("model_state_dict"), dict):
        objects = objects["model_state_dict"]
    if not isinstance(objects, dict) or not any(isinstance(v, TensorRef) for v in objects.values()):
        what = sorted(objects)[:8] if isinstance(objects, dict) else type(objects).__name__
        raise ElmError(f"{path}: no model state_dict inside (top level: {what}); expected CoreNet's "
                       "name -> tensor dictionary")
    return objects


def open_corenet(path: Path, preset: str | None, yaml: Path | None) -> Source:
    if (preset is None) == (yaml is None):
        raise ElmError(f"{path}: a CoreNet .pt checkpoint does not record its size: pass exactly one of "
                       "--preset NAME (270M, 450M, 1_1B, 3B) or --config CORENET_YAML")
    name = preset if preset is not None else preset_from_yaml(yaml)
    return corenet_source(path, OpenELMConfig.from_preset(name), f"OpenELM-{preset_name(name)}")


def corenet_source(path: Path, cfg: OpenELMConfig, name: str = "OpenELM") -> Source:
    """The checkpoint at `path` read as the architecture `cfg` (HF key names,
    padding rows dropped)."""
    ckpt = TorchCheckpoint(path)
    state = _state_dict(ckpt.objects, path)
    expected = cfg.weight_shapes()
    refs = {}
    for key, ref in state.items():
        if ".pos_embedding." in key:
            continue  # RoPE tables: recomputed by the model, not weights
        hf = key if key.startswith("transformer.") else "transformer." + key
        if hf not in expected or not isinstance(ref, TensorRef):
            raise ElmError(f"{path}: unexpected entry {key!r}; is this an {name} CoreNet checkpoint?")
        want = expected[hf]
        ok = ref.shape == want or (hf == EMBEDDING and len(ref.shape) == 2 and ref.shape[1] == want[1]
                                   and ref.shape[0] >= want[0])
        if not ok:
            raise ElmError(f"{path}: {key} has shape {list(ref.shape)}, expected {list(want)} for {name}"
                           + (" (the embedding may have extra padding rows)" if hf == EMBEDDING else ""))
        if not ref.is_float:
            raise ElmError(f"{path}: {key} is a {ref.storage.storage_type}, expected float weights")
        refs[hf] = ref
    missing = [k for k in expected if k not in refs]
    if missing:
        raise ElmError(f"{path}: {missing[0].removeprefix('transformer.')} is missing "
                       f"({len(missing)} of {len(expected)} tensors); is this an {name} checkpoint?")

    def read(key):
        value = ckpt.read(refs[key])
        if key == EMBEDDING:
            value = value[: cfg.vocab_size]  # drop the padding rows 32000..32127
        return mx.array(value)

    meta = cfg.to_dict()
    meta["torch_dtype"] = "float32"
    return Source(path, cfg, meta, list(expected), read, None, None, ckpt.close)
