"""Continuous batching: many sequences decode together, one token each per model pass.

A decode step reads every weight once whether it serves one sequence or eight, so the
server runs its requests through one `BatchEngine`: sequences join and leave between
steps, and every step feeds each running sequence's last token through one compiled
forward, and the next chunk of any newcomer's prompt through the eager one.

Design decision: one row of one `BatchCache` per sequence (per layer a [rows, kv heads, T,
head_dim] buffer, per row the positions it holds), no left padding. The decode rows run
through the compiled forward (Model.decode, step.batch_forward): one token per row at that
row's own position, each row's attention masked to exactly the positions it holds, so the
projections and the FFN read the weights once for all rows and the step is one trace per
(capacity bucket, power-of-two B); a speculative row's block joins that pass as a part of
its own (Model.decode_parts). Prompt chunks run through the eager forward (`prefill`),
packed for the projections and the FFN, each chunk's attention on its own row as
`generate_tokens` reads a prompt alone (Attention.segments). A sequence's numbers come from
the same operations whoever runs beside it, so its tokens equal `generate_tokens`' tokens
(greedy, or seeded; tests/test_batch.py states the log-probability tolerance), and joining,
leaving and prefix reuse never copy or re-pad a shared cache (mlx-lm's left-padded
`BatchKVCache` does both).

Sampling is per sequence (`SequenceSampler`: its own penalties and its own random key), so a
seeded request draws the same tokens beside any company. Steps are pipelined as
`generate_tokens`' are: a plain sequence's token is drawn in one step and read in the next,
which feeds it to the model unread, so building a step overlaps computing the last one. A
speculative row's block must be read before its next block can be guessed, so beside plain
rows it is checked on the device in the step that verifies it and read in the next, while
that step computes (the row sits that step out): the plain rows never wait for it. Alone, a
block is verified and read in one step. A
newcomer's prompt is read inside the decode steps, at most `prefill_chunk` prompt tokens per
step, so running streams wait for at most one chunk. A finished sequence's row keeps what it
holds until another sequence needs the row, and a newcomer takes the row holding the longest
prefix of its prompt: a client re-sending a growing conversation has only the new part read."""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import mlx.core as mx

from .context import common_prefix
from .errors import ElmError
from .generate import check_context
from .model import Segments
from .sample import SequenceSampler, log_softmax
from .speculative import Verifier
from .step import batch_forward, padded, row_blocks

MAX_TOP_LOGPROBS = 10  # OpenAI's limit


@dataclass(eq=False)
class Sequence:
    """One request inside the engine. `tokens` grows by one per step until `finish` is set
    ("stop": EOS, "length": max_tokens or the context, "cancelled")."""
    id: int
    ids: list[int]  # the prompt
    max_tokens: int
    sampler: SequenceSampler
    logprobs: int | None  # None: none; 0: the chosen token's; k: also the k most likely
    eos_id: int | None
    tokens: list[int] = field(default_factory=list)
    row: int | None = None  # its row of the BatchCache while it runs
    todo: list[int] = field(default_factory=list)  # prompt ids still to prefill
    reused: int = 0  # prompt tokens found in a kept cache
    finish: str | None = None
    cancelled: str | None = None  # the finish reason cancel() was given
    spec: Verifier | None = None  # speculative decoding (prompt lookup or a draft model), else None
    unsettled: tuple | None = None  # its last block's check (Verifier.check), verified beside plain rows, read next step


@dataclass
class Token:
    """What a step produced for one sequence."""
    seq: Sequence
    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish: str | None = None


