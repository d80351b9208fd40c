"""Log-likelihood of token sequences, batched, and sliding-window perplexity.

One forward pass scores a batch: sequences are right-padded (the causal mask
already keeps every real position from seeing the padding after it), the
transformer runs once, and the output head runs only on the positions whose
next token is scored, so a 2-token answer after a 1,000-token few-shot prompt
costs 2 x vocab logits, not 1,000 x vocab. Sums are taken in float64 from
float32 log-softmaxes. The lm-eval backend (evaluate.py) and `elm-mlx
perplexity` both score through `score_batch`; the backend's one-token
continuations of a shared context go through `next_token_logprobs`, one row
for all of them.
"""

import time
from collections.abc import Callable

import mlx.core as mx
import numpy as np

from .errors import ElmError

# Scored positions per forward pass: the head's float32 logits are this x vocab
# (4096 x 32000 x 4 bytes = 0.5 GB), and log-softmax holds a second copy.
SCORED_POSITIONS_PER_BATCH = 4096


def score_batch(model, seqs: list, n_scored: list) -> list:
    """[(sum of log p(token), every scored token is the argmax)] for each sequence.

    seqs[i]: token ids, inputs and targets together (the model reads seqs[i][:-1]
    and predicts seqs[i][1:]); n_scored[i]: how many of its last tokens to score."""
    B, C = len(seqs), max(n_scored)
    positions = np.zeros((B, C), np.int32)
    targets = np.zeros((B, C), np.int32)
    valid = np.zeros((B, C), bool)
    for i, (seq, n) in enumerate(zip(seqs, n_scored)):
        seq = np.asarray(seq, np.int32)
        m = len(seq) - 1
        if not 1 <= n <= m:
            raise ValueError(f"cannot score {n} tokens of a {len(seq)}-token sequence")
        pos = np.arange(m - C, m)  # the last C input positions (right-aligned)
        valid[i] = pos >= m - n
        positions[i] = np.maximum(pos, 0)
        targets[i] = seq[positions[i] + 1]
    logits = logits_at(model, [s[:-1] for s in seqs], positions)
    t = mx.array(targets)[..., None]
    logprob = (mx.take_along_axis(logits, t, axis=-1) - mx.logsumexp(logits, axis=-1, keepdims=True))[..., 0]
    greedy = mx.argmax(logits, axis=-1) == t[..., 0]
    logprob, greedy = np.array(logprob, dtype=np.float64), np.array(greedy)
    return [(float(logprob[i][valid[i]].sum()), bool(greedy[i][valid[i]].all())) for i in range(B)]


def next_token_logprobs(model, inputs: list) -> tuple:
    """(log-softmax [B, vocab] float64, argmax [B]) of the token after each input: one
    pass serves every one-token continuation of a context (a multiple-choice question
    whose choices are single tokens, like MMLU's letters)."""
    logits = logits_at(model, inputs, np.array([[len(x) - 1] for x in inputs], np.int32))[:, 0, :]
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return np.array(logprobs, dtype=np.float64), np.array(mx.argmax(logits, axis=-1))


def logits_at(model, inputs: list, positions: np.ndarray) -> mx.array:
    """float32 logits [B, C, vocab] at positions[b] of each input row, the rows
    right-padded into one batch and run through the transformer once."""
    tokens = np.zeros((len(inputs), max(len(x) for x in inputs)), np.int32)
    for i, x in enumerate(inputs):
        tokens[i, :len(x)] = x
    h = model.transformer(mx.array(tokens))
    h = mx.take_along_axis(h, mx.array(positions)[..., None], axis=1)
    return model.head(h).astype(mx.float32)


def batches(order: list, n_scored: list, batch_size: int):
    """Consecutive runs of `order` with at most batch_size sequences and at most
    SCORED_POSITIONS_PER_BATCH scored positions (batch size x the longest)."""
    batch, widest = [], 0
    for i in order:
        w = max(widest, n_scored[i])
        if batch and (len(batch) == batch_size or (len(batch) + 1) * w > SCORED_POSITIONS_PER_BATCH):
            yield batch
            batch, w = [], n_scored[i]
        batch.append(i)
        widest = w
    if batch:
        yield batch


def check_window(context: int, stride: int, max_context: int) -> None:
    if not 1 <= context <= max_context:
        raise ElmError(f"--context {context}: expected 1 to the model's context, {max_context}")
    if not 1 <= stride <= context:
        raise ElmError(f"--stride {stride}: expected 1 to --context ({context})")


def sliding_windows(n: int, context: int, stride: int) -> list:
    """Windows (begin, end, n_scored) over tokens[0:n], tokens[0] being BOS: a
    window reads tokens[begin:end-1] (at most `context` of them) and scores its
    last n_scored targets. The first window scores all it reads; each later one
    scores the next `stride` tokens, reading the `context` tokens before each.
    Every token after BOS is scored once. With stride == context these are
    lm-eval's rolling windows (`get_rolling_token_windows` with context_len=1,
    then `make_disjoint_window`), the last one reading a full context."""
    check_window(context, stride, context)
    out, done = [], min(context + 1, n)
    if n >= 2:
        out.append((0, done, done - 1))
    while done < n:
        end = min(done + stride, n)
        out.append((max(0, end - 1 - context), end, end - done))
        done = end
    return out


def perplexity(model, ids: list, context: int, stride: int, batch_size: int = 1,
               progress: Callable[[int], None] | None = None) -> tuple[float, int, float]:
    """(perplexity, tokens scored, seconds) of ids (BOS first) with sliding windows."""
    check_window(context, stride, model.config.max_context_length)
    windows = sliding_windows(len(ids), context, stride)
    if not windows:
        raise ElmError("the text is empty: nothing to score")
    seqs = [ids[b:e] for b, e, _ in windows]
    n_scored = [n for _, _, n in windows]
    total, tic = 0.0, time.perf_counter()
    for batch in batches(range(len(seqs)), n_scored, batch_size):
        total += sum(lp for lp, _ in score_batch(model, [seqs[i] for i in batch], [n_scored[i] for i in batch]))
        if progress:
            progress(sum(n_scored[i] for i in batch))
    n = sum(n_scored)
    return float(np.exp(-total / n)), n, time.perf_counter() - tic


def perplexity_of_file(model: str, file, *, context: int = 2048, stride: int | None = None, batch_size: int = 8,
                       dtype=None, tokenizer=None, adapter_path=None, say=print) -> float:
    """`elm-mlx perplexity`: prints `perplexity: X` and the speed; returns X."""
    import sys
    from pathlib import Path

    from tqdm import tqdm

    from .checkpoint import dtype_label
    from .load import load

    file = Path(file)
    if not file.is_file():
        raise ElmError(f"FILE {file}: no such file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ElmError(f"FILE {file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    stride = context if stride is None else stride
    check_window(context, stride, 1 << 30)  # before loading; the model's own limit after
    model_, tok = load(model, dtype=dtype, tokenizer=tokenizer, adapter_path=adapter_path)
    check_window(context, stride, model_.config.max_context_length)
    ids = tok.encode(text)
    if len(ids) < 2:
        raise ElmError(f"FILE {file}: no text to score")
    with tqdm(total=max(len(ids) - 1, 0), unit="tok", desc="perplexity", file=sys.stderr) as bar:
        ppl, n, seconds = perplexity(model_, ids, context, stride, batch_size, progress=bar.update)
    say(f"perplexity: {ppl:.4f}")
    say(f"{n} tokens scored in {seconds:.2f} s: {n / seconds:.1f} tokens/s "
        f"(context {context}, stride {stride}, {dtype_label(model_.dtype)})")
    return ppl
