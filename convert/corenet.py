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
from ..errors import ElmError, quoted
from ..files import read_text
from .sources import Source
from .torch_zip import TensorRef, TorchCheckpoint

EMBEDDING = "transformer.token_embeddings.weight"


def preset_from_yaml(path: Path) -> str:
    try:
        doc = pyyaml.safe_load(read_text(Path(path), "CoreNet YAML", 16 << 20))
        name = doc["model"]["language_modeling"]["general_gpt"]["model_name"]
    except ElmError as e:
        raise ElmError(f"--config: {e}") from None
    except (pyyaml.YAMLError, KeyError, TypeError, RecursionError) as e:
        raise ElmError(f"--config {path}: not a CoreNet OpenELM YAML (expected "
                       f"model.language_modeling.general_gpt.model_name): {quoted(str(e), 200)}") from None
    if preset_name(str(name)) is None:
        raise ElmError(f"--config {path}: model_name {quoted(name)} is not an OpenELM size (270M, 450M, 1_1B, 3B)")
    return str(name)


# Where a training checkpoint keeps the model: CoreNet's training_checkpoint_*.pt
# (corenet/utils/checkpoint_utils.py: model_state_dict beside optim_state_dict,
# ema_state_dict, ...), then the keys other trainers use.
STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model")


def _state_dict(objects, path: Path) -> dict:
    """A bare state_dict (CoreNet's checkpoint_last.pt, checkpoint_best.pt, ...: torch.save of
    model.state_dict()), or a training checkpoint wrapping one under a key."""
    if isinstance(objects, dict):
        for key in STATE_DICT_KEYS:
            if isinstance(objects.get(key), dict):
                objects = objects[key]
                break
    if not isinstance(objects, dict) or not any(isinstance(v, TensorRef) for v in objects.values()):
        what = quoted(sorted(map(str, objects))) if isinstance(objects, dict) else type(objects).__name__
        raise ElmError(f"{path}: no model state_dict inside (top level: {what}); expected CoreNet's "
                       f"name -> tensor dictionary, bare or under {' / '.join(STATE_DICT_KEYS)}")
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
        if not isinstance(key, str):
            raise ElmError(f"{path}: the state_dict has a key {quoted(key)}; expected tensor names")
        if ".pos_embedding." in key:
            continue  # RoPE tables: recomputed by the model, not weights
        hf = key if key.startswith("transformer.") else "transformer." + key
        if hf not in expected or not isinstance(ref, TensorRef):
            raise ElmError(f"{path}: unexpected entry {quoted(key)}; is this an {name} CoreNet checkpoint?")
        want = expected[hf]
        ok = ref.shape == want or (hf == EMBEDDING and len(ref.shape) == 2 and ref.shape[1] == want[1]
                                   and ref.shape[0] >= want[0])
        if not ok:
            raise ElmError(f"{path}: {key} has shape {quoted(list(ref.shape))}, expected {list(want)} for {name}"
                           + (" (the embedding may have extra padding rows)" if hf == EMBEDDING else ""))
        if not ref.is_float:
            raise ElmError(f"{path}: {key} is a {ref.storage.storage_type}, expected float weights")
        ckpt.check(ref)  # its storage's declared size, before anything is read
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
