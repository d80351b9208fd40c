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

A .pt from the internet can also be a zip bomb (a 1 MB file declaring
gigabytes). Nothing is read whole: data.pkl is read through a bounded stream
by an unpickler with an operation budget, `byteorder` is read to 16 bytes,
and a tensor is read only after its storage's declared size was checked
against its shape, and only the bytes the tensor covers. Memory stays bounded
by the model's size whatever the file declares.
"""

import lzma
import pickle
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ElmError, quoted
from ..files import regular_file

# data.pkl of OpenELM-3B's training checkpoint (model, EMA and AdamW state: ~1500
# tensors) is ~300 KB and ~60k pickle operations; these limits are far above that,
# and below what would take memory (each operation builds at most ~100 bytes).
PICKLE_BYTES = 32 << 20
PICKLE_OPS = 400_000
# Zip members that are not data.pkl or a tensor storage may be read only this far.
SMALL_MEMBER = 16
# Whatever a damaged or crafted archive raises while being read.
ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, NotImplementedError, RuntimeError, EOFError,
              OSError, ValueError)

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
        raise ValueError(f"bad tensor geometry offset={quoted(storage_offset)} size={quoted(size)} "
                         f"stride={quoted(stride)}")
    return TensorRef(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad, backward_hooks):
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return data


class StateDict(dict):
    """collections.OrderedDict as torch pickles a state_dict: with a `_metadata`
    attribute (per-module versions) set by the pickle's BUILD opcode after the items."""

    metadata = None

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (__dict__, slots) form
            state = state[0]
        self.metadata = state.get("_metadata") if isinstance(state, dict) else None


_ALLOWED = {
    ("collections", "OrderedDict"): StateDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
}


class _TooBig(Exception):
    pass


def _counted(fn):
    def op(self):
        self.ops_left -= 1
        if self.ops_left < 0:
            raise _TooBig(f"data.pkl takes more than {PICKLE_OPS} pickle operations")
        return fn(self)
    return op


class _Unpickler(pickle._Unpickler):
    """Python's own unpickler (not the C one: each opcode is counted against a budget,
    so a pickle bomb stops early), resolving only the globals in _ALLOWED."""

    dispatch = {code: _counted(fn) for code, fn in pickle._Unpickler.dispatch.items()}

    def __init__(self, file, source: Path):
        super().__init__(file)
        self.source = source
        self.ops_left = PICKLE_OPS

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in STORAGES:
            return name  # only ever used inside a persistent id
        raise ElmError(f"{self.source}: refused to load: the pickle asks for {quoted(module)[1:-1]}."
                       f"{quoted(name)[1:-1]}, which a "
                       "checkpoint of tensors never needs (only torch's tensor-rebuild functions are "
                       "allowed). The file may be malicious; it was not loaded and nothing in it ran.")

    def persistent_load(self, pid):
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or pid[1] not in STORAGES or not isinstance(pid[4], int) or pid[4] < 0):
            raise ElmError(f"{self.source}: unexpected persistent id {quoted(pid)} in data.pkl; "
                           "expected ('storage', <torch storage type>, key, location, numel)")
        return StorageRef(pid[2] if isinstance(pid[2], str) else quoted(pid[2]), pid[1], pid[4])


