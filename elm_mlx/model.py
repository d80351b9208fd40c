"""OpenELM in MLX. Every layer has its own query/KV head count and FFN width
(layer-wise scaling); module names follow Apple's HF checkpoints so their
safetensors load without renaming.

Two forwards, and one copy of each layer's arithmetic (Attention.qkv/heads,
sdpa and merge_heads, the FFN, the norms): `Model.__call__` is the eager reference (any
number of tokens through any cache with `offset` and `update_and_fetch`: a
sequence's KVCache, or, for several sequences' tokens packed along one axis, a
`Segments` of rows of the batch engine's BatchCache), and
`Model.decode` is a pure function of T tokens per row (one when decoding, a
fixed width when verifying a speculative block), their positions as arrays and
fixed-size KV buffers, so that `mx.compile` traces it once per buffer size and
replays it for every token (elm_mlx/step.py).

In the compiled forward every token is a row of its own (the layout of one
decoding token per row) for the projections, RoPE, the cache writes and the
FFN, and only attention groups tokens by the row of keys they read
(Model.place, a Pass of Positions): a speculative block of k + 1 tokens beside
the decode rows then adds ~18 graph nodes a layer to their ~107, not a second
heads layout, RoPE and write of its own (~61; bench/decode_nodes.py), and a
small model's CPU step costs what its node count costs."""

import itertools
import math
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import OpenELMConfig


class Position(NamedTuple):
    """One part of a compiled forward's tokens (Model.place): B rows of T tokens, the pass's tokens
    `span` (rows major), reading buffer rows `rows` (None: rows 0..B-1), each query seeing the
    positions `visible` marks (bool, laid out as attention reads it)."""
    rows: mx.array | None
    visible: mx.array
    shape: tuple
    first: int
    masks: dict  # cached_attention's for T > 1, by query heads per KV head: built once a pass

    @property
    def span(self) -> slice:
        return slice(self.first, self.first + self.shape[0] * self.shape[1])


class Pass(NamedTuple):
    """Where a compiled forward's N tokens go (Model.place). For the projections, RoPE and the cache
    writes every token is a row of its own (the layout of one decoding token per row), so several
    parts cost one heads layout, one RoPE and one write per layer; only attention runs per part.
    Token i sits at positions[i] (int32 [N]) in buffer row rows[i] (int32 [N]); rope: each token's
    rotation as a matrix ([N, 1, hd, hd]; None: mx.fast's kernels); start/axes: where a pass of one
    row writes its tokens with a slice update (else rows is set and one scatter writes them)."""
    positions: mx.array
    rows: mx.array | None
    rope: mx.array | None
    parts: list
    start: mx.array | None
    axes: tuple
    window: int  # attention reads each row's first `window` positions


class Segments(list):
    """One layer's caches of several sequences whose tokens a forward packs along one axis, in order
    (the batch engine's prompt chunks, batch.prefill): each has `offset`, `update_and_fetch` and
    `length`, how many of the tokens are its."""


