"""LoRA / DoRA fine-tuning: data, batches, the training loop, checkpoints.

Design decisions:
- Data is mlx-lm's: a folder with train.jsonl (and optionally valid.jsonl),
  rows {"text"}, {"prompt", "completion"} or {"messages"}. Chat rows (and
  prompt/completion rows on a model with a chat template, as mlx-lm does) are
  rendered through the model's template and encoded exactly as `elm-mlx chat`
  encodes a conversation (chat_template.chat_ids), so the model is tuned on
  the ids it will be prompted with. A bad row is an ElmError naming file:line.
- The loss is the token-weighted mean cross-entropy of the global batch: each
  process sums its rows' losses and token counts, gradients of the sums are
  all_summed and divided by the global token count. Data-parallel training
  over N ranks (each takes rows rank, rank+N, ... of every batch) is then the
  same arithmetic as one process with the whole batch, not an average of
  per-rank means.
- Everything random is a function of (seed, step): the batch order is
  replayed, dropout is seeded per step, and the optimizer state is saved with
  the adapter, so --resume continues the same loss curve an uninterrupted run
  draws. Only rank 0 writes files and reports; every write is atomic.
"""

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from . import lora
from .chat_template import chat_ids
from .errors import ElmError, quoted
from .files import read_text

PAPER_KEYS = ["qkv_proj", "out_proj", "proj_1", "proj_2", "token_embeddings"]
STATE_FILE = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"


@dataclass
class TrainConfig:
    fine_tune_type: str = "lora"
    rank: int = 8  # mlx-lm's defaults
    scale: float = 20.0
    dropout: float = 0.0
    num_layers: int = 16
    keys: list = field(default_factory=lambda: ["qkv_proj", "out_proj", "proj_1", "proj_2"])
    iters: int = 1000
    batch_size: int = 4
    learning_rate: float = 1e-5
    lr_schedule: str = "constant"  # or "cosine"
    min_learning_rate: float = 0.0  # the cosine's end
    warmup: int = 0
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float | None = None
    seed: int = 0
    mask_prompt: bool = False
    grad_checkpoint: bool = False
    val_batches: int = 25  # -1: the whole valid set
    steps_per_report: int = 10
    steps_per_eval: int = 200
    save_every: int = 100
    max_seq_length: int | None = None  # default: the model's context


# CoreNet projects/openelm/peft_configs (rank 32, alpha 32, dropout 0.1, every
# layer, the tied embedding too; AdamW 0.9/0.95 without weight decay, clip 1.0,
# cosine 3e-4 -> 3e-5). The warm-up length is not in our reference: 100 iterations
# (at most a tenth of the run) is our choice.
PRESETS = {"paper": dict(rank=32, scale=1.0, dropout=0.1, num_layers=-1, keys=PAPER_KEYS, betas=(0.9, 0.95),
                         weight_decay=0.0, grad_clip=1.0, lr_schedule="cosine", learning_rate=3e-4,
                         min_learning_rate=3e-5, warmup=100)}


