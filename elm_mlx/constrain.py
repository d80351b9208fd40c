"""Structured output: a Constraint for sample.py's hook, built on llguidance.

Design decisions:
- Engine: llguidance (Microsoft, maintained; used by vLLM, SGLang, llama.cpp). One abi3
  wheel per platform (macOS arm64, manylinux x86-64 and aarch64), no Python dependencies,
  a mask in well under a millisecond for a 32k vocab, the widest JSON-Schema coverage of the
  three, and Lark grammars and regexes as well. Its MLX helper is not used (it may be
  Metal-only); we fill a NumPy uint32 bitmask and hand sample.py an mx.array bool [V].
- The tokenizer's byte table (tokenizer.Tokenizer.token_bytes: "▁" as a space, <0xNN> as
  its byte) is what llguidance sees; control tokens are special, EOS is id 2 and allowed
  only when the grammar accepts.
- A grammar is compiled once per schema/grammar/regex (an LRU keyed by canonical JSON),
  never per token; each request gets its own matcher over the compiled grammar.
- A schema feature llguidance cannot enforce is an ElmError naming it, never relaxed:
  the grammar is validated with warnings, and any warning or error is raised.
"""

from __future__ import annotations

import json
import time
from functools import lru_cache

import mlx.core as mx
import numpy as np

from .errors import ElmError

try:
    import llguidance
except ImportError:  # pragma: no cover - a dependency in pyproject
    llguidance = None


def _require():
    if llguidance is None:
        raise ElmError("structured output needs the llguidance package: pip install llguidance")


_LL_TOKENIZERS: dict[int, object] = {}


def ll_tokenizer(tokenizer):
    """llguidance's view of our SentencePiece tokenizer (built once per tokenizer object)."""
    _require()
    key = id(tokenizer)
    if key not in _LL_TOKENIZERS:
        table, _ = tokenizer._bytes_table()
        tokens, special = [], []
        sp = tokenizer._sp
        byte_id = {int(sp.id_to_piece(i)[3:5], 16): i for i in range(sp.vocab_size()) if sp.is_byte(i)}
        for i, data in enumerate(table):
            if not data:  # control tokens (<s>, </s>): never text, named for llguidance
                data = f"<[{i}]>".encode()
                special.append(i)
            tokens.append(data)

        class _Wrap:
            eos_token_id = tokenizer.eos_id
            bos_token_id = tokenizer.bos_token_id
            special_token_ids = special

            def __call__(self, s):
                # SentencePiece would add its dummy-prefix space ("{" -> "▁{"), which
                # llguidance takes for text: spell the bytes with <0xNN> tokens instead.
                data = s if isinstance(s, bytes) else s.encode()
                return [byte_id[b] for b in data]

        w = _Wrap()
        w.tokens = tokens
        _LL_TOKENIZERS[key] = (tokenizer, llguidance.LLTokenizer(llguidance.TokenizerWrapper(w)))
    return _LL_TOKENIZERS[key][1]


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


@lru_cache(maxsize=64)
def _compiled(kind: str, source: str) -> str:
    """The llguidance grammar for (kind, source), validated: an unenforceable feature raises."""
    _require()
    if kind == "json_schema":
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            source, defaults={"whitespace_flexible": False})
    elif kind == "json_object":
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            '{"type":"object"}', defaults={"whitespace_flexible": False})
    elif kind == "regex":
        grammar = llguidance.LLMatcher.grammar_from_regex(source)
    elif kind == "grammar":
        grammar = llguidance.LLMatcher.grammar_from_lark(source)
    else:
        raise ValueError(kind)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ElmError(f"{kind}: cannot be enforced: {messages[0].strip().splitlines()[0]}")
    if messages:  # e.g. an unknown "format": a warning in llguidance, an error here (never relaxed)
        raise ElmError(f"{kind}: cannot be enforced exactly: {messages[0].strip().splitlines()[0]}")
    return grammar


class Constraint:
    """allowed() -> mx.array bool [vocab]; advance(token) after each token drawn."""

    def __init__(self, tokenizer, *, json_schema=None, json_object=False, grammar=None,
                 regex=None, vocab_size: int | None = None):
        given = [x is not None and x is not False for x in (json_schema, grammar, regex)] + [bool(json_object)]
        if sum(given) != 1:
            raise ElmError("structured output: give exactly one of json_schema, json_object, grammar, regex")
        if json_schema is not None:
            if isinstance(json_schema, str):
                try:
                    json_schema = json.loads(json_schema)
                except json.JSONDecodeError as e:
                    raise ElmError(f"json_schema: expected a JSON object, got invalid JSON ({e.msg})") from None
            if not isinstance(json_schema, dict):
                raise ElmError("json_schema: expected a JSON object (a JSON Schema)")
            kind, source = "json_schema", _canonical(json_schema)
        elif json_object:
            kind, source = "json_object", ""
        elif regex is not None:
            kind, source = "regex", str(regex)
        else:
            kind, source = "grammar", str(grammar)
        grammar_text = _compiled(kind, source)
        self.ll = ll_tokenizer(tokenizer)
        self.matcher = llguidance.LLMatcher(self.ll, grammar_text)
        if self.matcher.is_error():
            raise ElmError(f"{kind}: {self.matcher.get_error()}")
        self.n = self.ll.vocab_size
        self.vocab_size = vocab_size or self.n
        self.eos = tokenizer.eos_id
        self._bits = np.zeros(((self.n + 31) // 32,), dtype=np.uint32)
        self._shifts = np.arange(32, dtype=np.uint32)
        self.mask_seconds = 0.0
        self.masks = 0

    def allowed(self):
        t0 = time.perf_counter()
        if self.matcher.is_stopped():
            mask = np.zeros(self.vocab_size, dtype=bool)
            mask[self.eos] = True
        else:
            self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
            bits = (self._bits[:, None] >> self._shifts) & 1
            mask = np.zeros(self.vocab_size, dtype=bool)
            n = min(self.n, self.vocab_size)
            mask[:n] = bits.reshape(-1)[:n].astype(bool)
        self.mask_seconds += time.perf_counter() - t0
        self.masks += 1
        return mx.array(mask)

    def advance(self, token: int):
        if self.matcher.is_stopped():
            return
        if not self.matcher.consume_token(int(token)):
            raise ElmError(f"structured output: token {token} is outside the grammar "
                           f"({self.matcher.get_error()})")

    @property
    def accepting(self) -> bool:
        return self.matcher.is_accepting() or self.matcher.is_stopped()

    @property
    def mask_ms_per_token(self) -> float:
        return 1000 * self.mask_seconds / max(1, self.masks)
