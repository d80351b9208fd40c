"""Reading PyTorch's zip checkpoint format (torch.save since 1.6) without torch
and without running code from the file.

A .pt file is a zip archive `<name>/data.pkl` + `<name>/data/<key>` storages +
`<name>/byteorder`. data.pkl is a pickle whose tensors are
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` calls on
persistent ids `('storage', torch.FloatStorage, key, location, numel)`. The
unpickler below resolves only those few globals; anything else (os.system,
builtins.eval, ...) is refused before it can be called. Tensors are read
lazily, one storage at a time, so a caller streaming over keys holds one
tensor in memory, not the file.
"""

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ElmError

# torch storage class -> (numpy dtype of the stored bytes, is bfloat16)
STORAGES = {
    "FloatStorage": ("f4", False),
    "HalfStorage": ("f2", False),
    "BFloat16Storage": ("u2", True),
    "DoubleStorage": ("f8", False),
    "LongStorage": ("i8", False),
    "IntStorage": ("i4", False),
    "ShortStorage": ("i2", False),
    "CharStorage": ("i1", False),
    "ByteStorage": ("u1", False),
    "BoolStorage": ("?", False),
}


@dataclass(frozen=True)
class StorageRef:
    key: str
    storage_type: str
    numel: int


@dataclass(frozen=True)
class TensorRef:
    """A tensor in the archive, not yet read: storage + view geometry."""

    storage: StorageRef
    offset: int
    shape: tuple
    stride: tuple

    @property
    def is_float(self) -> bool:
        return self.storage.storage_type in ("FloatStorage", "HalfStorage", "BFloat16Storage", "DoubleStorage")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    geometry = [storage_offset, *size, *stride]
    if not isinstance(storage, StorageRef) or not all(isinstance(v, int) and v >= 0 for v in geometry) \
            or len(size) != len(stride):
        raise ValueError(f"bad tensor geometry offset={storage_offset!r} size={size!r} stride={stride!r}")
    return TensorRef(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad, backward_hooks):
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, source: Path):
        super().__init__(file)
        self.source = source

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in STORAGES:
            return name  # only ever used inside a persistent id
        raise ElmError(f"{self.source}: refused to load: the pickle asks for {module}.{name}, which a "
                       "checkpoint of tensors never needs (only torch's tensor-rebuild functions are "
                       "allowed). The file may be malicious; it was not loaded and nothing in it ran.")

    def persistent_load(self, pid):
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or pid[1] not in STORAGES or not isinstance(pid[4], int)):
            raise ElmError(f"{self.source}: unexpected persistent id {pid!r} in data.pkl; "
                           "expected ('storage', <torch storage type>, key, location, numel)")
        return StorageRef(str(pid[2]), pid[1], pid[4])


class TorchCheckpoint:
    """A torch.save zip file: `.objects` is the unpickled structure with
    TensorRef leaves; `read(ref)` returns one tensor as a NumPy float32 array."""

    def __init__(self, path):
        self.path = Path(path)
        if not zipfile.is_zipfile(self.path):
            raise ElmError(f"{self.path}: not a PyTorch zip checkpoint (torch.save >= 1.6 writes a zip "
                           "archive); re-save it with a recent torch, or pass a Hugging Face folder")
        self._zip = zipfile.ZipFile(self.path)
        pkls = [n for n in self._zip.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise ElmError(f"{self.path}: expected exactly one <name>/data.pkl in the archive, found {len(pkls)}")
        self._prefix = pkls[0][: -len("data.pkl")]
        order = self._member("byteorder", required=False)
        self._order = "<" if order in (None, b"little") else ">" if order == b"big" else None
        if self._order is None:
            raise ElmError(f"{self.path}: byteorder is {order!r}, expected 'little' or 'big'")
        with self._zip.open(pkls[0]) as f:
            try:
                self.objects = _Unpickler(f, self.path).load()
            except ElmError:
                raise
            except Exception as e:  # truncated or corrupt pickle: any of a dozen exception types
                raise ElmError(f"{self.path}: data.pkl is damaged ({type(e).__name__}: {e})") from None

    def _member(self, name, required=True):
        try:
            return self._zip.read(self._prefix + name)
        except KeyError:
            if required:
                raise ElmError(f"{self.path}: the archive has no {self._prefix + name}; the file is incomplete") \
                    from None
            return None

    def read(self, ref: TensorRef) -> np.ndarray:
        st = ref.storage
        kind, bf16 = STORAGES[st.storage_type]
        raw = self._member(f"data/{st.key}")
        dtype = np.dtype(self._order + kind)
        if len(raw) < st.numel * dtype.itemsize:
            raise ElmError(f"{self.path}: storage data/{st.key} has {len(raw)} bytes, expected "
                           f"{st.numel * dtype.itemsize}; the file is truncated")
        flat = np.frombuffer(raw, dtype=dtype, count=st.numel)
        last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride) if n > 0)
        if 0 not in ref.shape and last >= st.numel:
            raise ElmError(f"{self.path}: a tensor of shape {list(ref.shape)} reaches past its storage "
                           f"data/{st.key} ({st.numel} elements); the file is damaged")
        view = np.lib.stride_tricks.as_strided(flat[ref.offset:], ref.shape,
                                               [s * dtype.itemsize for s in ref.stride], writeable=False)
        if bf16:
            return (view.astype(np.uint32) << 16).view(np.float32)
        return view.astype(np.float32)

    def close(self):
        self._zip.close()
