"""Catalogue rows that need a real process: exit codes after Ctrl-C (while
streaming, during start-up) and a network that accepts connections but never
answers. Each runs the installed `elm-mlx` command."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager

import pytest
from hostile import ELM_MLX, quiet_env, silent_server


@pytest.fixture(scope="module")
def model_dir(base_folder):
    return base_folder


@contextmanager
def spawned(args, env):
    """`elm-mlx ARGS` running, killed on the way out if it has not ended."""
    proc = subprocess.Popen([ELM_MLX, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()


def first_output(proc, limit=120) -> bytes:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            data = os.read(proc.stdout.fileno(), 4096)
            if data.strip():
                return data
        assert proc.poll() is None, proc.communicate()
    raise AssertionError("no output")


def test_ctrl_c_while_streaming_exits_130(model_dir):
    with spawned(["generate", "-M", str(model_dir), "Once upon a time", "-m", "1900", "--temp", "0", "--dtype",
                  "fp32"], quiet_env()) as proc:
        text = first_output(proc)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "(interrupted)" in err
    assert "generation:" in err  # the stats of what was streamed
    assert text  # the streamed text was printed before the interruption


def test_ctrl_c_during_start_up_exits_130_without_a_traceback(model_dir, tmp_path):
    """Start-up waiting on the network (a folder without a tokenizer, a hub that never answers)."""
    folder = shutil.copytree(model_dir, tmp_path / "no-tokenizer")
    (folder / "tokenizer.model").unlink()
    with silent_server() as (url, sock):
        with spawned(["generate", "-M", str(folder), "hi"], quiet_env(HF_HUB_OFFLINE=0, HF_ENDPOINT=url)) as proc:
            sock.settimeout(60)
            conn, _ = sock.accept()  # it is now waiting for an answer
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
            conn.close()
    err = err.decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err


def test_a_hub_that_never_answers_fails_fast_with_the_clear_message(model_dir, tmp_path):
    folder = shutil.copytree(model_dir, tmp_path / "no-tokenizer")
    (folder / "tokenizer.model").unlink()
    with silent_server() as (url, _):
        start = time.monotonic()
        r = subprocess.run([ELM_MLX, "generate", "-M", str(folder), "hi"], capture_output=True, text=True,
                           timeout=120, env=quiet_env(HF_HUB_OFFLINE=0, HF_ENDPOINT=url))
        elapsed = time.monotonic() - start
    assert r.returncode == 2, r.stderr
    assert "No tokenizer.model found" in r.stderr and "did not answer" in r.stderr
    assert "Retrying" not in r.stderr and "Traceback" not in r.stderr
    assert elapsed < 30
