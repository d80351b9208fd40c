"""`elm-mlx bench`: the metric arithmetic (with a fake clock), the byte
counts, the JSON schema, and that both engines of a comparison generate the
same tokens. No test is timed."""

import json
import math
import os
from itertools import count

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from checkpoints import hf_config, make_hf_checkpoint
from typer.testing import CliRunner

from elm_mlx import bench as b
from elm_mlx.cli import app
from elm_mlx.config import OpenELMConfig
from elm_mlx.errors import ElmError
from elm_mlx.model import Model

runner = CliRunner()

# Widths that are multiples of 64, so that q4/q8 (group size 64) quantize every layer.
TINY64 = hf_config(layers=2, model_dim=128, head_dim=32, num_query_heads=[4, 8], num_kv_heads=[1, 2],
                   ffn_multipliers=[1.0, 2.0], vocab_size=32000, ffn_dim_divisor=64)


def tiny_model(dtype=mx.float32):
    model = Model(OpenELMConfig.from_dict(TINY64))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


class FakeClock:
    """Returns the next of the given readings at each call."""

    def __init__(self, readings):
        self.readings = iter(readings)

    def __call__(self):
        return next(self.readings)


# ---------------------------------------------------------------- arithmetic

def test_run_metrics_are_ratios_of_the_right_counts_and_windows():
    m = b.run_metrics(b.Stamps(start=10.0, first=10.5, end=14.5), prompt_tokens=36, gen_tokens=101, load_s=2.0)
    assert m["prompt_tps"] == pytest.approx(36 / 0.5)
    assert m["generation_tps"] == pytest.approx(100 / 4.0)  # the 100 tokens after the first, in the 4 s after it
    assert m["total_tps"] == pytest.approx(137 / 4.5)
    assert m["ttft_s"] == pytest.approx(2.5) and m["load_s"] == 2.0


def test_one_generated_token_has_no_generation_rate():
    m = b.run_metrics(b.Stamps(0.0, 1.0, 1.0), prompt_tokens=4, gen_tokens=1, load_s=0.0)
    assert m["generation_tps"] == 0.0 and m["total_tps"] == pytest.approx(5.0)


def test_bandwidth_counts_weights_plus_the_average_kv_context():
    # decode steps 1..9 attend over 20+1 .. 20+9 keys: 25 on average = 20 + 10/2
    out = b.bandwidth(weight_bytes=1000, kv_bytes_per_token=8, prompt_tokens=20, gen_tokens=10,
                      generation_tps=2e6, machine_gbps=10.0)
    assert out["bytes_per_token"] == 1000 + 8 * 25
    assert out["bandwidth_gbps"] == pytest.approx(1200 * 2e6 / 1e9)
    assert out["bandwidth_pct"] == pytest.approx(100 * 2.4 / 10.0)
    assert sum(20 + i for i in range(1, 10)) / 9 == 25  # the average the formula uses


def test_mean_and_sample_std():
    assert b.mean_std([2.0]) == (2.0, 0.0)
    mean, std = b.mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and std == pytest.approx(math.sqrt(5 / 3))


def test_time_run_reads_the_clock_around_the_first_and_last_token():
    started = []

    def tokens():
        started.append(True)  # the work begins on the first next(), after `start` was read
        yield from count()

    it = tokens()
    stamps = b.time_run(it, 5, clock=FakeClock([1.0, 3.0, 7.0]))
    assert stamps == b.Stamps(1.0, 3.0, 7.0) and started == [True]
    with pytest.raises(StopIteration):
        next(it)  # closed


def test_memory_bandwidth_is_bytes_over_the_best_read():
    # a reading before and after each of 3 reads: 0.5 s, 0.25 s, 1 s
    gbps, how = b.memory_bandwidth(gib=1 / 1024, repeats=3, clock=FakeClock([0, 0.5, 1, 1.25, 2, 3]))
    assert gbps == pytest.approx(2**20 / 0.25 / 1e9)
    assert "best of 3" in how


# ---------------------------------------------------------------- bytes

def test_weight_bytes_per_token_reads_the_tied_embedding_once_plus_a_row():
    model = tiny_model(mx.bfloat16)
    cfg = model.config
    assert b.weight_bytes_per_token(model) == 2 * cfg.num_parameters() + 2 * cfg.model_dim
    assert b.kv_bytes_per_token(model) == 2 * cfg.head_dim * sum(cfg.num_kv_heads) * 2


def test_untied_head_reads_only_one_embedding_row():
    cfg = OpenELMConfig.from_dict({**TINY64, "share_input_output_layers": False})
    model = Model(cfg)
    emb = cfg.vocab_size * cfg.model_dim * 4
    assert b.weight_bytes_per_token(model) == 4 * cfg.num_parameters() - emb + 4 * cfg.model_dim


