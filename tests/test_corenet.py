"""CoreNet .pt checkpoints: PyTorch's zip format read by a restricted unpickler
(no torch, no code from the file), CoreNet key names, the 32128-row padded
embedding, the size from a preset or CoreNet's YAML.

Fixtures are written by tests/torch_format.py in torch.save's real format
(data.pkl with persistent storage ids and _rebuild_tensor_v2, data/N storages,
fp32/fp16/bf16, shared and non-contiguous storages). When torch is importable,
one test also checks both directions against torch itself.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile

import engine
import mlx.core as mx
import numpy as np
import pytest
import torch_format as tf
from checkpoints import TINY, make_hf_checkpoint, openelm_270m_config, random_weights, round_to_dtype
from elm_mlx.convert import build_weights
from elm_mlx.convert.corenet import corenet_source
from elm_mlx.convert.torch_zip import TorchCheckpoint
from reference import reference_logits
from typer.testing import CliRunner

from elm_mlx import ElmError
from elm_mlx.cli import app
from elm_mlx.config import OpenELMConfig
from elm_mlx.load import load_model

TOKENS = [1, 17, 300, 5, 511, 42, 42, 7, 256, 3, 99, 2]
PAD_ROWS = 128  # CoreNet's vocabulary is 32128 = 32000 + 128 rows the HF files drop


def corenet_state(weights: dict, dtype="F32", seed=0) -> tf.StateDict:
    """HF-named weights -> CoreNet's model.state_dict() (with its `_metadata`): no
    `transformer.` prefix, padded embedding."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, value in weights.items():
        if key == "transformer.token_embeddings.weight":
            value = np.concatenate([value, rng.standard_normal((PAD_ROWS, value.shape[1])).astype(np.float32)])
        state[key.removeprefix("transformer.")] = tf.tensor(value, dtype)
    return tf.as_state_dict(state)


def model_from(source) -> engine.Model:
    model = engine.Model(source.config)
    model.load_weights(list(build_weights([source], mx.float32, progress=False).items()))
    return model


# ---------------------------------------------------------------- the zip format


def test_reader_matches_values_for_every_storage_kind(tmp_path):
    rng = np.random.default_rng(1)
    base = tf.tensor(rng.standard_normal((6, 5)))
    half = tf.tensor(rng.standard_normal((4, 8)), "F16")
    bf = tf.tensor(rng.standard_normal((3, 7)), "BF16")
    obj = collections.OrderedDict(
        base=base, transposed=tf.transposed(base), rows=tf.rows(base, 2, 5),  # three views, one storage
        half=half, half_t=tf.transposed(half), bf=bf, bf_rows=tf.rows(bf, 1, 3),
        param=tf.tensor(rng.standard_normal(3), parameter=True), empty=tf.tensor(np.zeros((0, 4))))
    ckpt = TorchCheckpoint(tf.save(obj, tmp_path / "mix.pt"))
    assert list(ckpt.objects) == list(obj)
    for key, t in obj.items():
        got = ckpt.read(ckpt.objects[key])
        assert got.dtype == np.float32 and got.shape == t.size
        assert np.array_equal(got, tf.values_of(t)), key
    # The shared storage is one member of the archive, as torch.save writes it.
    names = zipfile.ZipFile(tmp_path / "mix.pt").namelist()
    assert len([n for n in names if "/data/" in n and not n.endswith("serialization_id")]) == 5


def test_torch_itself_agrees_in_both_directions(tmp_path):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    a = tf.tensor(rng.standard_normal((5, 3)))
    obj = collections.OrderedDict(a=a, at=tf.transposed(a), h=tf.tensor(rng.standard_normal(4), "F16"),
                                  b=tf.rows(tf.tensor(rng.standard_normal((4, 2)), "BF16"), 1, 4))
    loaded = torch.load(tf.save(obj, tmp_path / "ours.pt"), weights_only=True)
    for k, t in obj.items():
        assert np.array_equal(loaded[k].float().numpy(), tf.values_of(t)), k
    assert loaded["a"].untyped_storage().data_ptr() == loaded["at"].untyped_storage().data_ptr()

    theirs = collections.OrderedDict(w=torch.randn(6, 4), wt=None, h=torch.randn(3).half(),
                                     b=torch.randn(5, 6).bfloat16()[:, 2:5], p=torch.nn.Parameter(torch.randn(2)))
    theirs["wt"] = theirs["w"].t()
    torch.save(theirs, tmp_path / "torch.pt")
    ckpt = TorchCheckpoint(tmp_path / "torch.pt")
    for k, v in theirs.items():
        assert np.array_equal(ckpt.read(ckpt.objects[k]), v.detach().float().numpy()), k


