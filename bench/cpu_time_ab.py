"""Decode speed of elm-mlx vs mlx-lm counted in tokens per CPU-second as well
as per wall-second: on a shared machine the wall clock also measures the
neighbours, CPU time much less so. Random weights, the paper's prompt, the
prefill excluded; alternating runs after a warm-up of each.

    OPENBLAS_NUM_THREADS=1 LD_PRELOAD=.../libopenblas.so.0 python bench/cpu_time_ab.py 1_1B --tokens 8 --repeats 4

Use one BLAS thread: idle threads that spin would count as CPU time.
"""

import argparse
import time

import mlx.core as mx

from elm_mlx.bench import PAPER_PROMPT_IDS, elm_engine, load_bench_model, mean_std, mlx_lm_engine


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("size")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=4)
    args = p.parse_args()
    model, _ = load_bench_model(args.size, args.dtype, True, None)
    engines = [elm_engine(model), mlx_lm_engine(model)]
    cpu, wall = {e.name: [] for e in engines}, {e.name: [] for e in engines}
    for r in range(-1, args.repeats):  # r = -1: the warm-up
        for e in engines if r % 2 == 0 else engines[::-1]:
            tokens = e.tokens(PAPER_PROMPT_IDS)
            next(tokens)  # the prefill is not counted
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(args.tokens):
                next(tokens)
            c1, w1 = time.process_time(), time.perf_counter()
            tokens.close()
            mx.synchronize()
            if r >= 0:
                cpu[e.name].append(args.tokens / (c1 - c0))
                wall[e.name].append(args.tokens / (w1 - w0))
    for name in cpu:
        print(f"{name:8} tokens per CPU-second {'%.3f ± %.3f' % mean_std(cpu[name])}, "
              f"per wall-second {'%.3f ± %.3f' % mean_std(wall[name])}")
    ratio = lambda d: mean_std(d["elm-mlx"])[0] / mean_std(d["mlx-lm"])[0]  # noqa: E731
    print(f"elm-mlx / mlx-lm: {ratio(cpu):.3f} (CPU time), {ratio(wall):.3f} (wall clock)")


if __name__ == "__main__":
    main()
