import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
import sentencepiece as spm
from hub_cache import make_hub_repo, use_hub_cache

from elm_mlx.errors import ElmError
from elm_mlx.tokenizer import (
    TOKENIZER_REPO,
    TOKENIZER_SHA256,
    Tokenizer,
    load_tokenizer,
    resolve_tokenizer,
)

TEXTS = [
    "Once upon a time there was",
    "日本語のテキストと中文",
    "👩‍👩‍👧 and 🇫🇷, 𝄞 ☃️ 🤖",
    "  leading, double  spaces,\ttabs\n\nnewlines \n and trailing  ",
    " one leading space",
    "\tstarts with a tab",
    "Ünïcödé façade — naïve “quotes” ½ ∑ ≠ Ωmega",
]



@pytest.fixture(scope="module")
def sp(tok, llama_tokenizer):
    return spm.SentencePieceProcessor(model_file=str(llama_tokenizer))


def stream(tok, ids, continuation=False):
    detok = tok.detokenizer(continuation=continuation)
    chunks = [detok.add_token(i) for i in ids] + [detok.finalize()]
    assert detok.text == "".join(chunks)
    return chunks


def test_known_encoding_and_special_ids(tok, llama_tokenizer):
    assert tok.encode("Once upon a time there was") == [1, 9038, 2501, 263, 931, 727, 471]
    assert tok.encode("Once upon a time there was", add_bos=False) == [9038, 2501, 263, 931, 727, 471]
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 32000)
    assert tok.path == llama_tokenizer
    assert tok.decode([1, 9038, 2501, 263, 931, 727, 471, 2]) == "Once upon a time there was"
    assert tok.encode("") == [1]


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_matches_sentencepiece_decode(tok, sp, text):
    ids = tok.encode(text) + [tok.eos_id]
    chunks = stream(tok, ids)
    assert "".join(chunks) == sp.decode(ids) == text
    final = "".join(chunks)
    for k in range(len(chunks)):  # every prefix is already final text, nothing is revised
        assert final.startswith("".join(chunks[: k + 1]))
    assert not any("\ufffd" in c for c in chunks)


def test_byte_fallback_emits_nothing_until_the_character_completes(tok, sp):
    text = "a👩‍👧𝄞b"
    ids = tok.encode(text, add_bos=False)
    detok = tok.detokenizer()
    pending = b""
    for i in ids:
        if sp.is_byte(i):
            pending += bytes([int(sp.id_to_piece(i)[3:5], 16)])
            try:
                expected = pending.decode("utf-8")
                pending = b""
            except UnicodeDecodeError:
                expected = ""
            assert detok.add_token(i) == expected
        else:
            assert not pending
            detok.add_token(i)
    assert sum(sp.is_byte(i) for i in ids) >= 8  # the test really fed byte pieces
    assert detok.finalize() == ""
    assert detok.text == text


def test_emoji_byte_by_byte_exact_chunks(tok, sp):
    ids = tok.encode("👩")
    assert [sp.id_to_piece(i) for i in ids[2:]] == ["<0xF0>", "<0x9F>", "<0x91>", "<0xA9>"]
    assert stream(tok, ids) == ["", "", "", "", "", "👩", ""]


@pytest.mark.parametrize("pieces", [
    ["<unk>", "▁Once"],          # SentencePiece keeps the space of " ⁇ "
    ["<0x41>", "▁Once"],         # a byte piece first ends the sequence start
    ["<0x20>", "▁Once"],         # a literal space byte is never stripped
    ["▁", "▁", "▁Once"],         # only one dummy-prefix space is dropped
    ["<s>", "</s>", "▁Once"],    # control tokens don't end the sequence start
    ["▁Once", "<unk>", "▁Once"],
    ["<0xE6>", "<0x97>", "▁Once"],   # invalid UTF-8: one U+FFFD per byte, like SentencePiece
    ["▁a", "<0xF0>", "<0x9F>", "<0x98>"],  # truncated at the end: finalize flushes it
    ["<0xFF>", "<0xC0>", "<0x80>", "<0xED>", "<0xA0>", "<0x80>"],
])
def test_edge_sequences_match_sentencepiece(tok, sp, pieces):
    ids = [sp.piece_to_id(p) for p in pieces]
    assert "".join(stream(tok, ids)) == sp.decode(ids)


