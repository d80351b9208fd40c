"""Concurrent streams through the server's batch engine (elm_mlx/batch.py): aggregate
tokens/s and per-stream latency for 1, 2, 4, 8 streams, beside mlx-lm's BatchGenerator on
the same weight arrays, in one process, alternating engines after a warm-up of each.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python bench/concurrency.py 270M --tokens 32 --repeats 2

Each stream has its own random prompt (--prompt-tokens), generates --tokens greedily with EOS
ignored; all streams start together. Aggregate tok/s = generated tokens after each stream's
first / time from the first stream's first token to the last token (the prefill is left
out, as in `elm-mlx bench`); TTFT = start to a stream's first token; ms/token = a stream's
time between tokens after its first. Random weights: a step reads every weight whatever
its value."""

import argparse
import json
import statistics
import time

import elm_mlx  # noqa: F401  (first: it binds an optimized BLAS before MLX loads)
import mlx.core as mx
import numpy as np

from elm_mlx.batch import BatchEngine
from elm_mlx.bench import load_bench_model
from elm_mlx.bench.machine import environment


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(3, vocab, size=length - 1).tolist() for _ in range(n)]


def run_elm(model, ids: list, tokens: int) -> list:
    """[(t0, [token times])] per stream."""
    engine = BatchEngine(model, max_batch=len(ids))
    t0 = clock()
    seqs = [engine.add(p, tokens) for p in ids]
    times = {s.id: [] for s in seqs}
    while engine.has_work():
        out = engine.step()
        now = clock()
        for t in out:
            times[t.seq.id].append(now)
    return [(t0, times[s.id]) for s in seqs]


def clock():
    """(wall, this process's CPU) seconds: on a shared machine the wall clock also measures the
    neighbours, CPU time much less so."""
    return time.perf_counter(), time.process_time()


def mlx_lm_model(model):
    from mlx.utils import tree_flatten
    from mlx_lm.models import openelm

    theirs = openelm.Model(openelm.ModelArgs.from_dict(model.config.to_dict()))
    theirs.load_weights(tree_flatten(model.parameters()))  # the very same arrays
    return theirs


def run_mlx_lm(theirs, ids: list, tokens: int) -> list:
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(theirs, stop_tokens=None, completion_batch_size=max(8, len(ids)),
                         prefill_batch_size=len(ids))
    t0 = clock()
    uids = gen.insert(ids, [tokens] * len(ids))
    times = {u: [] for u in uids}
    while responses := gen.next_generated():
        now = clock()
        for r in responses:
            times[r.uid].append(now)
    gen.close()
    return [(t0, times[u]) for u in uids]


def summarize(runs: list) -> dict:
    first = min(ts[0] for _, ts in runs)
    last = max(ts[-1] for _, ts in runs)
    after_first = sum(len(ts) - 1 for _, ts in runs)
    return {
        "aggregate_tps": after_first / (last[0] - first[0]),
        "aggregate_tps_cpu": after_first / (last[1] - first[1]),  # per CPU-second of this process
        "ttft_s": statistics.mean(ts[0][0] - t0[0] for t0, ts in runs),
        "ms_per_token": 1000 * statistics.mean((ts[-1][0] - ts[0][0]) / (len(ts) - 1) for _, ts in runs),
        "tokens": [len(ts) for _, ts in runs],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("size", nargs="?", default="270M")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=36)
    p.add_argument("--concurrency", default="1,2,4,8")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-compare", action="store_true", help="skip mlx-lm")
    p.add_argument("--json", help="write the runs here")
    args = p.parse_args()
    model, _ = load_bench_model(args.size, args.dtype, True, None)
    engines = {"elm-mlx": (run_elm, model)}
    if not args.no_compare:
        engines["mlx-lm"] = (run_mlx_lm, mlx_lm_model(model))
    vocab = model.config.vocab_size
    for name, (run, m) in engines.items():  # warm-up: every shape once
        run(m, prompts(2, args.prompt_tokens, vocab, 99), 4)
    results = []
    levels = [int(x) for x in args.concurrency.split(",")]
    for r in range(args.repeats):  # levels and engines alternate, so a drift of the load falls on all
        for c in levels if r % 2 == 0 else levels[::-1]:
            ids = prompts(c, args.prompt_tokens, vocab, c)
            order = list(engines) if (r + c) % 2 == 0 else list(engines)[::-1]
            for name in order:
                run, m = engines[name]
                s = summarize(run(m, ids, args.tokens))
                mx.clear_cache()
                results.append({"engine": name, "concurrency": c, "repeat": r, **s})
                print(f"{name:8} C={c}  {s['aggregate_tps']:7.2f} tok/s aggregate ({s['aggregate_tps_cpu']:.2f} per CPU-s)  "
                      f"TTFT {s['ttft_s']:.2f} s  "
                      f"{s['ms_per_token']:.0f} ms/token per stream", flush=True)
    print()
    print("| engine | streams | aggregate tok/s | × one stream | per CPU-s | × one stream | TTFT (s) | "
          "ms/token per stream |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    base = {}
    for name in engines:
        for c in sorted(levels):
            rows = [r for r in results if r["engine"] == name and r["concurrency"] == c]
            tps = statistics.mean(r["aggregate_tps"] for r in rows)
            cpu = statistics.mean(r["aggregate_tps_cpu"] for r in rows)
            base.setdefault(name, (tps, cpu))
            print(f"| {name} | {c} | {tps:.2f} | {tps / base[name][0]:.2f} | {cpu:.2f} | {cpu / base[name][1]:.2f} | "
                  f"{statistics.mean(r['ttft_s'] for r in rows):.2f} | "
                  f"{statistics.mean(r['ms_per_token'] for r in rows):.0f} |")
    env = environment()
    print(f"\n{args.size} fp32 random weights, {args.prompt_tokens}-token prompts, {args.tokens} tokens per stream, "
          f"{args.repeats} runs each; {env}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "runs": results}, f, indent=1)


if __name__ == "__main__":
    main()