class BatchEngine:
    """Not thread-safe: one thread adds, cancels and steps (MLX work stays on it)."""

    def __init__(self, model, max_batch: int = 8, prefill_chunk: int = 512):
        if max_batch < 1:
            raise ElmError(f"--max-batch {max_batch}: expected >= 1")
        self.model = model
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.window = model.config.max_context_length
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.cache = BatchCache(model, max_batch)
        self.compiled = batch_forward(model)  # looked up once: finding it walks the model's parameters
        self.verify = row_blocks(model)  # a speculative row's block, compiled
        # Per row: the ids it holds when no sequence runs in it (a finished one's, kept for prefix
        # reuse), and when it was last given up.
        self.kept: list[list[int]] = [[] for _ in range(max_batch)]
        self.freed_at = [0] * max_batch
        self._ids = itertools.count()
        # Drawn, not yet read: each pipelined sequence's next token (and its logprob terms), queued
        # with mx.async_eval; the next step feeds it to the model before reading it (see step()).
        self.pending: dict[Sequence, tuple] = {}
        self.totals = dict(requests=0, finished=0, cancelled=0, prompt_tokens=0, reused_tokens=0,
                           generated_tokens=0, steps=0)

    # ------------------------------------------------------------ requests

    def add(self, ids: list[int], max_tokens: int, *, eos_id: int | None = None, logprobs: int | None = None,
            proposer=None, **sampling) -> Sequence:
        """Queue a prompt; it starts at the next step with room. Sampling keywords as SequenceSampler's.
        proposer: speculative decoding's (speculative.make_proposer): its guesses are verified in the
        same step as the other rows' tokens, through the compiled forward on its own row (verify_row),
        and its tokens follow what plain decoding draws (greedy: the same)."""
        if not ids:
            raise ElmError("the prompt is empty: expected at least one token (BOS)")
        check_context(len(ids), self.window)
        if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise ElmError(f"top_logprobs {logprobs}: expected 0 to {MAX_TOP_LOGPROBS}")
        vocab, limit = self.model.config.vocab_size, min(max_tokens, self.window - len(ids))
        sampler = SequenceSampler(vocab, ids, **sampling)
        seq = Sequence(next(self._ids), list(ids), limit, sampler, logprobs, eos_id)
        if proposer is not None:
            if logprobs is not None or sampling.get("constraint") is not None:
                raise ElmError("speculative decoding with logprobs or structured output is not supported")
            seed = sampling.pop("seed", None)
            key = mx.random.key(seed) if seed is not None and sampling.get("temp") else None
            seq.spec = Verifier(vocab, ids, proposer, max_tokens=limit, key=key,
                                **{k: v for k, v in sampling.items() if k != "constraint"})
        self.waiting.append(seq)
        self.totals["requests"] += 1
        return seq

    def cancel(self, seq: Sequence, finish: str = "cancelled"):
        """Ends `seq` at the next step with this finish reason (its row is kept for reuse like a
        finished one's). The server also ends a sequence this way when a stop string appears."""
        if seq.finish is None:
            seq.cancelled = finish

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> dict:
        return {"queued": len(self.waiting), "active": len(self.running), "max_batch": self.max_batch, **self.totals}

    # ------------------------------------------------------------ stepping

    def step(self) -> list[Token]:
        """Admit waiting sequences, then one pass over the batch: the last token of every
        decoding sequence (one compiled forward), speculative rows' blocks, and up to
        `prefill_chunk` prompt tokens of admitted ones. Each decoding sequence gets one token,
        and so does one whose prompt this step finished reading.

        Pipelined, as generate_tokens is: a plain sequence's token (no speculation, no structured
        output) is drawn in one step and read in the next, which first feeds it, still unread, to
        the model and queues the draw after it (mx.async_eval), so the host builds a step while
        the previous one computes. The tokens are the same; a sequence that ends on a token it
        has just been fed wastes the draw after it. A speculative row verified beside pipelined
        plain rows is read in the next step instead (Sequence.unsettled), so those steps still
        overlap."""
        self._drop_cancelled()
        self._admit()
        decoding = [s for s in self.running if s.tokens and s.finish is None]
        # A pending token that is the sequence's last is only read, never fed.
        lasts = {s: self.pending.pop(s) for s in decoding if s in self.pending and len(s.tokens) + 1 >= s.max_tokens}
        decoding = [s for s in decoding if s not in lasts]
        # Verified in the last step, settled in this one, after it is queued: no block this step.
        resting = {s: s.unsettled for s in decoding if s.unsettled is not None}
        decoding = [s for s in decoding if s not in resting]
        blocks = {s: s.spec.block() for s in decoding if s.spec is not None}
        single = [s for s in decoding if s not in blocks or blocks[s].shape[0] == 1]
        chunks = self._prefill_chunks()
        wanted = [not s.todo for s, _ in chunks]  # a prompt's last chunk: its last position's logits
        logits = {}
        spec = {s: (blocks[s], s.spec.proposer.num_tokens + 1) for s in decoding if s not in single}
        if single:  # one token each, and speculative blocks beside them, through one compiled pass
            fed = {s.row: self.pending[s][0] if s in self.pending else s.tokens[-1] for s in single}
            rows, verified = decode(self.compiled, self.cache, fed, {s.row: b for s, b in spec.items()})
            logits.update((s, rows[s.row: s.row + 1]) for s in single)
            logits.update((s, verified[s.row]) for s in spec)
        else:  # speculative rows only: each block compiled on its own row
            logits.update((s, verify_row(self.verify, self.cache, s.row, *b)) for s, b in spec.items())
        if chunks:  # prompt chunks, eager, packed, each on its row
            read = prefill(self.model, self.cache, [(s.row, ids) for s, ids in chunks], wanted)
            logits.update((s, r) for (s, _), r in zip(chunks, read) if r is not None)
        checked = {s: v for s, v in logits.items() if s.spec is not None}
        # Beside pipelined plain rows a block is settled in the next step, while that step computes,
        # so that the plain rows' steps still overlap; alone, at once.
        overlap = any(s.spec is None and s.sampler.constraint is None for s in single)
        defer = {s: s.spec.check(v) for s, v in checked.items() if s.tokens} if overlap else {}
        out = self._sample([s for s in logits if s.spec is None], [v for s, v in logits.items() if s.spec is None],
                           later=[a for c in defer.values() for a in c])
        out += [self._take(seq, drawn) for seq, drawn in lasts.items()]
        for seq, check in resting.items():
            seq.unsettled = None
            out += self._speculate(seq, check=check)
        for seq, block_logits in checked.items():
            if seq in defer:
                seq.unsettled = defer[seq]
            else:
                out += self._speculate(seq, block_logits)
        self.totals["steps"] += 1
        self._retire()
        return out

    def _speculate(self, seq: Sequence, logits=None, check: tuple | None = None) -> list[Token]:
        """The tokens a speculative sequence's logits let through (its first, after the prompt; or
        a verified block's, from its logits or their Verifier.check), its row trimmed past the
        guesses rejected."""
        if not seq.tokens:
            tokens, drop = [seq.spec.first(logits)], 0
        else:
            tokens, drop = seq.spec.accept(*check) if check is not None else seq.spec.settle(logits)
        self.cache.lengths[seq.row] -= drop
        out = []
        for token in tokens:
            out.append(self._append(seq, token))
            seq.spec.stats.tokens += 1
            if seq.finish:  # the rest of the block is past a stop: the row's tail is never read
                break
        return out

    def _drop_cancelled(self):
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
            seq.finish = seq.cancelled
            self.totals["cancelled" if seq.finish == "cancelled" else "finished"] += 1
        for seq in self.running:
            if seq.cancelled and seq.finish is None:
                seq.finish = seq.cancelled
                self.pending.pop(seq, None)  # drawn, never read: the row holds only what it was fed
                seq.unsettled = None
        self._retire()

    def _admit(self):
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting.popleft()
            seq.row, n = self._row_for(seq.ids)
            self.cache.lengths[seq.row] = n
            seq.reused, seq.todo = n, seq.ids[n:]
            self.totals["prompt_tokens"] += len(seq.ids)
            self.totals["reused_tokens"] += n
            self.running.append(seq)

    def _row_for(self, ids: list[int]) -> tuple[int, int]:
        """A free row, preferring the one holding the longest prefix of `ids`, else the one given up
        longest ago; and how many of its positions stay valid."""
        taken = {s.row for s in self.running}
        free = [r for r in range(self.max_batch) if r not in taken]
        # The last prompt token is always read again: its logits pick the first new token.
        common = {r: min(common_prefix(self.kept[r], ids), len(ids) - 1) for r in free}
        # Ties go to the low rows (the compiled step runs rows 0..B-1, B a power of two), then to
        # the row given up longest ago.
        row = max(free, key=lambda r: (common[r], -batch_bucket(r + 1, self.max_batch), -self.freed_at[r]))
        return row, common[row]

    def _prefill_chunks(self) -> list[tuple[Sequence, list[int]]]:
        """Prompt chunks of admitted sequences, oldest first, about `prefill_chunk` tokens in all.
        A prompt no longer than a chunk is read in one piece, as `generate_tokens` reads it."""
        budget, chunks = self.prefill_chunk, []
        for seq in self.running:
            if not seq.todo or seq.finish is not None:
                continue
            if chunks and budget < min(len(seq.todo), self.prefill_chunk):
                break  # it gets a whole chunk in the next step
            chunk, seq.todo = seq.todo[: self.prefill_chunk], seq.todo[self.prefill_chunk:]
            chunks.append((seq, chunk))
            budget -= len(chunk)
            if budget <= 0:
                break
        return chunks

    def _sample(self, seqs: list[Sequence], logits: list, later: list = ()) -> list[Token]:
        """Draws each sequence's next token from its logits. A pipelined sequence's draw is queued
        and becomes pending (with `later`, arrays read in the next step), and its previous pending
        token is read now; the others' (a first token, a constrained sequence's) are read at once.
        -> the tokens read, in `seqs` order."""
        drawn = {seq: self._draw(seq, row) for seq, row in zip(seqs, logits)}
        ahead = {s: d for s, d in drawn.items() if s.tokens and s.sampler.constraint is None}
        mx.async_eval([a for d in ahead.values() for a in d if a is not None] + list(later))
        previous, self.pending = self.pending, ahead
        now = {s: d for s, d in drawn.items() if s not in ahead}
        out = []
        for seq in seqs:
            if seq in previous:
                out.append(self._take(seq, previous[seq]))
            elif seq in now:
                out.append(self._take(seq, now[seq]))
        for seq in [s for s in self.pending if s.finish is not None]:  # ended on the token just read
            del self.pending[seq]
        return out

    def _draw(self, seq: Sequence, logits) -> tuple:
        """(token [1], and with logprobs: its log-probability, the top ids, their log-probabilities), unread."""
        y, transformed = seq.sampler(logits)
        if seq.logprobs is None:
            return y, None, None, None
        lp = log_softmax(transformed)[0]
        top = mx.argpartition(-lp, kth=seq.logprobs - 1)[: seq.logprobs] if seq.logprobs else None
        return y, lp[y[0]], top, None if top is None else lp[top]

    def _take(self, seq: Sequence, drawn: tuple) -> Token:
        y, logprob, top, top_lp = drawn
        token = y.item()
        seq.sampler.accept(token)
        t = self._append(seq, token)
        if logprob is not None:
            t.logprob = logprob.item()
            if top is not None:
                pairs = sorted(zip(top.tolist(), top_lp.tolist()), key=lambda p: -p[1])
                t.top_logprobs = [(i, v) for i, v in pairs if v > -float("inf")]
        return t

    def _append(self, seq: Sequence, token: int) -> Token:
        seq.tokens.append(token)
        self.totals["generated_tokens"] += 1
        if token == seq.eos_id:
            seq.finish = "stop"
        elif len(seq.tokens) >= seq.max_tokens:
            seq.finish = "length"
        return Token(seq, token, finish=seq.finish)

    def _retire(self):
        for seq in [s for s in self.running if s.finish is not None]:
            self.running.remove(seq)
            self.totals["cancelled" if seq.finish == "cancelled" else "finished"] += 1
            # Its row keeps what it holds, for a client that continues this conversation.
            self.kept[seq.row] = (seq.ids + seq.tokens)[: self.cache.lengths[seq.row]]
            self.freed_at[seq.row] = self.totals["steps"]
            seq.row = None


