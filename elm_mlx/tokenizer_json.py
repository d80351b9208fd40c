"""Llama-2's SentencePiece model, rebuilt from a Hugging Face tokenizer.json.

Folders written by `mlx_lm.convert` (transformers' save_pretrained) carry
tokenizer.json and no tokenizer.model. Rather than demand --tokenizer or the
hub copy, we build the SentencePiece model from the JSON, offline.

Design decisions:
- Only Llama-2's is built: the pieces, in id order, must hash to
  LLAMA2_VOCAB_SHA256. tokenizer.json keeps no scores, and its merges order
  depends on the transformers release that wrote it (5.x lists the "▁▁" merge
  first; SentencePiece ranks whitespace-only pieces last), so scores can not be
  read back from an arbitrary file. For Llama-2's vocabulary they follow
  exactly from the ids: byte and special pieces 0, every other piece
  -(id - 259), whitespace-only pieces -1e9. Types follow from the piece's form.
  The tests compare all 32000 pieces, scores and types with the real
  tokenizer.model, and encode/decode on a varied corpus.
- The normalizer (identity, dummy prefix, whitespace kept and escaped as "▁")
  and the trainer settings the encoder reads (BPE, byte fallback, the special
  ids) are Llama-2's constants, not read from the JSON: SentencePiece's
  behaviour is the reference, tokenizer.json's pre-tokenizer and decoder are
  Hugging Face's imitation of it.
- The ModelProto is written by hand in protobuf's wire format (varints,
  length-delimited fields, little-endian float32): a few lines, no protobuf
  dependency.
- Hostile input: read with a size cap (Llama-2's is 1.6 MB), JSON too deep or
  with huge numbers and every wrong shape end as one ElmError naming the file,
  what was expected, and --tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

from .errors import ElmError, quoted
from .files import read_text

# sha256 of json.dumps(pieces in id order) of the Llama-2 tokenizer.model.
LLAMA2_VOCAB_SHA256 = "317117d0ed0fa2d643533e2ad16aa34e72ec0091cba4a88a2b582c9e37f4458d"
LLAMA2_VOCAB_SIZE = 32000
JSON_LIMIT = 64 << 20
WHAT = "Hugging Face tokenizer.json"

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6  # SentencePiece.Type
BPE = 2  # TrainerSpec.ModelType
WHITESPACE_ONLY_SCORE = -1e9
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


def read_tokenizer_json(path: Path) -> dict:
    """The parsed file, a JSON object; else one ElmError naming it."""
    try:
        text = read_text(path, WHAT, JSON_LIMIT)
    except ElmError as e:  # not UTF-8, too large, unreadable: already names the file
        raise ElmError(f"{e}. Pass the model's tokenizer.model with --tokenizer") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, int too long, nested too deep
        raise refused(path, f"not valid JSON ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(data, dict):
        raise refused(path, "not a JSON object")
    return data


def refused(path: Path, problem: str) -> ElmError:
    return ElmError(f"{path}: {problem}; expected Llama-2's tokenizer.json (a BPE model of "
                    f"{LLAMA2_VOCAB_SIZE} pieces with merges and byte fallback), as OpenELM uses. "
                    "Pass the model's tokenizer.model with --tokenizer")


def llama2_pieces(path: Path, data: dict) -> list[str]:
    """The pieces in id order, if `data` is Llama-2's tokenizer.json."""
    model = data.get("model")
    if not isinstance(model, dict):
        raise refused(path, 'no "model" object')
    if model.get("type") != "BPE":
        raise refused(path, f"its model type is {quoted(model.get('type'))}, not \"BPE\"")
    merges = model.get("merges")
    if not isinstance(merges, list) or not merges:
        raise refused(path, "its BPE model has no merges")
    if model.get("byte_fallback") is not True:
        raise refused(path, "its BPE model has no byte fallback")
    pieces = pieces_in_id_order(path, model.get("vocab"))
    if len(pieces) != LLAMA2_VOCAB_SIZE:
        raise refused(path, f"its vocabulary has {len(pieces)} pieces")
    digest = hashlib.sha256(json.dumps(pieces).encode()).hexdigest()
    if digest != LLAMA2_VOCAB_SHA256:
        raise refused(path, f"its vocabulary is not Llama-2's (pieces sha256 {digest[:12]}…, "
                            f"expected {LLAMA2_VOCAB_SHA256[:12]}…)")
    return pieces


def pieces_in_id_order(path: Path, vocab) -> list[str]:
    """vocab {piece: id} -> pieces by id; the ids must be exactly 0..n-1."""
    if not isinstance(vocab, dict) or not all(type(i) is int for i in vocab.values()):
        raise refused(path, 'no "model.vocab" object of piece -> id')
    pieces: list = [None] * len(vocab)
    for piece, i in vocab.items():
        if not 0 <= i < len(pieces) or pieces[i] is not None:
            raise refused(path, f"its vocabulary ids are not 0..{len(pieces) - 1} (id {i} of {quoted(piece)})")
        pieces[i] = piece
    return pieces


def piece_type(piece: str) -> int:
    if piece == UNK:
        return UNKNOWN
    if piece in (BOS, EOS):
        return CONTROL
    return BYTE if _BYTE_PIECE.fullmatch(piece) else NORMAL


def scores(pieces: list[str], types: list[int]) -> list[float]:
    """Llama-2's: non-normal pieces 0, normal ones by id, whitespace-only ones last."""
    first = types.index(NORMAL)
    return [0.0 if t != NORMAL else WHITESPACE_ONLY_SCORE if not piece.strip("\u2581") else float(first - i)
            for i, (piece, t) in enumerate(zip(pieces, types))]


# ---------------------------------------------------------------- protobuf wire format
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # a negative int32 is ten bytes of two's complement
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _int(field: int, n: int) -> bytes:
    return _varint(field << 3) + _varint(n)


def _bytes(field: int, data: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _float(field: int, x: float) -> bytes:
    return _varint(field << 3 | 5) + struct.pack("<f", x)


def model_proto(pieces: list[str]) -> bytes:
    """A serialized SentencePiece ModelProto of Llama-2's settings over `pieces`."""
    types = [piece_type(p) for p in pieces]
    body = b"".join(_bytes(1, _bytes(1, p.encode()) + _float(2, s) + (_int(3, t) if t != NORMAL else b""))
                    for p, s, t in zip(pieces, scores(pieces, types), types))  # NORMAL: the default, left out
    trainer = (_int(3, BPE) + _int(4, len(pieces)) + _int(26, 1) + _int(35, 1)  # allow ws-only, byte_fallback
               + _int(40, pieces.index(UNK)) + _int(41, pieces.index(BOS)) + _int(42, pieces.index(EOS))
               + _int(43, -1) + _bytes(44, " \u2047 ".encode()) + _bytes(45, UNK.encode())
               + _bytes(46, BOS.encode()) + _bytes(47, EOS.encode()))
    # As Llama-2's: identity, dummy prefix, extra whitespace kept (escaped as "▁": the default).
    normalizer = _bytes(1, b"identity") + _bytes(2, b"") + _int(3, 1) + _int(4, 0) + _bytes(6, b"")
    return body + _bytes(2, trainer) + _bytes(3, normalizer)


def build_model_proto(path: Path) -> bytes:
    """The SentencePiece model the tokenizer.json at `path` describes (Llama-2's only)."""
    path = Path(path)
    return model_proto(llama2_pieces(path, read_tokenizer_json(path)))