def test_continuation_keeps_leading_space(tok, sp):
    prompt = tok.encode("Once upon a time")
    full = tok.encode("Once upon a time there was")
    assert full[: len(prompt)] == prompt
    generated = full[len(prompt):]
    assert "".join(stream(tok, generated, continuation=True)) == " there was"
    assert "".join(stream(tok, generated, continuation=False)) == sp.decode(generated) == "there was"
    assert "".join(stream(tok, prompt)) + "".join(stream(tok, generated, continuation=True)) == sp.decode(full)


def test_add_token_is_cheap(tok):
    ids = tok.encode("Some ordinary English text, with 日本語 and 👩 in it. " * 1000, add_bos=False)
    assert len(ids) > 15_000
    detok = tok.detokenizer()
    start = time.perf_counter()
    for i in ids:
        detok.add_token(i)
    elapsed = time.perf_counter() - start
    # Re-decoding the sequence on each token would take minutes here; the real cost is ~20 ms.
    assert elapsed < 2.0, f"{len(ids)} add_token calls took {elapsed:.2f}s"
    assert detok.text + detok.finalize() == tok.decode(ids)


# --- where the tokenizer comes from ---------------------------------------------------------


@pytest.fixture
def offline_empty_hub(tmp_path, monkeypatch):
    use_hub_cache(monkeypatch, tmp_path / "hub")
    return tmp_path / "hub"


def model_dir_with(tmp_path, data: bytes | None) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    if data is not None:
        (d / "tokenizer.model").write_bytes(data)
    return d


def test_hub_cache_helper_matches_huggingface_hub(tmp_path, monkeypatch):
    from huggingface_hub import hf_hub_download, snapshot_download

    files = {"config.json": b"{}", "sub/dir/weights.bin": b"\0" * 10}
    snap = make_hub_repo(tmp_path / "hub", "someorg/some-model", files)
    use_hub_cache(monkeypatch, tmp_path / "hub")
    assert Path(snapshot_download("someorg/some-model")) == snap
    for name, data in files.items():
        path = Path(hf_hub_download("someorg/some-model", name))
        assert path == snap / name and path.read_bytes() == data
    tagged = make_hub_repo(tmp_path / "hub", "someorg/other", {"a.txt": b"v2"}, revision="v2")
    assert Path(hf_hub_download("someorg/other", "a.txt", revision="v2")) == tagged / "a.txt"


def test_model_folder_beats_explicit_and_warns(tok, tmp_path, offline_empty_hub, capsys, llama_tokenizer):
    model = model_dir_with(tmp_path, llama_tokenizer.read_bytes())
    other = tmp_path / "elsewhere.model"
    shutil.copyfile(llama_tokenizer, other)
    assert resolve_tokenizer(model, other) == model / "tokenizer.model"
    err = capsys.readouterr().err
    assert "warning" in err and str(model / "tokenizer.model") in err and str(other) in err
    assert len(err.strip().splitlines()) == 1
    assert resolve_tokenizer(model, model / "tokenizer.model") == model / "tokenizer.model"
    assert capsys.readouterr().err == ""  # same file: nothing to warn about


def test_explicit_used_when_model_folder_has_none(tok, tmp_path, offline_empty_hub, capsys, llama_tokenizer):
    model = model_dir_with(tmp_path, None)
    assert resolve_tokenizer(model, str(llama_tokenizer)) == llama_tokenizer
    assert resolve_tokenizer(None, llama_tokenizer) == llama_tokenizer
    assert capsys.readouterr().err == ""
    assert load_tokenizer(model, llama_tokenizer).encode("Once", add_bos=False) == [9038]


def test_hub_copy_used_offline(tok, tmp_path, monkeypatch, llama_tokenizer):
    snap = make_hub_repo(tmp_path / "hub", TOKENIZER_REPO, {"tokenizer.model": llama_tokenizer})
    use_hub_cache(monkeypatch, tmp_path / "hub")
    model = model_dir_with(tmp_path, None)
    assert resolve_tokenizer(model) == snap / "tokenizer.model"
    assert resolve_tokenizer(None) == snap / "tokenizer.model"
    assert load_tokenizer(model).encode("Once upon a time there was")[1:] == [9038, 2501, 263, 931, 727, 471]