@pytest.mark.parametrize("quant,bits", [("q8-uniform", 8), ("q4-uniform", 4)])
def test_quantized_bytes_count_packed_weights_scales_and_biases(quant, bits):
    model = b.quantize(tiny_model(mx.bfloat16), quant)
    cfg = model.config
    paths = b.quantized_paths(model)
    assert set(paths.values()) == {(bits, 64)} and "transformer.token_embeddings" in paths
    assert b.quant_label(model) == f"q{bits}"
    matrices = {k: v for k, v in cfg.weight_shapes().items() if len(v) == 2}
    norms = sum(int(np.prod(s)) for k, s in cfg.weight_shapes().items() if len(s) == 1)
    packed = sum(r * c * bits // 8 + 2 * (r * c // 64) * 2 for r, c in matrices.values())  # + bf16 scales, biases
    row = cfg.model_dim * bits // 8 + 2 * (cfg.model_dim // 64) * 2
    assert b.weight_bytes_per_token(model) == packed + 2 * norms + row
    assert b.quantize(model, quant) is model  # already quantized: left alone
    with pytest.raises(ElmError, match=f"already quantized \\(q{bits}\\)"):
        b.quantize(model, "q8-uniform" if bits == 4 else "q4-uniform")


@pytest.mark.parametrize("quant", ["q4", "q8"])
def test_bench_quantizes_by_the_recipe_convert_stores(quant):
    """`bench --quant q4` measures what `convert --quant q4` writes: the same plan."""
    from elm_mlx.quant import make_plan

    model = b.quantize(tiny_model(mx.bfloat16), quant)
    plan = make_plan(model.config, quant)
    assert {p: bits for p, (bits, _) in b.quantized_paths(model).items()} == plan.modules


# ---------------------------------------------------------------- engines

def test_paper_prompt_ids_are_the_llama2_encoding_of_the_sentence(llama_tokenizer):
    from elm_mlx.tokenizer import Tokenizer

    assert Tokenizer(llama_tokenizer).encode(b.PAPER_PROMPT) == b.PAPER_PROMPT_IDS
    assert len(b.PAPER_PROMPT_IDS) == 36


def test_pp_tg_prompt_is_random_but_fixed():
    ids = b.prompt_ids("pp-tg", 64, 512)
    assert ids == b.prompt_ids("pp-tg", 64, 512) and len(ids) == 64 and 0 <= min(ids) and max(ids) < 512
    assert len(set(ids)) > 20
    with pytest.raises(ElmError, match="needs the Llama-2 vocabulary"):
        b.prompt_ids("paper", None, 512)


@pytest.mark.parametrize("quant", [None, "q4"])
def test_every_engine_generates_the_same_greedy_tokens(quant):
    # The comparison and the ablation are only fair if all engines compute the
    # same thing from the same arrays.
    model = b.quantize(tiny_model(), quant)
    engines = [b.elm_engine(model), b.mlx_lm_engine(model), b.naive_norm_engine(model)]
    ids = b.prompt_ids("pp-tg", 12, 32000)
    streams = []
    for e in engines:
        it = e.tokens(ids)
        streams.append([next(it) for _ in range(10)])
        it.close()
    assert streams[0] == streams[1] == streams[2]
    eager = b.elm_engine(model, compile=False)
    assert eager.name == "elm-mlx eager"
    it = eager.tokens(ids)
    assert [next(it) for _ in range(10)] == streams[0]
    it.close()
    for e in engines[:2] + [eager]:  # the host-cost probes issue the same steps
        one = e.issue(ids)
        assert [one().item() for _ in range(9)] == streams[0][1:]
    ours = dict(nn.utils.tree_flatten(model.parameters()))
    for e in engines[1:]:  # shared arrays, no copies
        theirs = dict(nn.utils.tree_flatten(e.model.parameters()))
        assert all(theirs[k] is v for k, v in ours.items())


def test_naive_norm_replaces_every_norm_and_keeps_the_logits():
    model = tiny_model()
    naive = b.naive_norm_engine(model).model
    kinds = [type(m) for _, m in naive.named_modules()]
    assert kinds.count(b.NaiveRMSNorm) == 4 * model.config.num_transformer_layers + 1
    assert nn.RMSNorm not in kinds
    tokens = mx.array([[1, 5, 9, 200, 7]])
    assert np.allclose(np.array(naive(tokens)), np.array(model(tokens)), atol=1e-4)


def test_measure_alternates_engines_and_reports_each_run():
    model = tiny_model()
    calls = []

    def engine(name):
        def tokens(ids):
            calls.append(name)
            yield from count()
        return b.Engine(name, model, tokens)

    clock = FakeClock([float(t) for t in range(100)])
    info = {"load_s": 1.0, "machine_bandwidth_gbps": 10.0, "model": "tiny"}
    runs = b.measure([engine("A"), engine("B")], [1, 2, 3], 4, 3, info, clock=clock)
    assert calls == ["A", "B", "A", "B", "B", "A", "A", "B"]  # warm-ups, then ABBA...
    assert [r["engine"] for r in runs] == ["A", "B", "B", "A", "A", "B"]
    r = runs[0]  # its clock readings are 6, 7, 8
    assert r["prompt_tps"] == 3.0 and r["generation_tps"] == 3.0 and r["total_tps"] == 3.5 and r["ttft_s"] == 2.0
    assert r["bytes_per_token"] == b.weight_bytes_per_token(model) + b.kv_bytes_per_token(model) * 5
    assert all(r["same_output"] for r in runs)


def test_host_ms_times_building_the_step_not_running_it():
    issued = []

    def issue():
        issued.append(1)
        return mx.array(1)

    assert b.host_ms(issue, steps=2, clock=FakeClock([0.0, 0.002, 1.0, 1.004])) == pytest.approx(3.0)
    assert len(issued) == 3  # a first, untimed step (traces, grows caches)


def test_measure_flags_an_engine_whose_tokens_differ():
    model = tiny_model()
    def counting(start):
        return lambda ids: (t for t in count(start))
    engines = [b.Engine("A", model, counting(0)), b.Engine("B", model, counting(1))]
    info = {"load_s": 1.0, "machine_bandwidth_gbps": 10.0, "model": "tiny"}
    runs = b.measure(engines, [1, 2, 3], 4, 2, info, clock=FakeClock([float(t) for t in range(100)]))
    assert [(r["engine"], r["same_output"]) for r in runs] == [("A", True), ("B", False), ("B", False), ("A", True)]
    assert "DIFFERENT 4 token ids" in b.table([{**r, "dtype": "fp32", "method": "paper", "mlx_version": "x",
                                                  "backend": "CPU", "bandwidth_probe": "p"} for r in runs])


def test_the_table_has_plain_numbers_no_nan_and_fits_100_columns():
    base = {"model": "OpenELM-270M", "dtype": "fp32", "method": "paper", "prompt_tokens": 128, "gen_tokens": 64,
            "load_s": 1.0, "mlx_version": "x", "backend": "CPU", "machine_bandwidth_gbps": 10.0,
            "bandwidth_probe": "p", "bytes_per_token": 5e8, "prompt_tps": 4130.0, "generation_tps": 41.5,
            "ms_per_token": 24.1, "total_tps": 55.0, "ttft_s": 0.031, "peak_memory_gb": 1.2,
            "bandwidth_gbps": 20.0, "bandwidth_pct": 80.0}
    runs = []
    for i, (engine, spread) in enumerate([("elm-mlx", 110.0), ("mlx-lm", 87.0), ("elm-mlx+draft", 50.0)]):
        for repeat, sign in enumerate((-1, 1)):
            r = {**base, "engine": engine, "repeat": repeat, "prompt_tps": 1000.0 * (i + 3) + sign * spread,
                 "host_ms_per_token": 0.4 + 0.01 * sign}
            if engine == "elm-mlx+draft":
                del r["host_ms_per_token"]  # not measured for a speculative engine
                r.update(acceptance_rate=0.5, tokens_per_forward=1.8)
            runs.append(r)
    text = b.table(runs)
    assert "e+" not in text and "e-" not in text and "nan" not in text.lower(), text
    assert max(len(line) for line in text.splitlines()) <= 100, text
    assert "3000 ± 156" in text and "4000 ± 123" in text and "0.400 ± 0.014" in text  # sample std, to the mean's decimals
    assert "ratio" in text and "0.750x" in text


# ---------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny64")
    (folder / "config.json").write_text(json.dumps(TINY64))
    return folder


def bench_json(*args, random_weights=True):
    r = runner.invoke(app, ["bench", "--json", "-", *args] + (["--random-weights"] if random_weights else []))
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout), r.stderr


