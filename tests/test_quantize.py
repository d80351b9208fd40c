"""`elm-mlx convert --quant q4|q8 [--group-size] [--report]`: affine group
quantization with the OpenELM recipe, stored in mlx-lm's layout, loaded with
no flags.

The quantized model is checked against an independent path: the packed
weights are unpacked and dequantized in NumPy (w = scale * q + bias per group),
and the float64 reference forward (reference.py) runs on those weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import engine
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from checkpoints import TINY, hf_config, make_hf_checkpoint, openelm_270m_config, random_weights
from elm_mlx.convert import convert
from elm_mlx.quant import make_plan, quantize_model, quantize_weight, sensitive_modules
from elm_mlx.convert.report import TEXT, compare, log_probs
from engine import TINY_32K
from reference import reference_logits
from typer.testing import CliRunner

from elm_mlx import ElmError
from elm_mlx.cli import app
from elm_mlx.config import OpenELMConfig
from elm_mlx.load import load_model
from elm_mlx.tokenizer import Tokenizer

TOKENS = [1, 17, 300, 5, 511, 42, 42, 7, 256, 3, 99, 2]
STEPS = 120  # training steps of the slow trained-checkpoint test


def dequantized(folder: Path) -> dict:
    """HF-named float64 weights of a quantized folder, unpacked by hand."""
    config = json.loads((folder / "config.json").read_text())
    q = config["quantization"]
    stored = {k: np.array(v.astype(mx.float32) if v.dtype != mx.uint32 else v)
              for k, v in mx.load(str(folder / "model.safetensors")).items()}
    out = {}
    for key, value in stored.items():
        if key.endswith((".scales", ".biases")):
            continue
        module = key.removesuffix(".weight")
        if f"{module}.scales" not in stored:
            out[key] = value.astype(np.float64)
            continue
        bits = q.get(module, q)["bits"]
        group = q.get(module, q)["group_size"]
        per_word = 32 // bits
        shifts = np.arange(per_word, dtype=np.uint32) * bits
        ints = (value[..., None] >> shifts) & ((1 << bits) - 1)  # low bits first
        ints = ints.reshape(value.shape[0], -1).astype(np.float64)
        scales = np.repeat(stored[f"{module}.scales"].astype(np.float64), group, axis=1)
        biases = np.repeat(stored[f"{module}.biases"].astype(np.float64), group, axis=1)
        out[key] = ints * scales + biases
    return out


@pytest.fixture
def src(tmp_path):
    make_hf_checkpoint(tmp_path / "src", TINY["tied"], seed=31)
    return tmp_path / "src"


@pytest.mark.parametrize("arch", ["tied", "untied", "odd_layers", "head_dim_128"])
@pytest.mark.parametrize("quant,group", [("q4", 32), ("q8", 32), ("q4", 64)])
def test_quantized_folder_matches_dequantized_reference(tmp_path, arch, quant, group, llama_tokenizer):
    cfg = TINY[arch]
    make_hf_checkpoint(tmp_path / "src", cfg, seed=32)
    out = convert(tmp_path / "src", tmp_path / "q", dtype="fp32", quant=quant, group_size=group,
                  tokenizer=llama_tokenizer, progress=False)
    model = load_model(out)  # no flags
    layers = [m for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    assert layers, "nothing was quantized"
    weights = dequantized(out)
    # mx.dequantize agrees with the hand unpacking...
    emb = model.transformer.token_embeddings
    if isinstance(emb, nn.QuantizedEmbedding):
        mine = mx.dequantize(emb.weight, emb.scales, emb.biases, group_size=emb.group_size, bits=emb.bits)
        assert np.allclose(np.array(mine), weights["transformer.token_embeddings.weight"], atol=1e-6)
    # ... and the quantized model computes what the float64 reference does on those weights.
    err = np.max(np.abs(engine.logits(model, TOKENS) - reference_logits(weights, cfg, TOKENS)))
    assert err <= 1e-4, err


def test_recipe_and_config_entry(src, tmp_path, llama_tokenizer, capsys):
    out = convert(src, tmp_path / "q", quant="q4", tokenizer=llama_tokenizer)  # bf16, group 64
    config = json.loads((out / "config.json").read_text())
    cfg = OpenELMConfig.from_dict(config)
    q = config["quantization"]
    assert config["quantization_config"] == q  # mlx-lm writes both
    assert (q["group_size"], q["bits"], q["mode"]) == (64, 4, "affine")
    high = sensitive_modules(cfg)
    assert high == ["transformer.token_embeddings"] + [f"transformer.layers.0.{m}" for m in
                                                      ("attn.qkv_proj", "attn.out_proj", "ffn.proj_1", "ffn.proj_2")]
    assert {k for k in q if k not in ("group_size", "bits", "mode")} == set(high)
    model = load_model(out)
    assert model.transformer.token_embeddings.bits == 8
    assert model.layers[0].ffn.proj_2.bits == 8 and model.layers[0].attn.qkv_proj.bits == 8
    assert model.layers[1].ffn.proj_2.bits == 4 and model.layers[2].ffn.proj_1.bits == 4
    assert model.layers[1].attn.qkv_proj.bits == 4 and model.layers[1].attn.qkv_proj.group_size == 64
    assert model.transformer.norm.weight.dtype == mx.bfloat16
    assert model.layers[1].attn.qkv_proj.scales.dtype == mx.bfloat16
    # bits per weight and size on disk are printed, and are what was written.
    err = capsys.readouterr().err
    size = sum(f.stat().st_size for f in out.iterdir())
    assert f"{size / 1e9:.3f} GB on disk" in err
    stored = sum(v.nbytes for v in mx.load(str(out / "model.safetensors")).values())
    assert f"{stored * 8 / cfg.num_parameters():.2f} bits per weight" in err


def test_q8_recipe_keeps_the_sensitive_modules_unquantized(src, tmp_path, llama_tokenizer):
    out = convert(src, tmp_path / "q8", quant="q8", tokenizer=llama_tokenizer, progress=False)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert set(q) == {"group_size", "bits", "mode"} and q["bits"] == 8
    model = load_model(out)
    assert type(model.transformer.token_embeddings) is nn.Embedding
    assert type(model.layers[0].attn.qkv_proj) is nn.Linear
    assert model.layers[1].attn.qkv_proj.bits == 8


def test_q8_is_closer_than_q4(src, tmp_path, llama_tokenizer):
    exact = engine.logits(load_model(src, dtype="fp32"), TOKENS)
    errs = {}
    for quant in ("q4", "q8"):
        out = convert(src, tmp_path / quant, dtype="fp32", quant=quant, group_size=32, tokenizer=llama_tokenizer,
                      progress=False)
        errs[quant] = np.max(np.abs(engine.logits(load_model(out), TOKENS) - exact))
    assert 0 < errs["q8"] < errs["q4"] / 4, errs


def test_loading_with_another_dtype_casts_scales(src, tmp_path, llama_tokenizer):
    out = convert(src, tmp_path / "q", dtype="fp32", quant="q8", group_size=32, tokenizer=llama_tokenizer,
                  progress=False)
    model = load_model(out, dtype="bf16")
    assert model.layers[1].attn.qkv_proj.scales.dtype == mx.bfloat16
    assert model.transformer.norm.weight.dtype == mx.bfloat16
    assert model(mx.array([TOKENS])).dtype == mx.bfloat16


def test_group_size_must_divide_inputs_or_the_layer_stays_float():
    cfg = OpenELMConfig.from_dict(TINY["odd_layers"])  # model_dim 96
    plan = make_plan(cfg, "q4", 64)
    # 96 inputs: not divisible by 64, kept in float; proj_2 / out_proj inputs are multiples of 64.
    assert "transformer.layers.0.attn.qkv_proj" not in plan.modules
    assert "transformer.layers.0.attn.out_proj" in plan.modules
    with pytest.raises(ElmError, match="--group-size 128 divides no layer"):
        make_plan(OpenELMConfig.from_dict({**TINY["odd_layers"], "ffn_multipliers": [1.0] * 5,
                                           "num_query_heads": [2] * 5, "num_kv_heads": [2] * 5}), "q4", 128)


def test_3b_never_quantizes_to_fp16(tmp_path, llama_tokenizer, monkeypatch):
    """The 3B's activations overflow fp16: a quantized 3B computes in bf16. The
    check needs only the config, so a tiny checkpoint posing as the 3B (model_dim
    is what identifies it) is enough."""
    cfg = dict(TINY["tied"], model_dim=3072, head_dim=128, num_query_heads=[2, 2, 2], num_kv_heads=[1, 1, 1],
               ffn_multipliers=[0.1, 0.1, 0.1], vocab_size=64)
    make_hf_checkpoint(tmp_path / "big", cfg, seed=1)
    with pytest.raises(ElmError, match="overflow float16"):
        convert(tmp_path / "big", tmp_path / "q", dtype="fp16", quant="q4", tokenizer=llama_tokenizer,
                progress=False)
    out = convert(tmp_path / "big", tmp_path / "q", quant="q4", tokenizer=llama_tokenizer, progress=False)
    assert load_model(out).layers[0].attn.qkv_proj.scales.dtype == mx.bfloat16


@pytest.mark.parametrize("args,message", [
    (["--quant", "q3"], "Error: Invalid value for '--quant': Value error, 'q3' is not one of 'q4', 'q8'"),
    (["--quant", "q4", "--group-size", "48"],
     "Error: Invalid value for '--group-size': Value error, '48' is not one of '32', '64', '128'"),
    (["--group-size", "32"], "error: --group-size 32 only applies with --quant"),
    (["--report"], "error: --report measures what quantization changed"),
    (["--to", "gguf"], "Error: Invalid value for '--to': Value error, 'gguf' is not one of 'elm', 'mlx-lm'"),
    (["--average"], "error: --average needs at least two checkpoints"),
    (["--preset", "270M"], "error: --preset/--config describe CoreNet .pt checkpoints"),
])
def test_bad_combinations_are_one_line_errors(src, tmp_path, llama_tokenizer, args, message):
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["convert", str(src), "-o", str(out), "--tokenizer", str(llama_tokenizer)] + args)
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
    assert not out.exists()


def test_requantizing_a_quantized_folder_is_refused(src, tmp_path, llama_tokenizer):
    q = convert(src, tmp_path / "q", quant="q4", tokenizer=llama_tokenizer, progress=False)
    with pytest.raises(ElmError, match="already quantized"):
        convert(q, tmp_path / "qq", quant="q8", progress=False)


def test_help_explains_every_flag():
    r = CliRunner().invoke(app, ["convert", "-h"])
    for flag in ("--quant", "--group-size", "--report", "--average", "--to", "--tokenizer", "--preset", "--config",
                 "--dtype", "--output"):
        assert flag in r.stdout


# ---------------------------------------------------------------- quality report


def test_report_numbers_match_an_independent_computation(tmp_path, llama_tokenizer):
    make_hf_checkpoint(tmp_path / "src", TINY_32K, seed=33)
    r = CliRunner().invoke(app, ["convert", str(tmp_path / "src"), "-o", str(tmp_path / "q"), "--quant", "q4",
                                 "--group-size", "32", "--dtype", "fp32", "--report",
                                 "--tokenizer", str(llama_tokenizer)])
    assert r.exit_code == 0, r.output
    assert "top-1 agreement" in r.output and "mean KL" in r.output and "perplexity" in r.output
    got = json.loads((tmp_path / "q" / "quality.json").read_text())

    tokens = Tokenizer(llama_tokenizer).encode(TEXT)
    source = {k: np.array(v, dtype=np.float64)
              for k, v in mx.load(str(tmp_path / "src" / "model.safetensors")).items()}

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    ref = log_softmax(reference_logits(source, TINY_32K, tokens))
    quant = log_softmax(reference_logits(dequantized(tmp_path / "q"), TINY_32K, tokens))
    kl = np.mean(np.sum(np.exp(ref) * (ref - quant), -1))
    nxt = np.array(tokens[1:])
    assert got["positions"] == len(tokens)
    assert got["mean_kl"] == pytest.approx(kl, rel=1e-3, abs=1e-6)
    # Top-1 may flip on a near-tie between fp32 and float64: allow one position.
    top1 = np.mean(ref.argmax(-1) == quant.argmax(-1))
    assert abs(got["top1_agreement"] - top1) <= 1 / len(tokens) + 1e-9
    for name, lp in (("ppl_reference", ref), ("ppl_quantized", quant)):
        assert got[name] == pytest.approx(np.exp(-np.mean(lp[np.arange(len(nxt)), nxt])), rel=1e-4)


# ---------------------------------------------------------------- the numbers the issue asks for


def _agreement(folder: Path, tmp_path: Path, quant: str, tokenizer: Path) -> dict:
    # fp32 compute: only quantization moves the distributions, and MLX's CPU backend
    # has no fast bf16 matmul (on a Mac, bf16 compute is what runs).
    convert(folder, tmp_path / quant, quant=quant, dtype="fp32", tokenizer=tokenizer, report=True, progress=False)
    return json.loads((tmp_path / quant / "quality.json").read_text())


@pytest.mark.slow
def test_270m_random_weights_quality(llama_tokenizer):
    """The real 270M shapes through the recipe, in memory, on the report text's first
    96 tokens (the full report on random 270M is in docs/QUANTIZATION.md: it takes
    ~15 minutes on a 2-core CPU). Random weights give near-uniform next-token
    distributions, so top-1 rests on tiny margins and flips under any perturbation:
    KL is the meaningful measure. Bounds ~5x the full-text values (q8 0.00022, q4 0.060)."""
    cfg = OpenELMConfig.from_dict(openelm_270m_config())
    weights = {k: mx.array(v) for k, v in random_weights(openelm_270m_config(), seed=0).items()}
    tokens = Tokenizer(llama_tokenizer).encode(TEXT)[:96]
    reference = engine.Model(cfg)
    reference.load_weights(list(weights.items()))
    ref = log_probs(reference, tokens)
    del reference
    kl = {}
    for level in ("q8", "q4"):
        plan = make_plan(cfg, level, 64)
        stored = {}
        for key, value in weights.items():
            stored |= quantize_weight(key, value, plan)
        model = engine.Model(cfg)
        quantize_model(model, plan.config_entry(), plan.modules)
        model.load_weights(list(stored.items()))
        kl[level] = compare(ref, log_probs(model, tokens), tokens).mean_kl
    assert 0 < kl["q8"] <= 1e-3 and kl["q8"] < kl["q4"] / 20 and kl["q4"] <= 0.3, kl


@pytest.mark.slow
def test_trained_checkpoint_top1_agreement(tmp_path, llama_tokenizer):
    """The issue's thresholds, q8 >= 99% and q4 >= 90% top-1, on a tiny OpenELM
    trained with MLX on public-domain text (tests/train_tiny.py; smaller and
    with fewer steps than the documented run, so the test takes about four minutes)."""
    from train_tiny import train

    small = hf_config(layers=4, model_dim=128, head_dim=32, num_query_heads=[4, 4, 8, 8], num_kv_heads=[1, 1, 2, 2],
                      ffn_multipliers=[0.5, 1.5, 2.5, 4.0], vocab_size=32000, ffn_dim_divisor=32)
    train(tmp_path / "src", steps=STEPS, tokenizer=llama_tokenizer, log=lambda _: None, config=small)
    q8 = _agreement(tmp_path / "src", tmp_path, "q8", llama_tokenizer)
    q4 = _agreement(tmp_path / "src", tmp_path, "q4", llama_tokenizer)
    assert q8["top1_agreement"] >= 0.99, q8
    assert q4["top1_agreement"] >= 0.90, q4