def test_hub_copy_with_wrong_bytes_is_rejected(tmp_path, monkeypatch):
    bad = b"definitely not the llama tokenizer"
    snap = make_hub_repo(tmp_path / "hub", TOKENIZER_REPO, {"tokenizer.model": bad})
    use_hub_cache(monkeypatch, tmp_path / "hub")
    with pytest.raises(ElmError) as e:
        resolve_tokenizer(model_dir_with(tmp_path, None))
    msg = str(e.value)
    assert TOKENIZER_SHA256 in msg and hashlib.sha256(bad).hexdigest() in msg
    assert str(snap / "tokenizer.model") in msg and "--tokenizer" in msg


def test_nothing_anywhere_says_what_to_do(tmp_path, offline_empty_hub):
    model = model_dir_with(tmp_path, None)
    with pytest.raises(ElmError) as e:
        resolve_tokenizer(model)
    msg = str(e.value)
    assert str(model / "tokenizer.model") in msg and "model folder" in msg
    assert "--tokenizer PATH" in msg and TOKENIZER_REPO in msg and "HF_HUB_OFFLINE" in msg
    with pytest.raises(ElmError, match="model folder.*--tokenizer PATH"):
        resolve_tokenizer(None)


def test_missing_explicit_path_is_named(tmp_path, offline_empty_hub):
    missing = tmp_path / "nope" / "tokenizer.model"
    for model in (None, model_dir_with(tmp_path, None)):
        with pytest.raises(ElmError) as e:
            resolve_tokenizer(model, missing)
        assert f"--tokenizer {missing}" in str(e.value) and "no such file" in str(e.value)


def test_garbage_tokenizer_file_is_named(tmp_path, offline_empty_hub):
    model = model_dir_with(tmp_path, b"\x00garbage, not a protobuf" * 40)
    with pytest.raises(ElmError) as e:
        load_tokenizer(model)
    assert str(model / "tokenizer.model") in str(e.value)
    assert "not a valid SentencePiece" in str(e.value)
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    with pytest.raises(ElmError, match="empty.model"):
        Tokenizer(empty)


# --- Llama-2's model rebuilt from a tokenizer.json (mlx_lm.convert's folders) ----------------

CORPUS = TEXTS + [
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\n\tif x:\n\t\tpass\n",
    "".join(" " * n + "word" + "\n" * (n % 3) + "\t" * (n % 2) for n in range(1, 34)),
    "   three leading, trailing three   ", "\n\nnewlines first", " ", "  ", "", "\u2581 literal lower-one-eighth block",
    "Iñtërnâtiônàlizætiøn: Привет, мир! Γειά σου κόσμε. مرحبا بالعالم. שלום עולם. नमस्ते दुनिया. 안녕하세요 세계",
    "数学是研究数量、结构、变化以及空间等概念的一门学科。東京は日本の首都です。",
    "emoji 🧑🏽‍💻🏳️‍🌈 👍🏿 \U0001fae0 control \x00\x01\x7f and rare 𓀀 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ﷺ",
    "URLs https://example.com/path?q=1&r=2#frag and e-mail a.b@c.de, numbers 3.14159 1,000,000 0x1F 1e-9",
    "<s> </s> <unk> <0x41> typed as text",
]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory, llama_tokenizer) -> Path:
    """tokenizer.json as `convert --to mlx-lm` (transformers) writes it, beside no tokenizer.model."""
    from elm_mlx.convert.mlx_lm import write_tokenizer_files

    folder = tmp_path_factory.mktemp("json-only")
    shutil.copyfile(llama_tokenizer, folder / "tokenizer.model")
    write_tokenizer_files(folder)
    (folder / "tokenizer.model").unlink()
    return folder / "tokenizer.json"


