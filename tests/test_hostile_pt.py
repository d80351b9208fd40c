"""Catalogue rows for PyTorch .pt checkpoints (docs/RELIABILITY.md): what torch
really writes (a state_dict's `_metadata`, CoreNet's training checkpoints) is
read; zip bombs are refused or read within bounded memory (measured in a child
process); damaged archives are one line; nothing in the file ever runs."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch_format as tf
from checkpoints import TINY, random_weights
from elm_mlx.convert import build_weights
from elm_mlx.convert.corenet import corenet_source
from elm_mlx.convert.torch_zip import PICKLE_OPS, TorchCheckpoint
from hostile import PEAK_RSS_KIB, deflated_zeros, pickle_bomb, pickled, run_cli_measured, zip_with
from test_corenet import PAD_ROWS, corenet_state
from typer.testing import CliRunner

from elm_mlx import ElmError
from elm_mlx.cli import app
from elm_mlx.config import OpenELMConfig

CFG = TINY["tied"]
PEAK_LIMIT_MB = 100  # the bound for converting a crafted 1 MB .pt


def cli_fails(args, message):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 2 and "Traceback" not in r.stderr + r.stdout, r.stderr
    [line] = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert message in line, line
    return line


# ---------------------------------------------------------------- what torch really writes


def test_state_dict_with_metadata_converts(tmp_path):
    """torch.save(model.state_dict()): an OrderedDict with `_metadata` set by BUILD (CoreNet's
    checkpoint_last.pt / checkpoint_best.pt); the reader used to fail on the BUILD."""
    weights = random_weights(CFG, seed=1)
    path = tf.save(corenet_state(weights), tmp_path / "checkpoint_last.pt")
    ckpt = TorchCheckpoint(path)
    assert ckpt.objects.metadata[""] == {"version": 1} and "layers.0.attn.qkv_proj" in ckpt.objects.metadata
    got = build_weights([corenet_source(path, OpenELMConfig.from_dict(CFG))], mx.float32, progress=False)
    for key, value in weights.items():
        assert np.array_equal(np.array(got[key]), value), key


def test_corenet_training_checkpoint_converts(tmp_path):
    """training_checkpoint_last.pt: the state dict under model_state_dict beside AdamW and EMA state."""
    weights = random_weights(CFG, seed=2)
    path = tf.save(tf.training_checkpoint(corenet_state(weights)), tmp_path / "training_checkpoint_last.pt")
    got = build_weights([corenet_source(path, OpenELMConfig.from_dict(CFG))], mx.float32, progress=False)
    assert np.array_equal(np.array(got["transformer.norm.weight"]), weights["transformer.norm.weight"])


def test_fixture_pickle_is_byte_identical_to_torch():
    """tests/torch_format.py writes exactly torch.save's data.pkl for a state dict."""
    torch = pytest.importorskip("torch")

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn_norm = torch.nn.Module()
            self.attn_norm.weight = torch.nn.Parameter(torch.ones(4))
            self.proj = torch.nn.Linear(4, 3, bias=False)

    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([Block(), Block()])
    ours = tf.state_dict({k: v.detach().numpy() for k, v in model.state_dict().items()})
    assert list(ours._metadata) == list(model.state_dict()._metadata)
    theirs = io.BytesIO()
    torch.save(model.state_dict(), theirs)
    with zipfile.ZipFile(theirs) as z:
        their_pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    mine = io.BytesIO()
    tf._Pickler(mine, []).dump(ours)
    assert mine.getvalue() == their_pkl


