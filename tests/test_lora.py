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


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_qlora_trains_over_a_q4_base_which_stays_frozen(tmp_path, tok, kind):
    from elm_mlx.quant import quantize_in_memory

    model = quantize_in_memory(fresh_model(), "q4")
    packed = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    h = tune.train(model, encoded(tok, FACTS), [], small_cfg(fine_tune_type=kind), tmp_path, progress=False)
    assert isinstance(model.layers[0].attn.qkv_proj.linear, nn.QuantizedLinear)
    assert h["train"][-1][1] < 0.8 * h["train"][0][1]
    after = dict(tree_flatten(model.parameters()))
    for k, v in packed.items():  # the base's packed weights, scales and biases are untouched
        path = k.replace(".qkv_proj.", ".qkv_proj.linear.").replace(".out_proj.", ".out_proj.linear.")
        path = path.replace(".proj_1.", ".proj_1.linear.").replace(".proj_2.", ".proj_2.linear.")
        path = path.replace("token_embeddings.", "token_embeddings.embedding.")
        assert np.array_equal(np.array(after[path]), v), k


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


# ---------------------------------------------------------------- CLI
from typer.testing import CliRunner  # noqa: E402

from elm_mlx import generate, load  # noqa: E402
from elm_mlx.cli import app  # noqa: E402

runner = CliRunner()
CHAT_ROWS = [{"messages": [{"role": "user", "content": f"What is fact {i}?"},
                           {"role": "assistant", "content": FACTS[i]}]} for i in range(4)]


