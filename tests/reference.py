"""Float64 NumPy forward pass of OpenELM (HF / PyTorch semantics, reference section 3).

Independent test oracle: written from the reference document, not from any MLX code.
Weights use HF key names and PyTorch [out, in] shapes; batch of one, no cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

EPS = 1e-6


def _f64(w) -> np.ndarray:
    return np.asarray(w, dtype=np.float64)


def rms_norm(x: np.ndarray, weight) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * _f64(weight)


def linear(x: np.ndarray, weight) -> np.ndarray:
    """PyTorch F.linear without bias: x @ W^T, W is [out, in]."""
    return x @ _f64(weight).T


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def rope(x: np.ndarray, base: float) -> np.ndarray:
    """GPT-NeoX rotate_half RoPE on [heads, S, hd] at positions 0..S-1."""
    hd, S = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / base ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    theta = np.outer(np.arange(S, dtype=np.float64), inv_freq)  # [S, hd/2]
    emb = np.concatenate([theta, theta], axis=-1)                # [S, hd]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    rotated = np.concatenate([-x2, x1], axis=-1)
    return x * np.cos(emb) + rotated * np.sin(emb)


def attention(x: np.ndarray, w: dict, p: str, cfg: dict, i: int) -> np.ndarray:
    S, hd = x.shape[0], cfg["head_dim"]
    nq, nkv = cfg["num_query_heads"][i], cfg["num_kv_heads"][i]
    W_qkv = w[p + "attn.qkv_proj.weight"]
    assert W_qkv.shape[0] == (nq + 2 * nkv) * hd, (p, W_qkv.shape, nq, nkv)
    qkv = linear(x, W_qkv).reshape(S, nq + 2 * nkv, hd).transpose(1, 0, 2)  # [heads, S, hd]
    q, k, v = qkv[:nq], qkv[nq: nq + nkv], qkv[nq + nkv:]
    if cfg.get("normalize_qk_projections", True):
        q = rms_norm(q, w[p + "attn.q_norm.weight"])  # one [hd] weight shared by all heads
        k = rms_norm(k, w[p + "attn.k_norm.weight"])
    base = float(cfg.get("rope_freq_constant", 10000))
    q, k = rope(q, base), rope(k, base)
    k = np.repeat(k, nq // nkv, axis=0)  # repeat_interleave: q head h uses kv head h // (nq/nkv)
    v = np.repeat(v, nq // nkv, axis=0)
    scores = q @ k.transpose(0, 2, 1) * hd ** -0.5                        # [nq, S, S]
    scores = np.where(np.tril(np.ones((S, S), dtype=bool)), scores, -np.inf)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = scores / scores.sum(axis=-1, keepdims=True)
    out = (probs @ v).transpose(1, 0, 2).reshape(S, nq * hd)
    return linear(out, w[p + "attn.out_proj.weight"])


def ffn(x: np.ndarray, w: dict, p: str) -> np.ndarray:
    W1, W2 = w[p + "ffn.proj_1.weight"], w[p + "ffn.proj_2.weight"]
    f = W2.shape[1]
    assert W1.shape[0] == 2 * f, (p, W1.shape, W2.shape)
    y = linear(x, W1)
    gate, up = y[:, :f], y[:, f:]
    return linear(silu(gate) * up, W2)


def reference_logits(weights: dict, cfg: dict, tokens: Sequence[int]) -> np.ndarray:
    """Logits [len(tokens), vocab] in float64 for one sequence, no cache."""
    emb = weights["transformer.token_embeddings.weight"]
    x = _f64(emb[np.asarray(tokens, dtype=np.int64)])  # no embedding scaling
    for i in range(cfg["num_transformer_layers"]):
        p = f"transformer.layers.{i}."
        h = x + attention(rms_norm(x, weights[p + "attn_norm.weight"]), weights, p, cfg, i)
        x = h + ffn(rms_norm(h, weights[p + "ffn_norm.weight"]), weights, p)
    x = rms_norm(x, weights["transformer.norm.weight"])
    if cfg.get("share_input_output_layers", True):
        return linear(x, emb)
    return linear(x, weights["lm_head.weight"])
