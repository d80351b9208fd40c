"""The bench/ scripts (not installed), loaded by path for the tests that run them on a tiny config."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "bench/configs/tiny-4L-128d")


def load(name: str):
    """bench/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / f"bench/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
