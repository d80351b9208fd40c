"""The hostile-input catalogue (docs/RELIABILITY.md): one test per row. Each
bad input or fault must give one line naming the file, key, flag or value (exit
2), Ctrl-C exit 130, never a traceback, never a hang, and leave nothing lost or
half-written. The rows for .pt files are in test_hostile_pt.py, the fuzz pass in
test_fuzz_readers.py; the HTTP server's rows are in the server's tests."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import time
from pathlib import Path

import elm_mlx.convert
import mlx.core as mx
import pytest
from checkpoints import TINY, make_hf_checkpoint, with_llama_vocab
from engine import TINY_32K
from hostile import silent_server, write_safetensors_header
from typer.testing import CliRunner

import elm_mlx
from elm_mlx import ElmError
from elm_mlx.chat import Chat, command
from elm_mlx.chat_template import RENDER_SECONDS, ChatTemplate
from elm_mlx.checkpoint import read_header
from elm_mlx.cli import app
from elm_mlx.load import load_model
from elm_mlx.tokenizer import Tokenizer, resolve_tokenizer

runner = CliRunner()


def fails(args, message, input=None, env=None):
    """elm-mlx ARGS fails with exit 2 and one `error:` line containing `message`."""
    r = runner.invoke(app, [str(a) for a in args], input=input, env=env)
    out = r.stderr + r.stdout
    assert r.exit_code == 2, out
    assert "Traceback" not in out, out
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr
    return errors[0]


@pytest.fixture(scope="module")
def model_dir(base_folder):
    """A working model folder (tiny, Llama-2 vocabulary, tokenizer included)."""
    return base_folder


@pytest.fixture
def folder(model_dir, tmp_path):
    """A private copy of model_dir, to damage."""
    return Path(shutil.copytree(model_dir, tmp_path / "model"))


def generate_fails(folder, message, *extra, input=None):
    return fails(["generate", "-M", folder, "hi", "-m", "2", *extra], message, input=input)


# ---------------------------------------------------------------- config.json


def test_config_that_is_a_list(folder):
    (folder / "config.json").write_text("[1, 2, 3]")
    generate_fails(folder, "config.json: expected a JSON object of settings, got a JSON array")


def test_config_that_is_a_directory(folder):
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()
    generate_fails(folder, "config.json: expected a config.json (a regular file), found a folder")


@pytest.mark.parametrize("key,value,want", [
    ("num_transformer_layers", "3", "an integer >= 1"),
    ("model_dim", 64.5, "an integer >= 1"),
    ("num_query_heads", [4, "2", 8], "a list of integers >= 1"),
    ("num_kv_heads", 2, "a list of integers >= 1"),
    ("ffn_multipliers", [1.0, None, 2.0], "a list of numbers > 0"),
    ("normalize_qk_projections", "yes", "true or false"),
    ("vocab_size", -1, "an integer >= 1"),
    ("rms_norm_eps", 0, "a number > 0"),
    ("max_context_length", True, "an integer >= 1"),
    ("head_dim", 2**40, "a dimension must be < 2**31"),
])
def test_config_fields_of_the_wrong_type(folder, key, value, want):
    cfg = json.loads((folder / "config.json").read_text())
    cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    line = generate_fails(folder, want)
    assert "config.json" in line and key in line, line


def test_config_not_utf8(folder):
    (folder / "config.json").write_bytes(b'{"model_type": "openelm\xff"}')
    generate_fails(folder, "not UTF-8 text (byte b'\\xff' at offset 23, line 1)")


def test_config_that_is_a_fifo_does_not_hang(folder):
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    generate_fails(folder, "found a FIFO")


def test_unreadable_config(folder, monkeypatch):
    """Permissions: as root (CI) chmod does not stop reads, so open() is made to refuse."""
    target, real_open = str(folder / "config.json"), builtins.open

    def refusing(file, *args, **kwargs):
        if str(file) == target:
            raise PermissionError(errno.EACCES, "Permission denied", target)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing)
    generate_fails(folder, "cannot read it (Permission denied: check the permissions")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_folder(folder):
    folder.chmod(0)
    try:
        generate_fails(folder, str(folder))
    finally:
        folder.chmod(0o755)


# ---------------------------------------------------------------- safetensors files


@pytest.mark.parametrize("header,message", [
    ([1, 2, 3], "the header is a JSON list, expected an object"),
    ("weights", "the header is a JSON str, expected an object"),
    ({"__metadata__": [1]}, "__metadata__ must be an object of strings"),
    ({"__metadata__": {"format": 1}}, "__metadata__ must be an object of strings"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, "tensor 'w' has a malformed"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, "tensor 'w' has a malformed"),
    ({"w": {"dtype": "F32", "shape": [-2, -1], "data_offsets": [0, 8]}}, "tensor 'w' has a malformed"),
    ({"w": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, "tensor 'w' has a malformed"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}}, "tensor 'w' has a malformed"),
    ({"w": "F32"}, "tensor 'w' has a malformed"),
])
def test_malformed_safetensors_header(folder, header, message):
    write_safetensors_header(folder / "model.safetensors", header, b"\0" * 16)
    line = generate_fails(folder, message)
    assert str(folder / "model.safetensors") in line


def test_huge_key_is_quoted_short(folder):
    key = "k" * 100_000
    write_safetensors_header(folder / "model.safetensors", {key: {"dtype": "F32"}})
    line = generate_fails(folder, "has a malformed")
    assert len(line) < 400


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_weights_that_are_not_a_regular_file(folder, kind):
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors") if kind == "fifo" else (folder / "model.safetensors").mkdir()
    generate_fails(folder, "found a FIFO" if kind == "fifo" else "found a folder")


# ---------------------------------------------------------------- shard index


def sharded(tmp_path, llama_tokenizer) -> Path:
    folder = tmp_path / "sharded"
    make_hf_checkpoint(folder, TINY_32K, shards=2, seed=6)
    shutil.copyfile(llama_tokenizer, folder / "tokenizer.model")
    return folder


@pytest.mark.parametrize("weight_map,message", [
    (["model-00001-of-00002.safetensors"], "'weight_map' must be an object of tensor name -> file name strings"),
    ({"transformer.norm.weight": 1}, "'weight_map' must be an object of tensor name -> file name strings"),
    ({"transformer.norm.weight": None}, "'weight_map' must be an object of tensor name -> file name strings"),
])
def test_index_weight_map_of_the_wrong_type(tmp_path, llama_tokenizer, weight_map, message):
    folder = sharded(tmp_path, llama_tokenizer)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    generate_fails(folder, message)


def test_index_not_utf8(tmp_path, llama_tokenizer):
    folder = sharded(tmp_path, llama_tokenizer)
    (folder / "model.safetensors.index.json").write_bytes(b'{"weight_map": {"\xc3\x28": "a"}}')
    generate_fails(folder, "model.safetensors.index.json: not UTF-8 text")


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "sub/../../model.safetensors",
                                  "..\\..\\secret.safetensors"])
def test_shard_names_that_escape_the_folder_are_never_opened(tmp_path, llama_tokenizer, monkeypatch, name):
    folder = sharded(tmp_path, llama_tokenizer)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["transformer.norm.weight"] = name
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    opened, real_open = [], builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    line = generate_fails(folder, "which is outside")
    assert repr(name) in line
    assert not [f for f in opened if "passwd" in f or "secret" in f or f.endswith("/model.safetensors")]


def test_shard_that_is_a_fifo(tmp_path, llama_tokenizer):
    folder = sharded(tmp_path, llama_tokenizer)
    shard = folder / "model-00002-of-00002.safetensors"
    shard.unlink()
    os.mkfifo(shard)
    generate_fails(folder, "found a FIFO")


# ---------------------------------------------------------------- tokenizer and vocabulary


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path, llama_tokenizer):
    """TINY's 512-row embedding with the 32000-token Llama-2 tokenizer: ids past row 511 would be
    read out of bounds (MLX's gather does not check), so the load is refused."""
    folder = tmp_path / "small-vocab"
    make_hf_checkpoint(folder, TINY["tied"], seed=7)
    line = fails(["generate", "-M", folder, "hello world", "--tokenizer", llama_tokenizer],
                 "vocab_size is 512, but")
    assert "32000 tokens" in line and "--tokenizer" in line


def test_model_vocabulary_far_larger_than_the_tokenizer_is_refused(tmp_path, llama_tokenizer):
    folder = tmp_path / "big-vocab"
    make_hf_checkpoint(folder, {**TINY_32K, "vocab_size": 40000}, seed=8)
    fails(["generate", "-M", folder, "hi", "--tokenizer", llama_tokenizer], "vocab_size is 40000, but")


def test_corenet_padding_rows_load_and_never_break_the_detokenizer(tmp_path, llama_tokenizer):
    """CoreNet's 32128-row embedding is legitimate: rows >= 32000 are padding. If one is
    ever generated it is no text: no IndexError in the detokenizer or decode."""
    folder = tmp_path / "padded"
    make_hf_checkpoint(folder, {**TINY_32K, "vocab_size": 32128}, seed=9)
    model, tok = elm_mlx.load(folder, dtype="fp32", tokenizer=llama_tokenizer)
    assert model.config.vocab_size == 32128
    detok = tok.detokenizer()
    assert [detok.add_token(i) for i in (32000, 32127, 40000, -1)] == ["", "", "", ""]
    assert detok.add_token(15043) + detok.finalize() == "Hello"
    assert tok.decode([15043, 32100, 3186]) == tok.decode([15043, 3186])
    assert elm_mlx.generate(model, tok, "Hi", 4) is not None


def test_tokenizer_json_not_utf8(folder):
    (folder / "tokenizer.model").rename(folder.parent / "tokenizer.model")
    (folder / "tokenizer.json").write_bytes(b'{"model": {"vocab": {"\xff": 0}}}')
    fails(["generate", "-M", folder, "hi", "--tokenizer", folder.parent / "tokenizer.model"],
          "tokenizer.json: not UTF-8 text")


def test_lone_surrogate_in_text_is_one_error(model_dir):
    tok = Tokenizer(model_dir / "tokenizer.model")
    with pytest.raises(ElmError, match="lone surrogate"):
        tok.encode("caf\udce9")


# ---------------------------------------------------------------- chat templates


def test_chat_template_not_utf8(folder):
    (folder / "chat_template.jinja").write_bytes(b"{{ messages[0]['content'] }}\xe9")
    generate_fails(folder, "chat_template.jinja: not UTF-8 text")


@pytest.mark.parametrize("source", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "{{ 'x' * 10000000000 }}",
    "{% set s = ['x'] * 1000000000 %}{{ s|length }}",
])
def test_chat_template_rendering_is_bounded(folder, source):
    (folder / "chat_template.jinja").write_text(source)
    start = time.monotonic()
    generate_fails(folder, "chat template")
    assert time.monotonic() - start < RENDER_SECONDS + 10


