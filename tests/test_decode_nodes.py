"""bench/decode_nodes.py on a tiny config: a speculative block beside the decode rows adds nodes
to the pass, its one row written with dynamic slice updates (not another scatter), and the
command prints both counts. Nothing here is timed."""

import importlib.util
from pathlib import Path

import mlx.core as mx

from elm_mlx.bench import load_bench_model

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "bench/configs/tiny-4L-128d")


def bench_module():
    spec = importlib.util.spec_from_file_location("decode_nodes", ROOT / "bench/decode_nodes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_block_beside_the_decode_rows_is_counted_per_primitive(capsys):
    nodes = bench_module()
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
