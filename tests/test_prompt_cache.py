"""Prompt cache files (`--prompt-cache FILE`): reuse across runs gives the same
output, a file from another model / dtype / tokenizer is refused, a damaged one
is a clear error, writes are atomic, a chat resumes from one."""

import io
import shutil

import pytest
from checkpoints import make_hf_checkpoint
from engine import TINY_32K
from typer.testing import CliRunner

from elm_mlx import load
from elm_mlx.chat import Chat, say
from elm_mlx.cli import app
from elm_mlx.sample import SamplingParams

PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown fox"


@pytest.fixture(scope="module")
def folder(tmp_path_factory, llama_tokenizer):
    path = tmp_path_factory.mktemp("tiny") / "tiny"
    make_hf_checkpoint(path, TINY_32K, seed=5)
    shutil.copyfile(llama_tokenizer, path / "tokenizer.model")
    return path


def run(folder, *args):
    return CliRunner().invoke(app, ["generate", "-M", str(folder), "--dtype", "fp32", "-m", "8", *args])


def test_a_second_run_reuses_the_prompt_and_says_the_same(folder, tmp_path, llama_tokenizer):
    from elm_mlx.context import common_prefix
    from elm_mlx.tokenizer import Tokenizer

    tok = Tokenizer(llama_tokenizer)
    n, longer_ids = len(tok.encode(PROMPT)), tok.encode(PROMPT + " and the cat")
    shared = common_prefix(tok.encode(PROMPT), longer_ids)
    cache = tmp_path / "p.safetensors"
    plain = run(folder, PROMPT)
    first = run(folder, PROMPT, "--prompt-cache", str(cache))
    assert first.exit_code == 0, first.stderr
    assert cache.exists() and [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]  # no temp file left
    assert f"0 of {n} prompt tokens reused, {n + 8} tokens saved" in first.stderr
    second = run(folder, PROMPT, "--prompt-cache", str(cache))
    assert f"{n - 1} of {n} prompt tokens reused" in second.stderr  # the last one is read for its logits
    longer = run(folder, PROMPT + " and the cat", "--prompt-cache", str(cache), "--prompt-lookup", "3")
    assert f"{shared} of {len(longer_ids)} prompt tokens reused" in longer.stderr
    assert plain.stdout == first.stdout == second.stdout
    assert longer.stdout == run(folder, PROMPT + " and the cat").stdout


def test_a_cache_from_another_model_or_dtype_is_refused(folder, tmp_path, llama_tokenizer):
    cache = tmp_path / "p.safetensors"
    assert run(folder, PROMPT, "--prompt-cache", str(cache)).exit_code == 0
    other = tmp_path / "other"
    make_hf_checkpoint(other, TINY_32K, seed=6)
    shutil.copyfile(llama_tokenizer, other / "tokenizer.model")
    r = run(other, PROMPT, "--prompt-cache", str(cache))
    assert r.exit_code == 2 and f"--prompt-cache {cache} was made with another model" in r.stderr
    r = CliRunner().invoke(app, ["generate", "-M", str(folder), "--dtype", "fp16", "-m", "2", PROMPT,
                                 "--prompt-cache", str(cache)])
    assert r.exit_code == 2 and "was made with another dtype (fp32, this run has fp16)" in r.stderr


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not ours"])
def test_a_damaged_file_is_a_clear_error(folder, tmp_path, damage):
    cache = tmp_path / "p.safetensors"
    assert run(folder, PROMPT, "--prompt-cache", str(cache)).exit_code == 0
    data = cache.read_bytes()
    if damage == "garbage":
        cache.write_bytes(b"\x00\x01not a safetensors file at all")
    elif damage == "truncated":
        cache.write_bytes(data[: len(data) // 2])
    else:
        import mlx.core as mx

        mx.save_safetensors(str(cache), {"x": mx.zeros(3)})
    r = run(folder, PROMPT, "--prompt-cache", str(cache))
    assert r.exit_code == 2, r.stderr
    assert r.stderr.startswith(f"error: --prompt-cache {cache}") and "Traceback" not in r.stderr


def test_a_cache_in_a_missing_folder_is_refused_and_no_folder_is_made(folder, tmp_path):
    cache = tmp_path / "no" / "such" / "x.safetensors"
    r = run(folder, PROMPT, "--prompt-cache", str(cache))
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: --prompt-cache {cache}: the folder {cache.parent} does not exist")
    assert not (tmp_path / "no").exists()
    r = run(folder, PROMPT, "--prompt-cache", str(tmp_path))
    assert r.exit_code == 2 and r.stderr.startswith(f"error: --prompt-cache {tmp_path} is a folder"), r.stderr


def test_a_restarted_chat_resumes_from_its_file(folder, tmp_path):
    cache = tmp_path / "chat.safetensors"
    model, tok = load(folder, dtype="fp32")
    greedy = SamplingParams(repetition_penalty=1.2)

    def new_chat():
        return Chat(model, tok, None, None, 6, greedy)

    chat = new_chat()
    assert "will be kept" in chat.keep_in(cache, str(folder), "fp32")
    say(chat, "Hello there", io.StringIO())
    held = len(chat.context.ids)
    resumed = new_chat()
    line = resumed.keep_in(cache, str(folder), "fp32")
    assert f"resumed 2 messages from {cache}, {held} tokens already read" in line
    assert resumed.messages == chat.messages
    out = io.StringIO()
    say(resumed, "And then?", out)
    assert resumed.context.reused >= held - 1
    fresh = new_chat()
    fresh.messages = [dict(m) for m in chat.messages]
    expect = io.StringIO()
    say(fresh, "And then?", expect)
    assert out.getvalue() == expect.getvalue()


def test_a_cache_from_another_tokenizer_is_refused(folder, tmp_path):
    from elm_mlx import ElmError
    from elm_mlx import prompt_cache
    from elm_mlx.context import CachedContext

    model, tok = load(folder, dtype="fp32")
    context = CachedContext(model)
    list(context.stream(tok, tok.encode(PROMPT), 3))
    ident = prompt_cache.identity(folder, model, tok)
    prompt_cache.save(tmp_path / "p.safetensors", context, ident)
    fresh = CachedContext(model)
    prompt_cache.load(tmp_path / "p.safetensors", fresh, ident)
    assert fresh.ids == context.ids and fresh.cache[0].offset == len(context.ids)
    with pytest.raises(ElmError, match="was made with another tokenizer"):
        prompt_cache.load(tmp_path / "p.safetensors", CachedContext(model), {**ident, "tokenizer": "0" * 16})
