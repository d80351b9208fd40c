"""Turn bench/results/<machine>/*.json (written by bench/suite.py) into the
tables of BENCHMARKS.md and the chart bench/tokens_per_second.png.

    python bench/report.py [bench/results/<machine>]

Only the part of BENCHMARKS.md between the `results` markers is rewritten;
the prose around it is kept. Needs matplotlib (`pip install matplotlib`).
"""

import json
import math
import sys
from pathlib import Path

from elm_mlx.bench import mean_std
from elm_mlx.config import OpenELMConfig

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
SIZE_ORDER = ["270M", "450M", "1_1B", "3B"]
ENGINES = ["elm-mlx", "mlx-lm", "naive RMSNorm"]
METRICS = [("prompt_tps", "prompt tok/s"), ("generation_tps", "gen tok/s"), ("total_tps", "total tok/s")]


def load(folder: Path) -> dict:
    read = lambda name, default: json.loads((folder / name).read_text()) if (folder / name).exists() else default  # noqa
    return {"env": read("env.json", {}), "runs": read("runs.json", []), "kernels": read("kernels.json", {}),
            "no_preload": read("no_preload.json", [])}


def groups(runs: list) -> dict:
    """{(size, dtype label, engine): {metric: (mean, std)}} in run order."""
    out = {}
    for r in runs:
        label = r["dtype"] + (f"-{r['quant']}" if r.get("quant") else "")
        out.setdefault((r["model"], label, r["engine"]), []).append(r)
    keys = [k for k, _ in METRICS] + ["ttft_s", "peak_memory_gb", "bandwidth_gbps", "bandwidth_pct"]
    return {g: {k: mean_std([r[k] for r in rs]) for k in keys} | {"runs": rs} for g, rs in out.items()}


def fmt(m, s=0.0):
    digits = 3 if m < 10 else 1 if m < 1000 else 0
    return f"{m:.{digits}f} ± {s:.{digits}f}" if s else f"{m:.{digits}f}"


def ratio(a, b):
    """(ratio of means, whether 1 lies within two combined relative stds)."""
    (ma, sa), (mb, sb) = a, b
    r = ma / mb
    noise = 2 * r * math.hypot(sa / ma if ma else 0, sb / mb if mb else 0)
    return r, abs(r - 1) <= noise


