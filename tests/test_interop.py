"""Folders go both ways between elm-mlx and mlx-lm: mlx-lm's own conversions (the
mlx-community layout, quantized or not, with tokenizer.model / tokenizer.json)
load with elm_mlx.load and no flags, and `elm-mlx convert --to mlx-lm` writes a
folder mlx_lm.load reads, model and tokenizer. Round trip HF -> MLX -> mlx-lm
layout keeps the logits (fp32 exactly, bf16 within a bound)."""

from __future__ import annotations

import json
import shutil

import engine
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from checkpoints import TINY, make_hf_checkpoint
from elm_mlx.convert import convert
from elm_mlx.convert.mlx_lm import TOKENIZER_CONFIG
from engine import TINY_32K

import elm_mlx
from elm_mlx import ElmError
from elm_mlx.load import load_model
from elm_mlx.tokenizer import Tokenizer

TOKENS = [1, 17, 300, 5, 511, 42, 42, 7, 256, 3, 99, 2]
BF16_REL_BOUND = 0.03  # as test_convert.py: bf16 storage + compute vs fp32, fraction of max |logit|
TEXT = "The quick brown fox jumps over the lazy dog. Naïve café, 1234."


def mlx_lm_convert(hf, out, llama_tokenizer, **kw):
    """A folder made by mlx-lm's own converter, as mlx-community's were. Its
    AutoTokenizer needs tokenizer files next to Apple's config (the known
    'Unrecognized configuration class OpenELMConfig' pain), so they are added first."""
    from mlx_lm.convert import convert as mlx_lm_convert_

    shutil.copyfile(llama_tokenizer, hf / "tokenizer.model")
    (hf / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    mlx_lm_convert_(str(hf), str(out), **kw)
    return out


@pytest.mark.parametrize("arch", ["tied", "untied", "odd_layers"])
def test_round_trip_hf_to_mlx_to_mlx_lm_fp32_is_exact(tmp_path, arch, llama_tokenizer):
    from mlx_lm import load as mlx_lm_load

    cfg = TINY[arch]
    make_hf_checkpoint(tmp_path / "hf", cfg, seed=70)
    mlx = convert(tmp_path / "hf", tmp_path / "mlx", dtype="fp32", tokenizer=llama_tokenizer, progress=False)
    lm = convert(mlx, tmp_path / "lm", dtype="fp32", layout="mlx-lm", progress=False)
    source = engine.logits(load_model(tmp_path / "hf", dtype="fp32"), TOKENS)
    assert np.array_equal(engine.logits(load_model(mlx), TOKENS), source)
    assert np.array_equal(engine.logits(load_model(lm), TOKENS), source)
    theirs, tok = mlx_lm_load(str(lm))
    assert np.max(np.abs(engine.logits(theirs, TOKENS) - source)) <= 1e-5
    assert tok.encode(TEXT) == Tokenizer(llama_tokenizer).encode(TEXT)
    assert (lm / "tokenizer.json").exists()


def test_round_trip_bf16_within_bound(tmp_path, llama_tokenizer):
    from mlx_lm import load as mlx_lm_load

    make_hf_checkpoint(tmp_path / "hf", TINY["tied"], seed=71)
    lm = convert(tmp_path / "hf", tmp_path / "lm", layout="mlx-lm", tokenizer=llama_tokenizer, progress=False)
    source = engine.logits(load_model(tmp_path / "hf", dtype="fp32"), TOKENS)
    for model in (load_model(lm), mlx_lm_load(str(lm))[0]):
        err = np.max(np.abs(engine.logits(model, TOKENS) - source)) / np.max(np.abs(source))
        assert err <= BF16_REL_BOUND, err


@pytest.mark.parametrize("group", [32, 64])
def test_our_quantized_folder_in_mlx_lm(tmp_path, group, llama_tokenizer):
    """Per-module overrides (the recipe's 8-bit modules) are read by mlx-lm as written."""
    from mlx_lm import load as mlx_lm_load

    make_hf_checkpoint(tmp_path / "hf", TINY_32K, seed=72)
    lm = convert(tmp_path / "hf", tmp_path / "lm", dtype="fp32", quant="q4", group_size=group, layout="mlx-lm",
                 tokenizer=llama_tokenizer, progress=False)
    theirs, _ = mlx_lm_load(str(lm))
    assert theirs.transformer.token_embeddings.bits == 8 and theirs.transformer.layers[1].ffn.proj_1.bits == 4
    assert np.max(np.abs(engine.logits(theirs, TOKENS) - engine.logits(load_model(lm), TOKENS))) <= 1e-5


@pytest.mark.parametrize("kw", [dict(), dict(quantize=True, q_bits=4, q_group_size=64),
                                dict(quantize=True, q_bits=8, q_group_size=32, dtype="float16")])
def test_mlx_lm_made_folders_load_with_no_flags(tmp_path, llama_tokenizer, kw):
    from mlx_lm.utils import load_model as mlx_lm_load_model

    make_hf_checkpoint(tmp_path / "hf", TINY_32K, seed=73)
    folder = mlx_lm_convert(tmp_path / "hf", tmp_path / "community", llama_tokenizer, **kw)
    # Today's mlx-lm writes tokenizer.json only: a SentencePiece model from --tokenizer
    # is checked against it (with none, it is rebuilt from it: the test above).
    assert (folder / "tokenizer.json").exists() and not (folder / "tokenizer.model").exists()
    elm_mlx.load(str(folder), tokenizer=llama_tokenizer)
    # mlx-community's 2024 OpenELM folders also hold tokenizer.model: no flags at all.
    shutil.copyfile(llama_tokenizer, folder / "tokenizer.model")
    ours, tok = elm_mlx.load(str(folder))
    theirs, _ = mlx_lm_load_model(folder)
    if kw:
        assert isinstance(ours.layers[0].attn.qkv_proj, nn.QuantizedLinear)
        assert ours.layers[0].attn.qkv_proj.bits == kw["q_bits"]
    # Same stored weights, same compute dtype: the two implementations agree.
    ours = load_model(folder, dtype="fp32")
    theirs.update(nn.utils.tree_map(lambda p: p.astype(mx.float32) if p.dtype != mx.uint32 else p,
                                    theirs.parameters()))
    assert np.max(np.abs(engine.logits(ours, TOKENS) - engine.logits(theirs, TOKENS))) <= 1e-4
    assert tok.encode(TEXT) == Tokenizer(llama_tokenizer).encode(TEXT)


def test_mlx_community_folder_converts_and_keeps_its_quantization(tmp_path, llama_tokenizer):
    make_hf_checkpoint(tmp_path / "hf", TINY_32K, seed=74)
    folder = mlx_lm_convert(tmp_path / "hf", tmp_path / "community", llama_tokenizer, quantize=True, q_bits=4)
    out = convert(folder, tmp_path / "ours", dtype="fp32", tokenizer=llama_tokenizer, progress=False)
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    a = engine.logits(load_model(out), TOKENS)
    b = engine.logits(load_model(folder, dtype="fp32"), TOKENS)
    assert np.array_equal(a, b)


def test_quantized_folder_with_a_wrong_entry_names_the_problem(tmp_path, llama_tokenizer):
    make_hf_checkpoint(tmp_path / "hf", TINY_32K, seed=75)
    out = convert(tmp_path / "hf", tmp_path / "q", quant="q4", group_size=32, tokenizer=llama_tokenizer,
                  progress=False)
    config = json.loads((out / "config.json").read_text())
    config["quantization"]["group_size"] = 64  # disagrees with the stored scales
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ElmError) as e:
        load_model(out)
    assert "group_size=64" in str(e.value) and "expected" in str(e.value) and str(out) in str(e.value)
    config["quantization"] = {"group_size": 32, "bits": 8, "mode": "affine"}  # the stored weights are 4-bit
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ElmError) as e:
        load_model(out)
    assert str(out / "model.safetensors") in str(e.value) and "has shape" in str(e.value)
    del config["quantization"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ElmError, match="no \"quantization\" entry"):
        load_model(out)