def test_bounded_rendering_restores_the_tracer():
    import sys

    before = sys.gettrace()
    ChatTemplate("{{ messages[0]['content'] }}", "t").render([{"role": "user", "content": "a"}])
    assert sys.gettrace() is before


# ---------------------------------------------------------------- flags and standard input


def test_stdin_not_utf8(model_dir):
    fails(["generate", "-M", model_dir, "-", "-m", "2"], "standard input is not UTF-8 text (byte b'\\xff' at offset 3)",
          input=b"abc\xffdef")


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
@pytest.mark.parametrize("cmd", ["generate", "chat"])
def test_seed_out_of_range(model_dir, seed, cmd):
    args = [cmd, "-M", model_dir, "--seed", seed] + (["hi"] if cmd == "generate" else [])
    fails(args, f"--seed {seed}: expected an integer from 0 to {2**64 - 1}")


@pytest.mark.parametrize("name", ["./missing", "../missing/model", "~/missing-elm-model", "/no/such/model",
                                  "models/x/"])
def test_model_path_that_does_not_exist_is_not_a_hub_id(name, monkeypatch):
    import elm_mlx.hub

    monkeypatch.setattr(elm_mlx.hub, "download", lambda repo: pytest.fail(f"asked the hub for {repo}"))
    fails(["generate", "-M", name, "hi"], f"--model {name}: expected an existing file or folder")


