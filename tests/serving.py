"""Run the real `elm-mlx serve` on a free port, and talk to it with the standard
library's HTTP client (test helpers for the server and web page tests)."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

STARTUP_S = 120  # importing MLX and loading a model on a busy 2-core machine


@contextmanager
def running_server(folder: Path, log: Path, *args: str, process: list | None = None):
    """Yields the base URL of `elm-mlx serve -M folder --port 0 *args`; its output goes to `log`
    (and its Popen to `process`, when given)."""
    exe = Path(sys.executable).with_name("elm-mlx")
    with open(log, "w") as out:
        proc = subprocess.Popen([str(exe), "serve", "-M", str(folder), "--port", "0", *args],
                                stdout=out, stderr=subprocess.STDOUT)
    if process is not None:
        process.append(proc)
    try:
        yield _wait_until_up(proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_until_up(proc, log: Path) -> str:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"elm-mlx serve exited with {proc.returncode}:\n{log.read_text()}")
        found = re.search(r"on (http://127\.0\.0\.1:\d+)", log.read_text())
        if found:
            try:
                if request(found.group(1), "GET", "/health")[0] == 200:
                    return found.group(1)
            except ConnectionError:
                pass  # bound, not yet listening
        time.sleep(0.1)
    raise RuntimeError(f"elm-mlx serve did not come up in {STARTUP_S} s:\n{log.read_text()}")


def connect(url: str) -> http.client.HTTPConnection:
    u = urlparse(url)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=120)


def request(url: str, method: str, path: str, body: bytes | str | dict | None = None, headers: dict | None = None):
    """(status, parsed JSON body or text). `headers` add to (or, given None as a value, remove)
    Content-Type: application/json."""
    if isinstance(body, dict):
        body = json.dumps(body)
    headers = {k: v for k, v in ({"Content-Type": "application/json"} | (headers or {})).items() if v is not None}
    conn = connect(url)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read().decode()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(data)
    except json.JSONDecodeError:
        return resp.status, data


def wait_idle(url: str, timeout: float = 60):
    """Until the server has no request running or queued."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = request(url, "GET", "/health")[1]
        if not health["busy"] and not health["queued"]:
            return
        time.sleep(0.05)
    raise AssertionError(f"server still busy after {timeout} s")


def health(url: str) -> dict:
    return request(url, "GET", "/health")[1]
