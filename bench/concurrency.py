"""Concurrent streams through the server's batch engine (elm_mlx/batch.py): aggregate
tokens/s and per-stream latency for 1, 2, 4, 8 streams, beside mlx-lm's BatchGenerator on
the same weight arrays, in one process, alternating engines after a warm-up of each.
Then (unless --no-burst) the largest burst of plain requests alone and with one prompt-lookup request
beside them (a prompt that repeats itself), every text checked against its greedy text alone.
Then (unless --no-server) one greedy request to the real `elm-mlx serve` on the same weights
(written to a temporary folder) beside `generate`'s engine for the same prompt and length:
both timed from the request to the last token, so the server's HTTP and prefill are in.
Several architectures named on the command line are measured one after another in one run.

    OPENBLAS_NUM_THREADS=1 LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python bench/concurrency.py bench/configs/overhead-28L-128d 270M --tokens 32 --repeats 2

Each stream has its own random prompt (--prompt-tokens), generates --tokens greedily with EOS
ignored; all streams start together. Aggregate tok/s = generated tokens after each stream's
first / time from the first stream's first token to the last token (the prefill is left
out, as in `elm-mlx bench`); TTFT = start to a stream's first token; ms/token = a stream's
time between tokens after its first. Random weights: a step reads every weight whatever
its value."""

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

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
    return [(t0, ts) for ts in drain(engine, seqs)]


def drain(engine, seqs: list) -> list:
    """Step `engine` until it is done: each sequence's token times, in the order of `seqs`."""
    times = {s.id: [] for s in seqs}
    while engine.has_work():
        out = engine.step()
        now = clock()
        for t in out:
            times[t.seq.id].append(now)
    return [times[s.id] for s in seqs]


def burst(model, ids: list, lookup_ids: list | None, tokens: int, lookup: int) -> dict:
    """One burst through the batch engine: the plain prompts `ids` together, and with `lookup_ids`
    one more request with prompt lookup (`lookup` guesses) beside them. Aggregate tok/s as
    summarize() counts it (every stream's tokens after its first, over the burst), each stream's
    tokens, the lookup request's acceptance, and its own rate beside a plain stream's (tok/s after
    its first token)."""
    from elm_mlx.speculative import make_proposer

    engine = BatchEngine(model, max_batch=len(ids) + 1)
    t0 = clock()
    seqs = [engine.add(p, tokens) for p in ids]
    if lookup_ids is not None:
        seqs.append(engine.add(lookup_ids, tokens, proposer=make_proposer(model, prompt_lookup=lookup)))
    times = drain(engine, seqs)
    summary = summarize([(t0, ts) for ts in times])
    spec = seqs[-1].spec.stats if lookup_ids is not None else None
    rate = [(len(ts) - 1) / (ts[-1][0] - ts[0][0]) for ts in times]
    return {**summary, "texts": [s.tokens for s in seqs],
            "acceptance": spec.acceptance_rate if spec else None,
            "tokens_per_forward": spec.tokens_per_forward if spec else None,
            "lookup_stream_tps": rate[-1] if spec else None, "plain_stream_tps": statistics.median(rate[: len(ids)])}