# ---------------------------------------------------------------- data
def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of every non-blank line; a line that is not a JSON object is an ElmError naming it."""
    rows = []
    for n, line in enumerate(read_text(path, "JSONL data file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ElmError(f"{path}:{n}: not valid JSON ({e.msg}): {quoted(line)}") from None
        if not isinstance(row, dict):
            raise ElmError(f"{path}:{n}: expected a JSON object with \"text\", \"prompt\"/\"completion\" or "
                           f"\"messages\", got {quoted(row)}")
        rows.append((n, row))
    return rows


def _string(row, key, where):
    v = row[key]
    if not isinstance(v, str):
        raise ElmError(f"{where}: \"{key}\" must be a string, got {quoted(v)}")
    return v


def encode_row(row: dict, tok, template, mask_prompt: bool, where: str) -> tuple[list[int], int]:
    """-> (ids, offset): the loss covers ids[offset:] (offset 0 unless mask_prompt; BOS is never a target)."""
    if "messages" in row:
        messages = row["messages"]
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages)):
            raise ElmError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} strings")
        if template is None:
            raise ElmError(f"{where}: a \"messages\" row needs a chat template, and this model has none "
                           "(an -Instruct model has one); use \"text\" rows for a base model")
        ids = chat_ids(tok, template, messages, add_generation_prompt=False)
        offset = 0
        if mask_prompt:
            last_assistant = messages[-1]["role"] == "assistant"
            offset = len(chat_ids(tok, template, messages[:-1], add_generation_prompt=last_assistant))
        return ids, offset
    if "prompt" in row and "completion" in row:
        prompt, completion = _string(row, "prompt", where), _string(row, "completion", where)
        if template is not None:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            ids = chat_ids(tok, template, messages, add_generation_prompt=False)
            head = chat_ids(tok, template, messages[:1], add_generation_prompt=True)
        else:
            head = tok.encode(prompt)
            ids = head + tok.encode(completion, add_bos=False) + [tok.eos_token_id]
        return ids, len(head) if mask_prompt else 0
    if "text" in row:
        ids = tok.encode(_string(row, "text", where))
        return (ids if ids[-1:] == [tok.eos_token_id] else ids + [tok.eos_token_id]), 0
    raise ElmError(f"{where}: a row needs \"text\", \"prompt\" and \"completion\", or \"messages\"; "
                   f"it has {quoted(sorted(row))}")


def load_split(path: Path, tok, template, mask_prompt: bool, max_len: int) -> list[tuple[list[int], int]]:
    data = []
    for n, row in read_jsonl(path):
        where = f"{path}:{n}"
        ids, offset = encode_row(row, tok, template, mask_prompt, where)
        if len(ids) > max_len:
            raise ElmError(f"{where}: the row is {len(ids)} tokens, longer than the context of {max_len}; "
                           "split it or raise --max-seq-length (at most the model's context)")
        if mask_prompt and offset >= len(ids):
            raise ElmError(f"{where}: with --mask-prompt nothing is left to learn (the row is all prompt)")
        data.append((ids, offset))
    return data


def load_data(folder: Path, tok, template, mask_prompt: bool, max_len: int):
    """(train, valid) from folder/train.jsonl and folder/valid.jsonl (valid may be absent: [])."""
    folder = Path(folder)
    train_file = folder / "train.jsonl"
    if not train_file.exists():
        raise ElmError(f"--data {folder}: no train.jsonl there (expected train.jsonl and valid.jsonl, "
                       "one JSON object a line, as mlx_lm.lora reads)")
    train = load_split(train_file, tok, template, mask_prompt, max_len)
    if not train:
        raise ElmError(f"{train_file} has no rows")
    valid_file = folder / "valid.jsonl"
    valid = load_split(valid_file, tok, template, mask_prompt, max_len) if valid_file.exists() else []
    return train, valid


# ---------------------------------------------------------------- batches
def batch_indices(n: int, batch_size: int, seed: int):
    """Global batches of row indices, forever: shuffled epochs (rows reused across an epoch's end)."""
    rng = np.random.default_rng(seed)
    order = []
    while True:
        while len(order) < batch_size:
            order += list(rng.permutation(n))
        yield order[:batch_size]
        order = order[batch_size:]


def make_batch(data, indices, rank: int = 0, size: int = 1):
    """This rank's rows (indices[rank::size]) padded to the longest row of the global batch:
    -> (tokens [b, L] int32, offsets [b], lengths [b])."""
    width = max(len(data[i][0]) for i in indices)
    mine = indices[rank::size]
    tokens = np.zeros((len(mine), width), np.int32)
    for r, i in enumerate(mine):
        tokens[r, :len(data[i][0])] = data[i][0]
    offsets = np.array([data[i][1] for i in mine], np.int32)
    lengths = np.array([len(data[i][0]) for i in mine], np.int32)
    return mx.array(tokens), mx.array(offsets), mx.array(lengths)


def loss_sums(model, tokens, offsets, lengths):
    """(sum of target-token cross-entropies, number of target tokens). Target t+1
    (predicted at position t) counts when offset <= t+1 < length (t+1 >= 1: BOS never)."""
    logits = model(tokens[:, :-1])
    targets = tokens[:, 1:]
    pos = mx.arange(1, targets.shape[1] + 1)[None]
    mask = (pos >= offsets[:, None]) & (pos < lengths[:, None])
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets) * mask
    return ce.sum(), mask.sum().astype(mx.float32)


