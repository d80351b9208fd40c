"""elm_mlx.convert.convert and `elm-mlx convert`: Apple HF checkpoint -> one MLX
folder (model.safetensors, config.json, tokenizer.model), written through a
temporary folder renamed at the end.

Converted folders must load with elm_mlx.load and give the source's logits (fp32:
bit-identical; bf16: within a measured bound), and load in mlx-lm too.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import elm_mlx.convert
import engine
import mlx.core as mx
import numpy as np
import pytest
from checkpoints import TINY, make_hf_checkpoint, round_to_dtype, with_llama_vocab
from elm_mlx.convert import convert
from engine import param_dtypes
from reference import reference_logits
from typer.testing import CliRunner

import elm_mlx
from elm_mlx import ElmError
from elm_mlx.cli import app
from elm_mlx.load import load_model

TOKENS = [1, 17, 300, 5, 511, 42, 42, 7, 256, 3, 99, 2]
# bf16 storage + bf16 compute vs the fp32 source, as a fraction of max |logit|.
# Measured over every TINY arch: 0.0126-0.0165 (max abs err 0.047-0.073 on logits
# of max |value| 3.5-4.4). Asserted with ~2x headroom.
BF16_REL_BOUND = 0.03


def logits(model, tokens=TOKENS) -> np.ndarray:
    return engine.logits(model, tokens)


def header(path: Path) -> dict:
    """{key: (dtype, shape)} read straight from a safetensors header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        h = json.loads(f.read(n))
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in h.items() if k != "__metadata__"}


def leftovers(parent: Path) -> list:
    return [p.name for p in parent.iterdir() if "partial" in p.name]


pytestmark = pytest.mark.usefixtures("offline_caches")


@pytest.fixture
def src(tmp_path):
    """A TINY 'tied' fp32 HF checkpoint: (folder, cfg, weights)."""
    cfg = TINY["tied"]
    folder = tmp_path / "src"
    return folder, cfg, make_hf_checkpoint(folder, cfg, seed=21)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("arch", list(TINY))
def test_fp32_conversion_is_exact(tmp_path, arch, llama_tokenizer):
    cfg = with_llama_vocab(TINY[arch])
    weights = make_hf_checkpoint(tmp_path / "src", cfg, seed=22)
    out = convert(tmp_path / "src", tmp_path / "out", dtype="fp32", tokenizer=llama_tokenizer,
                  progress=False)
    assert out == tmp_path / "out"
    source = load_model(tmp_path / "src", dtype="fp32")
    model, tok = elm_mlx.load(out)  # dtype None: as stored
    assert param_dtypes(model) == {mx.float32}
    assert tok.vocab_size == 32000
    assert np.array_equal(logits(model), logits(source))
    assert np.max(np.abs(logits(model) - reference_logits(weights, cfg, TOKENS))) <= 1e-4


@pytest.mark.parametrize("arch", ["tied", "untied", "odd_layers"])
def test_mlx_lm_loads_converted_folder(tmp_path, arch, llama_tokenizer):
    """Interoperability: our folder is a valid mlx-lm OpenELM folder."""
    from mlx_lm.utils import load_model as mlx_lm_load_model

    cfg = TINY[arch]
    make_hf_checkpoint(tmp_path / "src", cfg, seed=23)
    out = convert(tmp_path / "src", tmp_path / "out", dtype="fp32", tokenizer=llama_tokenizer,
                  progress=False)
    theirs, _ = mlx_lm_load_model(out)
    ours = load_model(out)
    assert np.max(np.abs(logits(theirs) - logits(ours))) <= 1e-5


