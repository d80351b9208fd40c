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
import sys
import time
from pathlib import Path

from .errors import ElmError, quoted
from .files import read_text

# A template is data from the internet: its rendering is bounded in time, output and
# the size of any string or list it builds (loops and `'x' * n` could otherwise hang
# generate or freeze serve). Real templates render in about a millisecond.
RENDER_SECONDS = 2.0
RENDER_CHARS = 8 << 20
TEMPLATE_BYTES = 1 << 20
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

        # What transformers' apply_chat_template uses; the sandbox keeps a template
        # from reaching Python objects (a template file is data, not code).
        env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = _raise
        try:
            self._template = env.from_string(source)
        except (TemplateError, RecursionError, MemoryError) as e:
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
            return _bounded_render(self._template, dict(messages=messages, add_generation_prompt=add_generation_prompt,
                                                        bos_token=BOS_TEXT, eos_token=EOS_TEXT))
        except _TooLong as e:
            raise ElmError(f"chat template {self.origin}: {e}; is it a chat template?") from None
        except Exception as e:  # a template's own raise_exception, or a TemplateError
            raise ElmError(f"chat template {self.origin}: {quoted(str(e), 300)}") from None


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


class _TooLong(Exception):
    pass


def _sandbox():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        """transformers' sandbox, with `*` and `**` refused when they would build a
        huge string, list or number."""
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > RENDER_CHARS:
                        raise _TooLong(f"'{operator}' would build {len(seq) * n} items")
            elif isinstance(left, (int, float)) and isinstance(right, (int, float)) and abs(right) > 1000 \
                    and abs(left) > 1:
                raise _TooLong(f"'{left} ** {right}' is too large")
            return super().call_binop(context, operator, left, right)

    return BoundedSandbox


def _BoundedSandbox(**kwargs):
    return _sandbox()(**kwargs)


def _bounded_render(template, variables: dict) -> str:
    """template.render(), stopped after RENDER_SECONDS or RENDER_CHARS of output. The
    clock is checked on every line Jinja's compiled code runs (a trace function, set
    only while rendering), so loops that print nothing are stopped too."""
    deadline = time.monotonic() + RENDER_SECONDS

    def check(frame, event, arg):
        if time.monotonic() > deadline:
            raise _TooLong(f"rendering took more than {RENDER_SECONDS:g} s")
        return check

    previous = sys.gettrace()
    sys.settrace(check)
    try:
        parts, size = [], 0
        for chunk in template.generate(**variables):
            parts.append(chunk)
            size += len(chunk)
            if size > RENDER_CHARS:
                raise _TooLong(f"its output passed {RENDER_CHARS >> 20} M characters")
        return "".join(parts)
    finally:
        sys.settrace(previous)


def encode_chat(tokenizer, text: str) -> list[int]:
    """Rendered template text -> ids as the Llama-2 fast tokenizer gives them (see the module doc),
    with BOS first."""
    ids = encode_pieces(tokenizer, text)
    return ids if ids[:1] == [tokenizer.bos_id] else [tokenizer.bos_id] + ids


def encode_pieces(tokenizer, text: str) -> list[int]:
    """encode_chat without the BOS it adds: each piece between special-token strings on its own,
    so the text after a "</s>" encodes the same alone as at the end of a longer text."""
    special = {BOS_TEXT: tokenizer.bos_id, EOS_TEXT: tokenizer.eos_id}
    ids = []
    for piece in re.split(f"({re.escape(BOS_TEXT)}|{re.escape(EOS_TEXT)})", text):
        if piece in special:
            ids.append(special[piece])
        elif piece:
            ids += tokenizer.encode(piece, add_bos=False)
    return ids


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
    if file.exists() or file.is_symlink():
        return ChatTemplate(read_text(file, "Jinja chat template", TEMPLATE_BYTES), str(file))
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
            source = read_text(Path(template_file).expanduser(), "Jinja chat template", TEMPLATE_BYTES)
        except ElmError as e:
            raise ElmError(f"--chat-template {template_file}: cannot read it ({e}); expected a Jinja template "
                           "file like transformers' chat_template.jinja") from None
        return ChatTemplate(source, str(template_file))
    return find_template(folder, name)
