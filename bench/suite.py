"""The reproducible benchmark suite: every OpenELM size x dtype (x quantization)
against mlx-lm on the same weight arrays, the RMSNorm ablation (fused
mx.fast.rms_norm vs a composed RMSNorm, same model, same run), and where a
decode step's time goes on this backend. Random weights of each size's exact
architecture: offline, and speed does not depend on the values.

    python bench/suite.py                       # everything, then bench/report.py
    python bench/suite.py --sizes 270M --gen-tokens 32

Results: bench/results/<machine>/{env,runs,kernels}.json; then
`python bench/report.py` writes BENCHMARKS.md and bench/tokens_per_second.png.
"""

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import elm_mlx  # noqa: F401  (first: it binds an optimized BLAS before MLX loads)
import mlx.core as mx
from mlx.utils import tree_flatten

from elm_mlx import bench as b
from elm_mlx.bench.machine import machine_label
from elm_mlx.cache import make_cache
from elm_mlx.checkpoint import parse_dtype
from elm_mlx.quant import DEFAULT_GROUP_SIZE, LEVELS, RECIPE, UNIFORM
from elm_mlx.config import SIZES
from elm_mlx.model import Model

HERE = Path(__file__).resolve().parent
# Generated tokens per size. Apple silicon runs the paper's 1024; a 2-core CPU
# reads the 3B's 12 GB of fp32 weights per token, so there the counts shrink.
GEN_FULL = {"270M": 1024, "450M": 1024, "1_1B": 1024, "3B": 1024}
GEN_CPU = {"fp32": {"270M": 128, "450M": 64, "1_1B": 32, "3B": 16},
           "bf16": {"270M": 64, "450M": 32, "1_1B": 16, "3B": 8}}


