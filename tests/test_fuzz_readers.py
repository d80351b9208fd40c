"""Fuzz pass over what reads untrusted bytes: the safetensors header reader, the
.pt reader (archive, pickle, tensors), the tokenizer and the detokenizer. Any
input gives a result or an ElmError, never another exception, never a hang
(hypothesis' deadline fails a slow example). Derandomized: CI runs the same
examples every time."""

from __future__ import annotations

import io
import zipfile
from datetime import timedelta

import numpy as np
import torch_format as tf
from hostile import safetensors_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elm_mlx import ElmError
from elm_mlx.checkpoint import read_header
from elm_mlx.convert.torch_zip import TensorRef, TorchCheckpoint

FUZZ = settings(max_examples=150, deadline=timedelta(seconds=5), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)
entries = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "X9"]) | json_values,
    "shape": st.lists(st.integers(-3, 10), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-16, 64), min_size=0, max_size=3) | json_values,
})
headers = st.dictionaries(st.text(max_size=6) | st.just("__metadata__"), entries | json_values, max_size=4) \
    | json_values


@FUZZ
@given(header=headers, data=st.binary(max_size=64))
def test_safetensors_header_reader(tmp_path_factory, header, data):
    path = tmp_path_factory.mktemp("st") / "f.safetensors"
    path.write_bytes(safetensors_bytes(header, data))
    try:
        tensors = read_header(path)
    except ElmError:
        return
    for dtype, shape in tensors.values():  # what is accepted is consistent
        assert isinstance(dtype, str) and all(isinstance(s, int) and s >= 0 for s in shape)


@FUZZ
@given(raw=st.binary(max_size=300))
def test_safetensors_reader_on_raw_bytes(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("raw") / "f.safetensors"
    path.write_bytes(raw)
    try:
        read_header(path)
    except ElmError:
        pass


def _valid_pt() -> bytes:
    rng = np.random.default_rng(0)
    a = tf.tensor(rng.standard_normal((3, 4)))
    obj = tf.training_checkpoint(tf.as_state_dict({"w.weight": a, "w.t": tf.transposed(a),
                                                   "h.bias": tf.tensor(rng.standard_normal(5), "BF16")}))
    buf = io.BytesIO()
    storages: list = []
    pkl = io.BytesIO()
    tf._Pickler(pkl, storages).dump(obj)
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("ckpt/data.pkl", pkl.getvalue())
        zf.writestr("ckpt/byteorder", b"little")
        for key, s in enumerate(storages):
            zf.writestr(f"ckpt/data/{key}", s.tobytes())
    return buf.getvalue()


VALID_PT = _valid_pt()


def _read_everything(path):
    ckpt = TorchCheckpoint(path)
    try:
        stack = [ckpt.objects]
        while stack:
            obj = stack.pop()
            if isinstance(obj, TensorRef):
                ckpt.read(obj)
            elif isinstance(obj, dict):
                stack += list(obj.values())
            elif isinstance(obj, (list, tuple)):
                stack += list(obj)
    finally:
        ckpt.close()


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, len(VALID_PT) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.none() | st.integers(0, len(VALID_PT)))
def test_pt_reader_on_damaged_files(tmp_path_factory, edits, cut):
    raw = bytearray(VALID_PT)
    for at, value in edits:
        raw[at] = value
    path = tmp_path_factory.mktemp("pt") / "c.pt"
    path.write_bytes(bytes(raw[:cut]))
    try:
        _read_everything(path)
    except ElmError:
        pass


@FUZZ
@given(pkl=st.binary(max_size=200))
def test_pt_reader_on_arbitrary_pickles(tmp_path_factory, pkl):
    path = tmp_path_factory.mktemp("pkl") / "p.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("p/data.pkl", b"\x80\x02" + pkl)
        zf.writestr("p/data/0", b"\0" * 64)
    try:
        _read_everything(path)
    except ElmError:
        pass


def test_the_fuzzed_file_is_a_working_checkpoint(tmp_path):
    """Mutations start from something real: the unmutated file reads whole."""
    (tmp_path / "c.pt").write_bytes(VALID_PT)
    ckpt = TorchCheckpoint(tmp_path / "c.pt")
    state = ckpt.objects["model_state_dict"]
    assert np.array_equal(ckpt.read(state["w.t"]), ckpt.read(state["w.weight"]).T)
    _read_everything(tmp_path / "c.pt")



@FUZZ
@given(text=st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=200)
       | st.tuples(st.text(max_size=8), st.integers(0xD800, 0xDFFF), st.text(max_size=8))
       .map(lambda t: t[0] + chr(t[1]) + t[2]))  # always a lone surrogate
def test_tokenizer_encode(tok, text):
    try:
        ids = tok.encode(text)
    except ElmError:
        assert any("\ud800" <= c <= "\udfff" for c in text)
        return
    assert all(0 <= i < tok.vocab_size for i in ids)


@FUZZ
@given(ids=st.lists(st.integers(-10, 40000), max_size=60), continuation=st.booleans())
def test_detokenizer_never_raises(tok, ids, continuation):
    detok = tok.detokenizer(continuation)
    text = "".join(detok.add_token(i) for i in ids) + detok.finalize()
    assert text == detok.text
    assert isinstance(tok.decode(ids), str)
