"""load(): a folder, a preset or a hub id -> (model, tokenizer)."""

import sys
from pathlib import Path

import mlx.core as mx

from .chat_template import find_template
from .checkpoint import load_weights, parse_dtype
from .config import OpenELMConfig, read_config
from .errors import ElmError
from .hub import cache_root, resolve
from .model import Model
from .quant import quantize_model, read_quantization
from .tokenizer import check_tokenizer_json, load_tokenizer


_told = set()


def cpu_backend() -> bool:
    return mx.default_device() == mx.cpu


def first_time(notice: str) -> bool:
    """True the first time on this machine (a marker in elm-mlx's cache folder; once per
    process where that can't be written): a notice that is news once, not on every command."""
    if notice in _told:
        return False
    _told.add(notice)
    marker = cache_root() / "told" / notice
    if marker.exists():
        return False
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:
        pass
    return True


def compute_dtype(dtype: str | None) -> str | None:
    """The dtype the front ends (load(), generate, chat, serve, bench) compute
    in: the one asked for, else "fp32" on the CPU backend, whatever the
    weights are stored in (quantized weights stay quantized, with float32
    activations): MLX's CPU bf16/fp16 kernels and quantized matmuls with bf16
    activations are 2-10x slower than float32 there (BENCHMARKS.md). Else
    None (load_model's as-stored default). Says so once per machine on stderr, with the
    BLAS hint when no optimized BLAS is bound."""
    if not cpu_backend():
        return dtype
    from . import blas

    blas.hint_if_missing(True)
    if dtype is not None:
        return dtype
    if first_time("cpu-fp32"):
        print("elm-mlx: computing in fp32 on MLX's CPU backend (bf16 is several times slower there); "
              "--dtype overrides", file=sys.stderr)
    return "fp32"


def load_model(folder: Path, dtype=None, adapter_path=None) -> Model:
    """dtype None: as stored for a folder elm-mlx wrote (its dtype was chosen
    at conversion) and for quantized folders, bfloat16 for anything else.
    Never float16 by default: the 3B's activations overflow it, so a quantized
    3B stored with float16 scales computes in bfloat16 too. (The front ends
    pass compute_dtype(...): float32 on the CPU backend.)"""
    folder = Path(folder)
    raw = read_config(folder / "config.json")
    cfg = OpenELMConfig.from_dict(raw, source=str(folder / "config.json"))
    quantization = read_quantization(raw, str(folder / "config.json"))
    dtype = parse_dtype(dtype)
    if dtype is None and "elm_mlx" not in raw and (quantization is None or not cfg.fp16_safe):
        dtype = mx.bfloat16
    if dtype is not None and dtype == mx.float16 and not cfg.fp16_safe:
        print("warning: OpenELM-3B's activations overflow float16; use bf16", file=sys.stderr)
    weights = load_weights(folder, cfg, dtype, quantization)
    model = Model(cfg)
    if quantization is not None:
        quantize_model(model, quantization, {k.removesuffix(".scales") for k in weights if k.endswith(".scales")})
    model.load_weights(list(weights.items()))
    if adapter_path is not None:
        from .lora import load_adapters

        load_adapters(model, adapter_path)
    mx.eval(model.parameters())
    return model


def load(name_or_path: str, dtype: str | None = None, tokenizer: str | None = None, adapter_path=None):
    """(model, tokenizer) from a model folder (Apple's HF layout or one
    `elm-mlx convert` wrote), a preset ("270M", "1_1B-Instruct", ...) or a hub
    id ("apple/OpenELM-3B"); hub models are downloaded and converted once.
    dtype: "bf16", "fp16" or "fp32"; default fp32 on the CPU backend, else
    bf16 (as stored for converted folders). tokenizer: a tokenizer.model
    used when the model folder has none (else one is rebuilt from the
    folder's tokenizer.json, else the hub copy is used)."""
    folder = resolve(str(name_or_path), dtype, tokenizer)  # the hub copy keeps its stored dtype
    if adapter_path is not None:
        from .lora import read_adapter_config

        read_adapter_config(adapter_path)  # before the slow part: fail fast
    model, tok = load_model(folder, compute_dtype(dtype), adapter_path), load_tokenizer(folder, tokenizer)
    check_tokenizer_json(folder, tok)
    check_vocabularies(model.config.vocab_size, tok, folder)
    tok.chat_template = find_template(folder, str(name_or_path))
    return model, tok


# CoreNet pads OpenELM's embedding to 32128 rows (the 32000 Llama-2 tokens, a padding
# token, rows to a round size); rows past the tokenizer's are never a token's.
PADDING_ROWS = 256


def check_vocabularies(model_vocab: int, tok, folder) -> None:
    """The tokenizer's ids must all be rows of the embedding (MLX's gather has no bounds
    check: a larger tokenizer reads past it), and the model may only add padding rows
    (the detokenizer turns them into no text)."""
    if model_vocab < tok.vocab_size:
        raise ElmError(f"{folder}/config.json: vocab_size is {model_vocab}, but {tok.path} has {tok.vocab_size} "
                       "tokens: the tokenizer is not this model's (its ids would read past the embedding); "
                       "pass the model's own tokenizer.model with --tokenizer")
    if model_vocab > tok.vocab_size + PADDING_ROWS:
        raise ElmError(f"{folder}/config.json: vocab_size is {model_vocab}, but {tok.path} has only "
                       f"{tok.vocab_size} tokens: the tokenizer is not this model's; pass the model's own "
                       "tokenizer.model with --tokenizer")