@pytest.mark.parametrize("arch", list(TINY))
def test_bf16_conversion_within_bound(tmp_path, arch, llama_tokenizer):
    cfg = TINY[arch]
    weights = make_hf_checkpoint(tmp_path / "src", cfg, seed=24)
    out = convert(tmp_path / "src", tmp_path / "out", tokenizer=llama_tokenizer, progress=False)  # default bf16
    assert {d for d, _ in header(out / "model.safetensors").values()} == {"BF16"}

    source = logits(load_model(tmp_path / "src", dtype="fp32"))
    model = load_model(out)
    assert param_dtypes(model) == {mx.bfloat16}  # stored dtype kept
    err = np.max(np.abs(logits(model) - source)) / np.max(np.abs(source))
    assert err <= BF16_REL_BOUND, f"bf16 logits off by {err:.4f} of max |logit|"

    # The stored values are the fp32 weights rounded to nearest bf16: with fp32
    # compute they match the float64 reference on those rounded weights.
    rounded = {k: round_to_dtype(v, "BF16") for k, v in weights.items()}
    as_fp32 = load_model(out, dtype="fp32")
    emb = np.array(as_fp32.transformer.token_embeddings.weight)
    assert np.array_equal(emb, rounded["transformer.token_embeddings.weight"])
    assert np.max(np.abs(logits(as_fp32) - reference_logits(rounded, cfg, TOKENS))) <= 1e-4