class Attention(nn.Module):
    def __init__(self, cfg: OpenELMConfig, i: int):
        super().__init__()
        self.n_q, self.n_kv = cfg.num_query_heads[i], cfg.num_kv_heads[i]
        self.head_dim = hd = cfg.head_dim
        self.rope_base = cfg.rope_freq_constant
        self.qkv_proj = nn.Linear(cfg.model_dim, (self.n_q + 2 * self.n_kv) * hd, bias=False)
        self.out_proj = nn.Linear(self.n_q * hd, cfg.model_dim, bias=False)
        if cfg.normalize_qk_projections:
            # One [head_dim] weight shared by all heads: a single fused
            # rms_norm call covers the whole [B, H, L, hd] block.
            self.q_norm = nn.RMSNorm(hd, eps=cfg.rms_norm_eps)
            self.k_norm = nn.RMSNorm(hd, eps=cfg.rms_norm_eps)

    def qkv(self, x, offset, rope=None):
        """Queries, keys and values [B, heads, T, head_dim] of x [B, T, dim], rotated
        for positions offset.. (an int, or int32 [B] in a compiled step). rope: each
        row's rotation as a matrix instead of mx.fast.rope (Model.rope_matrix, [B, 1,
        hd, hd]; T = 1 only), see decode."""
        return self.heads(self.qkv_proj(x), offset, rope)

    def heads(self, qkv, offset, rope):
        """qkv() of the projection qkv [B, T, (n_q + 2 n_kv) head_dim]."""
        B, T, n_q, n_kv, hd = *qkv.shape[:2], self.n_q, self.n_kv, self.head_dim
        # Heads-major: a reshape when T = 1, else a transpose.
        qkv = qkv.reshape(B, n_q + 2 * n_kv, 1, hd) if T == 1 else qkv.reshape(B, T, -1, hd).transpose(0, 2, 1, 3)
        q, k, v = mx.split(qkv, [n_q, n_q + n_kv], axis=1)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        # Keys are cached after RoPE, so each step rotates only its new positions.
        if rope is None:
            at = offset if isinstance(offset, int) or B > 1 else offset[0]
            rotate = dict(traditional=False, base=self.rope_base, scale=1.0, offset=at)
            return mx.fast.rope(q, hd, **rotate), mx.fast.rope(k, hd, **rotate), v
        return q @ rope, k @ rope, v  # one token per row (decode's layout)

    def sdpa(self, q, k, v, mask):
        """mx.fast's attention, heads merged -> [B, T, n_q * head_dim]. GQA: SDPA maps query head h
        to KV head h // (n_q / n_kv) itself, so K and V are never repeated."""
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, mask=mask)
        return merge_heads(out, q.shape[2])

    def __call__(self, x, mask=None, cache=None):
        if isinstance(cache, Segments):
            return self.segments(x, cache)
        q, k, v = self.qkv(x, cache.offset if cache is not None else 0)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        return self.out_proj(self.sdpa(q, k, v, mask))

    def segments(self, x, caches: "Segments"):
        """Several sequences' tokens packed along one axis, x [1, N, dim]: the projections run once for
        all of them (the weights read once), then each sequence's RoPE at its offset, its cache and its
        attention as __call__ runs them for it alone."""
        qkv = self.qkv_proj(x)
        cuts = list(itertools.accumulate(c.length for c in caches))[:-1]
        outs = []
        for c, piece in zip(caches, mx.split(qkv, cuts, axis=1) if cuts else [qkv]):
            q, k, v = self.heads(piece, c.offset, None)
            k, v = c.update_and_fetch(k, v)
            outs.append(self.sdpa(q, k, v, "causal" if c.length > 1 else None))
        return self.out_proj(outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1))

    def decode(self, x, where: "Pass", keys, values):
        """The compiled forward's attention (Model.decode_parts): x [N, 1, dim] holds the tokens of
        where.parts, each token a row. Their keys and values are written into the fixed-size
        keys/values [R, kv_heads, capacity, head_dim] at their rows and positions; then per part
        (B rows of T tokens: T = 1 decoding, T > 1 a speculative block or a token and scratch after
        it) each query attends to the positions its `visible` marks. -> (out [N, 1, dim], keys, values)"""
        q, k, v = self.heads(self.qkv_proj(x), where.positions, where.rope)  # [N, heads, 1, head_dim]
        if where.rows is None:  # one row: its tokens in place
            if k.shape[0] > 1:
                k, v = k.transpose(2, 1, 0, 3), v.transpose(2, 1, 0, 3)  # [1, kv heads, N, head_dim]
            keys = mx.slice_update(keys, k, where.start, axes=where.axes)
            values = mx.slice_update(values, v, where.start, axes=where.axes)
        else:  # each token at its own row and position: one scatter
            keys[where.rows, :, where.positions] = k[:, :, 0]
            values[where.rows, :, where.positions] = v[:, :, 0]
        if where.rope is not None:  # scaled once for every part
            q = q * self.head_dim**-0.5
        if len(where.parts) == 1:
            out = self.cached_attention(q, where.parts[0], where, keys, values)
        else:
            out = mx.concatenate([self.cached_attention(q[p.span], p, where, keys, values) for p in where.parts])
        return self.out_proj(out), keys, values

    def cached_attention(self, q, part: "Position", where: "Pass", keys, values):
        """One part of the pass `where`: its attention over the first where.window positions of the KV
        buffers (decode), for its queries q [B * T, n_q, 1, head_dim] (rows major). With where.rope
        (RoPE as matrices, on a CPU; q already scaled): attention as an
        explicit GQA matmul pair, each of the part's T tokens a query row of its own against its
        row's keys, so a block costs what decoding rows costs, in ops; that is fewer, larger ops than
        the CPU backend's composed mx.fast kernels, and a CPU decode step is bound by their count.
        Else mx.fast.scaled_dot_product_attention, one kernel on a GPU.
        -> heads merged [B * T, 1, n_q * head_dim]"""
        (B, T), hd, rows = part.shape, self.head_dim, part.rows
        if rows is not None:
            K, V = (keys[rows], values[rows]) if B > 1 else (
                mx.slice(a, rows, axes=(0,), slice_size=(1, *a.shape[1:])) for a in (keys, values))
        else:
            K, V = (keys, values) if keys.shape[0] == B else (keys[:B], values[:B])
        if where.window < K.shape[2]:
            K, V = K[:, :, :where.window], V[:, :, :where.window]
        if where.rope is None:
            q = q.reshape(B, T, self.n_q, hd).transpose(0, 2, 1, 3)
            out = mx.fast.scaled_dot_product_attention(q, K, V, scale=hd**-0.5, mask=part.visible)
            return merge_heads(out, T).reshape(B * T, 1, -1)
        # Query head h reads KV head h // g, as SDPA does: group g's queries are rows of one matmul,
        # and a block's T tokens are T times as many rows (token major) against the same keys.
        n_kv, g = self.n_kv, self.n_q // self.n_kv
        if T == 1:
            q, seen = q.reshape(B, n_kv, g, hd), part.visible
        else:
            q = q.reshape(B, T, n_kv, g, hd).transpose(0, 2, 1, 3, 4).reshape(B, n_kv, T * g, hd)
            seen = part.masks.get(g)
            if seen is None:  # [B, T, window] -> each token's row repeated for its g heads, once a pass
                seen = part.masks[g] = mx.repeat(part.visible, g, axis=1)[:, None]
        out = mx.softmax(mx.where(seen, q @ K.swapaxes(-1, -2), -mx.inf), axis=-1, precise=True) @ V
        if T > 1:
            out = out.reshape(B, n_kv, T, g, hd).transpose(0, 2, 1, 3, 4)
        return out.reshape(B * T, 1, -1)


