"""OpenELM in MLX. Every layer has its own query/KV head count and FFN width
(layer-wise scaling); module names follow Apple's HF checkpoints so their
safetensors load without renaming."""

import mlx.core as mx
import mlx.nn as nn

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

    def __call__(self, x, mask=None, cache=None):
        B, L, _ = x.shape
        qkv = self.qkv_proj(x).reshape(B, L, self.n_q + 2 * self.n_kv, self.head_dim)
        q, k, v = mx.split(qkv.transpose(0, 2, 1, 3), [self.n_q, self.n_q + self.n_kv], axis=1)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        # Keys are cached after RoPE, so each step rotates only its new positions.
        offset = cache.offset if cache is not None else 0
        q = mx.fast.rope(q, self.head_dim, traditional=False, base=self.rope_base, scale=1.0, offset=offset)
        k = mx.fast.rope(k, self.head_dim, traditional=False, base=self.rope_base, scale=1.0, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        # GQA: SDPA maps query head h to KV head h // (n_q / n_kv) itself, so
        # K and V are never repeated.
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


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

    @property
    def layers(self):
        return self.transformer.layers

    @property
    def dtype(self) -> mx.Dtype:
        """The compute dtype (that of the float weights; quantized layers keep scales in it)."""
        return self.transformer.norm.weight.dtype
