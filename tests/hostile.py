"""Builders of hostile inputs for the catalogue tests (tests/test_hostile_*.py):
damaged safetensors files, zip bombs in torch's .pt format, sockets that never
answer, and running a command in a child process to see its exit code, its
stderr and its peak memory."""

from __future__ import annotations

import json
import os
import pickle
import socket
import struct
import subprocess
import sys
import textwrap
import zipfile
from contextlib import contextmanager
from pathlib import Path

ELM_MLX = str(Path(sys.executable).with_name("elm-mlx"))


def safetensors_bytes(header, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw)) + raw + data


def write_safetensors_header(path: Path, header, data: bytes = b"") -> Path:
    Path(path).write_bytes(safetensors_bytes(header, data))
    return Path(path)


def zip_with(path: Path, members: dict, compression=zipfile.ZIP_STORED) -> Path:
    """A zip archive of {name: bytes}."""
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def deflated_zeros(zf: zipfile.ZipFile, name: str, nbytes: int, fill: bytes = b"\0") -> None:
    """A member of `nbytes` identical bytes, deflated (~1000:1): the zip bomb's payload."""
    chunk = fill * (1 << 24)
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    with zf.open(info, "w", force_zip64=True) as f:
        left = nbytes
        while left > 0:
            f.write(chunk[:min(left, len(chunk))])
            left -= len(chunk)


def pickle_bomb(ops: int) -> bytes:
    """A protocol-2 pickle of a list of `ops` // 2 fresh empty dicts (2 opcodes each): small file, many objects."""
    return b"\x80\x02]" + b"}a" * ops + b"."


@contextmanager
def silent_server():
    """A TCP socket that accepts connections and never answers: yields (url, sock)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", sock
    finally:
        sock.close()


# A child Python that runs the CLI and reports its own peak memory: VmHWM, the high-water
# mark of this process image (ru_maxrss would include the parent's, as Linux keeps it
# across exec).
PEAK_RSS_KIB = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])"
# main() ends the process itself (elm_mlx/blas.py, exit_process) after running atexit handlers.
_PEAK = textwrap.dedent(f"""
    import atexit, sys
    from elm_mlx.cli import main
    sys.argv = ["elm-mlx"] + sys.argv[1:]
    atexit.register(lambda: sys.stderr.write(f"\\npeak_rss_kib={{{PEAK_RSS_KIB}}}\\n"))
    main()
""")


def run_cli_measured(args: list, timeout: float = 120, env: dict | None = None) -> tuple[int, str, float]:
    """(exit code, stderr, peak RSS in MB) of `elm-mlx ARGS` in a child process."""
    r = subprocess.run([sys.executable, "-c", _PEAK, *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=env)
    head, _, peak = r.stderr.rpartition("peak_rss_kib=")
    return r.returncode, head, int(peak.strip()) / 1024


def quiet_env(**extra) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def pickled(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)
