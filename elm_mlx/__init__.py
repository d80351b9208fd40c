"""elm-mlx: Apple's OpenELM language models on MLX."""

__version__ = "0.1.0"

from .errors import ElmError
from .generate import GenerationResponse, generate, stream_generate
from .load import load

__all__ = ["load", "generate", "stream_generate", "GenerationResponse", "ElmError", "__version__"]