def test_cli_lora_fuse_and_adapter_path(tmp_path, instruct_folder):
    data = write_data(tmp_path / "data", CHAT_ROWS, CHAT_ROWS[:2])
    out = tmp_path / "adapter"
    args = ["lora", "--model", str(instruct_folder), "--data", str(data), "--adapter-path", str(out),
            "--preset", "paper", "--fine-tune-type", "dora", "--iters", "6", "--batch-size", "2", "--mask-prompt",
            "--steps-per-eval", "3", "--learning-rate", "1e-2", "--dropout", "0", "--dtype", "fp32"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.stderr
    assert "valid loss" in r.stderr and "tok/s" in r.stderr and "peak memory" in r.stderr
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "dora" and cfg["num_layers"] == -1
    assert cfg["lora_parameters"] == {"rank": 32, "scale": 1.0, "dropout": 0.0, "keys": [
        "attn.qkv_proj", "attn.out_proj", "ffn.proj_1", "ffn.proj_2", "transformer.token_embeddings"]}
    # A second run into the same folder without --resume is refused (nothing overwritten).
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and r.stderr.startswith("error:") and "--resume" in r.stderr
    model, tok = load(instruct_folder, dtype="fp32", adapter_path=out)
    prompt = "What is fact 1?"
    want = generate(model, tok, tok.apply_chat_template([{"role": "user", "content": prompt}]), 8)
    r = runner.invoke(app, ["generate", "--model", str(instruct_folder), "--adapter-path", str(out), prompt,
                            "-m", "8", "--dtype", "fp32"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout == want + "\n"
    fused = tmp_path / "fused"
    r = runner.invoke(app, ["fuse", "--model", str(instruct_folder), "--adapter-path", str(out), "-o", str(fused),
                            "--dtype", "fp32"])
    assert r.exit_code == 0, r.stderr
    plain, _ = load(fused, dtype="fp32")
    tokens = tok.encode("What is fact 2? The river")
    np.testing.assert_allclose(f64(plain(mx.array([tokens]))), f64(model(mx.array([tokens]))), rtol=0, atol=1e-4)
    # perplexity --adapter-path scores the adapted model: the fused folder's number, not the base's.
    text = tmp_path / "facts.txt"
    text.write_text(" ".join(FACTS))

    def ppl(*extra):
        r = runner.invoke(app, ["perplexity", str(text), "--context", "32", "--dtype", "fp32", *extra])
        assert r.exit_code == 0, r.stderr
        return float(r.stdout.split("perplexity:")[1].split()[0])

    adapted = ppl("--model", str(instruct_folder), "--adapter-path", str(out))
    assert adapted == pytest.approx(ppl("--model", str(fused)), rel=1e-3)
    assert adapted != pytest.approx(ppl("--model", str(instruct_folder)), rel=1e-2)


@pytest.mark.parametrize("setup,message", [
    (lambda d: None, "no train.jsonl"),
    (lambda d: (d / "train.jsonl").write_text('{"text": "a"}\n{oops}\n'), "train.jsonl:2: not valid JSON"),
])
def test_cli_bad_data_is_one_error_line(tmp_path, base_folder, setup, message):
    (tmp_path / "d").mkdir()
    setup(tmp_path / "d")
    r = runner.invoke(app, ["lora", "--model", str(base_folder), "--data", str(tmp_path / "d"), "--adapter-path",
                            str(tmp_path / "a"), "--iters", "1", "--dtype", "fp32"])
    assert r.exit_code == 2, r.stderr
    assert r.stderr.startswith("error:") and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "a" / "adapters.safetensors").exists()


def test_cli_missing_adapter_config(tmp_path, base_folder):
    (tmp_path / "a").mkdir()
    r = runner.invoke(app, ["generate", "--model", str(base_folder), "--adapter-path", str(tmp_path / "a"), "hi",
                            "--dtype", "fp32"])
    assert r.exit_code == 2 and "adapter_config.json is missing" in r.stderr


# ---------------------------------------------------------------- mlx-lm interop
def test_our_adapter_in_mlx_lm_and_mlx_lms_adapter_here(tmp_path, tok):
    from checkpoints import random_weights
    from engine import TINY_32K, build, mlx_lm_model
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.tuner.utils import load_adapters as mlx_lm_load_adapters

    weights = random_weights(TINY_32K, seed=3)
    tokens = mx.array([tok.encode("The capital of Freedonia is")])
    for kind in ("lora", "dora"):
        # Ours -> mlx-lm (the embedding of the DoRA run stays LoRA, as the paper's).
        data = encoded(tok, FACTS)
        ours = build(TINY_32K, weights)
        tune.train(ours, data, [], small_cfg(iters=4, fine_tune_type=kind), tmp_path / f"ours-{kind}", progress=False)
        ours.eval()
        theirs = mlx_lm_model(TINY_32K, weights)
        mlx_lm_load_adapters(theirs, str(tmp_path / f"ours-{kind}"))
        theirs.eval()
        np.testing.assert_allclose(f64(theirs(tokens)), f64(ours(tokens)), rtol=0, atol=1e-4)
        assert np.abs(f64(ours(tokens)) - f64(build(TINY_32K, weights)(tokens))).max() > 1e-3
        # mlx-lm -> ours: adapters made by mlx-lm's tuner layers (embedding included), saved as mlx_lm.lora saves.
        theirs = mlx_lm_model(TINY_32K, weights)
        theirs.freeze()
        params = {"rank": 3, "scale": 5.0, "dropout": 0.0, "keys": ["attn.qkv_proj", "ffn.proj_2",
                                                                    "transformer.token_embeddings"]}
        linear_to_lora_layers(theirs, 2, params, use_dora=kind == "dora")
        randomize_model_leaves(theirs)
        folder = tmp_path / f"theirs-{kind}"
        folder.mkdir()
        mx.save_safetensors(str(folder / "adapters.safetensors"), dict(tree_flatten(theirs.trainable_parameters())))
        (folder / "adapter_config.json").write_text(json.dumps(
            {"fine_tune_type": kind, "num_layers": 2, "lora_parameters": params}))
        theirs.eval()
        mine = build(TINY_32K, weights)
        lora.load_adapters(mine, folder)
        np.testing.assert_allclose(f64(mine(tokens)), f64(theirs(tokens)), rtol=0, atol=1e-4)


def randomize_model_leaves(model, seed=2):
    rng = np.random.default_rng(seed)
    new = [(k, mx.array((rng.normal(size=v.shape) * (0.05 if k.endswith("lora_b") else 1)).astype(np.float32))
            if not k.endswith(".m") else v * 1.1) for k, v in tree_flatten(model.trainable_parameters())]
    model.update(__import__("mlx.utils", fromlist=["tree_unflatten"]).tree_unflatten(new))
    mx.eval(model.parameters())


# ---------------------------------------------------------------- data parallel
def test_two_ranks_under_mlx_launch_end_where_one_process_ends(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import lora_ranks

    script = Path(__file__).resolve().parent / "lora_ranks.py"
    launch = "from mlx._distributed_utils.launch import main; main()"
    r = subprocess.run([sys.executable, "-c", launch, "--backend", "ring", "-n", "2", "--hosts", "127.0.0.1",
                        "--python", sys.executable, str(script), str(tmp_path / "two")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    two = json.loads((tmp_path / "two" / "history.json").read_text())
    assert two["size"] == 2
    one = lora_ranks.run(tmp_path / "one")
    a, b = [l for _, l in one["train"]], [l for _, l in two["train"]]
    assert len(a) == len(b) == 8 and a[-1] < 0.9 * a[0]
    np.testing.assert_allclose(b, a, rtol=0.02)
    np.testing.assert_allclose([l for _, l in two["valid"]], [l for _, l in one["valid"]], rtol=0.02)
    w1 = mx.load(str(tmp_path / "one" / "adapters.safetensors"))
    w2 = mx.load(str(tmp_path / "two" / "adapters.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        assert np.abs(f64(w1[k]) - f64(w2[k])).max() <= 0.02 * np.abs(f64(w1[k])).max() + 1e-6, k


# ---------------------------------------------------------------- a tiny trained model learns
@pytest.fixture(scope="module")
def tiny_trained(tmp_path_factory):
    """tests/train_tiny.py's recipe at the TINY_32K size (seconds on a CPU): weights with trained statistics."""
    import train_tiny
    from engine import TINY_32K

    folder = tmp_path_factory.mktemp("tiny-trained")
    train_tiny.train(folder, steps=40, config=TINY_32K, batch=4, log=lambda s: None)
    return folder


def token_accuracy(model, data) -> float:
    """Share of the texts' tokens the model predicts greedily from their prefix."""
    hits = total = 0
    for ids, _ in data:
        pred = np.array(mx.argmax(model(mx.array([ids[:-1]]))[0], axis=-1))
        hits += int((pred == np.array(ids[1:])).sum())
        total += len(ids) - 1
    return hits / total


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_a_tiny_trained_model_learns_the_facts_in_40_iterations(tiny_trained, tok, kind, tmp_path):
    from elm_mlx.load import load_model

    data = encoded(tok, FACTS)
    model = load_model(tiny_trained, "fp32")
    before, acc_before = tune.nll(model, data), token_accuracy(model, data)
    cfg = tune.TrainConfig(fine_tune_type=kind, rank=8, scale=1.0, dropout=0.0, num_layers=-1, keys=tune.PAPER_KEYS,
                           iters=40, batch_size=4, learning_rate=3e-3, save_every=0, steps_per_report=100)
    tune.train(model, data, [], cfg, tmp_path, progress=False, log=lambda s: None)
    after = tune.nll(model, data)
    print(f"{kind}: NLL {before:.3f} -> {after:.3f}, greedy token accuracy {acc_before:.2f} -> "
          f"{token_accuracy(model, data):.2f}")
    assert after <= 0.7 * before, (before, after)
    assert token_accuracy(model, data) >= max(0.9, acc_before + 0.5)


def test_grad_checkpoint_gives_the_same_curve(tmp_path, tok):
    """--grad-checkpoint recomputes the trained model's blocks, and no other model's: the Block class
    gets a wrapper (Python looks __call__ up there) that passes every other instance through."""
    data = encoded(tok, FACTS)
    plain = tune.train(fresh_model(), data, [], small_cfg(iters=5), tmp_path / "a", progress=False)
    ckpt = tune.train(fresh_model(), data, [], small_cfg(iters=5, grad_checkpoint=True), tmp_path / "b",
                      progress=False)
    from elm_mlx.model import Block

    assert getattr(Block, "_elm_checkpointed", False)
    np.testing.assert_allclose([l for _, l in ckpt["train"]], [l for _, l in plain["train"]], rtol=1e-4)
    other = fresh_model()  # a model loaded afterwards keeps its own arrays through a forward
    before = dict(tree_flatten(other.parameters()))
    mx.eval(other(mx.array([[1, 2, 3]])))
    assert all(before[k] is v for k, v in tree_flatten(other.parameters()))