def schedule(cfg: TrainConfig):
    if cfg.lr_schedule not in ("constant", "cosine"):
        raise ElmError(f"--lr-schedule {cfg.lr_schedule}: expected constant or cosine")
    warmup = min(cfg.warmup, max(cfg.iters // 10, 0)) if cfg.warmup else 0
    main = (optim.cosine_decay(cfg.learning_rate, max(cfg.iters - warmup, 1), cfg.min_learning_rate)
            if cfg.lr_schedule == "cosine" else (lambda step: mx.array(cfg.learning_rate)))
    if not warmup:
        return main
    return optim.join_schedules([optim.linear_schedule(cfg.learning_rate / warmup, cfg.learning_rate, warmup), main],
                                [warmup])


def checkpoint_layers(model):
    """Recompute each block's activations in the backward pass (mx.checkpoint), as mlx-lm's
    --grad-checkpoint, for this model's blocks only. Python looks __call__ up on the class, so the
    class gets a wrapper once, and it checkpoints only the blocks marked here: every other model in
    the process (a later load(), a benchmark) runs its blocks as before, its arrays untouched."""
    block = type(model.layers[0])
    for layer in model.layers:
        layer._elm_checkpoint = True
    if getattr(block, "_elm_checkpointed", False):
        return
    call = block.__call__

    def checkpointed(self, *args, **kwargs):
        if not getattr(self, "_elm_checkpoint", False):
            return call(self, *args, **kwargs)

        def inner(params, *a, **k):
            self.update(params)
            return call(self, *a, **k)

        return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

    block.__call__ = checkpointed
    block._elm_checkpointed = True


# ---------------------------------------------------------------- training
def adapter_config_of(cfg: TrainConfig, model_name: str | None = None) -> dict:
    return lora.adapter_config(cfg.fine_tune_type, cfg.rank, cfg.scale, cfg.dropout, cfg.num_layers, cfg.keys,
                               elm_mlx={"model": model_name, "train": {k: v for k, v in asdict(cfg).items()}})


def save(folder: Path, model, cfg: TrainConfig, opt, step: int, model_name=None, extra_name: str | None = None):
    config = adapter_config_of(cfg, model_name)
    lora.save_adapters(folder, model, config)
    if extra_name:
        lora.save_adapters(folder, model, config, weights_name=extra_name)
    state = dict(tree_flatten(opt.state))
    mx.eval(state)
    from .files import atomic_write, atomic_write_text

    tmp = Path(folder) / f".{STATE_FILE}.partial.safetensors"
    try:
        mx.save_safetensors(str(tmp), {k: v for k, v in state.items() if isinstance(v, mx.array)})
        atomic_write(Path(folder) / STATE_FILE, lambda f: f.write(tmp.read_bytes()))
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_text(Path(folder) / STATE_JSON, json.dumps({"step": step}) + "\n")


def evaluate(model, data, batch_size: int, batches: int, rank=0, size=1, group=None) -> float:
    model.eval()
    total, count = mx.array(0.0), mx.array(0.0)
    n = len(data) if batches < 0 else min(len(data), batches * batch_size)
    for start in range(0, n, batch_size):
        idx = list(range(start, min(start + batch_size, n)))
        if len(idx) < size:
            idx = idx * size  # every rank needs a row; repeats count twice, rarely (a last short batch)
        s, c = loss_sums(model, *make_batch(data, idx, rank, size))
        total, count = total + s, count + c
    if group is not None:
        total, count = mx.distributed.all_sum(total, group=group), mx.distributed.all_sum(count, group=group)
    model.train()
    return (total / count).item()


def prepare(model, cfg: TrainConfig):
    """Seed, wrap `model` in fresh adapters (in place) and return the optimizer that trains them."""
    mx.random.seed(cfg.seed)
    lora.apply_adapters(model, cfg.fine_tune_type, cfg.rank, cfg.scale, cfg.dropout, cfg.num_layers, cfg.keys)
    if cfg.grad_checkpoint:
        checkpoint_layers(model)
    return optim.AdamW(learning_rate=schedule(cfg), betas=list(cfg.betas), weight_decay=cfg.weight_decay)


def make_step(model, opt, cfg: TrainConfig, group=None):
    """One optimizer step's graph: (tokens, offsets, lengths) -> (mean loss, target tokens), lazy.
    Gradients of the global token-weighted sums (all_summed over `group`), clipped, then opt.update."""

    def step_fn(tokens, offsets, lengths):
        (s, c), grads = nn.value_and_grad(model, loss_sums)(model, tokens, offsets, lengths)
        if group is not None:
            s, c = mx.distributed.all_sum(s, group=group), mx.distributed.all_sum(c, group=group)
            grads = tree_map(lambda g: mx.distributed.all_sum(g, group=group), grads)
        grads = tree_map(lambda g: g / c, grads)
        if cfg.grad_clip:
            grads, _ = optim.clip_grad_norm(grads, cfg.grad_clip)
        opt.update(model, grads)
        return s / c, c

    return step_fn


def run_step(step_fn, model, opt, cfg: TrainConfig, step: int, batch):
    """Training iteration `step` (1-based) on batch = make_batch(...), evaluated: -> (loss, ntok) arrays.
    Exactly what train() does per iteration (bench/lora_train.py times it)."""
    mx.random.seed(cfg.seed * 1_000_003 + step)  # dropout: a function of the step (resumable)
    loss, ntok = step_fn(*batch)
    mx.eval(model.trainable_parameters(), opt.state, loss, ntok)
    return loss, ntok


def train(model, train_data, valid_data, cfg: TrainConfig, adapter_path: Path, resume: bool = False,
          model_name: str | None = None, group=None, log=None, progress: bool = True) -> dict:
    """Apply fresh adapters to `model` (or the saved ones with resume) and train them.
    -> {"train": [(step, loss)], "valid": [(step, loss)], "step": last step, "interrupted": bool}."""
    rank, size = (group.rank(), group.size()) if group is not None else (0, 1)
    main = rank == 0
    log = log or (lambda s: print(s, file=sys.stderr))
    if cfg.batch_size % size:
        raise ElmError(f"--batch-size {cfg.batch_size} must be a multiple of the {size} processes")
    adapter_path = Path(adapter_path)
    opt = prepare(model, cfg)
    start = 0
    if resume:
        start = resume_state(model, opt, adapter_path, cfg)
    model.train()
    n_params = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))

    step_fn = make_step(model, opt, cfg, group)
    order = batch_indices(len(train_data), cfg.batch_size, cfg.seed)
    for _ in range(start):
        next(order)  # replay the batch order up to where the saved run stopped
    history = {"train": [], "valid": [], "step": start, "interrupted": False}
    bar = None
    if main and progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.iters, initial=start, unit="it", desc="train", file=sys.stderr, dynamic_ncols=True)
        bar.write(file=sys.stderr, s=f"trainable parameters: {n_params / 1e6:.3f}M ({cfg.fine_tune_type}, rank {cfg.rank}, "
                  f"{size} process{'es' if size > 1 else ''})")
    say = (lambda s: bar.write(s, file=sys.stderr)) if bar is not None else (log if main else (lambda s: None))
    tokens_seen, t0, losses = 0.0, time.perf_counter(), []
    step = start
    try:
        for step in range(start + 1, cfg.iters + 1):
            loss, ntok = run_step(step_fn, model, opt, cfg, step, make_batch(train_data, next(order), rank, size))
            history["step"] = step
            loss_v = loss.item()
            losses.append(loss_v)
            history["train"].append((step, loss_v))
            tokens_seen += ntok.item()
            if bar is not None:
                dt = time.perf_counter() - t0
                bar.set_postfix(loss=f"{loss_v:.3f}", tok_s=f"{tokens_seen / max(dt, 1e-9):.0f}",
                                lr=f"{opt.learning_rate.item():.2e}", peak=f"{mx.get_peak_memory() / 2**30:.2f}GB")
                bar.update(1)
            if step % cfg.steps_per_report == 0 or step == cfg.iters:
                say(f"iter {step}: train loss {np.mean(losses):.4f}, {tokens_seen / (time.perf_counter() - t0):.0f} "
                    f"tok/s, lr {opt.learning_rate.item():.2e}, peak memory {mx.get_peak_memory() / 2**30:.2f} GB")
                losses = []
            if valid_data and (step % cfg.steps_per_eval == 0 or step == cfg.iters):
                v = evaluate(model, valid_data, cfg.batch_size, cfg.val_batches, rank, size, group)
                history["valid"].append((step, v))
                say(f"iter {step}: valid loss {v:.4f}")
            if main and cfg.save_every and step % cfg.save_every == 0 and step != cfg.iters:
                save(adapter_path, model, cfg, opt, step, model_name, extra_name=f"{step:07d}_adapters.safetensors")
    except KeyboardInterrupt:
        history["interrupted"] = True
        if main:
            say(f"interrupted: saving the adapter of iteration {history['step']} to {adapter_path}")
    finally:
        if bar is not None:
            bar.close()
    if main:
        save(adapter_path, model, cfg, opt, history["step"], model_name)
    return history


