"""LoRA / DoRA adapters: layers against a float64 NumPy reference (forward and
gradients), on a model (fused == adapted, QLoRA), the adapter files, mlx-lm
interop both ways, the trainer and the CLI."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from elm_mlx import lora
from elm_mlx.errors import ElmError

RNG = np.random.default_rng(0)


def f64(a):
    return np.array(a.astype(mx.float32), dtype=np.float64)


def randomize(layer, rng=RNG):
    """Non-zero adapter weights (lora_b starts at zero, which hides mistakes)."""
    layer.lora_a = mx.array(rng.normal(size=layer.lora_a.shape).astype(np.float32) * 0.3)
    layer.lora_b = mx.array(rng.normal(size=layer.lora_b.shape).astype(np.float32) * 0.3)
    if "m" in layer:
        layer.m = layer.m * mx.array(rng.uniform(0.5, 1.5, size=layer.m.shape).astype(np.float32))


def grads_of(layer, fn, G):
    def loss(params):
        layer.update(params)
        return (fn() * G).sum()

    params = layer.trainable_parameters()
    return {k: f64(v) for k, v in tree_flatten(mx.grad(loss)(params))}


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_linear_forward_and_gradients_match_float64_reference(kind):
    base = nn.Linear(12, 10, bias=False)
    base.freeze()
    layer = (lora.DoRALinear if kind == "dora" else lora.LoRALinear)(base, rank=3, scale=1.7)
    randomize(layer)
    x = mx.array(RNG.normal(size=(2, 5, 12)).astype(np.float32))
    G = mx.array(RNG.normal(size=(2, 5, 10)).astype(np.float32))
    W, A, B, X, g, s = f64(base.weight), f64(layer.lora_a), f64(layer.lora_b), f64(x), f64(G), 1.7
    pre = X @ W.T + s * (X @ A) @ B
    if kind == "lora":
        ref, factor = pre, np.ones(10)
    else:
        d = np.linalg.norm(W + s * B.T @ A.T, axis=1)
        factor = f64(layer.m) / d
        ref = factor * pre
    np.testing.assert_allclose(f64(layer(x)), ref, rtol=1e-4, atol=1e-4)
    grads = grads_of(layer, lambda: layer(x), G)
    gf = g * factor  # the norm is a constant to the gradient (stop_gradient)
    Xf, gff = X.reshape(-1, 12), gf.reshape(-1, 10)
    np.testing.assert_allclose(grads["lora_b"], s * (Xf @ A).T @ gff, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads["lora_a"], s * Xf.T @ (gff @ B.T), rtol=1e-4, atol=1e-4)
    assert "linear" not in str(sorted(grads))  # the base is frozen
    if kind == "dora":
        np.testing.assert_allclose(grads["m"], ((g * pre) / d).reshape(-1, 10).sum(0), rtol=1e-4, atol=1e-4)
    fused = layer.fuse()
    np.testing.assert_allclose(f64(fused(x)), ref, rtol=1e-4, atol=1e-4)


def test_embedding_lookup_and_tied_head_match_float64_reference():
    base = nn.Embedding(20, 8)
    base.freeze()
    layer = lora.LoRAEmbedding(base, rank=2, scale=0.8)
    randomize(layer)
    E, A, B, s = f64(base.weight), f64(layer.lora_a), f64(layer.lora_b), 0.8
    ids = mx.array([[1, 5, 5, 19]])
    Eadapted = E + s * A @ B
    np.testing.assert_allclose(f64(layer(ids))[0], Eadapted[[1, 5, 5, 19]], rtol=1e-5, atol=1e-5)
    h = mx.array(RNG.normal(size=(1, 4, 8)).astype(np.float32))
    np.testing.assert_allclose(f64(layer.as_linear(h))[0], f64(h)[0] @ Eadapted.T, rtol=1e-4, atol=1e-4)
    G = mx.array(RNG.normal(size=(1, 4, 8)).astype(np.float32))
    grads = grads_of(layer, lambda: layer(ids), G)
    g = f64(G)[0]
    dA = np.zeros_like(A)
    np.add.at(dA, [1, 5, 5, 19], s * g @ B.T)
    np.testing.assert_allclose(grads["lora_a"], dA, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads["lora_b"], s * A[[1, 5, 5, 19]].T @ g, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(f64(layer.fuse().weight), Eadapted, rtol=1e-5, atol=1e-5)


def randomize_model(model, seed=1):
    rng = np.random.default_rng(seed)
    for _, m in model.named_modules():
        if isinstance(m, lora.ADAPTED):
            randomize(m, rng)
    mx.eval(model.parameters())


def fresh_model():
    from checkpoints import random_weights
    from engine import TINY_32K, build

    return build(TINY_32K, random_weights(TINY_32K, seed=3))


ALL_KEYS = ["qkv_proj", "out_proj", "proj_1", "proj_2", "token_embeddings"]


@pytest.mark.parametrize("kind,quant", [("lora", None), ("dora", None), ("lora", "q4"), ("dora", "q8")])
def test_fused_equals_adapted_on_a_model(kind, quant):
    from elm_mlx.quant import quantize_in_memory

    model = fresh_model()
    if quant:
        quantize_in_memory(model, quant)
    lora.apply_adapters(model, kind, rank=4, scale=2.0, num_layers=2, keys=ALL_KEYS)
    # Only the last 2 layers and the embedding are adapted.
    assert not isinstance(model.layers[0].attn.qkv_proj, lora.ADAPTED)
    assert isinstance(model.layers[2].ffn.proj_2, lora.DoRALinear if kind == "dora" else lora.LoRALinear)
    assert type(model.transformer.token_embeddings) is lora.LoRAEmbedding  # the paper's: the embedding stays LoRA
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert trainable and all(k.rsplit(".", 1)[-1] in lora.ADAPTER_LEAVES for k in trainable)
    randomize_model(model)
    model.eval()
    tokens = mx.array([[1, 450, 4996, 17354, 1701, 29916]])
    adapted = f64(model(tokens))
    base_model = fresh_model()
    if quant:
        quantize_in_memory(base_model, quant)
    assert np.abs(adapted - f64(base_model(tokens))).max() > 1e-2  # the adapter changes the output
    lora.fuse(model, dequantize=quant is not None)
    assert not any(isinstance(m, lora.ADAPTED) for _, m in model.named_modules())
    np.testing.assert_allclose(f64(model(tokens)), adapted, rtol=0, atol=1e-4)
