"""How many MLX graph nodes the batch engine's decode pass builds per layer, with and without a
speculative row's block beside the decode rows (Model.decode_parts). On a CPU a small model's step
costs what its ops cost (each dispatch ~25 us), so this count is what a change to the compiled
forward's op list is judged by before timing it. The eager graph is counted (mx.export_to_dot);
mx.compile then fuses its elementwise runs.

    python bench/decode_nodes.py bench/configs/overhead-28L-128d --rows 8 --width 5
"""

import argparse
import collections
import re
import tempfile

import elm_mlx  # noqa: F401  (first: it binds an optimized BLAS before MLX loads)
import mlx.core as mx

from elm_mlx.batch import BatchCache
from elm_mlx.bench import load_bench_model


def primitives(model, parts, rows: int) -> collections.Counter:
    """The primitives of one decode_parts pass over fresh buffers, by name."""
    cache = BatchCache(model, rows)
    cache.reserve(64)
    mx.eval(cache.keys, cache.values)
    logits, keys, values = model.decode_parts(parts, cache.keys, cache.values)
    with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
        mx.export_to_dot(f.name, *logits, *keys, *values)
        return collections.Counter(re.findall(r'label ="([A-Za-z]*)", shape=rectangle', f.read()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("size", nargs="?", default="bench/configs/overhead-28L-128d")
    p.add_argument("--rows", type=int, default=8, help="decode rows")
    p.add_argument("--width", type=int, default=5, help="the block's tokens (prompt lookup's k + 1)")
    args = p.parse_args(argv)
    model, _ = load_bench_model(args.size, "fp32", True, None)
    layers = len(model.layers)
    decode = (mx.zeros((args.rows, 1), mx.int32), mx.full((args.rows,), 10, mx.int32), None)
    block = (mx.zeros((1, args.width), mx.int32), mx.array([10], mx.int32), mx.array([args.rows], mx.int32))
    alone = primitives(model, [decode], args.rows + 1)
    beside = primitives(model, [decode, block], args.rows + 1)
    extra = beside - alone
    print(f"{args.size}: {args.rows} decode rows: {sum(alone.values()) / layers:.1f} nodes a layer; with a block of "
          f"{args.width} beside them: +{(sum(beside.values()) - sum(alone.values())) / layers:.1f} a layer")
    print("the block's, by primitive (a layer):",
          ", ".join(f"{k} {v / layers:.1f}" for k, v in extra.most_common() if v >= layers / 2))


if __name__ == "__main__":
    main()