def config_table(g: dict) -> list:
    lines = ["| size | dtype | engine | gen tokens | prompt tok/s | gen tok/s | total tok/s | TTFT s (incl. load) | "
             "peak GB | GB/s read | % of bandwidth |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (size, dtype, engine), m in sorted(g.items(), key=_order):
        if engine == "naive RMSNorm":
            continue
        lines.append(f"| {size} | {dtype} | {engine} | {m['runs'][0]['gen_tokens']} | " + " | ".join(
            fmt(*m[k]) for k in ["prompt_tps", "generation_tps", "total_tps", "ttft_s", "peak_memory_gb",
                                 "bandwidth_gbps", "bandwidth_pct"]) + " |")
    return lines


def ratio_table(g: dict) -> list:
    lines = ["| size | dtype | prompt | generation | total |", "|---|---|---|---|---|"]
    for (size, dtype, engine), m in sorted(g.items(), key=_order):
        theirs = g.get((size, dtype, "mlx-lm"))
        if engine != "elm-mlx" or theirs is None:
            continue
        cells = []
        for k, _ in METRICS:
            r, within = ratio(m[k], theirs[k])
            cells.append(f"**{r:.3f}×**" if r >= 1 else f"{r:.3f}× ({'within noise' if within else 'slower'})")
        lines.append(f"| {size} | {dtype} | " + " | ".join(cells) + " |")
    return lines


def ablation_table(g: dict) -> list:
    lines = ["| size | RMSNorms per token (4·L+1) | fused gen tok/s | naive gen tok/s | gain: prompt | gain: generation "
             "| gain: total |", "|---|---|---|---|---|---|---|"]
    for (size, dtype, engine), naive in sorted(g.items(), key=_order):
        fused = g.get((size, dtype, "elm-mlx"))
        if engine != "naive RMSNorm" or fused is None:
            continue
        norms = 4 * OpenELMConfig.from_preset(size).num_transformer_layers + 1
        gains = []
        for k, _ in METRICS:
            r, within = ratio(fused[k], naive[k])
            gains.append(f"{r:.3f}×" + (" (within noise)" if within else ""))
        lines.append(f"| {size} {dtype} | {norms} | {fmt(*fused['generation_tps'])} | "
                     f"{fmt(*naive['generation_tps'])} | " + " | ".join(gains) + " |")
    return lines


def kernel_table(k: dict) -> list:
    if not k:
        return []
    lines = ["| weights | one 8192×2048 matrix × vector | GB/s read |", "|---|---|---|"]
    lines += [f"| {m['format']} | {m['ms']:.1f} ms | {m['gbps']:.2f} |" for m in k.get("matvec", [])]
    if "step_ms" in k:
        lines += ["", f"A 270M fp32 decode step took {k['step_ms']:.1f} ms, of which {k['python_graph_ms']:.2f} ms "
                  f"({100 * k['python_graph_ms'] / k['step_ms']:.1f}%) was Python building the step's graph."]
    return lines


def no_preload_table(runs: list) -> list:
    if not runs:
        return []
    g = groups(runs)
    r0 = runs[0]
    lines = [f"Same suite machine, `LD_PRELOAD` unset, so MLX calls its bundled BLAS (`{r0.get('blas')}`): "
             f"270M {r0['dtype']}, {r0['prompt_tokens']} prompt + {r0['gen_tokens']} generated tokens, "
             f"{len(runs) // len(g)} runs per engine.", ""]
    return lines + config_table(g)[:] + [""] + ratio_table(g)


def _order(item):
    (size, dtype, engine), _ = item
    return SIZE_ORDER.index(size) if size in SIZE_ORDER else 9, _dtype_order(dtype), ENGINES.index(engine)


def _dtype_order(label):
    return ["fp32", "bf16", "fp16"].index(label.split("-")[0]), label


def header(env: dict) -> list:
    args = env.get("suite_args", {})
    blas = f", BLAS `{env['blas']}`" if env.get("blas") else ""
    return [
        f"**Machine:** {env.get('device_name')} ({env.get('cpus')} CPUs), `{env.get('platform')}`; "
        f"MLX {env.get('mlx_version')} ({env.get('backend')} backend{blas}); mlx-lm {env.get('mlx_lm_version')}; "
        f"measured {env.get('date')}, suite took {env.get('suite_seconds', 0) / 60:.1f} min.",
        f"**Memory bandwidth:** {env.get('machine_bandwidth_gbps', 0):.1f} GB/s ({env.get('bandwidth_probe')}).",
        f"**Run:** `python bench/suite.py` with sizes {args.get('sizes')}, dtypes {args.get('dtypes')}, "
        f"quantization {args.get('quant') or 'none'}, {args.get('repeats')} measured runs per engine after one "
        "warm-up each, engines alternating in ABBA order; the paper's prompt (BOS + 36 tokens), greedy, EOS "
        "ignored; generated tokens per run as in the tables.",
    ]


def chart(g: dict, env: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    sizes = [s for s in SIZE_ORDER if any(k[0] == s for k in g)]
    series = sorted({(d, e) for (_, d, e) in g if e != "naive RMSNorm"}, key=lambda x: (_dtype_order(x[0]), x[1]))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(series))
    for ax, (key, title) in zip(axes, [("generation_tps", "generation tok/s"), ("prompt_tps", "prompt tok/s")]):
        for i, (dtype, engine) in enumerate(series):
            xs, ys, es = [], [], []
            for j, s in enumerate(sizes):
                m = g.get((s, dtype, engine))
                if m:
                    xs.append(j + (i - (len(series) - 1) / 2) * width)
                    ys.append(m[key][0])
                    es.append(m[key][1])
            ax.bar(xs, ys, width, yerr=es, label=f"{engine} {dtype}", hatch="" if engine == "elm-mlx" else "//",
                   color=f"C{i // 2}", alpha=1.0 if engine == "elm-mlx" else 0.6, edgecolor="black", linewidth=0.5)
        ax.set_xticks(range(len(sizes)), [f"OpenELM-{s}" for s in sizes])
        ax.set_ylabel(title)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"elm-mlx vs mlx-lm, batch 1, greedy — {env.get('device_name')} ({env.get('cpus')} CPUs), "
                 f"MLX {env.get('mlx_version')} {env.get('backend')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    folders = [Path(a) for a in sys.argv[1:]] or sorted(p for p in (HERE / "results").iterdir() if p.is_dir())
    blocks = []
    for folder in folders:
        data = load(folder)
        g = groups(data["runs"])
        blocks += [f"### {folder.name}", ""] + header(data["env"]) + [
            "", "#### Throughput (mean ± sample std over the measured runs)", ""] + config_table(g) + [
            "", "#### elm-mlx / mlx-lm (ratio of means; 'within noise': 1 lies within 2 combined relative std)",
            ""] + ratio_table(g) + [
            "", "#### RMSNorm ablation: fused `mx.fast.rms_norm` vs composed (paper Table 10), same model, same run",
            ""] + ablation_table(g) + ["", "#### Where a decode step's time goes", ""] + kernel_table(
            data["kernels"]) + ["", "#### Without the preloaded OpenBLAS", ""] + no_preload_table(
            data["no_preload"]) + [""]
        chart(g, data["env"], HERE / "tokens_per_second.png")
    doc = HERE.parent / "BENCHMARKS.md"
    text = doc.read_text() if doc.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    doc.write_text(head + BEGIN + "\n" + "\n".join(blocks) + "\n" + END + tail)
    print(f"wrote {doc} and {HERE / 'tokens_per_second.png'}")


if __name__ == "__main__":
    main()