class BatchCache:
    """The keys and values of up to `rows` sequences: per layer one [rows, kv heads, T, head_dim]
    buffer (T grows in steps of 256 for all rows) and per row the positions it holds. A decode
    step writes every row's new position with one scatter per layer; attention reads a row's
    first `length` positions, the same values a sequence's own KVCache would hold."""

    step = 256
    smallest_window = 64

    def __init__(self, model, rows: int):
        self.rows = rows
        self.lengths = [0] * rows
        cfg = model.config
        self.shapes = [(rows, n_kv, cfg.head_dim) for n_kv in cfg.num_kv_heads]
        self.dtype = model.dtype
        self.keys = [None] * len(model.layers)
        self.values = [None] * len(model.layers)

    @property
    def capacity(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def window(self, need: int) -> int:
        """How many of each row's first positions a compiled pass's attention reads, when its queries
        see positions < need: a power of two, at least `smallest_window`, at most the capacity. A CPU
        pays for every position it scores, masked or not (8 rows of the overhead-bound architecture:
        ~18 vs ~24 ms a step over 64 positions rather than 256), and powers of two keep the traces
        few (64, 128, 256, then the capacity)."""
        return min(self.capacity, max(self.smallest_window, 1 << (need - 1).bit_length()))

    def reserve(self, need: int):
        """Room for `need` positions in every row of every layer (a whole number of steps)."""
        if self.capacity >= need:
            return
        T, old = -(-need // self.step) * self.step, self.capacity
        for n, (rows, n_kv, hd) in enumerate(self.shapes):
            for buffers in (self.keys, self.values):
                grown = mx.zeros((rows, n_kv, T, hd), self.dtype)
                if old:
                    grown[:, :, :old] = buffers[n]
                buffers[n] = grown


def batch_bucket(n: int, rows: int) -> int:
    """How many rows the compiled step runs for rows 0..n-1 in use: the next power of two (so a
    handful of traces serve every batch), at most all rows."""
    return min(1 << (n - 1).bit_length(), rows)


def decode(compiled, cache: BatchCache, last: dict, blocks: dict | None = None):
    """One token for each row in `last` ({row: its last token, an int or an unread int [1] array}), through the compiled step
    `compiled` (step.batch_forward's) over rows 0..B-1, and in the same pass each speculative row's
    block in `blocks` ({row: (block int32 [n <= width], width)}, padded to width). A row in 0..B-1
    with nothing to decode is fed a dummy token at its first free position (after the block, if it
    has one), scratch by definition (a row's positions past its length are never read), so its kept
    prefix is untouched. -> (logits [B, vocab] by row, {row: its block's logits [n,
    vocab]}); every row advances by what it was given."""
    blocks = blocks or {}
    B = batch_bucket(max(last) + 1, cache.rows)
    # A speculative row's dummy token goes after its block's positions: no two writes of a pass collide.
    offsets = [n + blocks[r][1] if r in blocks else n for r, n in enumerate(cache.lengths[:B])]
    block_ends = [cache.lengths[r] + w for r, (_, w) in blocks.items()]
    cache.reserve(max([o + 1 for o in offsets] + block_ends))
    fed = [last.get(r, 0) for r in range(B)]
    if all(isinstance(t, int) for t in fed):
        tokens = mx.array(fed, mx.int32)[:, None]
    else:  # pipelined rows' tokens, drawn and not read yet (BatchEngine.step)
        tokens = mx.concatenate([t.astype(mx.int32) if isinstance(t, mx.array) else mx.array([t], mx.int32)
                                 for t in fed])[:, None]
    parts = [(padded(block, width)[None], mx.array([cache.lengths[row]], mx.int32), mx.array([row], mx.int32))
             for row, (block, width) in blocks.items()]
    # What a query sees: the rows decoding and the blocks (a dummy row's output is never read).
    window = cache.window(max([cache.lengths[r] + 1 for r in last] + block_ends))
    logits, cache.keys, cache.values = compiled(tokens, mx.array(offsets, mx.int32), parts, cache.keys, cache.values,
                                                window)
    for row in last:
        cache.lengths[row] += 1
    verified = {}
    for (row, (block, _)), out in zip(blocks.items(), logits[1:]):
        verified[row] = out[0, : block.shape[0]]
        cache.lengths[row] += block.shape[0]
    return logits[0], verified


def verify_row(compiled, cache: BatchCache, row: int, block: mx.array, width: int) -> mx.array:
    """A speculative block (int32 [n <= width]) of one row through `compiled` (step.row_blocks'),
    padded to `width` (scratch past the row's length) -> logits [n, vocab]; the row advances by n.
    For a step in which no row decodes plainly (else the block joins decode()'s pass)."""
    n, offset = block.shape[0], cache.lengths[row]
    cache.reserve(offset + width)
    logits, cache.keys, cache.values = compiled(padded(block, width)[None], mx.array([offset], mx.int32), cache.keys,
                                                cache.values, mx.array([row], mx.int32), cache.window(offset + width))
    cache.lengths[row] += n
    return logits[0, :n]


def prefill(model, cache: BatchCache, chunks: list[tuple[int, list[int]]], wanted: list[bool]) -> list:
    """Prompt chunks [(row, ids)] through the eager forward in one pass: their tokens packed along one
    axis for the projections and the FFN (the weights read once), each chunk's RoPE, cache writes
    and attention on its own row as `generate_tokens` reads a prompt alone (Attention.segments).
    -> per chunk its last position's logits [1, vocab] if wanted (a prompt's last chunk), else None."""
    cache.reserve(max(cache.lengths[row] + len(ids) for row, ids in chunks))
    layers = [Segments(RowCache(cache, row, layer, len(ids)) for row, ids in chunks)
              for layer in range(len(cache.keys))]
    h = model.transformer(mx.array([i for _, ids in chunks for i in ids], mx.int32)[None], layers)
    ends = list(itertools.accumulate(len(ids) for _, ids in chunks))
    picks = [end - 1 for end, w in zip(ends, wanted) if w]
    logits = iter(model.head(h[:, mx.array(picks, mx.int32)])[0]) if picks else None
    for row, ids in chunks:
        cache.lengths[row] += len(ids)
    return [logits.__next__()[None] if w else None for w in wanted]


class RowCache:
    """One row and layer of a BatchCache as the eager forward's cache of a chunk of `length` tokens
    (`offset`, `update_and_fetch`): the chunk's keys and values go in at the row's length, and
    attention reads exactly the row's positions, what the sequence's own KVCache would hold."""

    def __init__(self, cache: BatchCache, row: int, layer: int, length: int):
        self.cache, self.row, self.layer, self.length = cache, row, layer, length
        self.offset = cache.lengths[row]

    def update_and_fetch(self, k, v):
        r, end = self.row, self.offset + k.shape[2]
        keys, values = self.cache.keys[self.layer], self.cache.values[self.layer]
        keys[r: r + 1, :, self.offset: end] = k  # in place: the cache's list holds these same arrays
        values[r: r + 1, :, self.offset: end] = v
        return keys[r: r + 1, :, :end], values[r: r + 1, :, :end]
