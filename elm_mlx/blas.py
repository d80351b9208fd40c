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
the BLAS actually bound (elm_mlx/bench/machine.py).

A BLAS already in the process's global scope (LD_PRELOAD, or a host program
that loaded one) is kept: binding a second would leave two thread pools and
two sets of exit-time destructors in one process.

Exit. OpenBLAS's pthread build joins its worker threads in a library
destructor (gotoblas_quit -> blas_thread_shutdown_) as the process exits. On
a loaded machine a worker that is just going to sleep can miss that wake-up
(Debian's 0.3.21), and the join waits forever: the output printed, every
thread on a futex. MLX's own static destructors can also crash while its
threads run (a segfault after the output). Nothing needs either teardown at
exit, so `exit_process` does Python's exit work (atexit handlers, flushing)
and ends the process with os._exit; the `elm-mlx` command always leaves that
way, and a Python program can do the same."""

import atexit
import ctypes
import os
import re
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
    present = loaded_openblas()
    if present is not None:  # LD_PRELOAD or a host program bound one already: never a second
        _state["bound"] = present
        return present
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


def loaded_openblas() -> str | None:
    """The path of an OpenBLAS already in the process's global symbol scope, else None."""
    if not hasattr(ctypes.CDLL(None), "openblas_get_config"):
        return None
    try:
        with open("/proc/self/maps") as maps:
            found = re.search(r"(/\S*libopenblas\S*\.so\S*)", maps.read())
    except OSError:
        found = None
    return found.group(1) if found else "openblas (already loaded)"


def exit_process(code=0):
    """End the process now, skipping native library destructors (see the module docstring):
    atexit handlers run and stdout/stderr are flushed first. code: as SystemExit's."""
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said
                pass
        os._exit(code)


def hint_if_missing(cpu_backend: bool) -> None:
    """Once per process: on Linux's CPU backend with no BLAS bound and
    $ELM_MLX_BLAS unset, say how to get one."""
    if (_state["hinted"] or not cpu_backend or not sys.platform.startswith("linux") or _state["bound"]
            or os.environ.get(ENV) is not None):  # the user chose (or was warned about) a BLAS
        return
    _state["hinted"] = True
    print(INSTALL_HINT, file=sys.stderr)