# ---------------------------------------------------------------- disk full while MLX writes


@pytest.mark.parametrize("fault", ["no space", "no inodes"])
def test_disk_full_while_mlx_writes_weights(model_dir, tmp_path, monkeypatch, fault):
    """MLX reports a failed write as a bare RuntimeError: it must still read as a full disk,
    and leave neither the output nor a partial folder."""
    real_save, real_statvfs = mx.save_safetensors, os.statvfs
    (tmp_path / "full.safetensors").symlink_to("/dev/full")  # every write: ENOSPC

    def save(path, arrays, metadata=None):
        Path(path).write_bytes(b"\0" * 64)
        real_save(str(tmp_path / "full.safetensors"), arrays, metadata=metadata)

    def statvfs(path):
        st = real_statvfs(path)
        if fault == "no inodes":
            return os.statvfs_result((st.f_bsize, st.f_frsize, st.f_blocks, st.f_bfree, st.f_bavail, st.f_files,
                                      0, 0, st.f_flag, st.f_namemax))
        return os.statvfs_result((st.f_bsize, st.f_frsize, st.f_blocks, 0, 0) + tuple(st)[5:])

    monkeypatch.setattr(elm_mlx.convert.mx, "save_safetensors", save)
    monkeypatch.setattr(elm_mlx.convert.os, "statvfs", statvfs)
    monkeypatch.setattr(elm_mlx.convert, "check_space", lambda out, n: None)  # the fault comes mid-write
    out = tmp_path / "out"
    line = fails(["convert", model_dir, "-o", out], "the disk is full (or out of inodes)")
    assert str(out) in line
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "partial" in p.name]


