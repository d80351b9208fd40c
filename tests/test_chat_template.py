"""Chat templates: Apple's -Instruct template rendered and tokenized as in its DPO
training, detection of -Instruct models (name, folder, converted output), overrides."""

import shutil

import pytest
from elm_mlx.convert import convert
from hub_cache import make_hub_repo, use_hub_cache
from typer.testing import CliRunner

from elm_mlx import ElmError, generate, load
from elm_mlx.chat_template import (
    OPENELM_TEMPLATE,
    TEMPLATE_FILE,
    ChatTemplate,
    chat_ids,
    choose_template,
    encode_chat,
    find_template,
    self_contained,
    says_instruct,
)
from elm_mlx.cli import app
from elm_mlx.tokenizer import TOKENIZER_REPO

APPLE = ChatTemplate(OPENELM_TEMPLATE, "OpenELM-Instruct")
USER = [{"role": "user", "content": "Hello there"}]



def test_apple_template_renders_zephyr_turns_with_an_empty_system_turn():
    # alignment-handbook inserted an empty system message before rendering every DPO prompt.
    assert APPLE.render(USER) == "<|system|>\n</s>\n<|user|>\nHello there</s>\n<|assistant|>\n"
    conversation = [{"role": "system", "content": "Be brief."}, *USER, {"role": "assistant", "content": "Hi!"},
                    {"role": "user", "content": "Bye"}]
    assert APPLE.render(conversation) == ("<|system|>\nBe brief.</s>\n<|user|>\nHello there</s>\n"
                                          "<|assistant|>\nHi!</s>\n<|user|>\nBye</s>\n<|assistant|>\n")
    assert APPLE.render(conversation[:3], add_generation_prompt=False).endswith("<|assistant|>\nHi!</s>\n")


def test_prompt_ids_are_what_dpo_training_saw(tok):
    """The handbook tokenized the rendered string with the Llama-2 fast tokenizer: every "</s>"
    became EOS (id 2) and the text after it got its own leading "▁" (29871 before "\\n" = 13).
    These ids come from Hugging Face `tokenizers` with Llama-2's tokenizer.json setup (added
    special tokens, Prepend("▁") normalizer) on this string; TRL's DPO trainer added BOS."""
    expected = [1,
                529, 29989, 5205, 29989, 29958, 13,  # "▁<" "|" "system" "|" ">" "\n"
                2, 29871, 13,  # </s> "▁" "\n"
                29966, 29989, 1792, 29989, 29958, 13,  # "<" "|" "user" "|" ">" "\n"
                10994, 727,  # "Hello" "▁there"
                2, 29871, 13,
                29966, 29989, 465, 22137, 29989, 29958, 13]  # "<" "|" "ass" "istant" "|" ">" "\n"
    assert chat_ids(tok, APPLE, USER) == expected
    # SentencePiece alone reads "</s>" as text: three pieces, no EOS. That is not what the model saw.
    assert tok.encode("</s>", add_bos=False) == [1533, 29879, 29958]


def test_special_token_text_anywhere_becomes_its_id(tok):
    assert encode_chat(tok, "a</s>b") == [1] + tok.encode("a", add_bos=False) + [2] + tok.encode("b", add_bos=False)
    assert encode_chat(tok, "<s>x") == [1] + tok.encode("x", add_bos=False)  # no second BOS
    assert encode_chat(tok, "") == [1]


def test_without_a_template_messages_are_read_as_typed(tok):
    messages = [{"role": "system", "content": "Once upon"}, {"role": "user", "content": " a time"}]
    assert chat_ids(tok, None, messages) == tok.encode("Once upon a time")


@pytest.mark.parametrize("name,instruct", [
    ("270M-Instruct", True), ("1_1B-instruct", True), ("apple/OpenELM-3B-Instruct", True),
    ("mlx-community/OpenELM-450M-Instruct", True), ("/models/OpenELM-270M-Instruct", True),
    ("/hf/models--apple--OpenELM-3B-Instruct/snapshots/0123abcd", True),
    ("270M", False), ("apple/OpenELM-3B", False), ("/models/OpenELM-270M", False),
    ("/hf/models--apple--OpenELM-3B/snapshots/0123abcd", False),
])
def test_instruct_models_are_known_by_name(name, instruct):
    assert says_instruct(name) is instruct


def test_folder_template_file_beats_names(tmp_path):
    folder = tmp_path / "plain-name"
    folder.mkdir()
    assert find_template(folder) is None
    assert find_template(folder, "270M-Instruct").source == OPENELM_TEMPLATE  # the name the user gave
    (folder / TEMPLATE_FILE).write_text("{% for m in messages %}{{ m['content'] }}|{% endfor %}")
    template = find_template(folder)
    assert template.origin == str(folder / TEMPLATE_FILE)
    assert template.render(USER) == "Hello there|"


