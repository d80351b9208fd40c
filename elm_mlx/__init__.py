"""elm-mlx: Apple's OpenELM language models on MLX."""

# First, before anything imports mlx.core: bind an optimized BLAS (elm_mlx/blas.py).
from . import blas

blas.bind()

# transformers (imported by mlx-lm, lm-eval and `convert --to mlx-lm` for tokenizers only) tells
# every process without PyTorch that "PyTorch was not found": advice for its model classes, which
# elm-mlx never uses. Off unless the user asked for it (setdefault).
import os  # noqa: E402

os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"

from .errors import ElmError  # noqa: E402
from .generate import GenerationResponse, generate, stream_generate  # noqa: E402
from .load import load  # noqa: E402

__all__ = ["load", "generate", "stream_generate", "GenerationResponse", "ElmError", "__version__"]