def test_real_torch_files_convert(tmp_path):
    """Files written by torch itself: a state dict and a training checkpoint with real AdamW state."""
    torch = pytest.importorskip("torch")
    weights = random_weights(CFG, seed=3)
    state = {k.removeprefix("transformer."): torch.from_numpy(v.copy()) for k, v in weights.items()}
    state["token_embeddings.weight"] = torch.cat([state["token_embeddings.weight"], torch.zeros(PAD_ROWS, 128)])
    model = torch.nn.Module()
    for key, value in state.items():  # nested modules, so state_dict() carries real _metadata
        *parents, leaf = key.split(".")
        owner = model
        for p in parents:
            if not hasattr(owner, p):
                owner.add_module(p, torch.nn.Module())
            owner = getattr(owner, p)
        owner.register_parameter(leaf, torch.nn.Parameter(value))
    optim = torch.optim.AdamW(model.parameters())
    sum(p.sum() for p in model.parameters()).backward()
    optim.step()
    with torch.no_grad():  # after the step, the weights the checkpoint must hold
        expected = {("transformer." + k): v.numpy().copy() for k, v in model.state_dict().items()}
    torch.save(model.state_dict(), tmp_path / "checkpoint_best.pt")
    torch.save({"iterations": 10, "epoch": 1, "model_state_dict": model.state_dict(),
                "optim_state_dict": optim.state_dict(), "best_metric": float("inf"), "is_interval_ckpt": False,
                "ema_state_dict": model.state_dict()}, tmp_path / "training_checkpoint_last.pt")
    for name in ("checkpoint_best.pt", "training_checkpoint_last.pt"):
        got = build_weights([corenet_source(tmp_path / name, OpenELMConfig.from_dict(CFG))], mx.float32,
                            progress=False)
        for key in weights:
            want = expected[key][: CFG["vocab_size"]] if "token_embeddings" in key else expected[key]
            assert np.array_equal(np.array(got[key]), want), (name, key)


