"""bench/decode_nodes.py on a tiny config: a speculative block beside the decode rows adds nodes
to the pass, only those of its attention (its tokens written by the decode rows' scatter, their
projections and RoPE shared), and the command prints both counts. Nothing here is timed."""

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
    # The block's keys and values go into the decode rows' scatter, and its tokens share their
    # projections, norms and RoPE: it adds only its attention, two matmuls a layer.
    assert beside["Scatter"] == alone["Scatter"] > 0 and beside["DynamicSliceUpdate"] == 0
    assert beside["Matmul"] - alone["Matmul"] == 2 * len(model.layers)
    assert beside["Rsqrt"] == alone["Rsqrt"]
    nodes.main([TINY, "--rows", "4"])
    out = capsys.readouterr().out
    assert "4 decode rows:" in out and "with a block of 5 beside them: +" in out