def test_mlx_lm_folder_with_only_tokenizer_json_loads_offline(tmp_path, llama_tokenizer, offline_caches):
    """No tokenizer.model, no --tokenizer, nothing cached, no network: Llama-2's SentencePiece
    model is rebuilt from tokenizer.json, and the model generates what it does with tokenizer.model."""
    from typer.testing import CliRunner

    from elm_mlx.cli import app

    make_hf_checkpoint(tmp_path / "hf", TINY_32K, seed=77)
    folder = mlx_lm_convert(tmp_path / "hf", tmp_path / "community", llama_tokenizer)
    assert not (folder / "tokenizer.model").exists()
    model, tok = elm_mlx.load(str(folder), dtype="fp32")
    assert tok.path == folder / "tokenizer.json"
    text = elm_mlx.generate(model, tok, "Once upon a time", 12)
    args = ["generate", "-M", str(folder), "Once upon a time", "-m", "12", "--dtype", "fp32"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.stderr
    assert r.stdout == text + "\n"
    # Written by convert as a tokenizer.model that loads without the JSON.
    out = convert(folder, tmp_path / "ours", dtype="fp32", progress=False)
    assert Tokenizer(out / "tokenizer.model").pieces() == tok.pieces()
    shutil.copyfile(llama_tokenizer, folder / "tokenizer.model")
    real_model, real_tok = elm_mlx.load(str(folder), dtype="fp32")
    assert real_tok.path == folder / "tokenizer.model"
    assert elm_mlx.generate(real_model, real_tok, "Once upon a time", 12) == text
    assert tok.encode(TEXT) == real_tok.encode(TEXT)
    (folder / "tokenizer.model").unlink()
    (folder / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": {"a": 0}')  # cut short
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert str(folder / "tokenizer.json") in r.stderr and "not valid JSON" in r.stderr and "--tokenizer" in r.stderr


def test_a_hub_repo_with_only_tokenizer_json_is_downloaded_with_it(tmp_path, llama_tokenizer, monkeypatch,
                                                                     offline_caches):
    """An mlx-community-style hub id whose repo has tokenizer.json and no tokenizer.model: the
    download asks for tokenizer.json with the weights, so nothing else is needed (the hub here
    is a stand-in that hands out the files the allow-list matches, as snapshot_download does)."""
    import fnmatch

    import huggingface_hub

    import elm_mlx.hub as hub

    make_hf_checkpoint(tmp_path / "hf", TINY_32K, seed=78)
    folder = mlx_lm_convert(tmp_path / "hf", tmp_path / "community", llama_tokenizer)

    def snapshot_download(repo, allow_patterns, **kwargs):
        snap = tmp_path / "snapshots" / repo.replace("/", "--") / ("0" * 40)
        snap.mkdir(parents=True, exist_ok=True)
        for f in folder.iterdir():
            if any(fnmatch.fnmatch(f.name, pattern) for pattern in allow_patterns):
                shutil.copyfile(f, snap / f.name)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(hub, "hub_reachable", lambda *a: None)
    model, tok = elm_mlx.load("someone/OpenELM-tiny-mlx", dtype="fp32")
    reference, _ = elm_mlx.load(str(folder), dtype="fp32")
    assert tok.pieces() == Tokenizer(llama_tokenizer).pieces()
    assert elm_mlx.generate(model, tok, "Once upon a time", 8) == elm_mlx.generate(reference, tok, "Once upon a time", 8)


def test_tokenizer_json_of_another_vocabulary_is_refused(tmp_path, llama_tokenizer):
    make_hf_checkpoint(tmp_path / "hf", TINY_32K, seed=76)
    folder = mlx_lm_convert(tmp_path / "hf", tmp_path / "community", llama_tokenizer)
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["▁hello"], vocab["▁world"] = vocab["▁world"], vocab["▁hello"]
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ElmError) as e:
        elm_mlx.load(str(folder), tokenizer=llama_tokenizer)
    assert str(folder / "tokenizer.json") in str(e.value) and "--tokenizer" in str(e.value)
    with pytest.raises(ElmError) as e:  # nor is Llama-2's model built from it
        elm_mlx.load(str(folder))
    assert str(folder / "tokenizer.json") in str(e.value) and "not Llama-2's" in str(e.value)


CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is MLX?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke\nabout cats."}],
]