def test_json_has_every_key_with_sane_values(tiny_folder):
    runs, stderr = bench_json("--model", str(tiny_folder), "--gen-tokens", "5", "--dtype", "fp32")
    assert len(runs) == 1
    run = runs[0]
    assert set(b.JSON_KEYS) <= set(run)
    assert run["model"] == str(tiny_folder) and run["dtype"] == "fp32" and run["method"] == "paper"
    assert run["prompt_tokens"] == 36 and run["gen_tokens"] == 5
    assert run["backend"] in {"CPU", "Metal", "CUDA"} and run["mlx_version"] == mx.__version__
    for key in ["prompt_tps", "generation_tps", "total_tps", "ttft_s", "peak_memory_gb", "bandwidth_gbps",
                "bandwidth_pct"]:
        assert isinstance(run[key], float) and run[key] > 0, key
    if run["backend"] == "CPU" and os.path.exists("/proc/self/maps"):
        assert os.path.exists(run["blas"])
    assert "gen tok/s" in stderr and "memory bandwidth" in stderr


def test_compare_pp_tg_writes_both_engines_and_ratios(tiny_folder, tmp_path):
    out = tmp_path / "runs.json"
    r = runner.invoke(app, ["bench", "--model", str(tiny_folder), "--random-weights", "--method", "pp-tg",
                            "-p", "16", "-g", "4", "-n", "2", "--compare", "mlx-lm", "--quant", "q8",
                            "--json", str(out)])
    assert r.exit_code == 0, r.stderr
    runs = json.loads(out.read_text())
    assert [x["engine"] for x in runs] == ["elm-mlx", "mlx-lm", "mlx-lm", "elm-mlx"]
    assert {x["prompt_tokens"] for x in runs} == {16} and {x["quant"] for x in runs} == {"q8"}
    assert "ratio" in r.stdout and "±" in r.stdout


