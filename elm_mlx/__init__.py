"""elm-mlx: Apple's OpenELM language models on MLX."""

# First, before anything imports mlx.core: bind an optimized BLAS (elm_mlx/blas.py).
from . import blas

blas.bind()

__version__ = "0.1.0"

from .errors import ElmError  # noqa: E402
from .generate import GenerationResponse, generate, stream_generate  # noqa: E402
from .load import load  # noqa: E402

__all__ = ["load", "generate", "stream_generate", "GenerationResponse", "ElmError", "__version__"]