class _Evil:
    def __reduce__(self):
        import os

        return os.system, ("touch pwned",)


@pytest.mark.parametrize("payload", [_Evil(), {"weights": _Evil()}])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, monkeypatch, payload):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("evil/data.pkl", pickle.dumps(payload, protocol=2))
        zf.writestr("evil/byteorder", b"little")
    with pytest.raises(ElmError) as e:
        TorchCheckpoint(path)
    msg = str(e.value)
    assert str(path) in msg and ("posix.system" in msg or "os.system" in msg) and "refused" in msg
    assert not (tmp_path / "pwned").exists()
    # Through the CLI: one line, exit 2, nothing run.
    r = CliRunner().invoke(app, ["convert", str(path), "-o", str(tmp_path / "out"), "--preset", "270M"])
    assert r.exit_code == 2 and "refused" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("module,name", [("builtins", "eval"), ("torch", "load"), ("numpy", "frombuffer")])
def test_any_other_global_is_refused(tmp_path, module, name):
    data = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R."
    path = tmp_path / "g.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("g/data.pkl", data)
    with pytest.raises(ElmError, match=f"{module}.{name}"):
        TorchCheckpoint(path)


def test_damaged_files_fail_with_the_file_name(tmp_path):
    not_zip = tmp_path / "old.pt"
    not_zip.write_bytes(b"\x80\x02}q\x00.")  # torch < 1.6's legacy format starts with a bare pickle
    with pytest.raises(ElmError, match="not a PyTorch zip checkpoint"):
        TorchCheckpoint(not_zip)

    t = tf.tensor(np.ones((4, 4)))
    path = tf.save({"w": t}, tmp_path / "short.pt")
    raw = io.BytesIO()
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(raw, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info.filename, data[:20] if info.filename.endswith("data/0") else data)
    (tmp_path / "short.pt").write_bytes(raw.getvalue())
    ckpt = TorchCheckpoint(tmp_path / "short.pt")
    with pytest.raises(ElmError, match="truncated"):
        ckpt.read(ckpt.objects["w"])

    # A view that claims more elements than its storage holds.
    bad = tf.Tensor(t.storage, 10, (4, 4), (4, 1))
    ckpt = TorchCheckpoint(tf.save({"w": bad}, tmp_path / "oob.pt"))
    with pytest.raises(ElmError, match="reaches past its storage"):
        ckpt.read(ckpt.objects["w"])


# ---------------------------------------------------------------- CoreNet -> MLX


@pytest.mark.parametrize("arch", ["tied", "odd_layers", "head_dim_128"])
def test_corenet_checkpoint_gives_the_hf_logits(tmp_path, arch):
    cfg = TINY[arch]
    weights = random_weights(cfg, seed=3)
    tf.save(corenet_state(weights), tmp_path / "ckpt.pt")
    source = corenet_source(tmp_path / "ckpt.pt", OpenELMConfig.from_dict(cfg))
    hf = make_hf_checkpoint(tmp_path / "hf", cfg, weights=weights)
    ours = engine.logits(model_from(source), TOKENS)
    assert np.array_equal(ours, engine.logits(load_model(tmp_path / "hf", dtype="fp32"), TOKENS))
    assert np.max(np.abs(ours - reference_logits(hf, cfg, TOKENS))) <= 1e-4


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_16bit_corenet_storages(tmp_path, dtype):
    cfg = TINY["tied"]
    weights = random_weights(cfg, seed=4)
    tf.save(corenet_state(weights, dtype), tmp_path / "ckpt.pt")
    source = corenet_source(tmp_path / "ckpt.pt", OpenELMConfig.from_dict(cfg))
    rounded = {k: round_to_dtype(v, dtype) for k, v in weights.items()}
    got = build_weights([source], mx.float32, progress=False)
    for k, v in rounded.items():
        assert np.array_equal(np.array(got[k]), v), k


