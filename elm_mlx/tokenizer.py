"""The Llama-2 SentencePiece tokenizer that OpenELM uses, and where to find it.

OpenELM checkpoints ship without a tokenizer; Apple points at the gated Llama-2 repo.
We never need that gate: the model folder's tokenizer.model or a user-given file comes
first, then a folder's tokenizer.json (mlx-lm's folders carry only that), from which
Llama-2's SentencePiece model is rebuilt offline (tokenizer_json.py), then an ungated
hub copy that is only trusted because its sha256 matches the real one.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import sys
from pathlib import Path

import sentencepiece as spm

from .errors import ElmError, quoted
from .files import read_bytes, regular_file
from .tokenizer_json import build_model_proto, read_tokenizer_json

TOKENIZER_SHA256 = "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"
TOKENIZER_REPO = "hf-internal-testing/llama-tokenizer"
TOKENIZER_FILE = "tokenizer.model"
JSON_FILE = "tokenizer.json"


def _replace_each_byte(err: UnicodeDecodeError) -> tuple[str, int]:
    # SentencePiece's decode gives every invalid byte its own U+FFFD; Python's "replace"
    # gives one per truncated sequence. Match SentencePiece so streamed == decoded.
    return "\ufffd" * (err.end - err.start), err.end


codecs.register_error("elm_mlx.sp_replace", _replace_each_byte)


def _first_surrogate(text: str) -> str:
    i = next((i for i, c in enumerate(text) if "\ud800" <= c <= "\udfff"), 0)
    return text[max(0, i - 10): i + 10]


class StreamingDetokenizer:
    """Turns one sequence of token ids into text, a token at a time, in O(1) per token."""

    def __init__(self, table: list[bytes], literal_space: frozenset[int], continuation: bool = False):
        self._table = table
        self._literal_space = literal_space
        # SentencePiece drops the dummy-prefix space of the first text piece of a sequence
        # only; generated text that follows a prompt keeps it.
        self._at_start = not continuation
        self._utf8 = codecs.getincrementaldecoder("utf-8")("elm_mlx.sp_replace")
        self._chunks: list[str] = []

    def add_token(self, token_id: int) -> str:
        # Ids past the tokenizer (a model's padding rows, see load.check_vocabularies) are no text.
        data = self._table[token_id] if 0 <= token_id < len(self._table) else b""
        if self._at_start and data:  # control tokens (b"") don't end the start
            self._at_start = False
            if data[:1] == b" " and token_id not in self._literal_space:
                data = data[1:]
        return self._emit(self._utf8.decode(data))  # holds back half a character

    def finalize(self) -> str:
        return self._emit(self._utf8.decode(b"", final=True))

    @property
    def text(self) -> str:
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def _emit(self, text: str) -> str:
        if text:
            self._chunks.append(text)
        return text


class Tokenizer:
    """path: a SentencePiece tokenizer.model, or a Hugging Face tokenizer.json (a name
    ending in .json) that Llama-2's model is rebuilt from."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._sp = spm.SentencePieceProcessor()
        self._proto: bytes | None = None  # the model, when built rather than read from path
        if self.path.suffix == ".json":
            self._proto = build_model_proto(self.path)
            self._sp.LoadFromSerializedProto(self._proto)
        else:
            self._load_file()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.vocab_size: int = self._sp.vocab_size()
        self._table: tuple[list[bytes], frozenset[int]] | None = None
        # An -Instruct model's ChatTemplate (set by load()); None for base models.
        self.chat_template = None

    def _load_file(self) -> None:
        regular_file(self.path, "tokenizer.model")  # a FIFO would block the load forever
        try:
            self._sp.Load(str(self.path))
        except (RuntimeError, OSError) as e:
            raise ElmError(
                f"{self.path}: not a valid SentencePiece tokenizer.model ({e}). Replace it with "
                f"the Llama-2 tokenizer.model (sha256 {TOKENIZER_SHA256})."
            ) from None

    def model_bytes(self) -> bytes:
        """The SentencePiece model, as a tokenizer.model file holds it (what convert writes)."""
        return self._proto if self._proto is not None else read_bytes(self.path, "tokenizer.model")

    @property
    def bos_token_id(self) -> int:
        return self.bos_id

    @property
    def eos_token_id(self) -> int:
        return self.eos_id

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = True):
        """As transformers' (and so mlx-lm's): the prompt for `messages` in the
        model's chat template, as the ids `elm-mlx generate` and `chat` feed the
        model (tokenize=True) or as text. Without a template the contents are
        read as typed, one after another."""
        from .chat_template import chat_ids, chat_text

        if tokenize:
            return chat_ids(self, self.chat_template, messages, add_generation_prompt)
        return chat_text(self.chat_template, messages, add_generation_prompt)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ElmError(f"expected text to tokenize, got {type(text).__name__}")
        try:
            return self._sp.encode(text, add_bos=add_bos)
        except RuntimeError:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800", or stdin read with surrogateescape)
                pass
            else:
                raise
            raise ElmError("the text is not valid Unicode (it holds a lone surrogate, e.g. "
                           f"{quoted(_first_surrogate(text))}); send UTF-8 text") from None

    def decode(self, ids) -> str:
        """Text of ids; ids outside the vocabulary (a model's padding rows) are no text."""
        return self._sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def pieces(self) -> list[str]:
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]

    def token_bytes(self, token_id: int) -> bytes:
        """What one token stands for: its piece's bytes, "▁" as a space (b"" for BOS/EOS)."""
        return self._bytes_table()[0][token_id]

    def piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def detokenizer(self, continuation: bool = False) -> StreamingDetokenizer:
        return StreamingDetokenizer(*self._bytes_table(), continuation=continuation)

    def _bytes_table(self) -> tuple[list[bytes], frozenset[int]]:
        # Built once (~50 ms for 32k pieces) so streaming never calls back into SentencePiece.
        if self._table is None:
            sp, table, literal_space = self._sp, [], set()
            for i in range(sp.vocab_size()):
                piece = sp.id_to_piece(i)
                if sp.is_control(i):
                    data = b""
                elif sp.is_unknown(i):
                    data = " \u2047 ".encode()  # how SentencePiece renders <unk>
                elif sp.is_byte(i):
                    data = bytes([int(piece[3:5], 16)])  # "<0xNN>"
                else:
                    data = piece.replace("\u2581", " ").encode()
                # These spaces are real text, not the dummy prefix: never stripped.
                if data[:1] == b" " and (sp.is_unknown(i) or sp.is_byte(i)):
                    literal_space.add(i)
                table.append(data)
            self._table = (table, frozenset(literal_space))
        return self._table


