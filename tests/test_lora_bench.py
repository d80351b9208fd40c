"""bench/lora_train.py on a tiny config, one timed step per engine: both trainers train,
on the same model and rows (equal losses before training), the same number of target tokens
per step, and the JSON holds what the table shows. Nothing here is timed."""

import json

import pytest
from bench_scripts import TINY, load


def bench_module():
    return load("lora_train")


def test_both_trainers_run_on_the_same_model_and_data(tmp_path, capsys):
    out = tmp_path / "lora-train.json"
    doc = bench_module().main([TINY, "--quant", "fp32", "q4", "--steps", "1", "--repeats", "1", "--seq-len", "16",
                               "--batch-size", "2", "--rows", "4", "--num-layers", "-1", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc))
    assert [(r["model"], r["base"]) for r in doc["results"]] == [(TINY, "fp32"), (TINY, "q4")]
    for r in doc["results"]:
        assert set(r["engines"]) == {"elm-mlx", "mlx-lm"}
        for e in r["engines"].values():
            assert e["tps"] > 0 and e["tps_cpu"] > 0 and e["peak_memory_bytes"] > 0
            assert [run["tokens"] for run in e["runs"]] == [2 * 16]  # every target, no pad, in both
        # lora_b starts at zero: both adapted models are the base; one batch, one loss
        assert r["initial_loss_diff"] <= 1e-4, r["initial_loss"]
        assert r["trainable_parameters"]["elm-mlx"] == r["trainable_parameters"]["mlx-lm"] > 0
        assert r["ratio_tps"] == pytest.approx(r["engines"]["elm-mlx"]["tps"] / r["engines"]["mlx-lm"]["tps"])
    assert "q4/8" in capsys.readouterr().out  # the recipe's label in the table


def test_a_rerun_replaces_its_configuration_and_keeps_the_others(tmp_path):
    m = bench_module()
    out = tmp_path / "lora-train.json"
    out.write_text(json.dumps({"results": [{"model": TINY, "base": "fp32", "old": True},
                                           {"model": "450M", "base": "q4", "old": True}]}))
    m.main([TINY, "--steps", "1", "--repeats", "1", "--warmup", "0", "--seq-len", "8", "--batch-size", "1",
            "--rows", "1", "--num-layers", "1", "--json", str(out)])
    results = json.loads(out.read_text())["results"]
    assert [(r["model"], r["base"], "old" in r) for r in results] == [("450M", "q4", True), (TINY, "fp32", False)]


@pytest.mark.parametrize("argv, message", [
    (["--quant", "q3"], "--quant q3: expected fp32, q4, q8"),
    (["--steps", "0"], "--steps 0: expected at least 1"),
    (["--num-layers", "0"], "--num-layers 0"),
    (["--num-layers", "5"], "tiny-4L-128d has 4 layers (expected 1..4, or -1 for all)"),
])
def test_bad_flags_are_one_line(argv, message, tmp_path):
    with pytest.raises(SystemExit) as e:
        bench_module().main([TINY, *argv, "--json", str(tmp_path / "x.json")])
    assert message in str(e.value) and "\n" not in str(e.value)
