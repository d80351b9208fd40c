"""The arithmetic of a benchmark, as pure functions: a run is three clock
readings (prompt start, first token, last token) and every reported number is
a ratio of a token or byte count to one of their windows."""

import math
import textwrap
import statistics
from dataclasses import dataclass

from mlx.utils import tree_flatten

JSON_KEYS = ["model", "dtype", "method", "prompt_tokens", "gen_tokens", "prompt_tps", "generation_tps", "total_tps",
             "ttft_s", "peak_memory_gb", "bandwidth_gbps", "bandwidth_pct", "backend", "mlx_version"]



@dataclass
class Stamps:
    """Clock readings of one run: the prompt goes in at `start`, the first
    generated token is in Python's hands at `first`, the last at `end`."""
    start: float
    first: float
    end: float


def run_metrics(s: Stamps, prompt_tokens: int, gen_tokens: int, load_s: float) -> dict:
    """Throughput of one run, each number a ratio of a token count to a window:
    prompt: the prompt tokens over the time to the first token (which includes
    computing it, as in the paper and mlx-lm); generation: the tokens produced
    after the first (gen_tokens - 1) over the time after the first. The paper's
    script and mlx-lm count all gen_tokens over that same window, which
    overstates the rate by gen_tokens / (gen_tokens - 1); total: every token
    over the whole run. ttft_s includes loading the model (measured once)."""
    after_first = s.end - s.first
    return {
        "prompt_tps": prompt_tokens / (s.first - s.start),
        "generation_tps": (gen_tokens - 1) / after_first if gen_tokens > 1 else 0.0,
        "ms_per_token": 1e3 * after_first / (gen_tokens - 1) if gen_tokens > 1 else 0.0,
        "total_tps": (prompt_tokens + gen_tokens) / (s.end - s.start),
        "ttft_s": load_s + s.first - s.start,
        "load_s": load_s,
    }


def bandwidth(weight_bytes: int, kv_bytes_per_token: int, prompt_tokens: int, gen_tokens: int,
              generation_tps: float, machine_gbps: float) -> dict:
    """Bytes a decode step reads (every weight once, plus the KV cache at the
    context it attends over, averaged over the run's decode steps) times the
    decode rate, next to what the machine can stream."""
    # Decode step i = 1 .. gen_tokens-1 attends over prompt_tokens + i positions.
    avg_context = prompt_tokens + gen_tokens / 2
    per_token = weight_bytes + kv_bytes_per_token * avg_context
    gbps = per_token * generation_tps / 1e9
    return {"bytes_per_token": int(per_token), "bandwidth_gbps": gbps,
            "bandwidth_pct": 100 * gbps / machine_gbps if machine_gbps else 0.0}


def mean_std(values: list) -> tuple:
    """Mean and sample standard deviation (llama-bench's ±); std 0 for one
    value, and for values that were not measured (nan)."""
    if any(math.isnan(v) for v in values):
        return float("nan"), 0.0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every parameter once, except the
    input embedding, of which the gather reads one row; a tied head reads the
    whole matrix. Quantized layers count their packed weights, scales and biases."""
    emb = model.transformer.token_embeddings
    total = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
    emb_params = [p for _, p in tree_flatten(emb.parameters())]
    row = sum(p.nbytes // p.shape[0] for p in emb_params)
    if model.config.share_input_output_layers:
        return total + row
    return total - sum(p.nbytes for p in emb_params) + row


def kv_bytes_per_token(model) -> int:
    # The cache holds keys and values in the activation dtype (the norms' dtype, also when quantized).
    return model.config.kv_bytes_per_token(model.dtype.size)


COLUMNS = [("prompt_tps", "prompt tok/s"), ("generation_tps", "gen tok/s"), ("ms_per_token", "ms/token"),
           ("host_ms_per_token", "host ms/token"), ("total_tps", "total tok/s"),
           ("ttft_s", "TTFT s"), ("peak_memory_gb", "peak GB"), ("bandwidth_gbps", "GB/s"), ("bandwidth_pct", "% bw")]


WIDTH, NAME, CELL = 100, 16, 16  # the table's widths: 16 + 5 x 16 = 96 columns


def plain(x: float, digits: int = 3) -> str:
    """`x` with about `digits` significant digits, never in exponent form: 4127, 12.3, 0.0451."""
    if x == 0 or not math.isfinite(x):
        return "0" if x == 0 else "-"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:.{decimals}f}"


def cell(mean: float, std: float) -> str:
    """A table cell: the mean, and ± the standard deviation to the same decimals; "-" when not measured."""
    if math.isnan(mean):
        return "-"
    text = plain(mean)
    if not std:
        return text
    decimals = len(text.split(".")[1]) if "." in text else 0
    return f"{text} ± {std:.{decimals}f}"


def summarize(runs: list) -> dict:
    """{engine: {metric: (mean, std)}} in the engines' order."""
    out = {}
    for r in runs:
        out.setdefault(r["engine"], {k: [] for k, _ in COLUMNS})
        for k, _ in COLUMNS:
            out[r["engine"]][k].append(r.get(k, float("nan")))
    return {e: {k: mean_std(v) for k, v in cols.items()} for e, cols in out.items()}


