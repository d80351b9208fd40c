"""`elm-mlx bench`: how fast, compared with what, and where the time goes.

metrics.py  the arithmetic: clock readings and byte counts -> tok/s, GB/s (pure, tested with a fake clock)
machine.py  the backend, the BLAS MLX calls, the memory-bandwidth probe
run.py      models (loaded, random or quantized), the engines compared, the timed runs, the table
"""

from .machine import backend, blas_library, environment, memory_bandwidth
from .metrics import (
    JSON_KEYS,
    Stamps,
    bandwidth,
    kv_bytes_per_token,
    mean_std,
    run_metrics,
    summarize,
    table,
    weight_bytes_per_token,
)
from .run import (
    METHODS,
    PAPER_PROMPT,
    PAPER_PROMPT_IDS,
    Engine,
    NaiveRMSNorm,
    elm_engine,
    host_ms,
    load_bench_model,
    measure,
    mlx_lm_engine,
    naive_norm_engine,
    prompt_ids,
    run_bench,
    quant_label,
    quantize,
    quantize_like,
    quantized_paths,
    time_run,
)

__all__ = [
    "JSON_KEYS", "Stamps", "bandwidth", "kv_bytes_per_token", "mean_std", "run_metrics", "summarize", "table",
    "weight_bytes_per_token", "backend", "blas_library", "environment", "memory_bandwidth", "METHODS",
    "PAPER_PROMPT", "PAPER_PROMPT_IDS", "Engine", "NaiveRMSNorm", "elm_engine", "host_ms", "load_bench_model",
    "measure", "mlx_lm_engine", "naive_norm_engine", "prompt_ids", "run_bench", "quant_label", "quantize", "quantize_like", "quantized_paths",
    "time_run",
]
