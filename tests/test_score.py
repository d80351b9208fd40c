"""score.py: batched, padded scoring and sliding-window perplexity against the
float64 NumPy forward; `elm-mlx perplexity` end to end. No lm-eval needed,
except for one cross-check of the window scheme against lm-eval's own."""

import math
import shutil

import numpy as np
import pytest
import sentencepiece as spm
from checkpoints import TINY, make_hf_checkpoint, random_weights
from engine import TINY_32K, build
from reference import reference_logits
from typer.testing import CliRunner

from elm_mlx.cli import app
from elm_mlx.errors import ElmError
from elm_mlx.score import SCORED_POSITIONS_PER_BATCH, batches, score_batch, sliding_windows

runner = CliRunner()


def log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def reference_score(weights, cfg, seq, n):
    """(sum of log p of the last n tokens of seq, all of them argmax), float64."""
    lp = log_softmax(reference_logits(weights, cfg, seq[:-1]))
    rows = np.arange(len(seq) - 1 - n, len(seq) - 1)
    targets = np.asarray(seq[1:])[rows]
    return lp[rows, targets].sum(), bool(np.all(lp[rows].argmax(axis=-1) == targets))


@pytest.mark.parametrize("arch", list(TINY))
def test_padded_batch_equals_each_sequence_alone(arch):
    cfg = TINY[arch]
    weights = random_weights(cfg, seed=3)
    model = build(cfg, weights)
    rng = np.random.default_rng(1)
    lengths, n_scored = [13, 2, 7, 20, 5], [4, 1, 7, 1, 3]
    seqs = [rng.integers(0, cfg["vocab_size"], n).tolist() for n in lengths]
    # One sequence continues with its own greedy tokens: is_greedy must be True there.
    lp = log_softmax(reference_logits(weights, cfg, seqs[2]))
    seqs[2] = seqs[2] + [int(lp[-1].argmax())]
    seqs[2] = seqs[2] + [int(log_softmax(reference_logits(weights, cfg, seqs[2]))[-1].argmax())]
    n_scored[2] = 2
    got = score_batch(model, seqs, n_scored)
    for (logprob, greedy), seq, n in zip(got, seqs, n_scored):
        want, want_greedy = reference_score(weights, cfg, seq, n)
        assert abs(logprob - want) <= 1e-4 * max(1.0, abs(want)), (arch, logprob, want)
        assert greedy == want_greedy
    assert got[2][1] and not all(g for _, g in got)


def test_batches_bound_sequences_and_scored_positions():
    n_scored = [3000, 1000, 1000, 5, 5, 5, 5, 5, 5, 5]
    runs = list(batches(range(len(n_scored)), n_scored, batch_size=4))
    assert [i for run in runs for i in run] == list(range(len(n_scored)))
    for run in runs:
        assert len(run) <= 4
        assert len(run) == 1 or len(run) * max(n_scored[i] for i in run) <= SCORED_POSITIONS_PER_BATCH
    assert runs[0] == [0]


@pytest.mark.parametrize("n", [1, 2, 5, 16, 17, 18, 40, 41])
@pytest.mark.parametrize("context", [1, 4, 16])
def test_windows_with_stride_equal_to_context_are_lm_evals_rolling_windows(n, context):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    ids = [1] + list(range(100, 100 + n - 1))  # BOS, then the text
    theirs = [c + k for c, k in map(make_disjoint_window, get_rolling_token_windows(ids[1:], 1, context, 1))]
    ours = [ids[b:e] for b, e, _ in sliding_windows(n, context, context)]
    assert ours == theirs
    scored = [ids[e - k:e] for b, e, k in sliding_windows(n, context, context)]
    assert sum(scored, []) == ids[1:]


@pytest.mark.parametrize("n,context,stride", [(30, 8, 3), (30, 8, 8), (9, 8, 1), (5, 8, 2), (31, 6, 5)])
def test_every_token_scored_once_with_at_most_context_inputs(n, context, stride):
    windows = sliding_windows(n, context, stride)
    scored = []
    for k, (b, e, s) in enumerate(windows):
        assert e - 1 - b <= context and 1 <= s <= e - 1 - b
        scored += list(range(e - s, e))
        if k > 0:
            assert s <= stride and (b == 0 or e - 1 - b == context)
    assert scored == list(range(1, n))


def test_stride_outside_one_to_context_is_refused():
    for stride in (0, 9):
        with pytest.raises(ElmError, match="--stride"):
            sliding_windows(20, 8, stride)


# ---------------------------------------------------------------- elm-mlx perplexity

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. However little known the feelings or views of such a man may be.")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, llama_tokenizer):
    folder = tmp_path_factory.mktemp("tiny32k")
    weights = make_hf_checkpoint(folder, TINY_32K, seed=7)
    shutil.copyfile(llama_tokenizer, folder / "tokenizer.model")
    text = folder.parent / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    sp = spm.SentencePieceProcessor(model_file=str(llama_tokenizer))
    return folder, weights, text, [1] + sp.encode(TEXT)


def run_perplexity(folder, text, *flags):
    r = runner.invoke(app, ["perplexity", "--model", str(folder), "--dtype", "fp32", str(text), *flags])
    assert r.exit_code == 0, r.output
    line = next(x for x in r.stdout.splitlines() if x.startswith("perplexity: "))
    assert "tokens/s" in r.stdout
    return float(line.split()[1])


def test_perplexity_is_exp_mean_nll_of_the_float64_forward(tiny):
    folder, weights, text, ids = tiny
    lp = log_softmax(reference_logits(weights, TINY_32K, ids[:-1]))
    want = math.exp(-np.mean(lp[np.arange(len(ids) - 1), ids[1:]]))
    assert run_perplexity(folder, text) == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("context,stride", [(12, 12), (12, 5), (7, 1)])
def test_windowed_perplexity_reads_context_tokens_before_each_scored_chunk(tiny, context, stride):
    folder, weights, text, ids = tiny
    nll, chunk = [], (1, min(context + 1, len(ids)))
    while chunk[0] < len(ids):
        a, b = chunk  # score ids[a:b], reading up to `context` tokens before ids[b-1]
        begin = max(0, b - 1 - context)
        lp = log_softmax(reference_logits(weights, TINY_32K, ids[begin:b - 1]))
        nll += [-lp[t - 1 - begin, ids[t]] for t in range(a, b)]
        chunk = (b, min(b + stride, len(ids)))
    assert len(nll) == len(ids) - 1
    got = run_perplexity(folder, text, "--context", str(context), "--stride", str(stride))
    assert got == pytest.approx(math.exp(np.mean(nll)), rel=1e-4)
    full = run_perplexity(folder, text)
    assert abs(got - full) > 1e-3 * full  # the windows really cut the context


def test_perplexity_errors_are_one_line(tiny, tmp_path):
    folder, _, text, _ = tiny
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for args, needle in [([str(tmp_path / "missing.txt")], "no such file"),
                         ([str(empty)], "no text to score"),
                         ([str(bad)], "not UTF-8"),
                         ([str(text), "--context", "4096"], "--context 4096"),
                         ([str(text), "--context", "8", "--stride", "9"], "--stride 9")]:
        r = runner.invoke(app, ["perplexity", "--model", str(folder), *args])
        assert r.exit_code == 2, r.output
        assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
