"""Write PyTorch checkpoints in torch.save's real zip format, by hand, without torch.

What torch.save (>= 1.6, `_use_new_zipfile_serialization=True`) writes, checked
against torch 2.13's own output:

    <name>/data.pkl                 pickle protocol 2 of the object; every tensor is
                                    REDUCE(torch._utils._rebuild_tensor_v2,
                                           (storage, offset, size, stride, requires_grad,
                                            collections.OrderedDict()))
                                    with storage a BINPERSID of
                                    ('storage', torch.FloatStorage|HalfStorage|BFloat16Storage,
                                     key, 'cpu', numel)
    <name>/.format_version          b'1'
    <name>/.storage_alignment       b'64'
    <name>/byteorder                b'little'
    <name>/data/<key>               the raw storage bytes, each 64-byte aligned in the file
    <name>/version                  b'3\\n'
    <name>/.data/serialization_id   40 decimal digits

Every member is stored uncompressed. <name> is the file name without extension.
Tensors that are views of one storage (shared, transposed, sliced) share a key.

`model.state_dict()` is an OrderedDict carrying a `_metadata` attribute (each
module's version), so torch.save pickles it as REDUCE(collections.OrderedDict, ())
+ SETITEMS + BUILD({'_metadata': OrderedDict(...)}): `state_dict()` below writes
exactly that. CoreNet's trainer saves such a state dict bare (checkpoint_last.pt,
checkpoint_best.pt) or inside a training checkpoint (training_checkpoint_last.pt:
model, AdamW and EMA state, see corenet/utils/checkpoint_utils.py):
`training_checkpoint()` builds that dict.
"""

from __future__ import annotations

import collections
import functools
import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from checkpoints import f32_to_bf16_bits

STORAGE_CLASS = {"F32": "FloatStorage", "F16": "HalfStorage", "BF16": "BFloat16Storage"}


@dataclass(frozen=True)
class Global:
    """A `module.name` reference pickled as the GLOBAL opcode (torch need not be importable)."""

    module: str
    name: str

    def __call__(self, *args):  # pickle's save_reduce only accepts callables
        raise TypeError(f"{self.module}.{self.name} is a marker, not a function")


@functools.lru_cache(maxsize=None)
def marker(module: str, name: str) -> Global:
    """One Global per name, so the pickler memoizes it and later uses are BINGETs, as in torch's pickle."""
    return Global(module, name)


class Storage:
    """One torch storage: the flat data of one or more tensors."""

    def __init__(self, values: np.ndarray, dtype: str):
        self.values = np.ascontiguousarray(values, dtype=np.float32).ravel()
        self.dtype = dtype

    def tobytes(self) -> bytes:
        if self.dtype == "F32":
            return self.values.astype("<f4").tobytes()
        if self.dtype == "F16":
            return self.values.astype("<f2").tobytes()
        return f32_to_bf16_bits(self.values).astype("<u2").tobytes()


@dataclass
class Tensor:
    """A view into a Storage, as torch keeps it: offset, size, stride in elements."""

    storage: Storage
    offset: int
    size: tuple
    stride: tuple
    parameter: bool = False  # nn.Parameter: wrapped in _rebuild_parameter

    def __reduce__(self):
        rebuild = (marker("torch._utils", "_rebuild_tensor_v2"),
                   (self.storage, self.offset, self.size, self.stride, False, Ordered()))
        if self.parameter:
            return marker("torch._utils", "_rebuild_parameter"), (_Reduced(*rebuild), True, Ordered())
        return rebuild


class Ordered(dict):
    """A collections.OrderedDict as torch's pickler writes it (its class memoized like every global)."""

    def __reduce__(self):
        return marker("collections", "OrderedDict"), (), None, None, iter(self.items())


class _Reduced:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def tensor(values, dtype: str = "F32", parameter: bool = False) -> Tensor:
    """A contiguous tensor with its own storage."""
    values = np.asarray(values, dtype=np.float32)
    strides = tuple(int(np.prod(values.shape[i + 1:])) for i in range(values.ndim))
    return Tensor(Storage(values, dtype), 0, tuple(values.shape), strides, parameter)


def transposed(t: Tensor) -> Tensor:
    """t.t(): same storage, swapped size and stride (non-contiguous)."""
    return Tensor(t.storage, t.offset, t.size[::-1], t.stride[::-1])


def rows(t: Tensor, start: int, stop: int) -> Tensor:
    """t[start:stop] of a 2-D tensor: same storage, an offset."""
    return Tensor(t.storage, t.offset + start * t.stride[0], (stop - start,) + t.size[1:], t.stride)