def merge_heads(out, T: int):
    """Heads [B, n_q, T, head_dim] (for T = 1 any [B, ..., head_dim] in head order) -> [B, T, n_q * head_dim]."""
    B = out.shape[0]
    return out.reshape(B, 1, -1) if T == 1 else out.transpose(0, 2, 1, 3).reshape(B, T, -1)


class FeedForward(nn.Module):
    def __init__(self, cfg: OpenELMConfig, i: int):
        super().__init__()
        dim = cfg.ffn_dims[i]
        self.proj_1 = nn.Linear(cfg.model_dim, 2 * dim, bias=False)
        self.proj_2 = nn.Linear(dim, cfg.model_dim, bias=False)

    def __call__(self, x):
        gate, up = mx.split(self.proj_1(x), 2, axis=-1)
        return self.proj_2(nn.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: OpenELMConfig, i: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.model_dim, eps=cfg.rms_norm_eps)
        self.attn = Attention(cfg, i)
        self.ffn_norm = nn.RMSNorm(cfg.model_dim, eps=cfg.rms_norm_eps)
        self.ffn = FeedForward(cfg, i)

    def __call__(self, x, mask=None, cache=None):
        h = x + self.attn(self.attn_norm(x), mask, cache)
        return h + self.ffn(self.ffn_norm(h))

    def decode(self, x, parts: list, keys, values):
        a, keys, values = self.attn.decode(self.attn_norm(x), parts, keys, values)
        h = x + a
        return h + self.ffn(self.ffn_norm(h)), keys, values