def lookup_prompt(length: int, vocab: int, seed: int = 5) -> list:
    """A prompt that repeats itself, as an edit or a quote does: prompt lookup has something to copy."""
    rng = np.random.default_rng(seed)
    half = rng.integers(3, vocab, size=length // 2).tolist()
    return [1] + half + half


def burst_with_lookup(model, streams: int, prompt_tokens: int, tokens: int, repeats: int, lookup: int) -> dict:
    """`streams` plain requests alone vs the same with one prompt-lookup request beside them, alternating:
    every text equal to its greedy text alone (generate_tokens), and both aggregates."""
    from elm_mlx.generate import generate_tokens

    vocab = model.config.vocab_size
    ids, extra = prompts(streams, prompt_tokens, vocab, 11), lookup_prompt(prompt_tokens, vocab)

    def alone(p):
        out = []
        for t in generate_tokens(model, p):
            out.append(t)
            if len(out) == tokens:
                return out

    expected = [alone(p) for p in ids + [extra]]
    for warm in (None, extra):  # warm-up: every trace both bursts use (their batch sizes, windows, block widths)
        burst(model, ids, warm, tokens, lookup)
    rates, cpu, same, accept, own = {"without": [], "with": []}, {"without": [], "with": []}, True, [], []
    for r in range(repeats):
        for name in (["without", "with"] if r % 2 == 0 else ["with", "without"]):
            b = burst(model, ids, extra if name == "with" else None, tokens, lookup)
            rates[name].append(b["aggregate_tps"])
            cpu[name].append(b["aggregate_tps_cpu"])
            same &= b["texts"] == expected[: len(b["texts"])]
            if name == "with":
                accept.append((b["acceptance"], b["tokens_per_forward"]))
                own.append((b["lookup_stream_tps"], b["plain_stream_tps"]))
            mx.clear_cache()
            print(f"burst {name:7} lookup: {b['aggregate_tps']:7.2f} tok/s aggregate", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {"streams": streams, "lookup": lookup, "without_tps": med["without"], "with_tps": med["with"],
            "ratio": med["with"] / med["without"], "same_texts": same,
            "ratio_per_cpu_s": med_cpu["with"] / med_cpu["without"], "runs_per_cpu_s": cpu,
            # Each repeat's two bursts ran back to back: their ratio is blind to the machine's drift.
            "pair_ratio_median": statistics.median(w / o for w, o in zip(rates["with"], rates["without"])),
            "acceptance": statistics.mean(a for a, _ in accept),
            "tokens_per_forward": statistics.mean(t for _, t in accept), "runs": rates,
            "lookup_stream_tps": statistics.median(a for a, _ in own),
            "plain_stream_tps": statistics.median(p for _, p in own)}


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


TOKENIZER = Path(__file__).resolve().parent.parent / "tests/data/llama2-tokenizer/tokenizer.model"


def write_folder(model, folder: Path) -> Path:
    """The bench model as a folder `elm-mlx serve` loads: config, weights, tokenizer."""
    from mlx.utils import tree_flatten

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_dict()))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())),
                       metadata={"format": "mlx"})
    (folder / "tokenizer.model").write_bytes(TOKENIZER.read_bytes())
    return folder


def start_server(folder: Path, log: Path):
    """(process, base URL) of `elm-mlx serve` on a free port, once it answers /health."""
    exe = Path(sys.executable).with_name("elm-mlx")
    with open(log, "w") as out:
        proc = subprocess.Popen([str(exe), "serve", "-M", str(folder), "--dtype", "fp32", "--port", "0"],
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        found = re.search(r"on (http://127\.0\.0\.1:\d+)", log.read_text())
        if proc.poll() is not None:
            raise SystemExit(f"elm-mlx serve exited:\n{log.read_text()}")
        if found:
            try:
                urllib.request.urlopen(found.group(1) + "/health", timeout=5).read()
                return proc, found.group(1)
            except OSError:
                pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"elm-mlx serve did not come up:\n{log.read_text()}")