def test_sharded_16bit_source(tmp_path, llama_tokenizer):
    """Like OpenELM-3B-Instruct: bf16 shards + index -> one file, exact values."""
    cfg = TINY["head_dim_128"]
    rounded = make_hf_checkpoint(tmp_path / "src", cfg, dtype="BF16", shards=3, seed=25)
    out = convert(tmp_path / "src", tmp_path / "out", dtype="bf16", tokenizer=llama_tokenizer,
                  progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    model = load_model(out, dtype="fp32")
    assert np.max(np.abs(logits(model) - reference_logits(rounded, cfg, TOKENS))) <= 1e-4


# ---------------------------------------------------------------- output folder


@pytest.mark.parametrize("dtype,name,st", [("fp32", "float32", "F32"), ("bf16", "bfloat16", "BF16"),
                                           ("fp16", "float16", "F16")])
def test_output_folder_contents(src, tmp_path, llama_tokenizer, dtype, name, st):
    folder, cfg, _ = src
    out = convert(folder, tmp_path / "out", dtype=dtype, tokenizer=llama_tokenizer, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    assert (out / "tokenizer.model").read_bytes() == llama_tokenizer.read_bytes()

    config = json.loads((out / "config.json").read_text())
    # Every field of the source stays, but auto_map (remote code not copied)
    # and torch_dtype (now what is stored).
    kept = {k: v for k, v in cfg.items() if k not in ("auto_map", "torch_dtype")}
    assert {k: config.get(k) for k in kept} == kept and "auto_map" not in config
    assert config["torch_dtype"] == name

    # Same keys and [out, in] shapes as Apple's file (mlx-lm and others read it as is).
    stored = header(out / "model.safetensors")
    src_header = header(folder / "model.safetensors")
    assert {k: s for k, (_, s) in stored.items()} == {k: s for k, (_, s) in src_header.items()}
    assert {d for d, _ in stored.values()} == {st}

    model = load_model(out)  # dtype None keeps the stored dtype
    assert param_dtypes(model) == {getattr(mx, name)}
    assert param_dtypes(load_model(out, dtype="fp32")) == {mx.float32}


def test_tokenizer_from_source_folder(src, tmp_path, llama_tokenizer):
    folder, _, _ = src
    (folder / "tokenizer.model").write_bytes(llama_tokenizer.read_bytes())
    out = convert(folder, tmp_path / "out", dtype="fp32", progress=False)
    assert (out / "tokenizer.model").read_bytes() == llama_tokenizer.read_bytes()


def test_a_file_that_is_no_tokenizer_fails_before_writing(src, tmp_path):
    folder, _, _ = src
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not sentencepiece")
    with pytest.raises(ElmError, match=str(bad)):
        convert(folder, tmp_path / "out", tokenizer=bad, progress=False)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_no_tokenizer_fails_before_writing(src, tmp_path):
    folder, _, _ = src
    with pytest.raises(ElmError) as e:
        convert(folder, tmp_path / "out", progress=False)
    assert "tokenizer.model" in str(e.value) and "--tokenizer" in str(e.value)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_bad_source_fails_with_its_message(src, tmp_path, llama_tokenizer):
    folder, _, _ = src
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ElmError) as e:
        convert(folder, tmp_path / "out", tokenizer=llama_tokenizer, progress=False)
    assert str(folder / "model.safetensors") in str(e.value)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


# ---------------------------------------------------------------- atomicity


def test_existing_output_is_untouched(src, tmp_path, llama_tokenizer):
    folder, _, _ = src
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(ElmError) as e:
        convert(folder, out, tokenizer=llama_tokenizer, progress=False)
    assert str(out) in str(e.value) and "already exists" in str(e.value)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert (out / "keep.txt").read_text() == "mine"
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_failure_midway_leaves_nothing(src, tmp_path, monkeypatch, llama_tokenizer, exc):
    folder, _, _ = src
    out = tmp_path / "out"
    calls = []

    def half_written(path, arrays, metadata=None):
        # Written into a temporary folder beside `out` (same filesystem: the final
        # rename is atomic); `out` itself does not exist yet, so a hard kill here
        # leaves nothing that loads.
        assert not out.exists()
        assert Path(path).parent.parent == out.parent and "partial" in Path(path).parent.name
        calls.append(path)
        Path(path).write_bytes(b"\0" * 1000)  # a partial file, then the interruption
        raise exc("interrupted")

    with monkeypatch.context() as patch:
        patch.setattr(elm_mlx.convert.mx, "save_safetensors", half_written)
        # MLX's own write errors (RuntimeError) become the ElmError of a failed write.
        with pytest.raises(ElmError if exc is RuntimeError else exc):
            convert(folder, out, tokenizer=llama_tokenizer, progress=False)
    assert calls, "the converter no longer writes through mx.save_safetensors"
    assert not out.exists()
    assert not leftovers(tmp_path)
    # ... and a retry then succeeds.
    convert(folder, out, tokenizer=llama_tokenizer, progress=False)
    assert load_model(out) is not None


def test_disk_error_midway_is_an_elm_error(src, tmp_path, monkeypatch, llama_tokenizer):
    folder, _, _ = src
    out = tmp_path / "out"

    def disk_full(path, arrays, metadata=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(elm_mlx.convert.mx, "save_safetensors", disk_full)
    with pytest.raises(ElmError) as e:
        convert(folder, out, tokenizer=llama_tokenizer, progress=False)
    assert str(out) in str(e.value) and "No space left on device" in str(e.value)
    assert not out.exists() and not leftovers(tmp_path)


# ---------------------------------------------------------------- CLI


def test_cli_convert(src, tmp_path, llama_tokenizer):
    folder, _, _ = src
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["convert", str(folder), "-o", str(out), "--dtype", "fp32",
                                      "--tokenizer", str(llama_tokenizer)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert np.array_equal(logits(load_model(out)), logits(load_model(folder, dtype="fp32")))


def test_cli_bad_dtype(src, tmp_path, llama_tokenizer):
    folder, _, _ = src
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["convert", str(folder), "-o", str(out), "--dtype", "fp64",
                                      "--tokenizer", str(llama_tokenizer)])
    assert result.exit_code == 2
    assert "Invalid value for '--dtype': Value error, 'fp64' is not one of 'bf16', 'fp16', 'fp32'" in result.output
    assert "Traceback" not in result.output
    assert not out.exists() and not leftovers(tmp_path)


def test_cli_existing_output(src, tmp_path, llama_tokenizer):
    folder, _, _ = src
    out = tmp_path / "out"
    out.mkdir()
    result = CliRunner().invoke(app, ["convert", str(folder), "-o", str(out),
                                      "--tokenizer", str(llama_tokenizer)])
    assert result.exit_code == 2
    assert f"error: {out} already exists" in result.output
    assert "Traceback" not in result.output
