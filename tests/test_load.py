"""elm_mlx.load: Apple HF folders (single file, shards; fp32/fp16/bf16 stored),
dtype handling, every way a folder or a name can be wrong (the message must name
the file, the key and the expected shape), and presets / hub ids from an offline
Hugging Face cache, converted once into ELM_MLX_CACHE.

Numeric checks compare with tests/reference.py (float64 NumPy forward written from
the reference document). The folder -> model half of `load` is
`elm_mlx.load.load_model`; tests that only need the model call it, so they run
without the Llama-2 tokenizer; tests that go through `elm_mlx.load` with a
working model need the real tokenizer and skip without it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import elm_mlx.convert
import engine
import mlx.core as mx
import numpy as np
import pytest
from checkpoints import TINY, make_hf_checkpoint, random_weights, write_safetensors, with_llama_vocab
from engine import param_dtypes
from hub_cache import make_hub_repo, use_hub_cache
from mlx.utils import tree_flatten
from reference import reference_logits

import elm_mlx
from elm_mlx import ElmError
from elm_mlx.load import load_model
from elm_mlx.tokenizer import TOKENIZER_REPO, Tokenizer

TOKENS = [1, 17, 300, 5, 511, 42, 42, 7, 256, 3, 99, 2]
TOL = 1e-4  # fp32 compute vs the float64 reference (measured ~5e-6 on logits of scale ~4)
# bf16 weights + bf16 compute vs fp32, as a fraction of max |logit|: measured
# 0.0126-0.0165 over the TINY archs (see test_convert.py); ~2x headroom.
BF16_REL_BOUND = 0.03


def logits(model, tokens=TOKENS) -> np.ndarray:
    return engine.logits(model, tokens)


def max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


pytestmark = pytest.mark.usefixtures("offline_caches")


@pytest.fixture
def tied(tmp_path):
    """A valid fp32 'tied' checkpoint: (folder, cfg, weights)."""
    cfg = TINY["tied"]
    folder = tmp_path / "tied"
    return folder, cfg, make_hf_checkpoint(folder, cfg)


def rewrite_weights(folder: Path, weights: dict) -> Path:
    path = folder / "model.safetensors"
    write_safetensors(path, weights, "F32", {"format": "pt"})
    return path


def load_error(name, **kw) -> str:
    with pytest.raises(ElmError) as e:
        elm_mlx.load(name, **kw)
    return str(e.value)


# ---------------------------------------------------------------- Apple's HF layout


@pytest.mark.parametrize("arch", list(TINY))
def test_hf_folder_fp32_matches_reference(tmp_path, arch):
    cfg = TINY[arch]
    weights = make_hf_checkpoint(tmp_path / arch, cfg, seed=3)
    model = load_model(tmp_path / arch, dtype="fp32")
    assert param_dtypes(model) == {mx.float32}
    ref = reference_logits(weights, cfg, TOKENS)
    assert logits(model).shape == (len(TOKENS), cfg["vocab_size"])
    assert max_err(logits(model), ref) <= TOL


@pytest.mark.parametrize("arch", ["tied", "untied"])
def test_sharded_equals_single_file(tmp_path, arch):
    cfg = TINY[arch]
    weights = random_weights(cfg, seed=5)
    make_hf_checkpoint(tmp_path / "single", cfg, weights=weights)
    make_hf_checkpoint(tmp_path / "sharded", cfg, weights=weights, shards=3)
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    single = load_model(tmp_path / "single", dtype="fp32")
    sharded = load_model(tmp_path / "sharded", dtype="fp32")
    a, b = dict(tree_flatten(single.parameters())), dict(tree_flatten(sharded.parameters()))
    assert a.keys() == b.keys()
    for k in a:
        assert mx.array_equal(a[k], b[k]).item(), k
    assert np.array_equal(logits(single), logits(sharded))
    assert max_err(logits(sharded), reference_logits(weights, cfg, TOKENS)) <= TOL


@pytest.mark.parametrize("stored", ["F16", "BF16"])
@pytest.mark.parametrize("arch", ["tied", "odd_layers"])
def test_16bit_checkpoints(tmp_path, stored, arch):
    cfg = TINY[arch]
    rounded = make_hf_checkpoint(tmp_path / "m", cfg, dtype=stored, seed=7)
    # fp32 compute on the stored (rounded) values: same tolerance as fp32 checkpoints.
    model = load_model(tmp_path / "m", dtype="fp32")
    assert param_dtypes(model) == {mx.float32}
    emb = np.array(model.transformer.token_embeddings.weight)
    assert np.array_equal(emb, rounded["transformer.token_embeddings.weight"])  # upcast is exact
    assert max_err(logits(model), reference_logits(rounded, cfg, TOKENS)) <= TOL
    # The default (bf16) of a bf16 checkpoint keeps its stored bits exactly.
    if stored == "BF16":
        default = load_model(tmp_path / "m")
        assert param_dtypes(default) == {mx.bfloat16}
        emb = np.array(default.transformer.token_embeddings.weight.astype(mx.float32))
        assert np.array_equal(emb, rounded["transformer.token_embeddings.weight"])


# ---------------------------------------------------------------- dtype


def test_default_dtype_is_bf16_for_hf_folder(tied):
    folder, cfg, weights = tied
    model = load_model(folder)
    assert param_dtypes(model) == {mx.bfloat16}
    ref = reference_logits(weights, cfg, TOKENS)
    assert max_err(logits(model), ref) <= BF16_REL_BOUND * np.abs(ref).max()


def test_dtype_fp32_and_fp16(tied):
    folder, _, _ = tied
    assert param_dtypes(load_model(folder, dtype="fp32")) == {mx.float32}
    assert param_dtypes(load_model(folder, dtype="float32")) == {mx.float32}
    assert param_dtypes(load_model(folder, dtype="fp16")) == {mx.float16}


def test_load_returns_model_and_tokenizer(tmp_path, llama_tokenizer):
    cfg = with_llama_vocab(TINY["tied"])
    folder = tmp_path / "tied"
    weights = make_hf_checkpoint(folder, cfg, seed=1)
    model, tok = elm_mlx.load(folder, dtype="fp32", tokenizer=llama_tokenizer)
    assert isinstance(tok, Tokenizer) and tok.vocab_size == 32000
    assert max_err(logits(model), reference_logits(weights, cfg, TOKENS)) <= TOL
    model, _ = elm_mlx.load(str(folder), tokenizer=llama_tokenizer)  # str path, default dtype
    assert param_dtypes(model) == {mx.float32}  # on the CPU backend (tests/test_defaults.py)


def test_bad_dtype_names_value_and_choices(tied):
    folder, _, _ = tied
    msg = load_error(folder, dtype="xx")
    assert "'xx'" in msg
    for choice in ("bf16", "fp16", "fp32"):
        assert choice in msg


# ---------------------------------------------------------------- bad folders and files


def test_folder_without_config(tied):
    folder, _, _ = tied
    (folder / "config.json").unlink()
    msg = load_error(folder)
    assert str(folder / "config.json") in msg and "not found" in msg


def test_config_not_json(tied):
    folder, _, _ = tied
    (folder / "config.json").write_text('{"model_type": "openelm",')
    msg = load_error(folder)
    assert str(folder / "config.json") in msg and "not valid JSON" in msg


def test_model_type_llama(tied):
    folder, cfg, _ = tied
    (folder / "config.json").write_text(json.dumps(dict(cfg, model_type="llama")))
    msg = load_error(folder)
    assert "config.json" in msg and "'llama'" in msg and "'openelm'" in msg


def test_num_query_heads_wrong_length(tied):
    folder, cfg, _ = tied
    (folder / "config.json").write_text(json.dumps(dict(cfg, num_query_heads=[4, 4])))
    msg = load_error(folder)
    assert "config.json" in msg and "num_query_heads" in msg
    assert "num_transformer_layers=3" in msg and "[4, 4]" in msg


def test_missing_weights_file(tied):
    folder, _, _ = tied
    (folder / "model.safetensors").unlink()
    msg = load_error(folder)
    assert str(folder) in msg
    assert "model.safetensors" in msg and "model.safetensors.index.json" in msg


def test_missing_tensor_names_key_and_shape(tied):
    folder, _, weights = tied
    key = "transformer.layers.2.ffn.proj_2.weight"  # ffn width 192 in layer 2 of 'tied'
    rewrite_weights(folder, {k: v for k, v in weights.items() if k != key})
    msg = load_error(folder)
    assert key in msg and "[128, 192]" in msg and "missing" in msg
    assert "model.safetensors" in msg


def test_missing_lm_head_in_untied_config(tmp_path):
    cfg = TINY["untied"]
    weights = make_hf_checkpoint(tmp_path / "m", cfg)
    del weights["lm_head.weight"]
    rewrite_weights(tmp_path / "m", weights)
    msg = load_error(tmp_path / "m")
    assert "lm_head.weight" in msg and "[512, 128]" in msg


def test_wrong_shape_names_file_key_and_shapes(tied):
    folder, _, weights = tied
    key = "transformer.layers.1.attn.qkv_proj.weight"  # (4 + 2*2) * 64 = 512 rows
    weights[key] = weights[key][:448]
    path = rewrite_weights(folder, weights)
    msg = load_error(folder)
    assert str(path) in msg and key in msg
    assert "[448, 128]" in msg and "[512, 128]" in msg


def test_wrong_shape_in_a_shard_names_the_shard(tmp_path):
    cfg = TINY["tied"]
    folder = tmp_path / "m"
    weights = make_hf_checkpoint(folder, cfg, shards=3)
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    key = "transformer.norm.weight"
    shard = folder / weight_map[key]
    part = {k: weights[k] for k, f in weight_map.items() if f == shard.name}
    part[key] = np.ones(64, np.float32)
    write_safetensors(shard, part, "F32")
    msg = load_error(folder)
    assert str(shard) in msg and key in msg and "[64]" in msg and "[128]" in msg


def test_unexpected_lm_head_in_tied_config(tied):
    folder, _, weights = tied
    weights["lm_head.weight"] = weights["transformer.token_embeddings.weight"]
    path = rewrite_weights(folder, weights)
    msg = load_error(folder)
    assert str(path) in msg and "unexpected key 'lm_head.weight'" in msg
    assert "share_input_output_layers" in msg  # explains why it is unexpected


def test_unexpected_unrelated_key(tied):
    folder, _, weights = tied
    weights["model.layers.0.self_attn.q_proj.weight"] = np.zeros((4, 4), np.float32)
    path = rewrite_weights(folder, weights)
    msg = load_error(folder)
    assert str(path) in msg
    assert "model.layers.0.self_attn.q_proj.weight" in msg and "unexpected key" in msg


def test_truncated_safetensors(tied):
    folder, _, _ = tied
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    msg = load_error(folder)
    assert str(path) in msg and "truncated" in msg


def test_truncated_inside_header(tied):
    folder, _, _ = tied
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    msg = load_error(folder)
    assert str(path) in msg and "not a safetensors file" in msg


@pytest.mark.parametrize("content", [b"", b"abc", b"<html>404 Not Found</html>" * 20,
                                     b"\x10\x00\x00\x00\x00\x00\x00\x00not json, 16 b."])
def test_garbage_model_safetensors(tied, content):
    folder, _, _ = tied
    path = folder / "model.safetensors"
    path.write_bytes(content)
    msg = load_error(folder)
    assert str(path) in msg and "not a safetensors file" in msg


def test_index_lists_missing_shard(tmp_path):
    folder = tmp_path / "m"
    make_hf_checkpoint(folder, TINY["tied"], shards=3)
    (folder / "model-00002-of-00003.safetensors").unlink()
    msg = load_error(folder)
    assert str(folder / "model.safetensors.index.json") in msg
    assert "model-00002-of-00003.safetensors" in msg and "missing" in msg


def test_index_not_json(tmp_path):
    folder = tmp_path / "m"
    make_hf_checkpoint(folder, TINY["tied"], shards=3)
    (folder / "model.safetensors.index.json").write_text("[]")
    msg = load_error(folder)
    assert str(folder / "model.safetensors.index.json") in msg and "weight_map" in msg


def test_path_is_a_file(tied):
    folder, _, _ = tied
    msg = load_error(folder / "model.safetensors")
    assert str(folder / "model.safetensors") in msg and "folder" in msg and "not a file" in msg


def test_name_neither_folder_preset_nor_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = load_error("OpenELM-999M")
    assert msg.startswith("model='OpenELM-999M': expected a folder, a preset or a hub id")  # the API names the argument
    assert "270M" in msg and "3B-Instruct" in msg and "hub id" in msg


# ---------------------------------------------------------------- hub (offline cache)


def _hub_files(folder: Path) -> dict:
    return {p.name: p for p in folder.iterdir() if p.name != "generation_config.json"}


def _converted(root: Path) -> list:
    return sorted(p.parent for p in root.rglob("model.safetensors"))


@pytest.fixture
def hub(tmp_path, monkeypatch, llama_tokenizer):
    """An offline hub cache with apple/OpenELM-270M (a TINY checkpoint, no tokenizer,
    as in Apple's repos) and the ungated tokenizer repo; ELM_MLX_CACHE in tmp_path."""
    cfg = with_llama_vocab(TINY["tied"])
    src = tmp_path / "src"
    weights = make_hf_checkpoint(src, cfg, seed=11)
    cache = tmp_path / "hf"
    make_hub_repo(cache, "apple/OpenELM-270M", _hub_files(src) | {"generation_config.json": b"{}"})
    make_hub_repo(cache, TOKENIZER_REPO, {"tokenizer.model": llama_tokenizer})
    use_hub_cache(monkeypatch, cache)
    elm = tmp_path / "elm-cache"
    monkeypatch.setenv("ELM_MLX_CACHE", str(elm))
    return {"cfg": cfg, "weights": weights, "cache": cache, "elm": elm, "tmp": tmp_path}


def test_preset_from_hub_converted_once(hub, monkeypatch):
    cfg, weights, elm = hub["cfg"], hub["weights"], hub["elm"]
    model, tok = elm_mlx.load("270M")
    assert isinstance(tok, Tokenizer) and tok.vocab_size == 32000
    assert param_dtypes(model) == {mx.float32}  # the default on the CPU backend...
    [entry] = _converted(elm)
    # ...of an fp32 copy: cached in what the CPU computes in, not rounded to bf16 and widened again
    assert json.loads((entry / "config.json").read_text())["torch_dtype"] == "float32"
    assert {p.name for p in entry.iterdir()} == {"model.safetensors", "config.json", "tokenizer.model"}
    assert not [p for p in elm.rglob("*") if "partial" in p.name]
    first = logits(model)
    mtimes = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}

    def no_convert(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(elm_mlx.convert, "convert", no_convert)
    model, _ = elm_mlx.load("270M")
    assert _converted(elm) == [entry]
    assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == mtimes
    assert np.array_equal(logits(model), first)
    assert max_err(first, reference_logits(weights, cfg, TOKENS)) <= TOL


def test_preset_is_cached_in_bf16_where_the_backend_computes_in_it(hub, monkeypatch):
    monkeypatch.setattr(sys.modules["elm_mlx.load"], "cpu_backend", lambda: False)  # as on a Mac's GPU
    model, _ = elm_mlx.load("270M")
    [entry] = _converted(hub["elm"])
    assert json.loads((entry / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert param_dtypes(model) == {mx.bfloat16}
    ref = reference_logits(hub["weights"], hub["cfg"], TOKENS)
    assert max_err(logits(model), ref) <= BF16_REL_BOUND * np.abs(ref).max()


def test_hub_id_fp32_separate_entry(hub, monkeypatch):
    cfg, weights, elm = hub["cfg"], hub["weights"], hub["elm"]
    elm_mlx.load("270M", dtype="bf16")
    model, _ = elm_mlx.load("apple/OpenELM-270M", dtype="fp32")
    assert param_dtypes(model) == {mx.float32}
    entries = _converted(elm)
    assert len(entries) == 2
    dtypes = {json.loads((e / "config.json").read_text())["torch_dtype"] for e in entries}
    assert dtypes == {"bfloat16", "float32"}
    assert max_err(logits(model), reference_logits(weights, cfg, TOKENS)) <= TOL
    # Both are cached now: neither converts again.
    monkeypatch.setattr(elm_mlx.convert, "convert", lambda *a, **k: pytest.fail("converted again"))
    again, _ = elm_mlx.load("apple/OpenELM-270M", dtype="fp32")
    assert np.array_equal(logits(again), logits(model))
    assert _converted(elm) == entries


def test_dtype_spellings_share_one_entry(hub, monkeypatch):
    elm_mlx.load("270M", dtype="bf16")
    [entry] = _converted(hub["elm"])
    monkeypatch.setattr(elm_mlx.convert, "convert", lambda *a, **k: pytest.fail("converted again"))
    for spelling in ("bf16", "bfloat16"):
        model, _ = elm_mlx.load("OpenELM-270M", dtype=spelling)
        assert param_dtypes(model) == {mx.bfloat16}
    assert _converted(hub["elm"]) == [entry]


def test_bad_dtype_fails_before_download(hub):
    # 3B is not in the cache: the dtype is reported, not the missing download.
    msg = load_error("3B", dtype="int4")
    assert "'int4'" in msg and "bf16, fp16, fp32" in msg
    assert "Hugging Face cache" not in msg


def test_new_hub_commit_is_converted_again(hub):
    """The conversion is keyed by the hub commit: an updated repo is not served stale."""
    cfg, elm, tmp = hub["cfg"], hub["elm"], hub["tmp"]
    elm_mlx.load("270M", dtype="fp32")
    new = make_hf_checkpoint(tmp / "src2", cfg, seed=12)
    make_hub_repo(hub["cache"], "apple/OpenELM-270M", _hub_files(tmp / "src2"))  # moves refs/main
    model, _ = elm_mlx.load("270M", dtype="fp32")
    assert len(_converted(elm)) == 2
    assert max_err(logits(model), reference_logits(new, cfg, TOKENS)) <= TOL


def test_sharded_hub_repo(hub):
    """Like apple/OpenELM-3B: three shards and an index."""
    cfg, tmp = with_llama_vocab(TINY["head_dim_128"]), hub["tmp"]
    weights = make_hf_checkpoint(tmp / "src3b", cfg, shards=3, seed=13)
    make_hub_repo(hub["cache"], "apple/OpenELM-3B", _hub_files(tmp / "src3b"))
    model, _ = elm_mlx.load("apple/OpenELM-3B", dtype="fp32")
    assert max_err(logits(model), reference_logits(weights, cfg, TOKENS)) <= TOL


def test_hub_repo_not_cached_offline(hub):
    msg = load_error("450M-Instruct")
    assert "apple/OpenELM-450M-Instruct" in msg
    assert "not in the Hugging Face cache" in msg
    assert "connect" in msg and "local folder" in msg  # what to do
    assert not hub["elm"].exists() or not _converted(hub["elm"])


def test_models_lists_what_this_machine_holds_and_rm_removes_it(hub):
    from typer.testing import CliRunner

    from elm_mlx.cli import app

    runner = CliRunner()
    elm_mlx.load("270M")
    elm_mlx.load("270M", dtype="bf16")
    r = runner.invoke(app, ["models"])
    assert r.exit_code == 0, r.stderr
    held = r.stdout.split("On this machine")[1]
    rows = {line.split()[1]: line for line in held.splitlines() if line.startswith("270M ")}
    assert set(rows) == {"download", "float32", "bfloat16"}, r.stdout
    fp32 = next(p for p in _converted(hub["elm"]) if p.name.endswith("-float32"))
    assert str(fp32) in rows["float32"] and f"{sum(f.stat().st_size for f in fp32.iterdir()) / 1e6:.1f} MB" in rows["float32"]
    assert "llama-tokenizer" not in r.stdout  # the tokenizer repo is not a model
    r = runner.invoke(app, ["models", "--rm", "270M"])
    assert r.exit_code == 0 and r.stdout.count("removed 270M") == 3 and "freed" in r.stdout, r.output
    assert _converted(hub["elm"]) == [] and not list(hub["elm"].rglob("*removing*"))
    assert not (hub["cache"] / "models--apple--OpenELM-270M").exists()
    assert (hub["cache"] / ("models--" + TOKENIZER_REPO.replace("/", "--"))).exists()
    assert "Nothing downloaded yet" in runner.invoke(app, ["models"]).stdout
    r = runner.invoke(app, ["models", "--rm", "270M"])
    assert r.exit_code == 2 and "nothing of apple/OpenELM-270M" in r.stderr
