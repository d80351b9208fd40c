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
replays it for every token (elm_mlx/step.py)."""

import itertools
import math
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import OpenELMConfig


class Position(NamedTuple):
    """Where one part of a compiled forward's tokens go (Model.position): B rows of T tokens, row b's
    at offsets[b] (int32 [B]) onward in buffer row rows[b] (None: row b), each query seeing the
    positions `visible` (bool [B, 1, T, capacity]) marks; rope: the rotations as matrices (None:
    mx.fast's kernels)."""
    offsets: mx.array
    rows: mx.array | None
    visible: mx.array
    rope: mx.array | None
    shape: tuple
    start: mx.array | None  # one row (B = 1): where its block starts in the buffers, on axes `axes`
    axes: tuple


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
        row's rotation as a matrix instead of mx.fast.rope (Model.rope_matrix; [B, 1,
        hd, hd] for one token, [B, 1, T, hd, hd] for T), see decode."""
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
        if T == 1:
            return q @ rope, k @ rope, v
        return *((a[:, :, :, None] @ rope)[:, :, :, 0] for a in (q, k)), v

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

    def decode(self, x, parts: list, keys, values):
        """The compiled forward's attention (Model.decode_parts): x holds the tokens of `parts`, each
        part B rows of T tokens (T = 1: decoding; T > 1: a speculative block, or one token and scratch
        after it) -- x [B, T, dim] for one part, else all packed as [1, sum B * T, dim], so that the
        projections read the weights once. Per part (a Position): row b's tokens are at positions
        offsets[b] .. offsets[b] + T - 1; their keys and values are written into buffer rows `rows`
        (default 0..B-1) of the fixed-size keys/values [R, kv_heads, capacity, head_dim], and each
        query attends to the positions `visible` marks. -> (out, keys, values)"""
        qkv = self.qkv_proj(x)
        if len(parts) == 1:
            blocks = [qkv]
        else:
            sizes = [p.shape for p in parts]
            cuts = list(itertools.accumulate(b * t for b, t in sizes))[:-1]
            blocks = [a.reshape(b, t, -1) for a, (b, t) in zip(mx.split(qkv[0], cuts), sizes)]
        outs = []
        for qkv, part in zip(blocks, parts):
            out, keys, values = self.cached_attention(qkv, part, keys, values)
            outs.append(out)
        out = outs[0] if len(outs) == 1 else mx.concatenate([o.reshape(1, -1, o.shape[-1]) for o in outs], axis=1)
        return self.out_proj(out), keys, values

    def cached_attention(self, qkv, part, keys, values):
        """One part's attention over the KV buffers (decode), its new keys and values written in.
        `part.rope` set: RoPE as matrices and attention as an explicit GQA matmul pair, fewer,
        larger ops than the CPU backend's composed mx.fast kernels, since a CPU decode step is
        bound by their count. None: mx.fast.rope and mx.fast.scaled_dot_product_attention, single
        kernels on a GPU. -> (heads merged [B, T, n_q * head_dim], keys, values)"""
        (B, T), hd, offsets, rows = qkv.shape[:2], self.head_dim, part.offsets, part.rows
        q, k, v = self.heads(qkv, offsets, part.rope)
        if B == 1:  # one row (a sequence's step or block, a speculative row's block): a slice update
            keys = mx.slice_update(keys, k, part.start, axes=part.axes)
            values = mx.slice_update(values, v, part.start, axes=part.axes)
        else:  # each row at its own position: one scatter
            at = mx.arange(B) if rows is None else rows
            if T == 1:
                keys[at, :, offsets], values[at, :, offsets] = k[:, :, 0], v[:, :, 0]
            else:
                positions = offsets[:, None] + mx.arange(T)[None]
                keys[at[:, None], :, positions] = k.transpose(0, 2, 1, 3)
                values[at[:, None], :, positions] = v.transpose(0, 2, 1, 3)
        if rows is not None:
            K, V = (keys[rows], values[rows]) if B > 1 else (
                mx.slice(a, rows, axes=(0,), slice_size=(1, *a.shape[1:])) for a in (keys, values))
        else:
            K, V = (keys, values) if keys.shape[0] == B else (keys[:B], values[:B])
        if part.rope is None:
            return self.sdpa(q, K, V, part.visible), keys, values
        # Query head h reads KV head h // g, as SDPA does: group g's queries are rows (i, t) of one matmul.
        g = self.n_q // self.n_kv
        q = (q * hd**-0.5).reshape(B, self.n_kv, g * T, hd)
        seen = part.visible if T == 1 else mx.tile(part.visible, (1, 1, g, 1))
        scores = mx.where(seen, q @ K.swapaxes(-1, -2), -mx.inf)
        out = mx.softmax(scores, axis=-1, precise=True) @ V
        return merge_heads(out if T == 1 else out.reshape(B, self.n_q, T, hd), T), keys, values


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

    def decode(self, token, offsets, keys: list, values: list, fused_kernels: bool | None = None, rows=None):
        """The compiled steps' forward (see the module docstring): token int32
        [B, 1], row b at position offsets[b] (int32 array [B]), per-layer KV
        buffers of one capacity whose rows 0..B-1 hold positions < offsets
        (more rows may follow: the batch engine's, left as they are). ->
        (logits [B, vocab], keys, values) with these tokens' keys and values
        written in. token [B, T > 1] (speculative verification: row b's block
        at offsets[b] onward, each position seeing those before it) -> logits
        [B, T, vocab]. `rows` (int32 [B]): the buffer rows they are, if not
        0..B-1. fused_kernels: use mx.fast's RoPE and attention kernels
        (default: on a GPU backend; see Attention.cached_attention)."""
        (logits,), keys, values = self.decode_parts([(token, offsets, rows)], keys, values, fused_kernels)
        return logits, keys, values

    def decode_parts(self, parts: list, keys: list, values: list, fused_kernels: bool | None = None):
        """decode() of several parts in one pass: parts [(token [B, T], offsets [B], rows [B] or None)],
        e.g. the batch engine's decode rows and a speculative row's block. Their tokens are packed along
        one axis for the projections and the FFN, so the weights are read once; attention runs per part.
        A later part's writes land after an earlier one's (a decode row's scratch token, then a block at
        the same position). -> ([logits per part, as decode()'s], keys, values)"""
        t = self.transformer
        if fused_kernels is None:
            fused_kernels = mx.default_device() != mx.cpu
        where = [self.position(token.shape, offsets, rows, keys[0].shape[2], fused_kernels)
                 for token, offsets, rows in parts]
        if len(parts) == 1:
            h = t.token_embeddings(parts[0][0])
        else:
            h = t.token_embeddings(mx.concatenate([token.reshape(1, -1) for token, _, _ in parts], axis=1))
        new_keys, new_values = [], []
        for layer, k, v in zip(t.layers, keys, values):
            h, k, v = layer.decode(h, where, k, v)
            new_keys.append(k)
            new_values.append(v)
        logits = self.head(t.norm(h))
        if len(parts) == 1:
            blocks = [logits]
        else:
            cuts = list(itertools.accumulate(b * n for b, n in (p.shape for p in where)))[:-1]
            blocks = [a.reshape(*p.shape, -1) for a, p in zip(mx.split(logits[0], cuts), where)]
        return [a[:, -1, :] if a.shape[1] == 1 else a for a in blocks], new_keys, new_values

    def position(self, shape, offsets, rows, capacity: int, fused_kernels: bool) -> "Position":
        """Where a part's tokens [B, T] sit (decode_parts): query t of row b is at offsets[b] + t and
        sees the positions up to it."""
        B, T = shape
        last = offsets[:, None] + mx.arange(T)[None]
        visible = (mx.arange(capacity)[None, None] <= last[:, :, None]).reshape(B, 1, T, -1)
        rope = None
        if not fused_kernels:
            rope = self.rope_matrix(last.reshape(-1)).reshape(B, 1, T, *([self.config.head_dim] * 2))
            rope = rope[:, :, 0] if T == 1 else rope  # [B, 1, hd, hd] for one token
        start, axes = None, ()
        if B == 1:
            start, axes = (offsets, (2,)) if rows is None else (mx.concatenate([rows, offsets]), (0, 2))
        return Position(offsets, rows, visible, rope, (B, T), start, axes)

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
