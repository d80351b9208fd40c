"""OpenELM in MLX. Every layer has its own query/KV head count and FFN width
(layer-wise scaling); module names follow Apple's HF checkpoints so their
safetensors load without renaming.

Two forwards share the layers' arithmetic: `Model.__call__` is the eager
reference (any number of tokens, the cache grows and is sliced in Python), and
`Model.decode` is a pure function of one token, its position as an array and
fixed-size KV buffers, so that `mx.compile` traces it once per buffer size and
replays it for every token (elm_mlx/step.py)."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import OpenELMConfig


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

    def qkv(self, x, offset):
        """Queries, keys and values [B, heads, L, head_dim] of x, rotated for
        positions offset.. (an int, or an int32 array in a compiled step)."""
        B, L, _ = x.shape
        qkv = self.qkv_proj(x).reshape(B, L, self.n_q + 2 * self.n_kv, self.head_dim)
        q, k, v = mx.split(qkv.transpose(0, 2, 1, 3), [self.n_q, self.n_q + self.n_kv], axis=1)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        # Keys are cached after RoPE, so each step rotates only its new positions.
        q = mx.fast.rope(q, self.head_dim, traditional=False, base=self.rope_base, scale=1.0, offset=offset)
        k = mx.fast.rope(k, self.head_dim, traditional=False, base=self.rope_base, scale=1.0, offset=offset)
        return q, k, v

    def attend(self, q, k, v, mask):
        # GQA: SDPA maps query head h to KV head h // (n_q / n_kv) itself, so
        # K and V are never repeated.
        B, _, L, _ = q.shape
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def __call__(self, x, mask=None, cache=None):
        q, k, v = self.qkv(x, cache.offset if cache is not None else 0)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        return self.attend(q, k, v, mask)

    def decode(self, x, offsets, rope, visible, keys, values, rows=None):
        """One token per row x[B, 1, dim], row b at position offsets[b] (int32
        array [B]): its key and value are written into rows 0..B-1 of the
        fixed-size buffers keys/values [R >= B, kv_heads, capacity, head_dim]
        at that position, and it attends to the positions `visible` (bool
        [B, 1, 1, capacity]) marks. Heads-major is a reshape when L = 1.
        `rope`: each row's rotation as a [B, 1, head_dim, head_dim] matrix
        (Model.rope_matrix), with attention as an explicit GQA matmul pair:
        fewer, larger ops than the CPU backend's composed mx.fast kernels,
        since a CPU decode step is bound by their count. None: mx.fast.rope
        and mx.fast.scaled_dot_product_attention, single kernels on a GPU.
        -> (out, keys, values)"""
        if x.shape[1] > 1:
            return self.decode_block(x, offsets, rope, visible, keys, values, rows)
        B, n_q, n_kv, hd = x.shape[0], self.n_q, self.n_kv, self.head_dim
        qkv = self.qkv_proj(x).reshape(B, n_q + 2 * n_kv, 1, hd)
        q, k, v = mx.split(qkv, [n_q, n_q + n_kv], axis=1)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is None:
            rotate = dict(traditional=False, base=self.rope_base, scale=1.0, offset=offsets if B > 1 else offsets[0])
            q, k = mx.fast.rope(q, hd, **rotate), mx.fast.rope(k, hd, **rotate)
        else:
            q, k = q @ rope, k @ rope
        if B == 1:  # one row (the single-sequence step): a slice update
            keys = mx.slice_update(keys, k, offsets, axes=(2,))
            values = mx.slice_update(values, v, offsets, axes=(2,))
        else:  # each row at its own position: one scatter
            rows = mx.arange(B)
            keys[rows, :, offsets] = k[:, :, 0]
            values[rows, :, offsets] = v[:, :, 0]
        K, V = (keys, values) if keys.shape[0] == B else (keys[:B], values[:B])
        if rope is None:
            out = mx.fast.scaled_dot_product_attention(q, K, V, scale=hd**-0.5, mask=visible)
        else:
            # Query head h reads KV head h // (n_q / n_kv), as SDPA does.
            q = (q * hd**-0.5).reshape(B, n_kv, n_q // n_kv, hd)
            scores = mx.where(visible, q @ K.swapaxes(-1, -2), -mx.inf)
            out = mx.softmax(scores, axis=-1, precise=True) @ V
        return self.out_proj(out.reshape(B, 1, n_q * hd)), keys, values

    def decode_block(self, x, offsets, rope, visible, keys, values, rows=None):
        """decode() for T > 1 tokens per row (x [B, T, dim]: a speculative block, or one token and
        scratch after it), row b's at positions offsets[b] .. offsets[b] + T - 1, `visible`
        [B, 1, T, capacity]. `rope` [B, 1, T, head_dim, head_dim] per position, with explicit GQA
        attention (the CPU's fewer ops, as for one token); None: mx.fast's kernels. `rows`
        (int32 [B]): the buffer rows the blocks are (default 0..B-1), e.g. one batch row's."""
        B, T, n_q, n_kv, hd = *x.shape[:2], self.n_q, self.n_kv, self.head_dim
        qkv = self.qkv_proj(x).reshape(B, T, n_q + 2 * n_kv, hd).transpose(0, 2, 1, 3)
        q, k, v = mx.split(qkv, [n_q, n_q + n_kv], axis=1)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is None:
            rotate = dict(traditional=False, base=self.rope_base, scale=1.0, offset=offsets if B > 1 else offsets[0])
            q, k = mx.fast.rope(q, hd, **rotate), mx.fast.rope(k, hd, **rotate)
        else:
            q, k = ((a[:, :, :, None] @ rope)[:, :, :, 0] for a in (q, k))
        at, positions = mx.arange(B) if rows is None else rows, offsets[:, None] + mx.arange(T)[None]
        keys[at[:, None], :, positions] = k.transpose(0, 2, 1, 3)
        values[at[:, None], :, positions] = v.transpose(0, 2, 1, 3)
        if rows is not None:
            K, V = keys[rows], values[rows]
        else:
            K, V = (keys, values) if keys.shape[0] == B else (keys[:B], values[:B])
        if rope is None:
            out = mx.fast.scaled_dot_product_attention(q, K, V, scale=hd**-0.5, mask=visible)
        else:  # query head h reads KV head h // g; rows (i, t) of group g's queries see as position t does
            g = n_q // n_kv
            q = (q * hd**-0.5).reshape(B, n_kv, g * T, hd)
            seen = mx.broadcast_to(visible[:, :, None], (B, 1, g, T, visible.shape[-1])).reshape(B, 1, g * T, -1)
            scores = mx.where(seen, q @ K.swapaxes(-1, -2), -mx.inf)
            out = (mx.softmax(scores, axis=-1, precise=True) @ V).reshape(B, n_q, T, hd)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, T, n_q * hd)), keys, values


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

    def decode(self, x, offsets, rope, visible, keys, values, rows=None):
        a, keys, values = self.attn.decode(self.attn_norm(x), offsets, rope, visible, keys, values, rows)
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
        [B, T, vocab]; `rows` (int32 [B], T > 1 only): the buffer rows they are, if not 0..B-1. fused_kernels: use mx.fast's RoPE and attention kernels
        (default: on a GPU backend; see Attention.decode)."""
        t = self.transformer
        if fused_kernels is None:
            fused_kernels = mx.default_device() != mx.cpu
        B, T = token.shape
        # Query t of row b sees positions <= offsets[b] + t.
        last = offsets[:, None] + mx.arange(T)[None]
        visible = (mx.arange(keys[0].shape[2])[None, None] <= last[:, :, None]).reshape(B, 1, T, -1)
        rope = None if fused_kernels else self.rope_matrix(last.reshape(-1)).reshape(B, 1, T, *([self.config.head_dim] * 2))
        rope = rope[:, :, 0] if T == 1 and rope is not None else rope  # [B, 1, hd, hd] for one token
        h = t.token_embeddings(token)
        new_keys, new_values = [], []
        for layer, k, v in zip(t.layers, keys, values):
            h, k, v = layer.decode(h, offsets, rope, visible, k, v, rows)
            new_keys.append(k)
            new_values.append(v)
        logits = self.head(t.norm(h))
        return (logits[:, -1, :] if T == 1 else logits), new_keys, new_values

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