def values_of(t: Tensor) -> np.ndarray:
    """What torch would give for t, as float32 (after rounding to the storage dtype)."""
    flat = np.frombuffer(t.storage.tobytes(), dtype={"F32": "<f4", "F16": "<f2", "BF16": "<u2"}[t.storage.dtype])
    if t.storage.dtype == "BF16":
        flat = (flat.astype(np.uint32) << 16).view(np.float32)
    flat = flat.astype(np.float32)
    view = np.lib.stride_tricks.as_strided(flat[t.offset:], t.size, [s * 4 for s in t.stride])
    return np.array(view)


class _Pickler(pickle._Pickler):
    """Python's pickler, plus GLOBAL opcodes for Global markers and persistent ids
    for storages, which is how torch's pickler emits them."""

    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file, storages: list):
        super().__init__(file, protocol=2)
        self.storages = storages

    def save_marker(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[Global] = save_marker

    def persistent_id(self, obj):
        if not isinstance(obj, Storage):
            return None
        if all(s is not obj for s in self.storages):
            self.storages.append(obj)
        key = str(next(i for i, s in enumerate(self.storages) if s is obj))
        return ("storage", marker("torch", STORAGE_CLASS[obj.dtype]), key, "cpu", obj.values.size)


def _aligned(zf: zipfile.ZipFile, name: str, data: bytes, alignment: int = 64) -> None:
    """Write a stored member whose data starts on an `alignment` boundary, padding
    the local header's extra field as torch's writer does."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    header = 30 + len(name.encode())
    start = zf.fp.tell() + header + 4  # + the extra field's own 4-byte header
    pad = -start % alignment
    info.extra = b"FB" + pad.to_bytes(2, "little") + b"Z" * pad
    zf.writestr(info, data)


def save(obj, path) -> Path:
    """torch.save(obj, path) for an object made of dicts, lists, numbers, strings and Tensors."""
    path = Path(path)
    storages: list[Storage] = []
    buf = io.BytesIO()
    _Pickler(buf, storages).dump(obj)
    name = path.stem
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        _aligned(zf, f"{name}/data.pkl", buf.getvalue())
        _aligned(zf, f"{name}/.format_version", b"1")
        _aligned(zf, f"{name}/.storage_alignment", b"64")
        _aligned(zf, f"{name}/byteorder", b"little")
        for key, s in enumerate(storages):
            _aligned(zf, f"{name}/data/{key}", s.tobytes())
        _aligned(zf, f"{name}/version", b"3\n")
        _aligned(zf, f"{name}/.data/serialization_id", b"1077862729799854162518198763718064115446")
    return path


class StateDict(collections.OrderedDict):
    """What nn.Module.state_dict() returns: an OrderedDict with a `_metadata`
    attribute, pickled as torch pickles it (a plain collections.OrderedDict + BUILD)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._metadata = module_metadata(self)

    def __reduce__(self):
        return (marker("collections", "OrderedDict"), (), {"_metadata": Ordered(self._metadata)}, None,
                iter(self.items()))


def module_metadata(keys) -> collections.OrderedDict:
    """state_dict()._metadata: {module prefix: {'version': 1}} for every module, the root ('') first."""
    meta = collections.OrderedDict([("", {"version": 1})])
    for key in keys:
        parts = key.split(".")[:-1]
        for i in range(1, len(parts) + 1):
            meta.setdefault(".".join(parts[:i]), {"version": 1})
    return meta


def state_dict(weights: dict, dtype: str = "F32") -> StateDict:
    """model.state_dict() of contiguous tensors, `_metadata` included."""
    return as_state_dict({k: tensor(v, dtype) for k, v in weights.items()})


def as_state_dict(tensors: dict) -> StateDict:
    return StateDict(tensors)


def training_checkpoint(state: StateDict, iterations: int = 5000, epoch: int = 3, seed: int = 0) -> dict:
    """CoreNet's training_checkpoint_*.pt (get_training_state): the model's state dict
    under model_state_dict, beside AdamW's state (a step and two moments per
    parameter), the EMA model's state dict, the gradient scaler's and the metric."""
    rng = np.random.default_rng(seed)
    names = list(state)
    optim = {
        "state": {i: {"step": tensor(np.float32(iterations)),
                      "exp_avg": tensor(rng.standard_normal(state[n].size) * 1e-3),
                      "exp_avg_sq": tensor(np.abs(rng.standard_normal(state[n].size)) * 1e-6)}
                  for i, n in enumerate(names)},
        "param_groups": [{"lr": 0.0053, "betas": (0.9, 0.95), "eps": 1e-08, "weight_decay": 0.1, "amsgrad": False,
                          "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
                          "fused": None, "params": list(range(len(names)))}],
    }
    ema = as_state_dict({n: tensor(values_of(t) * 0.5, t.storage.dtype) for n, t in state.items()})
    return {"iterations": iterations, "epoch": epoch, "model_state_dict": state, "optim_state_dict": optim,
            "best_metric": float("inf"), "is_interval_ckpt": False,
            "gradient_scaler_state_dict": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                           "growth_interval": 2000, "_growth_tracker": 0},
            "ema_state_dict": ema}