def serve_once(url: str, ids: list, tokens: int) -> tuple[float, list]:
    """(seconds from sending to the last byte, the completion's token count and text) of one
    greedy, non-streamed /v1/completions request given token ids."""
    model = json.loads(urllib.request.urlopen(url + "/v1/models", timeout=30).read())["data"][0]["id"]
    # Plain greedy, as generate_tokens decodes: serve's defaults for requests that leave them out
    # (repetition_penalty 1.2, top_p 0.9) would change the text.
    body = json.dumps({"model": model, "prompt": ids, "max_tokens": tokens, "temperature": 0, "top_p": 1.0,
                       "repetition_penalty": 1.0}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    reply = json.loads(urllib.request.urlopen(req, timeout=600).read())
    return time.perf_counter() - t0, [reply["usage"]["completion_tokens"], reply["choices"][0]["text"]]


def generate_once(model, tok, ids: list, tokens: int) -> tuple[float, list]:
    """The same through `generate`'s engine (generate_tokens: prefill, then the compiled step),
    stopped at EOS as the server stops."""
    from elm_mlx.generate import generate_tokens

    out, t0 = [], time.perf_counter()
    for t in generate_tokens(model, ids):
        if t == tok.eos_id:
            break
        out.append(t)
        if len(out) == tokens:
            break
    seconds = time.perf_counter() - t0
    detok = tok.detokenizer(continuation=True)  # as the server writes a completion: leading space kept
    text = "".join(detok.add_token(t) for t in out) + detok.finalize()
    return seconds, [len(out) + (len(out) < tokens), text]


def server_vs_generate(model, ids: list, tokens: int, repeats: int) -> dict:
    from elm_mlx.tokenizer import Tokenizer

    tok = Tokenizer(TOKENIZER)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_folder(model, Path(tmp) / "model")
        proc, url = start_server(folder, Path(tmp) / "serve.log")
        try:
            serve_once(url, ids, 8), generate_once(model, tok, ids, 8)  # warm-up: traces, first buckets
            rates = {"server": [], "generate": []}
            outputs = {}
            for r in range(repeats):
                for name in (["server", "generate"] if r % 2 == 0 else ["generate", "server"]):
                    seconds, out = serve_once(url, ids, tokens) if name == "server" else \
                        generate_once(model, tok, ids, tokens)
                    rates[name].append(out[0] / seconds)
                    outputs[name] = out
                    print(f"{name:8} {out[0]} tokens in {seconds:.2f} s: {out[0] / seconds:.1f} tok/s", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"server_tps": med["server"], "generate_tps": med["generate"], "ratio": med["server"] / med["generate"],
            "same_text": outputs["server"][1] == outputs["generate"][1], "tokens": outputs["server"][0],
            "runs": rates}


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
    p.add_argument("sizes", nargs="*", default=["270M"], metavar="SIZE",
                   help="presets or config folders, measured one after another in this run (default 270M)")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=36)
    p.add_argument("--concurrency", default="1,2,4,8")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-compare", action="store_true", help="skip mlx-lm")
    p.add_argument("--no-server", action="store_true", help="skip the server-vs-generate single stream")
    p.add_argument("--server-tokens", type=int, default=120, help="tokens of the server-vs-generate request")
    p.add_argument("--no-burst", action="store_true",
                   help="skip the burst of plain requests with and without one prompt-lookup request")
    p.add_argument("--lookup", type=int, default=4, help="guesses of the burst's prompt-lookup request")
    p.add_argument("--json", help="write the runs here (several sizes: one object per size, under \"sizes\")")
    args = p.parse_args()
    measured = {size: measure(size, args) for size in args.sizes}
    env = environment()
    print(f"\n{', '.join(args.sizes)}: {args.dtype} random weights, {args.prompt_tokens}-token prompts, {args.tokens} "
          f"tokens per stream, {args.repeats} runs each; {env}")
    if args.json:
        out = {"environment": env, **measured[args.sizes[0]]} if len(args.sizes) == 1 else {"environment": env,
                                                                                            "sizes": measured}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


def measure(size: str, args) -> dict:
    """Every measurement of one architecture, printed as it goes -> its runs for the JSON."""
    print(f"## {size}", flush=True)
    mx.random.seed(0)  # the same random weights in every run: the same texts, the same lookup acceptance
    model, _ = load_bench_model(size, args.dtype, True, None)
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
    lookup = None
    if not args.no_burst:
        print()
        lookup = burst_with_lookup(model, max(levels), args.prompt_tokens, args.tokens, max(3, args.repeats + 1),
                                   args.lookup)
        print(f"\n{lookup['streams']} plain streams with one prompt-lookup request (--lookup {lookup['lookup']}: "
              f"{100 * lookup['acceptance']:.0f}% of guesses kept, {lookup['tokens_per_forward']:.2f} tokens per "
              f"forward) beside them: {lookup['with_tps']:.1f} tok/s aggregate vs {lookup['without_tps']:.1f} "
              f"without it: **{lookup['ratio']:.2f}x** (median of the {len(lookup['runs']['with'])} pairs' ratios "
              f"{lookup['pair_ratio_median']:.2f}x; {lookup['ratio_per_cpu_s']:.2f}x per CPU-second); "
              f"every text its greedy text alone: {lookup['same_texts']}; "
              f"the lookup stream itself {lookup['lookup_stream_tps']:.1f} tok/s beside a plain stream's "
              f"{lookup['plain_stream_tps']:.1f}")
    server = None
    if not args.no_server:
        print()
        server = server_vs_generate(model, prompts(1, args.prompt_tokens, vocab, 7)[0], args.server_tokens,
                                    max(3, args.repeats + 1))
        print(f"\none greedy stream, {server['tokens']} tokens, HTTP and prefill included: elm-mlx serve "
              f"{server['server_tps']:.1f} tok/s, generate {server['generate_tps']:.1f} tok/s: "
              f"**{server['ratio']:.2f}x**; same text: {server['same_text']}")
    return {"runs": results, "burst_with_lookup": lookup, "server_vs_generate": server}


if __name__ == "__main__":
    main()