def say(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def gen_tokens(args, dtype, size, backend):
    if args.gen_tokens:
        return args.gen_tokens
    return GEN_CPU.get(dtype.split("-")[0], GEN_CPU["bf16"])[size] if backend == "CPU" else GEN_FULL[size]


def copy_model(model, dtype=None, quant=None):
    """A new model on the same arrays (cast or quantized when asked)."""
    other = Model(model.config)
    other.load_weights(tree_flatten(model.parameters()))
    if dtype is not None:
        other.set_dtype(dtype)
    b.quantize(other, quant)
    mx.eval(other.parameters())
    return other


def run_config(model, size, label, engines, args, env, load_s, out):
    n = gen_tokens(args, label, size, env["backend"])
    info = {"model": size, "dtype": label, "quant": None, "method": "paper", "load_s": load_s, **env}
    if "-" in label:
        info["dtype"], info["quant"] = label.split("-")
    say(f"{size} {label}: {', '.join(e.name for e in engines)}; 36 prompt + {n} generated tokens, "
        f"{args.repeats} runs each")
    runs = b.measure(engines, b.PAPER_PROMPT_IDS, n, args.repeats, info, progress=say)
    print(b.table(runs), file=sys.stderr, flush=True)
    out.extend(runs)


def sizes_and_dtypes(args, env, out):
    for size in args.sizes:
        say(f"building {size} with random weights (fp32)")
        t = time.perf_counter()
        model, _ = b.load_bench_model(size, "fp32", True, None)
        load_s = time.perf_counter() - t
        if "fp32" in args.dtypes:
            engines = [b.elm_engine(model), b.mlx_lm_engine(model)]
            if not args.no_ablation:
                engines.append(b.naive_norm_engine(model))
            run_config(model, size, "fp32", engines, args, env, load_s, out)
            save(args, env, out)
            del engines  # mlx-lm's and the naive model hold the float32 arrays too
        low = [d for d in args.dtypes if d != "fp32"]
        for dtype in low:
            t = time.perf_counter()
            cast = copy_model(model, parse_dtype(dtype))
            if dtype == low[-1]:
                del model  # the float32 arrays are freed once nothing refers to them
                gc.collect()
                model = cast
            cast_s = time.perf_counter() - t
            run_config(cast, size, dtype, [b.elm_engine(cast), b.mlx_lm_engine(cast)], args, env, cast_s, out)
            save(args, env, out)
            for quant in args.quant:
                q = copy_model(cast, quant=quant)
                run_config(q, size, f"{dtype}-{quant}", [b.elm_engine(q), b.mlx_lm_engine(q)], args, env, cast_s, out)
                save(args, env, out)
                del q
            del cast
        del model
        gc.collect()
        mx.clear_cache()


def kernels(env) -> dict:
    """Where a decode step's time goes: one OpenELM-1.1B-sized matrix-vector
    product per weight format (GB/s read), and Python's share of a 270M step."""
    out = {"matvec": []}
    w32 = mx.random.normal((8192, 2048), key=mx.random.key(0)) * 0.02
    x = mx.random.normal((1, 2048), key=mx.random.key(1))
    mx.eval(w32, x)
    formats = [("fp32", w32, None), ("bf16", w32.astype(mx.bfloat16), None)]
    for quant, bits in UNIFORM.items():
        formats.append((f"bf16-{quant.removesuffix('-uniform')}", w32.astype(mx.bfloat16), bits))
    for name, w, bits in formats:
        xx = x.astype(w.dtype)
        if bits:
            wq, s, z = mx.quantize(w, DEFAULT_GROUP_SIZE, bits)
            mx.eval(wq, s, z)
            nbytes = wq.nbytes + s.nbytes + z.nbytes
            f = lambda: mx.eval(mx.quantized_matmul(xx, wq, s, z, transpose=True, group_size=DEFAULT_GROUP_SIZE,  # noqa
                                                    bits=bits))
        else:
            nbytes = w.nbytes
            f = lambda: mx.eval(xx @ w.T)  # noqa: E731
        f()
        best = min(_timed(f) for _ in range(3))
        out["matvec"].append({"format": name, "shape": [8192, 2048], "ms": 1e3 * best, "gbps": nbytes / best / 1e9})
        say(f"matvec {name}: {1e3 * best:.1f} ms, {nbytes / best / 1e9:.2f} GB/s")
    model, _ = b.load_bench_model("270M", "fp32", True, None)
    cache = make_cache(model)
    y = mx.argmax(model(mx.array([b.PAPER_PROMPT_IDS]), cache)[:, -1], -1)
    mx.eval(y)
    build = total = 0.0
    steps = 8
    for _ in range(steps):
        t0 = time.perf_counter()
        y = mx.argmax(model(y[None], cache)[:, -1], -1)
        t1 = time.perf_counter()
        mx.eval(y)
        build, total = build + t1 - t0, total + time.perf_counter() - t0
    out["python_graph_ms"], out["step_ms"] = 1e3 * build / steps, 1e3 * total / steps
    say(f"270M fp32 decode step: {out['step_ms']:.1f} ms, of which building the graph in Python "
        f"{out['python_graph_ms']:.2f} ms")
    return out


def _timed(f):
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def blas_check(env, args) -> list:
    """With an optimized BLAS bound (elm_mlx/blas.py, or LD_PRELOAD), the same
    270M fp32 run without it (MLX's own)."""
    if env["backend"] != "CPU" or "mlx_cpu.libs" in env.get("blas", "mlx_cpu.libs"):
        return []
    environ = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"} | {"ELM_MLX_BLAS": "none"}
    cmd = [str(Path(sys.executable).with_name("elm-mlx")), "bench", "--model", "270M", "--random-weights", "--dtype", "fp32",
           "--gen-tokens", "32", "--compare", "mlx-lm", "-n", "2", "--json", "-"]
    say("270M fp32 with ELM_MLX_BLAS=none: elm-mlx " + " ".join(cmd[1:]))
    done = subprocess.run(cmd, env=environ, capture_output=True, text=True)
    if done.returncode:
        say(done.stderr)
        return []
    print(done.stderr, file=sys.stderr)
    return json.loads(done.stdout)


def save(args, env, runs, **extra):
    folder = args.out / machine_label(env)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "env.json").write_text(json.dumps({**env, "suite_args": vars(args) | {"out": str(args.out)},
                                                 "date": time.strftime("%Y-%m-%d")}, indent=1) + "\n")
    (folder / "runs.json").write_text(json.dumps(runs, indent=1) + "\n")
    for name, value in extra.items():
        (folder / f"{name}.json").write_text(json.dumps(value, indent=1) + "\n")
    return folder


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--quant", nargs="*", default=None, choices=list(LEVELS),
                   help="quantized runs (of the last dtype); default q8 q4, none on a CPU (see BENCHMARKS.md)")
    p.add_argument("--gen-tokens", type=int, help="for every size (default: 1024, fewer on a CPU)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-ablation", action="store_true")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args()
    say("probing the machine")
    env = b.environment()
    if args.quant is None:
        args.quant = [] if env["backend"] == "CPU" else list(RECIPE)
    say(json.dumps(env))
    start = time.perf_counter()
    runs = []
    extra = {"kernels": kernels(env)}
    save(args, env, runs, **extra)
    sizes_and_dtypes(args, env, runs)
    extra["no_preload"] = blas_check(env, args)
    env["suite_seconds"] = time.perf_counter() - start
    folder = save(args, env, runs, **extra)
    say(f"done in {env['suite_seconds'] / 60:.1f} min: {folder}")


if __name__ == "__main__":
    main()
