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



# ---------------------------------------------------------------- shared fixtures
import pytest  # noqa: E402

LLAMA_TOKENIZER = Path(__file__).resolve().parent / "data/llama2-tokenizer/tokenizer.model"


@pytest.fixture(scope="session")
def llama_tokenizer() -> Path:
    """The real Llama-2 tokenizer.model (OpenELM's), kept in tests/data with its notice."""
    return LLAMA_TOKENIZER