def resolve_tokenizer(model_dir: Path | None, explicit: str | Path | None = None) -> Path:
    """Find the tokenizer: the model folder's tokenizer.model, then --tokenizer PATH,
    then the model folder's tokenizer.json (Tokenizer rebuilds the model from it),
    then the hub copy of tokenizer.model."""
    if explicit is not None:
        explicit = Path(explicit).expanduser()
        if explicit.exists() and not explicit.is_file():
            raise ElmError(f"--tokenizer {explicit}: not a regular file (a folder, FIFO or device); pass the path "
                           "of a SentencePiece tokenizer.model")
        if not explicit.is_file():
            raise ElmError(
                f"--tokenizer {explicit}: no such file. Pass the path of a SentencePiece "
                f"tokenizer.model, or leave --tokenizer out to use the model folder's."
            )
    searched = []
    if model_dir is not None:
        local = Path(model_dir) / TOKENIZER_FILE
        if local.is_file():
            if explicit is not None and not os.path.samefile(local, explicit):
                print(f"warning: {model_dir} has its own tokenizer ({local}): it is used for that folder instead "
                      f"of --tokenizer {explicit}", file=sys.stderr)
            return local
        searched.append(f"{local} (not there)")
    if explicit is not None:
        return explicit
    searched.append("--tokenizer PATH (not given)")
    if model_dir is not None and (Path(model_dir) / JSON_FILE).exists():
        return Path(model_dir) / JSON_FILE

    try:
        # Imported here: it is slow to import and only needed when nothing local exists.
        from huggingface_hub import hf_hub_download

        from .hub import HUB_TIMEOUT, hub_reachable

        try:
            path = Path(hf_hub_download(TOKENIZER_REPO, TOKENIZER_FILE, local_files_only=True))
        except Exception:  # not cached: ask the hub, but only if it answers at all (fail fast)
            unreachable = hub_reachable()
            if unreachable:
                raise ConnectionError(unreachable) from None
            path = Path(hf_hub_download(TOKENIZER_REPO, TOKENIZER_FILE, etag_timeout=HUB_TIMEOUT))
    except Exception as e:  # offline, not cached, network or hub errors all end the same way
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        searched.append(f"hub repo {TOKENIZER_REPO} ({type(e).__name__}: {reason})")
        where = "\n".join(f"  {n}. {s}" for n, s in enumerate(searched, 1))
        folder = f"the model folder {model_dir}" if model_dir is not None else "the model folder"
        raise ElmError(
            f"No {TOKENIZER_FILE} found. Searched:\n{where}\nPut the Llama-2 {TOKENIZER_FILE} "
            f"in {folder}, or pass --tokenizer PATH, or connect to the internet once (without "
            f"HF_HUB_OFFLINE=1) so it can be fetched from {TOKENIZER_REPO}."
        ) from None

    actual = hashlib.sha256(read_bytes(path, "tokenizer.model")).hexdigest()
    if actual != TOKENIZER_SHA256:
        raise ElmError(
            f"{path} (from {TOKENIZER_REPO}) has sha256 {actual}, expected {TOKENIZER_SHA256}: "
            f"it is not the Llama-2 tokenizer. Delete it from the Hugging Face cache to fetch it "
            f"again, or pass --tokenizer PATH to a verified copy."
        )
    return path


def load_tokenizer(model_dir: Path | None, explicit: str | Path | None = None) -> Tokenizer:
    return Tokenizer(resolve_tokenizer(model_dir, explicit))


def check_tokenizer_json(folder: Path, tok) -> None:
    """mlx-lm folders written with recent transformers carry tokenizer.json and
    no tokenizer.model; a SentencePiece model from --tokenizer (or the hub copy)
    must then be the one tokenizer.json describes. (One built from that file is.)"""
    path = Path(folder) / JSON_FILE
    if (Path(folder) / TOKENIZER_FILE).exists() or not path.exists() or tok.path == path:
        return
    model = read_tokenizer_json(path).get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise ElmError(f"{path}: not a Hugging Face tokenizer.json (no model.vocab object of piece -> id)")
    pieces = tok.pieces()
    differ = [p for p, i in vocab.items() if not (0 <= i < len(pieces) and pieces[i] == p)]
    if differ or len(vocab) != len(pieces):
        example = quoted(differ[0]) if differ else len(vocab)
        raise ElmError(f"{path} is not the tokenizer in {tok.path} (e.g. piece {example}): "
                       "this model was trained with another vocabulary; pass its tokenizer.model with --tokenizer")