def table(runs: list) -> str:
    r0 = runs[0]
    quant = f" {r0['quant']}" if r0.get("quant") else ""
    lines = [
        f"{r0['model']} {r0['dtype']}{quant} | method {r0['method']}: {r0['prompt_tokens']} prompt + "
        f"{r0['gen_tokens']} generated tokens, batch 1, greedy, EOS ignored, {max(r['repeat'] for r in runs) + 1} "
        f"run(s) per engine after a warm-up | load {r0['load_s']:.2f} s (in TTFT)",
        f"MLX {r0['mlx_version']}, {r0['backend']} backend" + (f", BLAS {r0['blas']}" if r0.get("blas") else "")
        + f" | memory bandwidth {r0['machine_bandwidth_gbps']:.1f} GB/s ({r0['bandwidth_probe']})"
        + f" | {r0['bytes_per_token'] / 1e9:.3f} GB read per generated token",
    ]
    stats = summarize(runs)
    ours = next((e for e in stats if e != "mlx-lm"), None) if "mlx-lm" in stats and len(stats) > 1 else None
    ratios = {k: (stats[ours][k][0] / stats["mlx-lm"][k][0] if stats["mlx-lm"][k][0] else float("nan"))
              for k, _ in COLUMNS} if ours else {}
    # Two blocks of columns, each engine a row in both: the table fits 100 columns.
    for block in (COLUMNS[:5], COLUMNS[5:]):
        lines.append(f"{'engine':<{NAME}}" + "".join(f"{h:>{CELL}}" for _, h in block))
        for engine, cols in stats.items():
            lines.append(f"{engine[:NAME - 1]:<{NAME}}" + "".join(f"{cell(*cols[k]):>{CELL}}" for k, _ in block))
        if ours:
            lines.append(f"{'ratio':<{NAME}}" + "".join(
                f"{'-' if math.isnan(ratios[k]) else f'{ratios[k]:.3f}x':>{CELL}}" for k, _ in block))
    if ours:
        lines.append(f"(ratio = {ours} / mlx-lm, means: > 1 is faster for tok/s and GB/s, < 1 is better for "
                     "ms, TTFT and memory)")
        lines.append("(host ms/token: building one decode step's graph in Python and MLX, before it runs)")
    if len(stats) > 1 and all("same_output" in r for r in runs):
        same = all(r["same_output"] for r in runs)
        lines.append(f"output: {'the same' if same else 'DIFFERENT'} {r0['gen_tokens']} token ids in every run of "
                     "every engine")
    lines += speculative_lines(runs, stats)
    return "\n".join(textwrap.fill(line, WIDTH, subsequent_indent="  ", break_on_hyphens=False)
                     if len(line) > WIDTH else line for line in lines)


def speculative_lines(runs: list, stats: dict) -> list:
    """Speculative engines: acceptance, tokens per forward and speed-up over plain decoding in the same run."""
    lines, plain = [], runs[0]["engine"]  # measure() runs the plain engine first
    for engine in stats:
        spec = [r for r in runs if r["engine"] == engine and "acceptance_rate" in r]
        if not spec:
            continue
        accept = mean_std([r["acceptance_rate"] for r in spec])[0]
        per_forward = mean_std([r["tokens_per_forward"] for r in spec])[0]
        def times(k):
            base = stats[plain][k][0]
            return f"{stats[engine][k][0] / base:.2f}x" if base and not math.isnan(base) else "(not measured)"

        lines.append(f"{engine}: {100 * accept:.0f}% of guesses accepted, {per_forward:.2f} tokens per forward of "
                     f"the model; speed-up over plain decoding ({plain}) {times('generation_tps')} generation, "
                     f"{times('total_tps')} total")
    return lines