def test_instruct_folder_for_mlx_lm_builds_the_same_chat_prompt(tmp_path, llama_tokenizer):
    """`convert --to mlx-lm` of an -Instruct model: mlx-lm's chat prompt (its generate renders the
    template as text, then encodes it with no special tokens added) is token for token what
    elm-mlx's tokenizer.apply_chat_template gives and what `elm-mlx generate` feeds the model."""
    from mlx_lm import load as mlx_lm_load
    from typer.testing import CliRunner

    from elm_mlx.cli import app

    src = tmp_path / "OpenELM-270M-Instruct"
    make_hf_checkpoint(src, TINY_32K, seed=5)
    lm = convert(src, tmp_path / "lm", dtype="fp32", layout="mlx-lm", tokenizer=llama_tokenizer, progress=False)
    _, theirs = mlx_lm_load(str(lm))
    _, ours = elm_mlx.load(lm)
    assert ours.chat_template is not None
    for messages in CHATS:
        text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        mine = ours.apply_chat_template(messages)
        assert theirs.encode(text, add_special_tokens=False) == mine
        assert mine[0] == ours.bos_token_id and mine.count(ours.eos_token_id) == len(messages) + (
            messages[0]["role"] != "system")  # every turn ends with EOS, the empty system turn too
    r = CliRunner().invoke(app, ["generate", "-M", str(lm), "Hi", "-m", "1"])
    assert r.exit_code == 0, r.output
    assert f"prompt: {len(ours.apply_chat_template(CHATS[0]))} tokens" in r.stderr
    # Plain text still encodes as SentencePiece does.
    assert theirs.encode(TEXT) == Tokenizer(llama_tokenizer).encode(TEXT)