# ---------------------------------------------------------------- bench --random-weights


@pytest.mark.parametrize("model_dim", [2**20, 2**24])
def test_random_weights_too_big_for_memory(tmp_path, model_dim):
    cfg = dict(TINY_32K, model_dim=model_dim, head_dim=64, num_query_heads=[4] * 3, num_kv_heads=[1] * 3)
    (tmp_path / "huge").mkdir()
    (tmp_path / "huge" / "config.json").write_text(json.dumps(cfg))
    start = time.monotonic()
    fails(["bench", "-M", tmp_path / "huge", "--random-weights"], "GB for its weights")
    assert time.monotonic() - start < 10


# ---------------------------------------------------------------- chat /save and /load


@pytest.fixture(scope="module")
def chat(model_dir):
    model = load_model(model_dir, dtype="fp32")
    return Chat(model, Tokenizer(model_dir / "tokenizer.model"), None, max_tokens=4)


def test_save_errors_are_one_line_and_the_chat_goes_on(chat, tmp_path, capsys, monkeypatch):
    from elm_mlx.chat import repl

    lines = iter([f"/save {tmp_path / 'no' / 'such' / 'dir.json'}", f"/save {tmp_path}",
                  f"/load {tmp_path / 'missing.json'}", "/stats", "/quit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    out = io.StringIO()
    repl(chat, "test", out=out)
    out, err = out.getvalue(), capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 3 and "Traceback" not in out + err, err
    assert "No such file or directory" in errors[0] and "is a folder" in errors[1] and "missing.json" in errors[2]
    assert "context:" in out  # /stats ran after the failures: the chat went on


def test_a_failed_save_keeps_the_previous_one_whole(chat, tmp_path, monkeypatch):
    path = tmp_path / "chat.json"
    chat.messages = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "reply"}]
    chat.save(path)
    before = path.read_bytes()
    chat.messages.append({"role": "user", "content": "x" * 10000})

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("elm_mlx.files.os.fsync", disk_full)
    with pytest.raises(ElmError, match="the disk is full"):
        command(chat, f"/save {path}", out=open(os.devnull, "w"))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.json"]  # no temporary file left
    chat.reset()


# ---------------------------------------------------------------- the network


def test_offline_without_a_tokenizer_fails_fast(tmp_path):
    folder = tmp_path / "no-tokenizer"
    make_hf_checkpoint(folder, TINY_32K, seed=5)
    start = time.monotonic()
    r = runner.invoke(app, ["generate", "-M", str(folder), "hi"])
    assert r.exit_code == 2 and "No tokenizer.model found" in r.stderr and "Retrying" not in r.stderr
    assert time.monotonic() - start < 10