def test_training_checkpoint_wrapper_and_rope_buffers(tmp_path):
    cfg = TINY["tied"]
    weights = random_weights(cfg, seed=5)
    state = corenet_state(weights)
    state["layers.0.attn.pos_embedding.inv_freq"] = tf.tensor(np.ones(32))  # a buffer, not a weight
    tf.save(tf.training_checkpoint(state), tmp_path / "train.pt")
    source = corenet_source(tmp_path / "train.pt", OpenELMConfig.from_dict(cfg))
    assert np.array_equal(np.array(source.read("transformer.norm.weight")), weights["transformer.norm.weight"])
    assert np.array(source.read("transformer.token_embeddings.weight")).shape == (512, 128)


@pytest.mark.parametrize("mutate,message", [
    (lambda s: s.pop("norm.weight"), "norm.weight is missing"),
    (lambda s: s.__setitem__("extra.weight", tf.tensor(np.ones(3))), "unexpected entry 'extra.weight'"),
    (lambda s: s.__setitem__("norm.weight", tf.tensor(np.ones(7))), "norm.weight has shape [7], expected [128]"),
    (lambda s: s.__setitem__("token_embeddings.weight", tf.tensor(np.ones((100, 128)))),
     "token_embeddings.weight has shape [100, 128]"),
])
def test_wrong_checkpoints_name_file_and_key(tmp_path, mutate, message):
    cfg = TINY["tied"]
    state = corenet_state(random_weights(cfg, seed=6))
    mutate(state)
    path = tf.save(state, tmp_path / "bad.pt")
    with pytest.raises(ElmError) as e:
        corenet_source(path, OpenELMConfig.from_dict(cfg))
    assert str(path) in str(e.value) and message in str(e.value)


def test_size_comes_from_preset_or_yaml(tmp_path):
    path = tf.save(corenet_state(random_weights(TINY["tied"], seed=7)), tmp_path / "c.pt")
    out = tmp_path / "out"
    for extra, message in [([], "--preset NAME"), (["--preset", "270M", "--config", "x.yaml"], "exactly one"),
                           (["--preset", "5B"], "unknown preset '5B'")]:
        r = CliRunner().invoke(app, ["convert", str(path), "-o", str(out)] + extra)
        assert r.exit_code == 2 and message in r.output, r.output
    yaml = tmp_path / "openelm_270M.yaml"
    yaml.write_text("model:\n  language_modeling:\n    name: general_gpt\n    general_gpt:\n"
                    "      model_name: OpenELM-270M\n      vocab_size: 32128\n      max_context_length: 2048\n")
    # Tiny weights against the 270M preset: the YAML was read, the shapes disagree.
    r = CliRunner().invoke(app, ["convert", str(path), "-o", str(out), "--config", str(yaml)])
    assert r.exit_code == 2 and "expected" in r.output and "OpenELM-270M" in r.output, r.output
    yaml.write_text("model: {}\n")
    r = CliRunner().invoke(app, ["convert", str(path), "-o", str(out), "--config", str(yaml)])
    assert r.exit_code == 2 and "general_gpt.model_name" in r.output
    assert not out.exists()


@pytest.mark.slow
def test_full_270m_corenet_checkpoint_round_trip(tmp_path, llama_tokenizer):
    """The real 270M shapes (32128-row embedding), bf16 storages as CoreNet trains,
    through the CLI with --preset: same logits as the HF checkpoint of the same weights."""
    cfg = openelm_270m_config()
    weights = {k: round_to_dtype(v, "BF16") for k, v in random_weights(cfg, seed=8).items()}
    tf.save(corenet_state(weights, "BF16"), tmp_path / "checkpoint_average.pt")
    del weights
    r = CliRunner().invoke(app, ["convert", str(tmp_path / "checkpoint_average.pt"), "-o", str(tmp_path / "mlx"),
                                 "--preset", "270M", "--dtype", "bf16", "--tokenizer", str(llama_tokenizer)])
    assert r.exit_code == 0, r.output
    hf = {k: v for k, v in random_weights(cfg, seed=8).items()}
    make_hf_checkpoint(tmp_path / "hf", cfg, weights=hf, dtype="BF16")
    ours, source = load_model(tmp_path / "mlx"), load_model(tmp_path / "hf")
    assert np.array_equal(engine.logits(ours, TOKENS), engine.logits(source, TOKENS))
