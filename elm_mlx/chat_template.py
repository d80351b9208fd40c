"""Chat templates: messages -> the token ids an -Instruct model was tuned on.

Apple tuned OpenELM-*-Instruct with the alignment-handbook (DPO on UltraFeedback)
using a zephyr-style template whose tags are plain text:

    <|system|>\\n{system}</s>\\n<|user|>\\n{user}</s>\\n<|assistant|>\\n{reply}</s>\\n

The handbook rendered it as a string and tokenized that with Meta's Llama-2 *fast*
tokenizer, which cuts the text at the special-token strings "<s>"/"</s>" (so each
"</s>" became the EOS id 2, not the pieces "▁</" "s" ">" SentencePiece gives it) and
normalizes every piece between them on its own (so each gets SentencePiece's leading
"▁": "</s>\\n<|user|>" is [2, 29871, 13, ...]). TRL's DPO trainer then put BOS in
front. `encode_chat` reproduces exactly those ids, and the handbook also gave every
prompt a system turn (empty when the data had none), so we do too for Apple's template.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import ElmError

TEMPLATE_FILE = "chat_template.jinja"  # transformers' file name, so other tools find it too
BOS_TEXT, EOS_TEXT = "<s>", "</s>"  # the Llama-2 tokenizer's special-token strings

# Verbatim from apple/corenet projects/openelm/instruction_tuning/openelm-instruct.yaml.
OPENELM_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)


class ChatTemplate:
    def __init__(self, source: str, origin: str):
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        # What transformers' apply_chat_template uses; the sandbox keeps a template
        # from reaching Python objects (a template file is data, not code).
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = _raise
        try:
            self._template = env.from_string(source)
        except TemplateError as e:
            raise ElmError(f"{origin}: not a valid Jinja chat template: {e}") from None
        self.source = source
        self.origin = origin
        # Apple's DPO data always began with a system turn (the handbook inserts an empty
        # one); other templates get the messages as they are.
        self.empty_system = source == OPENELM_TEMPLATE

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.empty_system and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": ""}] + list(messages)
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=BOS_TEXT, eos_token=EOS_TEXT)
        except Exception as e:  # a template's own raise_exception, or a TemplateError
            raise ElmError(f"chat template {self.origin}: {e}") from None


def self_contained(template: ChatTemplate) -> str:
    """The template's source with what elm-mlx adds when it renders written into it,
    for tools that render templates as they are (transformers, mlx-lm): BOS first,
    and for Apple's template the empty system turn every DPO prompt had."""
    source = template.source
    if template.empty_system:
        source = "{% if messages[0]['role'] != 'system' %}{{ '<|system|>\\n' + eos_token }}\n{% endif %}" + source
    if not template.render([{"role": "user", "content": "x"}]).startswith(BOS_TEXT):
        source = "{{ bos_token }}" + source
    return source


def _raise(message):
    raise ElmError(message)


def encode_chat(tokenizer, text: str) -> list[int]:
    """Rendered template text -> ids as the Llama-2 fast tokenizer gives them (see the module doc),
    with BOS first."""
    special = {BOS_TEXT: tokenizer.bos_id, EOS_TEXT: tokenizer.eos_id}
    ids = []
    for piece in re.split(f"({re.escape(BOS_TEXT)}|{re.escape(EOS_TEXT)})", text):
        if piece in special:
            ids.append(special[piece])
        elif piece:
            ids += tokenizer.encode(piece, add_bos=False)
    return ids if ids[:1] == [tokenizer.bos_id] else [tokenizer.bos_id] + ids


def chat_text(template: ChatTemplate | None, messages: list[dict], add_generation_prompt: bool = True) -> str:
    if template is None:
        return "".join(m["content"] for m in messages)
    return template.render(messages, add_generation_prompt)


def chat_ids(tokenizer, template: ChatTemplate | None, messages: list[dict],
             add_generation_prompt: bool = True) -> list[int]:
    """The prompt for `messages`, ending where the assistant's reply begins. Without a
    template (base models, --no-chat-template) the contents are read as typed, one after another."""
    text = chat_text(template, messages, add_generation_prompt)
    return tokenizer.encode(text) if template is None else encode_chat(tokenizer, text)


def says_instruct(name: str) -> bool:
    """A preset, hub id or folder name of an -Instruct model. Hugging Face cache snapshots
    (.../models--apple--OpenELM-3B-Instruct/snapshots/<commit>) are named by their repo."""
    path = Path(name)
    parts = [path.name] + [p for p in path.parts if p.startswith("models--")]
    return any(re.search(r"instruct", p, re.IGNORECASE) for p in parts)


def find_template(folder: Path, name: str | None = None) -> ChatTemplate | None:
    """The folder's chat_template.jinja, else Apple's template when the folder or the
    name the user gave says -Instruct, else None (a base model)."""
    file = Path(folder) / TEMPLATE_FILE
    if file.is_file():
        return ChatTemplate(file.read_text(), str(file))
    if says_instruct(str(folder)) or (name is not None and says_instruct(name)):
        return ChatTemplate(OPENELM_TEMPLATE, "OpenELM-Instruct")
    return None


def choose_template(folder: Path, name: str, template_file: Path | None, no_template: bool) -> ChatTemplate | None:
    """--chat-template FILE, --no-chat-template, or what the model folder and its name say."""
    if template_file is not None and no_template:
        raise ElmError("--chat-template and --no-chat-template contradict each other: pass one")
    if no_template:
        return None
    if template_file is not None:
        try:
            return ChatTemplate(Path(template_file).expanduser().read_text(), str(template_file))
        except (OSError, UnicodeDecodeError) as e:
            raise ElmError(f"--chat-template {template_file}: cannot read it ({e}); expected a Jinja "
                           "template file like transformers' chat_template.jinja") from None
    return find_template(folder, name)