def test_a_network_that_never_answers_does_not_hang(tmp_path, monkeypatch):
    from huggingface_hub import constants

    import elm_mlx.hub

    monkeypatch.setattr(elm_mlx.hub, "HUB_TIMEOUT", 1.0)
    with silent_server() as (url, _):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", url)
        start = time.monotonic()
        with pytest.raises(ElmError) as e:
            resolve_tokenizer(tmp_path)
        assert time.monotonic() - start < 10
    assert "No tokenizer.model found" in str(e.value) and "did not answer" in str(e.value)


# ---------------------------------------------------------------- --debug and bugs


def test_debug_shows_the_traceback(folder):
    (folder / "config.json").write_text("[]")
    argv = ["generate", "-M", str(folder), "hi"]
    quiet = runner.invoke(app, argv)
    assert quiet.exit_code == 2 and "Traceback" not in quiet.stderr
    loud = runner.invoke(app, ["--debug"] + argv)
    assert loud.exit_code == 2 and "Traceback" in loud.stderr and "read_config" in loud.stderr
    by_env = runner.invoke(app, argv, env={"ELM_MLX_DEBUG": "1"})
    assert by_env.exit_code == 2 and "Traceback" in by_env.stderr


def test_an_unexpected_error_is_one_line_that_says_bug(model_dir, monkeypatch):
    import elm_mlx.hub

    monkeypatch.delenv("ELM_MLX_DEBUG", raising=False)
    monkeypatch.setattr(elm_mlx.hub, "resolve", lambda *a, **k: {}["boom"])
    r = runner.invoke(app, ["generate", "-M", str(model_dir), "hi"])
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    assert "error: unexpected KeyError" in r.stderr and "--debug" in r.stderr


def test_nothing_was_written_by_the_failures(folder, tmp_path):
    """A convert that fails on its input leaves no output and no partial folder."""
    (folder / "model.safetensors").write_bytes(b"\0" * 7)
    out = tmp_path / "out"
    fails(["convert", folder, "-o", out], "bad header length")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_config_with_bad_types_via_python_api(tmp_path):
    make_hf_checkpoint(tmp_path / "m", with_llama_vocab(TINY["tied"]), seed=1)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["num_query_heads"] = {"a": 1}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ElmError, match="num_query_heads is {'a': 1}, expected a list of integers"):
        load_model(tmp_path / "m")


def test_read_header_of_a_fifo_returns_at_once(tmp_path):
    os.mkfifo(tmp_path / "x.safetensors")
    with pytest.raises(ElmError, match="FIFO"):
        read_header(tmp_path / "x.safetensors")


def test_flags_naming_fifos_do_not_hang(model_dir, tmp_path):
    os.mkfifo(tmp_path / "tokenizer.model")
    os.mkfifo(tmp_path / "template.jinja")
    fails(["generate", "-M", model_dir, "hi", "--tokenizer", tmp_path / "tokenizer.model"], "not a regular file")
    fails(["generate", "-M", model_dir, "hi", "--chat-template", tmp_path / "template.jinja"], "found a FIFO")


@pytest.mark.parametrize("ids,message", [([1, 40000], "prompt token 1 is 40000"), ([1, -3], "prompt token 1 is -3"),
                                         ([1, 2.5], "prompt token 1 is 2.5"), ([True], "prompt token 0 is True")])
def test_prompt_ids_past_the_embedding_are_refused(model_dir, ids, message):
    """Ids given directly (the Python API, the server's token prompts) are never gathered out of bounds."""
    model = load_model(model_dir, dtype="fp32")
    tok = Tokenizer(model_dir / "tokenizer.model")
    with pytest.raises(ElmError, match=message):
        elm_mlx.generate(model, tok, ids, 2)


def test_atomic_writes_get_the_permissions_a_plain_write_gets(tmp_path):
    """chat /save, bench --json, eval --output and prompt caches go through a temporary file:
    it must not leave the result readable by its owner only (mkstemp's 0600)."""
    from elm_mlx.files import atomic_write_text

    plain, atomic = tmp_path / "plain.txt", tmp_path / "atomic.txt"
    plain.write_text("x")
    atomic_write_text(atomic, "x")
    assert (atomic.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
