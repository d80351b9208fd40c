import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# No test may reach the network or the user's caches. Set before anything
# imports huggingface_hub, which reads these once, at import.
_caches = tempfile.mkdtemp(prefix="elm-mlx-tests-")
atexit.register(shutil.rmtree, _caches, True)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = os.path.join(_caches, "hf")
os.environ["ELM_MLX_CACHE"] = os.path.join(_caches, "elm-mlx")

# Test helpers (hub_cache, ...) are imported as top-level modules, whatever the import mode.
sys.path.insert(0, str(Path(__file__).parent))


# ---------------------------------------------------------------- shared fixtures
import pytest  # noqa: E402

LLAMA_TOKENIZER = Path(__file__).resolve().parents[2] / "shared/llama2-tokenizer/tokenizer.model"


@pytest.fixture(scope="session")
def llama_tokenizer() -> Path:
    """The real Llama-2 tokenizer.model (OpenELM's); tests that need it skip without it."""
    if not LLAMA_TOKENIZER.is_file():
        pytest.skip(f"../shared/llama2-tokenizer/tokenizer.model not found: expected at {LLAMA_TOKENIZER}")
    return LLAMA_TOKENIZER
