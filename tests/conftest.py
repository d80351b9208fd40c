import atexit
import os
import shutil
import tempfile
from pathlib import Path

# No test may reach the network or the user's caches. Set before anything
# imports huggingface_hub, which reads these once, at import.
_caches = tempfile.mkdtemp(prefix="elm-mlx-tests-")
atexit.register(shutil.rmtree, _caches, True)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = os.path.join(_caches, "hf")
os.environ["HF_DATASETS_OFFLINE"] = "1"  # lm-eval's tasks load datasets (tests use local files)
os.environ["HF_DATASETS_CACHE"] = os.path.join(_caches, "datasets")
os.environ["ELM_MLX_CACHE"] = os.path.join(_caches, "elm-mlx")

# ...and none does: in the test process, names other than loopback ones do not resolve and
# connections go to loopback addresses only (the servers the tests start), so a test that would
# reach a hub or a CDN fails on the spot instead of passing where a network happens to be.
import socket  # noqa: E402

_LOOPBACK = {None, "localhost", "::1", "ip6-localhost"}


def _is_loopback(host) -> bool:
    host = host.decode() if isinstance(host, bytes) else host
    return host in _LOOPBACK or (isinstance(host, str) and host.startswith("127."))


def _offline_getaddrinfo(host, *args, _real=socket.getaddrinfo, **kwargs):
    if not _is_loopback(host):
        raise socket.gaierror(f"tests run offline: {host!r} does not resolve here (tests/conftest.py)")
    return _real(host, *args, **kwargs)


def _offline(connect):
    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            raise OSError(f"tests run offline: no connection to {address!r} (tests/conftest.py)")
        return connect(self, address)
    return guarded


socket.getaddrinfo = _offline_getaddrinfo
socket.socket.connect = _offline(socket.socket.connect)
socket.socket.connect_ex = _offline(socket.socket.connect_ex)

# Bind OpenBLAS before any test module imports mlx.core, as the elm-mlx command does
# (elm_mlx/blas.py): a test that imports mlx first would otherwise leave the whole
# session on MLX's reference BLAS (~4 GFLOP/s instead of ~175), and test what no user runs.
import elm_mlx  # noqa: E402,F401

# ---------------------------------------------------------------- shared fixtures
import pytest  # noqa: E402

LLAMA_TOKENIZER = Path(__file__).resolve().parent / "data/llama2-tokenizer/tokenizer.model"


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


_EXIT_STATUS = pytest.StashKey[int]()


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """The test process ends as the command does, without native destructors: OpenBLAS's
    exit-time pool shutdown can hang on a loaded machine (elm_mlx/blas.py, exit_process).
    Only once everything is reported; atexit handlers (the cache folder above) still run."""
    if _EXIT_STATUS in config.stash:
        from elm_mlx import blas

        blas.exit_process(config.stash[_EXIT_STATUS])


@pytest.fixture(scope="session")
def llama_tokenizer() -> Path:
    """The real Llama-2 tokenizer.model (OpenELM's), kept in tests/data with its notice."""
    return LLAMA_TOKENIZER


def tiny_model_folder(path: Path) -> Path:
    """A tiny OpenELM over the real 32000-token vocabulary, with its tokenizer.model."""
    from checkpoints import make_hf_checkpoint
    from engine import TINY_32K

    make_hf_checkpoint(path, TINY_32K, seed=5)
    shutil.copyfile(LLAMA_TOKENIZER, path / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def instruct_folder(tmp_path_factory) -> Path:
    """tiny_model_folder named -Instruct, so it gets Apple's chat template."""
    return tiny_model_folder(tmp_path_factory.mktemp("models") / "OpenELM-270M-Instruct")


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    """tiny_model_folder of a base model: no chat template."""
    return tiny_model_folder(tmp_path_factory.mktemp("models") / "OpenELM-270M")


@pytest.fixture
def offline_caches(tmp_path, monkeypatch):
    """Never touch the network or the user's caches: an empty offline hub cache and a
    private ELM_MLX_CACHE (tests that need a hub fill their own)."""
    from hub_cache import use_hub_cache

    use_hub_cache(monkeypatch, tmp_path / "empty-hf-cache")
    monkeypatch.setenv("ELM_MLX_CACHE", str(tmp_path / "empty-elm-cache"))


@pytest.fixture(scope="module")
def tok(llama_tokenizer):
    """The real Llama-2 tokenizer, loaded (a fresh one per test module)."""
    from elm_mlx.tokenizer import Tokenizer

    return Tokenizer(llama_tokenizer)


@pytest.fixture(scope="module")
def tiny32k_model():
    """An fp32 MLX model of the tiny architecture over the real vocabulary (engine.TINY_32K), random weights."""
    from checkpoints import random_weights
    from engine import TINY_32K, build

    return build(TINY_32K, random_weights(TINY_32K, seed=3))