def test_flags_override_and_contradict(tmp_path):
    folder = tmp_path / "OpenELM-270M-Instruct"
    folder.mkdir()
    chatml = tmp_path / "chatml.jinja"
    chatml.write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert choose_template(folder, str(folder), None, False).source == OPENELM_TEMPLATE
    assert choose_template(folder, str(folder), None, True) is None
    custom = choose_template(folder, str(folder), chatml, False)
    # Other templates get the messages as they are: no system turn is made up.
    assert custom.render(USER) == "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ElmError, match="--chat-template and --no-chat-template"):
        choose_template(folder, str(folder), chatml, True)
    with pytest.raises(ElmError, match="--chat-template .*missing.jinja: cannot read it"):
        choose_template(folder, str(folder), tmp_path / "missing.jinja", False)


def test_bad_templates_are_user_errors(tmp_path):
    with pytest.raises(ElmError, match="t.jinja: not a valid Jinja chat template"):
        ChatTemplate("{% for m in messages %}", "t.jinja")
    strict = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}", "s")
    with pytest.raises(ElmError, match="user first"):
        strict.render([{"role": "assistant", "content": "x"}])
    # Templates are data: the sandbox keeps them away from Python internals.
    with pytest.raises(ElmError, match="chat template evil"):
        ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}", "evil").render(USER)


@pytest.fixture(scope="module")
def instruct_source(instruct_folder):
    return instruct_folder


def test_converting_an_instruct_model_keeps_its_template(instruct_source, tmp_path, tok):
    """The folder keeps Apple's template, written self-contained (BOS and the empty system
    turn in its text, for tools that render it as it is), and it gives the same ids."""
    out = convert(instruct_source, tmp_path / "converted", dtype="fp32", progress=False)
    assert (out / TEMPLATE_FILE).read_text() == self_contained(APPLE)
    kept = find_template(out)  # though "converted" says nothing
    for messages in (USER, [{"role": "system", "content": "Be brief."}] + USER):
        assert chat_ids(tok, kept, messages) == chat_ids(tok, APPLE, messages)
    base = instruct_source.parent / "base"
    shutil.copytree(instruct_source, base)
    assert not (convert(base, tmp_path / "base-out", progress=False) / TEMPLATE_FILE).exists()


def test_instruct_preset_from_the_hub_keeps_its_template(instruct_source, tmp_path, monkeypatch, llama_tokenizer):
    cache = tmp_path / "hf"
    make_hub_repo(cache, "apple/OpenELM-270M-Instruct",
                  {p.name: p for p in instruct_source.iterdir() if p.name != "tokenizer.model"})
    make_hub_repo(cache, TOKENIZER_REPO, {"tokenizer.model": llama_tokenizer})
    use_hub_cache(monkeypatch, cache)
    monkeypatch.setenv("ELM_MLX_CACHE", str(tmp_path / "elm"))
    load("270M-Instruct")
    [converted] = [p.parent for p in (tmp_path / "elm").rglob("model.safetensors")]
    assert (converted / TEMPLATE_FILE).read_text() == self_contained(APPLE)


def test_generate_applies_the_template_to_instruct_models(instruct_source, tok):
    runner = CliRunner()
    args = ["generate", "-M", str(instruct_source), "Hello there", "-m", "6", "--dtype", "fp32"]
    templated, raw = runner.invoke(app, args), runner.invoke(app, args + ["--no-chat-template"])
    assert templated.exit_code == 0 and raw.exit_code == 0, templated.stderr + raw.stderr
    model, _ = load(instruct_source, dtype="fp32")
    ids = chat_ids(tok, APPLE, USER)
    assert templated.stdout == generate(model, tok, ids, 6) + "\n"
    assert f"prompt: {len(ids)} tokens" in templated.stderr and "chat template OpenELM-Instruct" in templated.stderr
    assert raw.stdout == generate(model, tok, "Hello there", 6) + "\n"
    assert "prompt: 3 tokens" in raw.stderr


def test_api_tokenizer_applies_the_chat_template_like_transformers(instruct_source, tmp_path):
    """mlx-lm's API shape: load() gives -Instruct models' tokenizers their template, and
    apply_chat_template gives exactly the ids `elm-mlx generate` and `chat` build."""
    _, itok = load(instruct_source, dtype="fp32")
    assert (itok.bos_token_id, itok.eos_token_id) == (1, 2)
    for messages in (USER, [{"role": "system", "content": "Be brief."}] + USER):
        assert itok.apply_chat_template(messages, add_generation_prompt=True) == chat_ids(itok, APPLE, messages)
        assert itok.apply_chat_template(messages, tokenize=False) == APPLE.render(messages)
    assert not itok.apply_chat_template(USER, add_generation_prompt=False, tokenize=False).endswith("<|assistant|>\n")
    base = tmp_path / "base"
    shutil.copytree(instruct_source, base)
    _, btok = load(base, dtype="fp32")
    assert btok.chat_template is None and btok.apply_chat_template(USER) == btok.encode("Hello there")
