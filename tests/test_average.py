"""`elm-mlx convert ckpt1 ckpt2 ... --average -o OUT`: the parameter mean of
several checkpoints of one architecture, read one tensor at a time."""

from __future__ import annotations

import engine
import mlx.core as mx
import numpy as np
import pytest
import torch_format as tf
from checkpoints import TINY, make_hf_checkpoint, random_weights
from elm_mlx.convert import build_weights, convert
from elm_mlx.convert.corenet import corenet_source
from reference import reference_logits
from test_corenet import corenet_state
from typer.testing import CliRunner

from elm_mlx import ElmError
from elm_mlx.cli import app
from elm_mlx.config import OpenELMConfig
from elm_mlx.load import load_model

TOKENS = [1, 17, 300, 5, 511, 42, 42, 7, 256, 3, 99, 2]


def sequential_mean(arrays) -> np.ndarray:
    """float32 sum in order, then / n: the same arithmetic, done in NumPy."""
    total = np.zeros_like(arrays[0], dtype=np.float32)
    for a in arrays:
        total = total + a.astype(np.float32)
    return total / np.float32(len(arrays))


@pytest.fixture
def checkpoints(tmp_path):
    cfg = TINY["odd_layers"]
    folders, weights = [], []
    for i in range(3):
        folders.append(tmp_path / f"ckpt{i}")
        weights.append(make_hf_checkpoint(folders[-1], cfg, seed=40 + i))
    return cfg, folders, weights


def test_average_of_hf_checkpoints(checkpoints, tmp_path, llama_tokenizer):
    cfg, folders, weights = checkpoints
    r = CliRunner().invoke(app, ["convert", *map(str, folders), "--average", "-o", str(tmp_path / "avg"),
                                 "--dtype", "fp32", "--tokenizer", str(llama_tokenizer)])
    assert r.exit_code == 0, r.output
    stored = mx.load(str(tmp_path / "avg" / "model.safetensors"))
    mean = {k: sequential_mean([w[k] for w in weights]) for k in weights[0]}
    for k, v in mean.items():
        assert np.array_equal(np.array(stored[k]), v), k
        assert np.allclose(np.array(stored[k]), np.mean([w[k] for w in weights], axis=0), rtol=1e-6, atol=1e-7)
    model = load_model(tmp_path / "avg")
    assert np.max(np.abs(engine.logits(model, TOKENS) - reference_logits(mean, cfg, TOKENS))) <= 1e-4


def test_average_then_quantize(checkpoints, tmp_path, llama_tokenizer):
    _, folders, weights = checkpoints
    out = convert(folders, tmp_path / "avgq", average=True, quant="q4", group_size=32, dtype="fp32",
                  tokenizer=llama_tokenizer, progress=False)
    emb = load_model(out).transformer.token_embeddings
    deq = mx.dequantize(emb.weight, emb.scales, emb.biases, group_size=32, bits=8)  # the recipe's 8 bits
    mean = sequential_mean([w["transformer.token_embeddings.weight"] for w in weights])
    assert np.max(np.abs(np.array(deq) - mean)) <= np.abs(mean).max() / 100


def test_average_of_corenet_checkpoints(tmp_path):
    """The paper's case: CoreNet .pt files (bf16 and fp32 mixed), padding rows dropped."""
    cfg = TINY["tied"]
    weights = [random_weights(cfg, seed=50 + i) for i in range(3)]
    paths = [tf.save(corenet_state(w, dtype), tmp_path / f"checkpoint_iter_{i}.pt")
             for i, (w, dtype) in enumerate(zip(weights, ["BF16", "F32", "BF16"]))]
    sources = [corenet_source(p, OpenELMConfig.from_dict(cfg)) for p in paths]
    got = build_weights(sources, mx.float32, average=True, progress=False)
    for k in weights[0]:
        expected = sequential_mean([np.array(s.read(k)) for s in sources])
        assert np.array_equal(np.array(got[k]), expected), k
    assert got["transformer.token_embeddings.weight"].shape == (512, 128)


def test_memory_stays_near_one_checkpoint(tmp_path):
    """Averaging 6 checkpoints holds the output plus about one tensor: MLX's peak
    memory stays far below what loading all of them (6x) would take."""
    cfg = TINY["tied"]
    folders = []
    for i in range(6):
        folders.append(tmp_path / f"c{i}")
        make_hf_checkpoint(folders[-1], cfg, seed=60 + i)
    from elm_mlx.convert.sources import open_source

    sources = [open_source(f) for f in folders]
    one = 4 * OpenELMConfig.from_dict(cfg).num_parameters()
    biggest = 4 * 512 * 128  # the embedding
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()  # arrays other tests still hold
    weights = build_weights(sources, mx.float32, average=True, progress=False)
    peak = mx.get_peak_memory() - before
    assert sum(v.nbytes for v in weights.values()) == one
    assert peak <= one + 4 * biggest, f"peak {peak} bytes for a {one}-byte checkpoint"


def test_mismatched_checkpoints_are_refused(checkpoints, tmp_path, llama_tokenizer):
    _, folders, _ = checkpoints
    make_hf_checkpoint(tmp_path / "other", TINY["tied"], seed=1)
    with pytest.raises(ElmError, match="different architectures"):
        convert([folders[0], tmp_path / "other"], tmp_path / "x", average=True, tokenizer=llama_tokenizer,
                progress=False)
    q = convert(folders[0], tmp_path / "q", quant="q4", group_size=32, tokenizer=llama_tokenizer, progress=False)
    with pytest.raises(ElmError, match="is quantized"):
        convert([folders[1], q], tmp_path / "y", average=True, tokenizer=llama_tokenizer, progress=False)
    r = CliRunner().invoke(app, ["convert", str(folders[0]), str(folders[1]), "-o", str(tmp_path / "z"),
                                 "--tokenizer", str(llama_tokenizer)])
    assert r.exit_code == 2 and "add --average" in r.output
    assert not any((tmp_path / n).exists() for n in "xyz")
