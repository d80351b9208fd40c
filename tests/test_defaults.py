"""Fast defaults without flags: the BLAS bound before MLX loads
(elm_mlx/blas.py) and float32 compute on the CPU backend (load.compute_dtype).
The binder is checked in fresh interpreters by what the process maps and
which library MLX's cblas_sgemm resolves to; nothing is timed."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from checkpoints import make_hf_checkpoint
from engine import TINY_32K, param_dtypes

import elm_mlx
from elm_mlx import blas
from elm_mlx.load import compute_dtype

DEBIAN_OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0")
BLAS_PY = Path(blas.__file__)
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the binder acts on Linux only")

# Prints {"maps": [mapped libraries with "blas" in their name], "sgemm": the
# library MLX's cblas_sgemm resolves to, "bound": what bind() returned}.
PROBE = """
import json, os, sys
{setup}
import mlx.core as mx
from elm_mlx.bench.machine import blas_library
sgemm = blas_library()
maps = sorted({{l.split()[-1] for l in open("/proc/self/maps") if "blas" in os.path.basename(l.split()[-1])}})
print(json.dumps({{"maps": maps, "sgemm": sgemm, "bound": bound}}))
"""
VIA_PACKAGE = "import elm_mlx; from elm_mlx import blas; bound = blas.bind()"


def probe(setup: str, env: dict) -> tuple[dict, str]:
    import os

    full = {k: v for k, v in os.environ.items() if k != blas.ENV} | env
    r = subprocess.run([sys.executable, "-c", PROBE.format(setup=setup)], capture_output=True, text=True, env=full,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), r.stderr


@linux
@pytest.mark.skipif(not DEBIAN_OPENBLAS.exists(), reason="needs Debian's libopenblas0-pthread")
def test_importing_elm_mlx_binds_debian_openblas():
    out, err = probe(VIA_PACKAGE, {})
    assert out["bound"] == str(DEBIAN_OPENBLAS)
    assert "openblas-pthread" in out["sgemm"] and any("openblas-pthread" in m for m in out["maps"])
    assert err == ""


@linux
def test_env_path_overrides_the_candidates(tmp_path):
    # A copy under another name: only the override can have mapped it.
    if not DEBIAN_OPENBLAS.exists():
        pytest.skip("needs a CBLAS library to copy")
    fake = tmp_path / "libmyblas.so"
    shutil.copy(DEBIAN_OPENBLAS.resolve(), fake)
    out, _ = probe(VIA_PACKAGE, {blas.ENV: str(fake)})
    assert out["bound"] == str(fake) and out["sgemm"] == str(fake) and str(fake) in out["maps"]


@linux
def test_a_blas_already_in_the_process_is_kept_never_a_second(tmp_path):
    if not DEBIAN_OPENBLAS.exists():
        pytest.skip("needs Debian's libopenblas0-pthread")
    other = tmp_path / "libmyblas.so"  # what ELM_MLX_BLAS asks for would be a second library
    shutil.copy(DEBIAN_OPENBLAS.resolve(), other)
    out, err = probe(VIA_PACKAGE, {"LD_PRELOAD": str(DEBIAN_OPENBLAS), blas.ENV: str(other)})
    # (numpy's private, symbol-prefixed copy aside)
    assert str(other) not in out["maps"] and len([m for m in out["maps"] if "openblas-pthread" in m]) == 1
    assert "openblas" in out["bound"] and out["sgemm"] == out["bound"]
    assert err == ""


@linux
def test_env_none_keeps_mlx_bundled_blas():
    out, err = probe(VIA_PACKAGE, {blas.ENV: "none"})
    assert out["bound"] is None and "openblas-pthread" not in out["sgemm"]
    assert not any("openblas-pthread" in m for m in out["maps"])
    assert err == ""


@linux
def test_a_bad_env_path_is_one_warning_and_mlx_keeps_its_blas(tmp_path):
    out, err = probe(VIA_PACKAGE, {blas.ENV: str(tmp_path / "missing.so")})
    assert out["bound"] is None and "openblas-pthread" not in out["sgemm"]
    assert err.count("\n") == 1 and f"{blas.ENV}={tmp_path / 'missing.so'}: no such file" in err
    not_blas = tmp_path / "libnotblas.so"
    not_blas.write_text("not a shared library")
    out, err = probe(VIA_PACKAGE, {blas.ENV: str(not_blas)})
    assert out["bound"] is None and str(not_blas) in err and err.count("\n") == 1


@linux
def test_none_found_binds_nothing_and_the_cpu_hint_says_how(tmp_path):
    # blas.py loaded on its own (the package would bind on import), with candidates that do not exist.
    setup = (f"import importlib.util; spec = importlib.util.spec_from_file_location('b', {str(BLAS_PY)!r}); "
             f"b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b); "
             f"b.CANDIDATES = [{str(tmp_path / 'nope.so')!r}]; bound = b.bind(); "
             "b.hint_if_missing(False); b.hint_if_missing(True); b.hint_if_missing(True); "
             f"os.environ[{blas.ENV!r}] = 'none'")  # the probe's own import of elm_mlx binds nothing
    out, err = probe(setup, {})
    assert out["bound"] is None and "openblas-pthread" not in out["sgemm"]
    assert err.strip() == blas.INSTALL_HINT  # once, and only for the CPU backend
    assert "sudo apt install libopenblas0-pthread" in err and "ELM_MLX_BLAS" in err


def test_cpu_backend_computes_in_fp32_by_default(tmp_path, capfd, monkeypatch, llama_tokenizer):
    make_hf_checkpoint(tmp_path / "m", TINY_32K, dtype="BF16")  # the Llama-2 vocabulary, as load() checks
    monkeypatch.setattr(sys.modules["elm_mlx.load"], "_told", set())
    monkeypatch.setenv("ELM_MLX_CACHE", str(tmp_path / "cache"))
    model, _ = elm_mlx.load(tmp_path / "m", tokenizer=llama_tokenizer)
    assert param_dtypes(model) == {mx.float32}
    assert param_dtypes(elm_mlx.load(tmp_path / "m", dtype="bf16", tokenizer=llama_tokenizer)[0]) == {mx.bfloat16}
    elm_mlx.load(tmp_path / "m", tokenizer=llama_tokenizer)
    assert capfd.readouterr().err.count("computing in fp32") == 1  # said once
    monkeypatch.setattr(sys.modules["elm_mlx.load"], "_told", set())  # as a new process on this machine:
    elm_mlx.load(tmp_path / "m", tokenizer=llama_tokenizer)
    assert "computing in fp32" not in capfd.readouterr().err  # not said again
    monkeypatch.setattr(sys.modules["elm_mlx.load"], "_told", set())  # another machine (cache)
    monkeypatch.setenv("ELM_MLX_CACHE", str(tmp_path / "other-cache"))
    elm_mlx.load(tmp_path / "m", tokenizer=llama_tokenizer)
    assert "computing in fp32" in capfd.readouterr().err
    assert compute_dtype("bf16") == "bf16"
    monkeypatch.setattr(sys.modules["elm_mlx.load"], "cpu_backend", lambda: False)
    assert compute_dtype(None) is None  # elsewhere: load_model's as-stored default
