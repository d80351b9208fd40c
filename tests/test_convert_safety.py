"""The conversion cache is safe: two conversions into one folder at once don't
mix (a lock), a conversion killed with SIGKILL leaves nothing that loads and
the next one cleans up after it, a full disk fails with a clear message."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import elm_mlx.convert
import engine
import numpy as np
import pytest
from checkpoints import TINY, make_hf_checkpoint
from elm_mlx.convert import convert

from elm_mlx import ElmError
from elm_mlx.load import load_model

TOKENS = [1, 17, 300, 5, 511, 42, 42, 7, 256, 3, 99, 2]

# A conversion in another process. Its writer is patched to announce itself
# (a file) and then either wait for a go-file or kill its own process.
CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    import mlx.core as mx
    from elm_mlx.convert import convert
    src, out, tok, mode, flag = sys.argv[1:6]
    real = mx.save_safetensors
    def save(path, arrays, metadata=None):
        Path(path).write_bytes(b"\\0" * 4096)  # a partial file
        Path(flag).write_text("writing")
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        while mode == "hold" and not Path(flag + ".go").exists():
            time.sleep(0.05)
        real(path, arrays, metadata=metadata)
    mx.save_safetensors = save
    try:
        convert(src, out, dtype="fp32", tokenizer=tok, progress=False)
        print("converted")
    except Exception as e:
        print(f"{type(e).__name__}: {e}")
""")


def child(tmp_path, src, out, tok, mode, flag):
    """The child's stderr goes to FLAG.err, to be read while it runs."""
    with open(f"{flag}.err", "w") as err:
        return subprocess.Popen([sys.executable, "-c", CHILD, str(src), str(out), str(tok), mode, str(flag)],
                                stdout=subprocess.PIPE, stderr=err, text=True, cwd=tmp_path)


def wait_for(path: Path, proc, limit=120):
    deadline = time.monotonic() + limit
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.fixture
def src(tmp_path):
    make_hf_checkpoint(tmp_path / "src", TINY["tied"], seed=80)
    return tmp_path / "src"


def partials(parent: Path) -> list:
    return [p.name for p in parent.iterdir() if "partial" in p.name]


def test_concurrent_conversions_into_one_folder(src, tmp_path, llama_tokenizer):
    out = tmp_path / "cache" / "model"
    first = child(tmp_path, src, out, llama_tokenizer, "hold", tmp_path / "first")
    second = None
    try:
        wait_for(tmp_path / "first", first)  # first holds the lock, mid-write
        second = child(tmp_path, src, out, llama_tokenizer, "plain", tmp_path / "second")
        # The second waits on the lock: it says so and writes nothing.
        deadline = time.monotonic() + 120
        while "waiting for another conversion" not in (err := Path(f"{tmp_path / 'second'}.err").read_text()):
            assert second.poll() is None and time.monotonic() < deadline, err
            time.sleep(0.05)
        assert not (tmp_path / "second").exists() and not out.exists()
        (tmp_path / "first.go").write_text("")
        assert first.communicate(timeout=120)[0].strip() == "converted"
        result = second.communicate(timeout=120)[0].strip()
        assert result.startswith("OutputExists") and "already exists" in result
        assert not (tmp_path / "second").exists()  # it never started writing
        assert np.array_equal(engine.logits(load_model(out), TOKENS),
                              engine.logits(load_model(src, dtype="fp32"), TOKENS))
        assert not partials(out.parent)
    finally:  # a failed assertion must not leave a child waiting forever
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()


def test_killed_conversion_leaves_nothing_that_loads(src, tmp_path, llama_tokenizer):
    out = tmp_path / "cache" / "model"
    proc = child(tmp_path, src, out, llama_tokenizer, "kill", tmp_path / "flag")
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and partials(out.parent)  # the half-written folder is hidden, not `out`
    with pytest.raises(ElmError):
        load_model(out)
    # The next conversion into the same place removes the leftover and succeeds.
    convert(src, out, dtype="fp32", tokenizer=llama_tokenizer, progress=False)
    assert not partials(out.parent)
    assert np.array_equal(engine.logits(load_model(out), TOKENS),
                          engine.logits(load_model(src, dtype="fp32"), TOKENS))


def test_full_disk_is_reported_before_writing(src, tmp_path, monkeypatch, llama_tokenizer):
    almost_full = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr(elm_mlx.convert.shutil, "disk_usage", lambda _: almost_full)
    with pytest.raises(ElmError) as e:
        convert(src, tmp_path / "out", tokenizer=llama_tokenizer, progress=False)
    assert "not enough disk space" in str(e.value) and str(tmp_path / "out") in str(e.value)
    assert not (tmp_path / "out").exists() and not partials(tmp_path)


def test_disk_full_midway_says_so(src, tmp_path, monkeypatch, llama_tokenizer):
    def enospc(path, arrays, metadata=None):
        Path(path).write_bytes(b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(elm_mlx.convert.mx, "save_safetensors", enospc)
    with pytest.raises(ElmError) as e:
        convert(src, tmp_path / "out", tokenizer=llama_tokenizer, progress=False)
    assert "the disk is full" in str(e.value) and str(tmp_path / "out") in str(e.value)
    assert not (tmp_path / "out").exists() and not partials(tmp_path)