def resume_state(model, opt, folder: Path, cfg: TrainConfig) -> int:
    """Load the adapter and the optimizer state a previous run saved in folder -> the step it reached."""
    folder = Path(folder)
    saved = lora.read_adapter_config(folder)
    want = lora.adapter_config(cfg.fine_tune_type, cfg.rank, cfg.scale, cfg.dropout, cfg.num_layers, cfg.keys)
    for k in ("fine_tune_type", "num_layers", "lora_parameters"):
        if saved.get(k) != want[k]:
            raise ElmError(f"--resume: {folder / lora.CONFIG_FILE} has {k} {quoted(saved.get(k))}, "
                           f"this run asks for {quoted(want[k])}")
    for name in (lora.WEIGHTS_FILE, STATE_FILE, STATE_JSON):
        if not (folder / name).exists():
            raise ElmError(f"--resume: {folder / name} is missing (was the run started by elm-mlx lora?)")
    weights = mx.load(str(folder / lora.WEIGHTS_FILE))
    trainable = dict(tree_flatten(model.trainable_parameters()))
    bad = [k for k in trainable if k not in weights or weights[k].shape != trainable[k].shape]
    if bad:
        raise ElmError(f"--resume: {folder / lora.WEIGHTS_FILE} does not fit this model ({bad[0]})")
    model.load_weights([(k, weights[k]) for k in trainable], strict=False)
    state = mx.load(str(folder / STATE_FILE))
    opt.init(model.trainable_parameters())
    known = dict(tree_flatten(opt.state))
    if set(state) != set(known):
        raise ElmError(f"--resume: {folder / STATE_FILE} is not the optimizer state of this adapter")
    for key, value in state.items():
        _assign(opt.state, key.split("."), value)
    step = json.loads(read_text(folder / STATE_JSON, "trainer state"))["step"]
    if not isinstance(step, int) or step < 0:
        raise ElmError(f"--resume: {folder / STATE_JSON}: bad step {quoted(step)}")
    return step


def _assign(tree, path, value):
    """tree[path] = value in a nested dict/list tree (flattened keys index lists by number)."""
    for part in path[:-1]:
        tree = tree[int(part)] if isinstance(tree, list) else tree[part]
    if isinstance(tree, list):
        tree[int(path[-1])] = value
    else:
        tree[path[-1]] = value


def nll(model, data) -> float:
    """Mean NLL per target token of data in eval mode (no dropout)."""
    return evaluate(model, data, batch_size=8, batches=-1)