class TorchCheckpoint:
    """A torch.save zip file: `.objects` is the unpickled structure with
    TensorRef leaves; `read(ref)` returns one tensor as a NumPy float32 array."""

    def __init__(self, path):
        self.path = Path(path)
        regular_file(self.path, "PyTorch checkpoint")
        try:
            if not zipfile.is_zipfile(self.path):
                raise ElmError(f"{self.path}: not a PyTorch zip checkpoint (torch.save >= 1.6 writes a zip "
                               "archive); re-save it with a recent torch, or pass a Hugging Face folder")
            self._zip = zipfile.ZipFile(self.path)
        except ElmError:
            raise
        except ZIP_ERRORS as e:
            raise ElmError(f"{self.path}: damaged zip archive ({quoted(str(e), 120)})") from None
        pkls = [n for n in self._zip.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise ElmError(f"{self.path}: expected exactly one <name>/data.pkl in the archive, found {len(pkls)}")
        self._prefix = pkls[0][: -len("data.pkl")]
        order = self._small_member("byteorder")
        self._order = "<" if order in (None, b"little") else ">" if order == b"big" else None
        if self._order is None:
            raise ElmError(f"{self.path}: byteorder is {quoted(order, 20)}, expected 'little' or 'big'")
        info = self._zip.getinfo(pkls[0])
        if info.file_size > PICKLE_BYTES:
            raise ElmError(f"{self.path}: data.pkl declares {info.file_size} bytes; a checkpoint's data.pkl (the "
                           f"index of its tensors) is well under {PICKLE_BYTES >> 20} MiB: the file is damaged or "
                           "crafted")
        try:
            with self._zip.open(info) as f:
                self.objects = _Unpickler(f, self.path).load()
        except ElmError:
            raise
        except _TooBig as e:
            raise ElmError(f"{self.path}: refused to load: {e}, far more than any checkpoint's index of tensors "
                           "(the file is damaged or crafted)") from None
        except Exception as e:  # truncated or corrupt pickle or zip member: any of a dozen exception types
            raise ElmError(f"{self.path}: data.pkl is damaged ({type(e).__name__}: {quoted(str(e), 120)})") \
                from None

    def _small_member(self, name):
        """A member that holds a few bytes (byteorder), read to at most SMALL_MEMBER + 1 bytes; None if absent."""
        try:
            with self._zip.open(self._prefix + name) as f:
                return f.read(SMALL_MEMBER + 1)
        except KeyError:
            return None
        except ZIP_ERRORS as e:
            raise ElmError(f"{self.path}: damaged zip archive at {self._prefix + name} "
                           f"({quoted(str(e), 120)})") from None

    def _storage_info(self, st: "StorageRef", itemsize: int) -> zipfile.ZipInfo:
        name = f"{self._prefix}data/{st.key}"
        try:
            info = self._zip.getinfo(name)
        except KeyError:
            raise ElmError(f"{self.path}: the archive has no {quoted(name)}; the file is incomplete") from None
        if info.file_size < st.numel * itemsize:
            raise ElmError(f"{self.path}: storage data/{quoted(st.key)[1:-1]} has {info.file_size} bytes, expected "
                           f"{st.numel * itemsize}; the file is truncated")
        return info

    def check(self, ref: TensorRef) -> None:
        """Checks ref's storage (present, its declared size enough for the tensor) without reading it."""
        st = ref.storage
        itemsize = np.dtype(STORAGES[st.storage_type][0]).itemsize
        self._storage_info(st, itemsize)
        last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride) if n > 0)
        if 0 not in ref.shape and last >= st.numel:
            raise ElmError(f"{self.path}: a tensor of shape {quoted(list(ref.shape))} reaches past its storage "
                           f"data/{quoted(st.key)[1:-1]} ({st.numel} elements); the file is damaged")
        numel = int(np.prod(ref.shape, dtype=object)) if ref.shape else 1
        if 0 not in ref.shape and (last + 1 - ref.offset) > 4 * numel + (1 << 20):
            raise ElmError(f"{self.path}: a tensor of shape {quoted(list(ref.shape))} is a sparse view of a storage "
                           f"{last + 1 - ref.offset} elements long; re-save the state dict with contiguous tensors "
                           "(tensor.clone())")

    def read(self, ref: TensorRef) -> np.ndarray:
        """One tensor as float32, reading only the bytes it covers (after `check`)."""
        self.check(ref)
        st = ref.storage
        kind, bf16 = STORAGES[st.storage_type]
        dtype = np.dtype(self._order + kind)
        if 0 in ref.shape:
            return np.zeros(ref.shape, np.float32)
        last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
        start, stop = ref.offset * dtype.itemsize, (last + 1) * dtype.itemsize
        info = self._storage_info(st, dtype.itemsize)
        try:
            with self._zip.open(info) as f:
                f.seek(start)  # a compressed member is decompressed forward in bounded chunks
                raw = f.read(stop - start)
                if stop == info.file_size:
                    f.read(1)  # at the end: the zip module checks the member's CRC
        except ZIP_ERRORS as e:
            raise ElmError(f"{self.path}: damaged zip archive at data/{quoted(st.key)[1:-1]} "
                           f"({quoted(str(e), 120)})") from None
        if len(raw) < stop - start:
            raise ElmError(f"{self.path}: storage data/{quoted(st.key)[1:-1]} ends after {start + len(raw)} bytes, "
                           f"expected {st.numel * dtype.itemsize}; the file is truncated")
        flat = np.frombuffer(raw, dtype=dtype)
        view = np.lib.stride_tricks.as_strided(flat, ref.shape, [s * dtype.itemsize for s in ref.stride],
                                               writeable=False)
        if bf16:
            return (view.astype(np.uint32) << 16).view(np.float32)
        return view.astype(np.float32)

    def close(self):
        self._zip.close()
