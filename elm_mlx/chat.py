"""`elm-mlx chat`: a terminal conversation. The history is kept as messages,
rendered with the chat template each turn; the KV cache keeps what it has read,
so a turn only reads the new user message. The last reply stays in the prompt as
the model's own token ids, not its text re-tokenized (which often splits
differently and would make the cache miss from there): `spoken` holds the ids
read and generated so far with the text they stand for, and the next prompt is
those ids plus the rendered text that follows, encoded piece by piece as
encode_chat does.
When the rendered history no longer begins with that text (turns dropped, a new
system prompt, /load) the whole prompt is encoded from text again."""

from __future__ import annotations

import json
import signal
import sys
import threading
from contextlib import closing, contextmanager
from pathlib import Path

from .chat_template import EOS_TEXT, ChatTemplate, chat_ids, chat_text, encode_pieces
from .context import CachedContext
from .errors import ElmError, quoted
from .files import atomic_write_text, describe_os_error, read_text
from .generate import check_context
from .sample import SamplingParams

ROLES = ("system", "user", "assistant")


class Chat:
    def __init__(self, model, tokenizer, template: ChatTemplate | None, system: str | None = None,
                 max_tokens: int = 512, sampling: SamplingParams | None = None, compile: bool = True,
                 speculation: dict | None = None):
        self.tokenizer = tokenizer
        self.template = template
        self.system = system
        self.messages: list[dict] = []  # user and assistant turns; the system prompt stays apart
        self.max_tokens = max_tokens
        self.sampling = sampling or SamplingParams()
        self.speculation = speculation or {}  # stream_generate's prompt_lookup / draft_model keywords
        self.context = CachedContext(model, compile)
        self.window = model.config.max_context_length
        self.dropped = 0  # turns dropped so far to fit the window
        self.last = None  # the last reply's final GenerationResponse
        self.cache_file = None  # --prompt-cache: (path, identity) the conversation and its KV cache are kept in
        self.spoken = None  # the last reply: (its prompt's text, its text, ended by EOS, the ids read and generated)

    def keep_in(self, path: Path, model_name: str, dtype=None, tokenizer_file=None) -> str:
        """Keep the conversation and its KV cache in `path` after every reply, and resume
        what it holds now. Returns a line saying which."""
        from . import prompt_cache

        context, ident, extra = prompt_cache.open_cache(path, model_name, dtype, tokenizer_file,
                                                        self.context.model, self.tokenizer, self.context.compile)
        self.context, self.cache_file = context, (Path(path), ident)
        if not extra.get("messages"):
            return f"(the conversation will be kept in {path})"
        self.load_messages(extra["messages"], str(path))
        return (f"(resumed {len(self.messages)} messages from {path}, {len(context.ids)} tokens already read; "
                "/reset starts afresh)")

    def persist(self):
        if self.cache_file is not None:
            from . import prompt_cache

            path, ident = self.cache_file
            prompt_cache.save(path, self.context, ident, {"messages": self.conversation()})

    def conversation(self) -> list[dict]:
        return self.head() + self.messages

    def head(self) -> list[dict]:
        return [{"role": "system", "content": self.system}] if self.system is not None else []

    def prompt_ids(self) -> list[int]:
        full = chat_text(self.template, self.conversation())
        end = self.spoken_end(full)
        if end is None:
            return chat_ids(self.tokenizer, self.template, self.conversation())
        return self.spoken[3] + encode_pieces(self.tokenizer, full[end:])

    def spoken_end(self, full: str) -> int | None:
        """Where, in the rendered conversation, the text the last reply's ids stand for ends:
        the prompt it answered, then (past the template's whitespace, e.g. Apple's "\n" after
        "<|assistant|>") the reply, then "</s>" if the model ended it with EOS."""
        if self.spoken is None:
            return None
        prompt_text, reply, eos, _ = self.spoken
        start = len(prompt_text)
        at = full.find(reply, start) if full.startswith(prompt_text) else -1
        if at < 0 or full[start:at].strip():
            return None
        end = at + len(reply)
        if eos:
            if not full.startswith(EOS_TEXT, end):
                return None
            end += len(EOS_TEXT)
        return end

    def add_user(self, text: str) -> int:
        """Appends a user turn, dropping the oldest turns until the prompt leaves room for
        a reply (max_tokens, but at most half the window). Returns how many were dropped."""
        message = {"role": "user", "content": text}
        alone = chat_ids(self.tokenizer, self.template, self.head() + [message])
        check_context(len(alone), self.window, what="that message (with the system prompt)")
        self.messages.append(message)
        budget = self.window - min(self.max_tokens, self.window // 2)
        dropped = 0
        while len(self.messages) > 1 and len(self.prompt_ids()) > budget:
            del self.messages[0]
            dropped += 1
            while len(self.messages) > 1 and self.messages[0]["role"] != "user":
                del self.messages[0]
        self.dropped += dropped
        return dropped

    def reply(self):
        """Streams the answer to the last user turn (GenerationResponse per token). Closing
        the stream early keeps the partial reply: the history and the cache agree either way."""
        parts, prompt_text, finished, prompt = [], chat_text(self.template, self.conversation()), False, self.prompt_ids()
        self.spoken = None  # until this reply is done
        try:
            for r in self.context.stream(self.tokenizer, prompt, self.max_tokens, sampling=self.sampling,
                                           **self.speculation):
                parts.append(r.text)
                self.last = r
                finished = r.finish_reason is not None
                yield r
        finally:
            if parts:
                reply = "".join(parts)
                self.messages.append({"role": "assistant", "content": reply})
                if finished and self.template is not None:  # (cut short, a held-back character has no text yet)
                    eos = self.context.ids[-1:] == [self.tokenizer.eos_id]
                    self.spoken = (prompt_text, reply, eos, list(self.context.ids))
            else:  # failed before a first token: the turn never happened
                self.messages.pop()
            self.persist()

    def reset(self):
        self.messages, self.dropped, self.last, self.spoken = [], 0, None, None  # /stats: this conversation only

    def save(self, path: Path):
        """Atomic: a failed save (full disk, no permission) leaves the previous file whole."""
        if Path(path).is_dir():
            raise ElmError(f"{path} is a folder: /save needs a file name")
        atomic_write_text(Path(path), json.dumps(self.conversation(), indent=2, ensure_ascii=False) + "\n")

    def load(self, path: Path):
        text = read_text(Path(path), "conversation (JSON, as /save writes it)", 64 << 20)
        try:
            messages = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ElmError(f"{path}: cannot read a conversation ({quoted(str(e), 200)})") from None
        self.load_messages(messages, str(path))

    def load_messages(self, messages, where: str):
        check_messages(messages, where)
        self.system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
        self.messages = [dict(m) for m in messages if m["role"] != "system"]
        self.dropped, self.last, self.spoken = 0, None, None

    def stats(self) -> str:
        turns = sum(m["role"] == "user" for m in self.messages)
        lines = [f"context: {len(self.prompt_ids())}/{self.window} tokens, {turns} turns in history"
                 + (f" ({self.dropped} older dropped)" if self.dropped else "")
                 + f", {len(self.context.ids)} tokens cached"]
        if self.last is not None:
            r = self.last
            lines.append(f"last reply: {r.prompt_tokens} prompt tokens read ({self.context.reused} reused from the "
                         f"cache), {r.prompt_tps:.1f} tok/s | {r.generation_tokens} tokens, "
                         f"{r.generation_tps:.1f} tok/s | peak memory {r.peak_memory_gb:.2f} GB"
                         + ("" if r.acceptance_rate is None else
                            f" | {100 * r.acceptance_rate:.0f}% of guesses accepted, "
                            f"{r.tokens_per_forward:.2f} tokens per forward"))
        return "\n".join(lines)


def check_messages(messages, where: str):
    """A conversation as /save writes it: a JSON list of {"role", "content"}, a system message only first."""
    if not isinstance(messages, list):
        raise ElmError(f"{where}: expected a JSON list of messages, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise ElmError(f"{where}: message {i} should be {{\"role\": system|user|assistant, \"content\": text}}")
        if m["role"] == "system" and i > 0:
            raise ElmError(f"{where}: message {i} is a system message; only the first may be")


@contextmanager
def ctrl_c_sets(flag: threading.Event):
    """While generating, Ctrl-C only raises a flag, checked between tokens: the
    reply stops cleanly instead of an exception landing inside a model step."""
    previous = signal.signal(signal.SIGINT, lambda *_: flag.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


HELP = """commands:
  /reset        forget the conversation (the system prompt stays)
  /system TEXT  set the system prompt (/system alone shows it)
  /save FILE    write the conversation as JSON
  /load FILE    continue a conversation saved with /save
  /stats        context use, cache reuse and speed of the last reply
  /quit         leave (or Ctrl-D); Ctrl-C stops a reply"""


def command(chat: Chat, line: str, out) -> bool:
    """Runs a /command; False means quit."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/quit", "/exit"):
        return False
    if name == "/reset":
        chat.reset()
        print("(conversation cleared)", file=out)
    elif name == "/system":
        if arg:
            chat.system = arg
            print("(system prompt set)", file=out)
        else:
            print(chat.system if chat.system is not None else "(no system prompt)", file=out)
    elif name in ("/save", "/load") and not arg:
        print(f"usage: {name} FILE", file=out)
    elif name == "/save":
        chat.save(Path(arg).expanduser())
        print(f"(saved {len(chat.conversation())} messages to {arg})", file=out)
    elif name == "/load":
        chat.load(Path(arg).expanduser())
        print(f"(loaded {len(chat.conversation())} messages from {arg})", file=out)
    elif name == "/stats":
        print(chat.stats(), file=out)
    elif name == "/help":
        print(HELP, file=out)
    else:
        print(f"unknown command {name}; /help lists them", file=out)
    return True


def say(chat: Chat, text: str, out):
    dropped = chat.add_user(text)
    if dropped:
        print(f"(dropped the {dropped} oldest turn{'s' * (dropped > 1)} to fit OpenELM's {chat.window}-token context)",
              file=out)
    stop = threading.Event()
    with ctrl_c_sets(stop), closing(chat.reply()) as stream:
        for r in stream:
            out.write(r.text)
            out.flush()
            if stop.is_set():
                break
    out.write("\n")
    if stop.is_set():
        print("(stopped; the partial reply stays in the history)", file=out)


def repl(chat: Chat, title: str, out=sys.stdout):
    try:
        import readline  # noqa: F401  (line editing and history for input(), where available)
    except ImportError:
        pass
    print(f"{title}\n/help for commands, Ctrl-C stops a reply, Ctrl-D quits.", file=out)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /quit to leave)", file=out)
            continue
        if not line.strip():
            continue
        try:
            if line.startswith("/"):
                if not command(chat, line.strip(), out):
                    return
            else:
                say(chat, line, out)
        except ElmError as e:  # one line; the conversation goes on
            print(f"error: {e}", file=sys.stderr)
        except OSError as e:
            print(f"error: {e.filename or 'I/O'}: {describe_os_error(e)}", file=sys.stderr)
        except KeyboardInterrupt:  # outside a reply (Ctrl-C during one only stops it)
            print("\n(interrupted)", file=out)