def readme_text() -> str:
    return (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_model_built_from_tokenizer_json_is_llama2s(tokenizer_json, llama_tokenizer, sp):
    built = spm.SentencePieceProcessor(model_proto=Tokenizer(tokenizer_json).model_bytes())
    assert built.vocab_size() == sp.vocab_size() == 32000
    for i in range(sp.vocab_size()):  # every piece, score and type
        assert (built.id_to_piece(i), built.get_score(i), built.is_control(i), built.is_byte(i),
                built.is_unknown(i), built.is_unused(i)) == \
               (sp.id_to_piece(i), sp.get_score(i), sp.is_control(i), sp.is_byte(i), sp.is_unknown(i), sp.is_unused(i))
    assert (built.bos_id(), built.eos_id(), built.unk_id(), built.pad_id()) == (1, 2, 0, -1)
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb  # needs protobuf
    except ImportError:
        return
    ours, real = pb.ModelProto(), pb.ModelProto()
    ours.ParseFromString(Tokenizer(tokenizer_json).model_bytes())
    real.ParseFromString(llama_tokenizer.read_bytes())
    assert ours.pieces == real.pieces and ours.normalizer_spec == real.normalizer_spec


def test_tokenizer_built_from_json_encodes_and_decodes_as_the_real_one(tokenizer_json, tok, sp):
    built = Tokenizer(tokenizer_json)
    texts = CORPUS + readme_text().split("\n\n")
    assert sum(len(t) for t in texts) > 20_000  # enough text for most merges to be exercised
    for text in texts:
        ids = tok.encode(text)
        assert built.encode(text) == ids == [1] + sp.encode(text), text
        assert built.encode(text, add_bos=False) == ids[1:]
        assert built.decode(ids) == tok.decode(ids) == sp.decode(ids)
        assert "".join(stream(built, ids)) == "".join(stream(tok, ids))
        assert "".join(stream(built, ids[1:], continuation=True)) == "".join(stream(tok, ids[1:], continuation=True))
    assert built.pieces() == tok.pieces()
    assert [built.token_bytes(i) for i in range(built.vocab_size)] == [tok.token_bytes(i) for i in range(tok.vocab_size)]
    assert (built.bos_id, built.eos_id, built.vocab_size) == (tok.bos_id, tok.eos_id, tok.vocab_size)


def test_tokenizer_json_used_offline_when_the_folder_has_no_tokenizer_model(tokenizer_json, tmp_path,
                                                                           offline_empty_hub, tok, llama_tokenizer):
    folder = tmp_path / "json-only"
    folder.mkdir()
    shutil.copyfile(tokenizer_json, folder / "tokenizer.json")
    assert resolve_tokenizer(folder) == folder / "tokenizer.json"
    assert load_tokenizer(folder).encode("Once upon a time there was") == tok.encode("Once upon a time there was")
    # It comes after --tokenizer and the folder's tokenizer.model.
    assert resolve_tokenizer(folder, llama_tokenizer) == llama_tokenizer
    shutil.copyfile(llama_tokenizer, folder / "tokenizer.model")
    assert resolve_tokenizer(folder) == folder / "tokenizer.model"


def _edit(data, change):
    change(data)
    return data


def _swap(data):
    vocab = data["model"]["vocab"]
    vocab["▁hello"], vocab["▁world"] = vocab["▁world"], vocab["▁hello"]


BAD_JSON = {
    "not JSON": lambda good: b"{\"model\": ",
    "nested deep": lambda good: b"[" * 100_000 + b"]" * 100_000,
    "huge number": lambda good: b"{\"model\": " + b"9" * 100_000 + b"}",
    "not UTF-8": lambda good: b"{\"model\": \"\xff\"}",
    "a list": lambda good: b"[]",
    "Unigram": lambda good: json.dumps({"model": {"type": "Unigram", "vocab": [["<unk>", 0.0]]}}).encode(),
    "no merges": lambda good: json.dumps(_edit(json.loads(good), lambda d: d["model"].pop("merges"))).encode(),
    "no byte fallback": lambda good: json.dumps(
        _edit(json.loads(good), lambda d: d["model"].update(byte_fallback=False))).encode(),
    "vocab ids": lambda good: json.dumps(
        _edit(json.loads(good), lambda d: d["model"]["vocab"].update({"▁hello": 7}))).encode(),
    "too few pieces": lambda good: json.dumps(
        _edit(json.loads(good), lambda d: d["model"]["vocab"].pop("给"))).encode(),
    "another vocabulary": lambda good: json.dumps(_edit(json.loads(good), _swap)).encode(),
}


@pytest.mark.parametrize("case", BAD_JSON)
def test_tokenizer_json_that_is_not_llama2s_is_refused(case, tokenizer_json, tmp_path, offline_empty_hub):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes(BAD_JSON[case](tokenizer_json.read_bytes()))
    with pytest.raises(ElmError) as e:
        load_tokenizer(folder)
    msg = str(e.value)
    assert str(folder / "tokenizer.json") in msg and "--tokenizer" in msg, msg
    assert case == "not UTF-8" or "Llama-2's tokenizer.json" in msg
    assert len(msg.splitlines()) == 1