# ---------------------------------------------------------------- zip bombs, measured in a child process


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    """Small files that declare far more: 128 MiB in byteorder or data.pkl (~130 KB each),
    1 GiB in a storage whose tensors are small views (~1 MB), and a 1 MB pickle of
    PICKLE_OPS operations."""
    d = tmp_path_factory.mktemp("bombs")
    ok = pickled({"norm.weight": None})
    with zipfile.ZipFile(d / "byteorder.pt", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("byteorder/data.pkl", ok)
        deflated_zeros(z, "byteorder/byteorder", 1 << 27, b"x")
    with zipfile.ZipFile(d / "pickle.pt", "w", zipfile.ZIP_DEFLATED) as z:
        deflated_zeros(z, "pickle/data.pkl", 1 << 27, b"N")  # NONE opcodes, never a STOP
    zip_with(d / "ops.pt", {"ops/data.pkl": pickle_bomb(PICKLE_OPS), "ops/byteorder": b"little"})
    # A real state dict whose every tensor is a small view of one storage declared 1 GiB long.
    weights = random_weights(CFG, seed=4)
    numel = (1 << 30) // 4
    storage = tf.Storage(np.zeros(1, np.float32), "F32")
    storage.values = np.broadcast_to(np.float32(0), (numel,))  # its bytes come from the bomb below
    state = tf.as_state_dict({
        k.removeprefix("transformer."): tf.Tensor(storage, 0, v.shape, tuple(int(np.prod(v.shape[i + 1:]))
                                                                            for i in range(v.ndim)))
        for k, v in weights.items()})
    state["token_embeddings.weight"] = tf.Tensor(storage, 0, (CFG["vocab_size"] + PAD_ROWS, 128), (128, 1))
    buf = io.BytesIO()
    tf._Pickler(buf, []).dump(state)
    with zipfile.ZipFile(d / "storage.pt", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("storage/data.pkl", buf.getvalue())
        z.writestr("storage/byteorder", b"little")
        deflated_zeros(z, "storage/data/0", numel * 4)
    for f in d.iterdir():
        assert f.stat().st_size < 1.2e6, f
    return d


@pytest.mark.parametrize("name,message", [
    ("byteorder.pt", "byteorder is b'xxxxxxxx"),
    ("pickle.pt", "data.pkl declares 134217728 bytes"),
    ("ops.pt", f"more than {PICKLE_OPS} pickle operations"),
])
def test_zip_bombs_are_refused_in_bounded_memory(bombs, tmp_path, name, message):
    code, err, peak = run_cli_measured(["convert", bombs / name, "-o", tmp_path / "out", "--preset", "270M"])
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert len(lines[0]) < 400 + len(str(bombs / name))  # nothing quoted whole
    assert peak < PEAK_LIMIT_MB, f"peak RSS {peak:.0f} MB"
    assert not (tmp_path / "out").exists()


CONVERT_TINY = textwrap.dedent(f"""
    import sys
    import mlx.core as mx
    from checkpoints import TINY
    from elm_mlx.config import OpenELMConfig
    from elm_mlx.convert import build_weights
    from elm_mlx.convert.corenet import corenet_source
    weights = build_weights([corenet_source(sys.argv[1], OpenELMConfig.from_dict(TINY["tied"]))], mx.bfloat16,
                            progress=False)
    print(len(weights), {PEAK_RSS_KIB} // 1024)
""")


def test_storage_bomb_reads_only_what_the_tensors_cover(bombs):
    """Every tensor a small view of a storage declared 1 GiB (deflated from 1 MB): converting
    reads each tensor's bytes only, so memory stays at the model's size."""
    r = subprocess.run([sys.executable, "-c", CONVERT_TINY, str(bombs / "storage.pt")], capture_output=True,
                       text=True, timeout=300, cwd=Path(__file__).parent)
    assert r.returncode == 0, r.stderr
    count, peak = map(int, r.stdout.split())
    assert count == len(random_weights(CFG, seed=4)) and peak < PEAK_LIMIT_MB, r.stdout


# ---------------------------------------------------------------- damaged archives


@pytest.fixture
def good_pt(tmp_path):
    return tf.save(corenet_state(random_weights(CFG, seed=5)), tmp_path / "good.pt")


def _member_offset(path: Path, name: str) -> int:
    with zipfile.ZipFile(path) as z:
        return z.getinfo(name).header_offset


def test_crc_error(good_pt):
    raw = bytearray(good_pt.read_bytes())
    with zipfile.ZipFile(good_pt) as z:
        info = z.getinfo("good/data/1")  # layers.0.attn_norm.weight: read whole, so its CRC is checked
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    raw[start] ^= 0xFF
    good_pt.write_bytes(bytes(raw))
    with pytest.raises(ElmError, match="damaged zip archive at data/1 .*CRC"):
        build_weights([corenet_source(good_pt, OpenELMConfig.from_dict(CFG))], mx.float32, progress=False)


def test_bad_local_header(good_pt):
    raw = bytearray(good_pt.read_bytes())
    offset = _member_offset(good_pt, "good/data/0")
    raw[offset:offset + 4] = b"XXXX"
    good_pt.write_bytes(bytes(raw))
    with pytest.raises(ElmError, match="damaged zip archive at data/0"):
        build_weights([corenet_source(good_pt, OpenELMConfig.from_dict(CFG))], mx.float32, progress=False)


def test_unknown_compression(good_pt):
    raw = bytearray(good_pt.read_bytes())
    name = b"good/data/0"
    local = _member_offset(good_pt, name.decode())
    raw[local + 8:local + 10] = struct.pack("<H", 99)  # the local header's compression method
    central = raw.find(b"PK\x01\x02")
    while raw[central + 46:central + 46 + len(name)] != name:  # that member's central directory entry
        central = raw.find(b"PK\x01\x02", central + 4)
    raw[central + 10:central + 12] = struct.pack("<H", 99)
    good_pt.write_bytes(bytes(raw))
    with pytest.raises(ElmError, match="damaged zip archive at data/0.*compression"):
        build_weights([corenet_source(good_pt, OpenELMConfig.from_dict(CFG))], mx.float32, progress=False)


def test_not_a_zip_and_truncated_archive(tmp_path, good_pt):
    raw = good_pt.read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    cli_fails(["convert", tmp_path / "cut.pt", "-o", tmp_path / "out", "--preset", "270M"], "cut.pt")


def test_pt_that_is_a_fifo(tmp_path):
    os.mkfifo(tmp_path / "ckpt.pt")
    cli_fails(["convert", tmp_path / "ckpt.pt", "-o", tmp_path / "out", "--preset", "270M"], "FIFO")


def test_persistent_id_is_quoted_short(tmp_path):
    data = b"\x80\x02(X\x07\x00\x00\x00storageq\x00" + b"X" + struct.pack("<I", 100_000) + b"k" * 100_000 + b"tQ."
    path = zip_with(tmp_path / "pid.pt", {"pid/data.pkl": data, "pid/byteorder": b"little"})
    with pytest.raises(ElmError) as e:
        TorchCheckpoint(path)
    assert "unexpected persistent id" in str(e.value) and len(str(e.value)) < 400


def test_no_code_runs_from_a_training_checkpoint(tmp_path, monkeypatch):
    """A training checkpoint whose optimizer state hides a call: refused, nothing run."""
    class Evil:
        def __reduce__(self):
            return os.system, ("touch pwned",)

    monkeypatch.chdir(tmp_path)
    state = tf.training_checkpoint(corenet_state(random_weights(CFG, seed=6)))
    state["optim_state_dict"]["param_groups"][0]["lr"] = Evil()
    path = tf.save(state, tmp_path / "training_checkpoint_last.pt")
    with pytest.raises(ElmError, match="refused to load"):
        TorchCheckpoint(path)
    assert not (tmp_path / "pwned").exists()
