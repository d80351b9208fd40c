"""An optimized BLAS for MLX's CPU backend on Linux, bound before MLX loads.

MLX's Linux CPU wheel links a reference BLAS (~5 GFLOP/s); every float32
matmul goes through its `cblas_sgemm`. libmlx looks that symbol up in the
process's global scope before its own dependencies, so loading OpenBLAS with
RTLD_GLOBAL before `mlx.core` is imported binds MLX to it in-process (~175
GFLOP/s here), as LD_PRELOAD would, without the user knowing either.

Which library: the path in $ELM_MLX_BLAS (`none` binds nothing), else the
first of CANDIDATES that exists (Debian/Ubuntu's `libopenblas0-pthread`,
Fedora's `openblas`). This module imports nothing else of elm_mlx and no MLX,
so `elm_mlx/__init__.py` can call bind() first thing. elm-mlx bench reports
the BLAS actually bound (elm_mlx/bench/machine.py)."""

import ctypes
import os
import sys

ENV = "ELM_MLX_BLAS"
CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
]
INSTALL_HINT = ("note: MLX's CPU backend is using its slow bundled BLAS; for ~30x faster matrix products install "
                "OpenBLAS (Debian/Ubuntu: sudo apt install libopenblas0-pthread) or set ELM_MLX_BLAS to a "
                "libopenblas.so")

_state = {"done": False, "bound": None, "hinted": False}


def bind() -> str | None:
    """Load the BLAS into the global scope (once per process); its path, or
    None when none was bound (not Linux, none installed, ELM_MLX_BLAS=none).
    A bad $ELM_MLX_BLAS gets one line on stderr."""
    if _state["done"]:
        return _state["bound"]
    _state["done"] = True
    if not sys.platform.startswith("linux"):
        return None
    wanted = os.environ.get(ENV)
    if wanted is not None and wanted.strip().lower() in ("", "none", "0"):
        return None
    for path in [wanted] if wanted else CANDIDATES:
        if not os.path.exists(path):
            if wanted:
                print(f"warning: {ENV}={path}: no such file; MLX keeps its bundled BLAS", file=sys.stderr)
            continue
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            print(f"warning: {ENV if wanted else 'BLAS'} {path} could not be loaded ({e}); MLX keeps its bundled "
                  "BLAS", file=sys.stderr)
            continue
        if not hasattr(ctypes.CDLL(path), "cblas_sgemm"):
            print(f"warning: {path} has no cblas_sgemm: not a CBLAS library; MLX keeps its bundled BLAS",
                  file=sys.stderr)
            continue
        _state["bound"] = path
        return path
    return None


def hint_if_missing(cpu_backend: bool) -> None:
    """Once per process: on Linux's CPU backend with no BLAS bound and
    $ELM_MLX_BLAS unset, say how to get one."""
    if (_state["hinted"] or not cpu_backend or not sys.platform.startswith("linux") or _state["bound"]
            or os.environ.get(ENV) is not None):  # the user chose (or was warned about) a BLAS
        return
    _state["hinted"] = True
    print(INSTALL_HINT, file=sys.stderr)
