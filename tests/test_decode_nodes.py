"""bench/decode_nodes.py on a tiny config: a speculative block beside the decode rows adds nodes
to the pass, its one row written with dynamic slice updates (not another scatter), and the
command prints both counts. Nothing here is timed."""

import mlx.core as mx
from bench_scripts import TINY, load

from elm_mlx.bench import load_bench_model


def test_a_block_beside_the_decode_rows_is_counted_per_primitive(capsys):
    nodes = load("decode_nodes")
    model, _ = load_bench_model(TINY, "fp32", True, None)
    decode = (mx.zeros((4, 1), mx.int32), mx.full((4,), 10, mx.int32), None)
    block = (mx.zeros((1, 5), mx.int32), mx.array([10], mx.int32), mx.array([4], mx.int32))
    alone, beside = nodes.primitives(model, [decode], 6), nodes.primitives(model, [decode, block], 6)
    assert sum(beside.values()) > sum(alone.values())
    assert beside["DynamicSliceUpdate"] - alone["DynamicSliceUpdate"] == 2 * len(model.layers)  # keys, values
    assert beside["Scatter"] == alone["Scatter"] > 0
    nodes.main([TINY, "--rows", "4"])
    out = capsys.readouterr().out
    assert "4 decode rows:" in out and "with a block of 5 beside them: +" in out