class Transformer(nn.Module):
    def __init__(self, cfg: OpenELMConfig):
        super().__init__()
        self.token_embeddings = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.layers = [Block(cfg, i) for i in range(cfg.num_transformer_layers)]
        self.norm = nn.RMSNorm(cfg.model_dim, eps=cfg.rms_norm_eps)

    def __call__(self, tokens, cache=None):
        h = self.token_embeddings(tokens)
        cache = cache or [None] * len(self.layers)
        # A causal mask string lets SDPA build it on the fly, aligned to the
        # end of the keys, so it is right for a chunk that follows cached ones.
        mask = "causal" if h.shape[1] > 1 else None
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return self.norm(h)


class Model(nn.Module):
    """model(tokens[B, L], cache=None) -> logits[B, L, vocab] (L = 1 with last_only)."""

    def __init__(self, cfg: OpenELMConfig):
        super().__init__()
        self.config = cfg
        self.transformer = Transformer(cfg)
        if not cfg.share_input_output_layers:
            self.lm_head = nn.Linear(cfg.model_dim, cfg.vocab_size, bias=False)

    def __call__(self, tokens, cache=None, last_only=False):
        h = self.transformer(tokens, cache)
        if last_only:  # generation reads only the last position: skip the head's vocab x dim work for the others
            h = h[:, -1:, :]
        return self.head(h)

    def head(self, h):
        """Logits of final hidden states (the transformer's normed output), for
        callers that need only some positions (scoring reads the continuation's)."""
        if "lm_head" in self:
            return self.lm_head(h)
        return self.transformer.token_embeddings.as_linear(h)

    def decode(self, token, offsets, keys: list, values: list, fused_kernels: bool | None = None, rows=None,
               window: int | None = None):
        """The compiled steps' forward (see the module docstring): token int32
        [B, 1], row b at position offsets[b] (int32 array [B]), per-layer KV
        buffers of one capacity whose rows 0..B-1 hold positions < offsets
        (more rows may follow: the batch engine's, left as they are). ->
        (logits [B, vocab], keys, values) with these tokens' keys and values
        written in. token [B, T > 1] (speculative verification: row b's block
        at offsets[b] onward, each position seeing those before it) -> logits
        [B, T, vocab]. `rows` (int32 [B]): the buffer rows they are, if not
        0..B-1. fused_kernels: use mx.fast's RoPE and attention kernels
        (default: on a GPU backend; see Attention.cached_attention). window:
        attention reads only each row's first `window` positions (None: the
        whole buffer), which must hold every position a query sees."""
        (logits,), keys, values = self.decode_parts([(token, offsets, rows)], keys, values, fused_kernels, window)
        return logits, keys, values

    def decode_parts(self, parts: list, keys: list, values: list, fused_kernels: bool | None = None,
                     window: int | None = None):
        """decode() of several parts in one pass: parts [(token [B, T], offsets [B], rows [B] or None)],
        e.g. the batch engine's decode rows and a speculative row's block. Their tokens are packed, one
        row each, for the projections, RoPE, the cache writes and the FFN, so the weights are read once
        and each layer's op count barely grows with the parts; attention runs per part. No two parts
        may write the same row and position. -> ([logits per part, as decode()'s], keys, values)"""
        t = self.transformer
        if fused_kernels is None:
            fused_kernels = mx.default_device() != mx.cpu
        where = self.place(parts, window or keys[0].shape[2], fused_kernels)
        tokens = mx.concatenate([token.reshape(-1) for token, _, _ in parts]) if len(parts) > 1 else parts[0][0]
        h = t.token_embeddings(tokens.reshape(-1, 1))  # [N, 1, dim]
        new_keys, new_values = [], []
        for layer, k, v in zip(t.layers, keys, values):
            h, k, v = layer.decode(h, where, k, v)
            new_keys.append(k)
            new_values.append(v)
        logits = self.head(t.norm(h))[:, 0]  # [N, vocab]
        out = []
        for p in where.parts:
            (B, T), a = p.shape, logits if len(parts) == 1 else logits[p.span]
            out.append(a if T == 1 else a.reshape(B, T, -1))
        return out, new_keys, new_values

    def place(self, parts: list, window: int, fused_kernels: bool) -> "Pass":
        """Where decode_parts' tokens sit: query t of part row b is at offsets[b] + t and sees the
        positions up to it, of the first `window` attention reads."""
        where, positions, rows, first = [], [], [], 0
        for token, offsets, part_rows in parts:
            B, T = token.shape
            at = offsets[:, None] + mx.arange(T)[None]  # [B, T]
            visible = mx.arange(window)[None, None] <= at[:, :, None]  # [B, T, window]
            # As attention reads it: SDPA's [B, 1, T, window]; cached_attention's scores [B, kv heads,
            # g, window] for T = 1 (for T > 1 it lays the rows out per g: Position.masks).
            if fused_kernels or T == 1:
                visible = visible.reshape(B, 1, T, -1)
            where.append(Position(part_rows, visible, (B, T), first, {}))
            positions.append(at.reshape(-1))
            buffer_rows = mx.arange(B, dtype=mx.int32) if part_rows is None else part_rows
            rows.append(mx.broadcast_to(buffer_rows[:, None], (B, T)).reshape(-1))
            first += B * T
        positions = positions[0] if len(parts) == 1 else mx.concatenate(positions)
        rope = None if fused_kernels else self.rope_matrix(positions)[:, None]  # [N, 1, hd, hd]
        start, axes = None, ()
        if len(parts) == 1 and where[0].shape[0] == 1:  # one row: a slice update at its offset
            offsets, part_rows = parts[0][1], parts[0][2]
            start, axes = (offsets, (2,)) if part_rows is None else (mx.concatenate([part_rows, offsets]), (0, 2))
            rows = None
        else:
            rows = rows[0] if len(rows) == 1 else mx.concatenate(rows)
        return Pass(positions, rows, rope, where, start, axes, window)

    def rope_matrix(self, offsets):
        """R[b] with x @ R[b] == mx.fast.rope(x, offset=offsets[b]) (non-traditional,
        every dimension rotated) -> [B, head_dim, head_dim]: built once per step and
        shared by all layers. The angles are computed as MLX's rope does, bit for bit."""
        hd, half = self.config.head_dim, self.config.head_dim // 2
        inv_freq = mx.exp(-mx.arange(half, dtype=mx.float32) * (math.log(self.config.rope_freq_constant) / half))
        angle = offsets.astype(mx.float32)[:, None] * inv_freq
        cos, sin = mx.cos(angle), mx.sin(angle)
        # x @ R: out[j] = x[j] cos - x[j + half] sin, out[j + half] = x[j + half] cos + x[j] sin.
        eye = np.eye(hd, dtype=np.float32)
        swap = np.zeros((hd, hd), np.float32)
        swap[np.arange(half) + half, np.arange(half)] = -1
        swap[np.arange(half), np.arange(half) + half] = 1
        cos, sin = mx.concatenate([cos, cos], axis=-1)[:, None], mx.concatenate([sin, sin], axis=-1)[:, None]
        rope = mx.array(eye) * cos + mx.array(swap) * sin
        return rope.astype(self.transformer.norm.weight.dtype)

    @property
    def layers(self):
        return self.transformer.layers

    @property
    def dtype(self) -> mx.Dtype:
        """The compute dtype (that of the float weights; quantized layers keep scales in it)."""
        return self.transformer.norm.weight.dtype
