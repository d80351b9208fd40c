"""The machine a benchmark ran on: MLX's backend, the BLAS its CPU matmuls
call, and how fast memory streams (the roofline for decoding)."""

import ctypes
import os
import platform
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx


def backend() -> str:
    if mx.default_device() == mx.cpu:
        return "CPU"
    if mx.metal.is_available():
        return "Metal"
    return "CUDA" if hasattr(mx, "cuda") and mx.cuda.is_available() else "GPU"


def blas_library() -> str:
    """The BLAS MLX's CPU matmuls call (it imports cblas_sgemm; float32 only)."""
    if sys.platform == "darwin":
        return "Accelerate"
    mx.eval(mx.ones((8, 8)) @ mx.ones((8, 8)))  # MLX's libraries are loaded by now
    # libmlx binds cblas_sgemm to the global scope first (LD_PRELOAD), then
    # to its own dependencies: ask the dynamic linker in that order.
    libmlx = [p for p in _mapped_files() if os.path.basename(p).startswith("libmlx")]
    for handle in [None] + libmlx[:1]:
        try:
            fn = ctypes.CDLL(handle).cblas_sgemm
        except (AttributeError, OSError):
            continue
        info = _DlInfo()
        if ctypes.CDLL(None).dladdr(ctypes.cast(fn, ctypes.c_void_p), ctypes.byref(info)) and info.fname:
            return os.path.realpath(info.fname.decode())
    return "unknown"


class _DlInfo(ctypes.Structure):
    _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]


def _mapped_files() -> list:
    try:
        with open("/proc/self/maps") as f:
            return list(dict.fromkeys(line.split()[-1] for line in f if "/" in line))
    except OSError:
        return []


def memory_bandwidth(gib: float = 1.0, repeats: int = 5, clock=time.perf_counter) -> tuple:
    """(GB/s, how): the best of `repeats` streaming reads of a `gib` GiB array.
    On a GPU, an MLX sum on the device. On the CPU, NumPy sums of the same
    MLX buffer with one thread per core: MLX's CPU reductions run on one
    thread and are compute-bound (~5 GB/s here), far below the memory."""
    n = int(gib * 2**30) // 4
    if backend() == "CPU":
        import numpy as np

        threads = cpu_count()
        parts = np.array_split(np.ones(n, np.float32), threads)
        with ThreadPoolExecutor(threads) as pool:
            best = _best_read(lambda: list(pool.map(np.sum, parts)), repeats, clock)
        how = f"NumPy sum, {threads} thread(s)"
    else:
        a = mx.ones((n,), mx.float32)
        best = _best_read(lambda: mx.eval(mx.sum(a)), repeats, clock)
        how = f"MLX sum on the {backend()} device"
    return n * 4 / best / 1e9, f"{how} over {gib:g} GiB, best of {repeats}"


def _best_read(read, repeats, clock) -> float:
    read()  # first touch: page faults and lazy allocation are not bandwidth
    best = float("inf")
    for _ in range(repeats):
        t = clock()
        read()
        best = min(best, clock() - t)
    return best


def available_memory() -> int | None:
    """Bytes of memory a new allocation can get: MemAvailable on Linux, the
    physical memory elsewhere; None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError, AttributeError):
        return None


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def environment() -> dict:
    gbps, how = memory_bandwidth()
    env = {"backend": backend(), "mlx_version": mx.__version__, "machine_bandwidth_gbps": gbps,
           "bandwidth_probe": how, "platform": platform.platform(),
           "device_name": mx.device_info().get("device_name", platform.processor()), "cpus": cpu_count()}
    try:
        import mlx_lm

        env["mlx_lm_version"] = mlx_lm.__version__
    except ImportError:
        pass
    if env["backend"] == "CPU":
        env["blas"] = blas_library()
    return env


def machine_label(env) -> str:
    """The folder name of a machine's results: bench/results/<this>/ (from environment())."""
    name = re.sub(r"[^A-Za-z0-9]+", "-", env["device_name"]).strip("-")
    return f"{platform.system().lower()}-{platform.machine()}-{name}-{env['cpus']}cpu-{env['backend'].lower()}"
