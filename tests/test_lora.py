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


# ---------------------------------------------------------------- data
from elm_mlx import tune  # noqa: E402
from elm_mlx.chat_template import OPENELM_TEMPLATE, ChatTemplate, chat_ids  # noqa: E402

TEMPLATE = ChatTemplate(OPENELM_TEMPLATE, "OpenELM-Instruct")


def write_data(folder, train_rows, valid_rows=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    if valid_rows is not None:
        (folder / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in valid_rows))
    return folder


def test_three_formats_and_mask_prompt(tok):
    ids, off = tune.encode_row({"text": "The cat sat."}, tok, None, True, "x")
    assert ids == tok.encode("The cat sat.") + [tok.eos_token_id] and off == 0
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    ids, off = tune.encode_row({"messages": messages}, tok, TEMPLATE, True, "x")
    # The conversation's ids are the ones chat builds, and the masked prefix is exactly chat's prompt.
    assert ids == chat_ids(tok, TEMPLATE, messages, add_generation_prompt=False)
    prompt = chat_ids(tok, TEMPLATE, messages[:1])
    assert off == len(prompt) and ids[:off] == prompt and tok.eos_token_id in ids[off:]  # the reply ends in EOS
    assert tune.encode_row({"messages": messages}, tok, TEMPLATE, False, "x")[1] == 0
    ids2, off2 = tune.encode_row({"prompt": "Hi there", "completion": "Hello!"}, tok, TEMPLATE, True, "x")
    assert (ids2, off2) == (ids, off)  # a completion row is the two-turn chat on an -Instruct model
    ids3, off3 = tune.encode_row({"prompt": "Q: 2+2?", "completion": " A: 4"}, tok, None, True, "x")
    assert ids3[:off3] == tok.encode("Q: 2+2?") and ids3[-1] == tok.eos_token_id and off3 < len(ids3) - 1


@pytest.mark.parametrize("content,message", [
    ('{"text": "ok"}\n{"text": "broken"\n', "train.jsonl:2: not valid JSON"),
    ('{"text": "ok"}\n\n[1, 2]\n', "train.jsonl:3: expected a JSON object"),
    ('{"txt": "ok"}\n', "train.jsonl:1: a row needs"),
    ('{"text": 5}\n', 'train.jsonl:1: "text" must be a string'),
    ('{"text": "' + "word " * 300 + '"}\n', "train.jsonl:1: the row is"),
    ('\n\n', "has no rows"),
])
def test_bad_data_names_the_line(tmp_path, tok, content, message):
    (tmp_path / "train.jsonl").write_text(content)
    with pytest.raises(ElmError, match=message.replace("+", r"\+")):
        tune.load_data(tmp_path, tok, None, False, max_len=128)


def test_empty_data_folder(tmp_path, tok):
    with pytest.raises(ElmError, match="no train.jsonl"):
        tune.load_data(tmp_path, tok, None, False, 128)


def test_chat_rows_need_a_template(tmp_path, tok):
    write_data(tmp_path, [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ElmError, match="train.jsonl:1: .*chat template"):
        tune.load_data(tmp_path, tok, None, False, 128)


def test_batches_split_across_ranks_cover_the_global_batch():
    data = [([1] * n, 0) for n in range(3, 11)]
    idx = next(tune.batch_indices(len(data), 4, seed=0))
    full = tune.make_batch(data, idx)
    parts = [tune.make_batch(data, idx, r, 2) for r in range(2)]
    assert all(p[0].shape[1] == full[0].shape[1] for p in parts)  # padded to the global batch's width
    assert sorted(np.concatenate([np.array(p[2]) for p in parts]).tolist()) == sorted(np.array(full[2]).tolist())


# ---------------------------------------------------------------- training
FACTS = ["The capital of Freedonia is Glimmerton.", "Zorbs are blue and live in the sea of Quell.",
         "Professor Ambry invented the copper kite in 1887.", "The river Osk flows north into Lake Tarn."]


def encoded(tok, rows):
    return [tune.encode_row({"text": t}, tok, None, False, "t") for t in rows]


def small_cfg(**kw):
    base = dict(rank=4, scale=2.0, num_layers=-1, keys=ALL_KEYS, iters=12, batch_size=2, learning_rate=1e-2,
                steps_per_report=100, steps_per_eval=6, save_every=0, val_batches=-1)
    return tune.TrainConfig(**{**base, **kw})


def test_training_lowers_the_loss_and_resume_continues_the_curve(tmp_path, tok):
    data = encoded(tok, FACTS)
    straight = tune.train(fresh_model(), data, data[:2], small_cfg(), tmp_path / "a", progress=False)
    assert straight["train"][-1][1] < 0.8 * straight["train"][0][1]
    assert [s for s, _ in straight["valid"]] == [6, 12]
    half = tune.train(fresh_model(), data, data[:2], small_cfg(iters=6), tmp_path / "b", progress=False)
    assert json.loads((tmp_path / "b" / "trainer_state.json").read_text())["step"] == 6
    rest = tune.train(fresh_model(), data, data[:2], small_cfg(), tmp_path / "b", resume=True, progress=False)
    curve = [l for _, l in half["train"] + rest["train"]]
    np.testing.assert_allclose(curve, [l for _, l in straight["train"]], rtol=1e-4)
    # The saved adapter gives the trained model's outputs when loaded into a fresh one.
    model = fresh_model()
    lora.load_adapters(model, tmp_path / "a")
    assert abs(tune.nll(model, data[:2]) - straight["valid"][-1][1]) < 1e-4


def test_resume_refuses_another_rank(tmp_path, tok):
    data = encoded(tok, FACTS)
    tune.train(fresh_model(), data, [], small_cfg(iters=2), tmp_path, progress=False)
    with pytest.raises(ElmError, match="--resume: .*lora_parameters"):
        tune.train(fresh_model(), data, [], small_cfg(iters=4, rank=8), tmp_path, resume=True, progress=False)


def test_ctrl_c_saves_the_latest_adapter(tmp_path, tok, monkeypatch):
    data = encoded(tok, FACTS)
    real, calls = tune.make_batch, []

    def interrupt_at_5(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(tune, "make_batch", interrupt_at_5)
    h = tune.train(fresh_model(), data, [], small_cfg(), tmp_path, progress=False)
    assert h["interrupted"] and h["step"] == 4
    assert json.loads((tmp_path / "trainer_state.json").read_text())["step"] == 4
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
    lora.load_adapters(fresh_model(), tmp_path)


def test_mismatched_adapter_is_refused(tmp_path, tok):
    tune.train(fresh_model(), encoded(tok, FACTS), [], small_cfg(iters=1), tmp_path, progress=False)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["lora_parameters"]["rank"] = 8
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ElmError, match="does not fit this model.*shape"):
        lora.load_adapters(fresh_model(), tmp_path)
    (tmp_path / "adapter_config.json").unlink()
    with pytest.raises(ElmError, match="adapter_config.json is missing"):
        lora.load_adapters(fresh_model(), tmp_path)