@pytest.mark.parametrize("args,message", [
    (["--method", "fast"], "Invalid value for '--method': Value error, 'fast' is not one of 'paper', 'pp-tg'"),
    (["--quant", "q3"], "'q3' is not one of 'q4', 'q8', 'q4-uniform', 'q8-uniform'"),
    (["--compare", "llama.cpp"], "Invalid value for '--compare': Value error, 'llama.cpp' is not one of 'mlx-lm'"),
    (["--prompt-tokens", "10"], "the paper method's prompt is fixed"),
    (["--gen-tokens", "0"], "Invalid value for '--gen-tokens'"),
    (["--gen-tokens", "2040"], "the paper method's prompt is 36 tokens; OpenELM's context is 2048 tokens and "
                               "generation needs 2040 more"),
    (["--dtype", "int8"], "Invalid value for '--dtype': Value error, 'int8' is not one of"),
])
def test_bad_flags_say_what_is_wrong(tiny_folder, args, message):
    r = runner.invoke(app, ["bench", "--model", str(tiny_folder), "--random-weights", *args])
    assert r.exit_code == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_a_checkpoint_folder_is_loaded_and_timed_from_the_start_of_loading(tmp_path):
    make_hf_checkpoint(tmp_path, TINY64, seed=3, dtype="BF16")
    runs, _ = bench_json("--model", str(tmp_path), "--gen-tokens", "3", random_weights=False)
    assert runs[0]["dtype"] == "fp32" and runs[0]["load_s"] > 0  # the CPU backend computes a bf16 checkpoint in fp32
    assert runs[0]["ttft_s"] > runs[0]["load_s"]


def test_a_quantized_folder_is_measured_as_it_is_against_mlx_lm(tmp_path, llama_tokenizer):
    # elm-mlx convert's q4 recipe keeps the embedding and two FFN projections at 8 bits
    from elm_mlx.convert import convert

    make_hf_checkpoint(tmp_path / "hf", TINY64, seed=4)
    convert(tmp_path / "hf", tmp_path / "q4", quant="q4", progress=False, tokenizer=llama_tokenizer)
    runs, _ = bench_json("--model", str(tmp_path / "q4"), "--method", "pp-tg", "-p", "8", "-g", "3", "-n", "1",
                         "--compare", "mlx-lm", "--quant", "q4", random_weights=False)
    assert [r["engine"] for r in runs] == ["elm-mlx", "mlx-lm"] and {r["quant"] for r in runs} == {"q4/8"}


def test_random_weights_need_a_preset_or_a_config():
    r = runner.invoke(app, ["bench", "--model", "nonesuch", "--random-weights"])
    assert r.exit_code == 2 and "expected a preset" in r.stderr


@pytest.mark.slow
def test_full_size_270m_with_random_weights_runs_offline():
    runs, _ = bench_json("--model", "270M", "--method", "pp-tg", "-p", "4", "-g", "2", "-n", "1", "--dtype", "fp32")
    assert runs[0]["bytes_per_token"] >= 4 * 271_527_168


def test_last_only_logits_are_the_last_position_of_the_full_logits():
    # generation asks the model for the last position only (the head skips the others)
    model = tiny_model()
    tokens = mx.array([[1, 5, 9, 200, 7, 31999]])
    full, last = model(tokens), model(tokens, last_only=True)
    assert last.shape == (1, 1, 32000)
    assert np.array_equal(np.array(last[:, 0]), np.array(full[:, -1]))


def test_bench_help_explains_the_methods():
    r = runner.invoke(app, ["bench", "-h"])
    assert r.exit_code == 0 and "--method" in r.stdout and "pp-tg" in r.stdout and "--compare" in r.stdout
