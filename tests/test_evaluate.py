"""The lm-eval backend: real lm-eval on a local multiple-choice task, scores
against the float64 NumPy forward, rolling windows, generate_until against
elm_mlx.generate; `elm-mlx eval` and its --paper table; the missing-extra message."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
from checkpoints import make_hf_checkpoint
from engine import TINY_32K
from reference import reference_logits
from typer.testing import CliRunner

from elm_mlx import generate
from elm_mlx.cli import app

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

import elm_mlx.evaluate as ev  # noqa: E402  (registers "elm-mlx")

runner = CliRunner()
BOS = 1

QUESTIONS = [
    ("What color is the sky on a clear day?", ["blue", "green", "red"], 0),
    ("How many legs does a spider have?", ["six", "eight", "ten", "four"], 1),
    ("Which is a fruit?", ["carrot", " potato", "apple"], 2),
    ("Water freezes at", ["zero degrees Celsius", "fifty degrees", "boiling"], 0),
    ("The capital of France is", ["Paris", "Rome", "Berlin"], 0),
    ("Cats say", ["woof", "meow", "moo"], 1),
    ("The opposite of hot is", ["warm", "cold"], 1),
    ("2 + 2 =", ["3", "4", "22"], 1),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, llama_tokenizer):
    folder = tmp_path_factory.mktemp("tiny32k")
    weights = make_hf_checkpoint(folder, TINY_32K, seed=11)
    shutil.copyfile(llama_tokenizer, folder / "tokenizer.model")
    return folder, weights, spm.SentencePieceProcessor(model_file=str(llama_tokenizer))


@pytest.fixture(scope="module")
def lm(tiny):
    return ev.ElmLM(pretrained=str(tiny[0]), dtype="fp32", batch_size=3)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A multiple-choice task over a local JSON-lines file. The prompt ends in a space and the
    choices carry no delimiter, so lm-eval's whitespace rule moves that space into each choice."""
    path = tmp_path_factory.mktemp("tasks")
    with open(path / "toy.jsonl", "w") as f:
        for q, choices, label in QUESTIONS:
            f.write(json.dumps({"question": q, "choices": choices, "label": label}) + "\n")
    (path / "toy.yaml").write_text(f"""\
task: elm_toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path / "toy.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer: "
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
""")
    return path


def log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def direct_loglikelihood(weights, sp, context, continuation):
    """lm-eval's rule, written out: trailing spaces of the context join the continuation;
    the continuation's tokens are those of BOS + encode(context + continuation) past
    BOS + encode(context); log p from the float64 forward of the concatenation."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    ctx = [BOS] + sp.encode(stripped)
    cont = ([BOS] + sp.encode(stripped + continuation))[len(ctx):]
    tokens = ctx + cont
    lp = log_softmax(reference_logits(weights, TINY_32K, tokens[:-1]))
    return sum(lp[len(ctx) - 1 + i, t] for i, t in enumerate(cont))


def test_multiple_choice_through_real_lm_eval_matches_the_float64_forward(lm, tiny, task_dir):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    _, weights, sp = tiny
    out = simple_evaluate(model=lm, tasks=["elm_toy_mc"], task_manager=TaskManager(
        include_path=str(task_dir), include_defaults=False), log_samples=True, bootstrap_iters=0)
    samples = out["samples"]["elm_toy_mc"]
    assert len(samples) == len(QUESTIONS)
    correct, moved = [], 0
    for s in samples:
        ours = [r[0][0] for r in s["resps"]]
        want = [direct_loglikelihood(weights, sp, ctx, cont) for ctx, cont in s["arguments"]]
        np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0)
        moved += sum(ctx.endswith(" ") for ctx, _ in s["arguments"])
        correct.append(int(np.argmax(want)) == int(s["target"]))
    assert moved > 0  # the whitespace rule was exercised
    assert out["results"]["elm_toy_mc"]["acc,none"] == pytest.approx(np.mean(correct))


def test_empty_context_is_bos_and_is_greedy_follows_the_argmax(lm, tiny):
    _, weights, sp = tiny
    [(lp, _)] = lm.loglikelihood([Instance("loglikelihood", {}, ("", "Once upon a time"), 0)])
    cont = sp.encode("Once upon a time")
    ref = log_softmax(reference_logits(weights, TINY_32K, [BOS] + cont[:-1]))
    assert lp == pytest.approx(sum(ref[i, t] for i, t in enumerate(cont)), abs=1e-4)

    context = [BOS] + sp.encode("The quick brown fox")
    greedy = []
    for _ in range(3):
        greedy.append(int(reference_logits(weights, TINY_32K, context + greedy)[-1].argmax()))
    wrong = greedy[:2] + [(greedy[2] + 1) % 32000]
    res = lm._loglikelihood_tokens([(None, context, greedy), (None, context, wrong), (None, context, greedy[:1])])
    assert [g for _, g in res] == [True, False, True]


def test_one_token_continuations_of_a_context_share_one_row(lm, tiny, monkeypatch):
    _, weights, sp = tiny
    rows, real = [], ev.next_token_logprobs

    def counting(model, inputs):
        rows.append(len(inputs))
        return real(model, inputs)

    monkeypatch.setattr(ev, "next_token_logprobs", counting)
    a, b = [BOS] + sp.encode("Question: which letter? Answer:"), [BOS] + sp.encode("Pick one:")
    lp_a = log_softmax(reference_logits(weights, TINY_32K, a))[-1]
    lp_b = log_softmax(reference_logits(weights, TINY_32K, b))[-1]
    best = int(lp_a.argmax())
    letters = [sp.piece_to_id(f"\u2581{c}") for c in "ABCD"] + [best]
    requests = [(None, a, [t]) for t in letters] + [(None, b, [t]) for t in letters[:2]] + [
        (None, b, letters[:3]), (None, a[:-1], [a[-1]])]  # a 3-token continuation; a lone one-token one
    res = lm._loglikelihood_tokens(requests)
    assert rows == [2]  # contexts a and b, each one row; the other two scored as usual
    for (lp, greedy), t in zip(res[:5], letters):
        assert lp == pytest.approx(lp_a[t], abs=1e-4) and greedy == (t == best)
    for (lp, greedy), t in zip(res[5:7], letters):
        assert lp == pytest.approx(lp_b[t], abs=1e-4) and greedy == (t == int(lp_b.argmax()))
    full = log_softmax(reference_logits(weights, TINY_32K, b + letters[:2]))
    assert res[7][0] == pytest.approx(sum(full[len(b) - 1 + i, t] for i, t in enumerate(letters[:3])), abs=1e-4)
    lone = log_softmax(reference_logits(weights, TINY_32K, a[:-1]))[-1]
    assert res[8][0] == pytest.approx(lone[a[-1]], abs=1e-4)


def test_rolling_loglikelihood_is_the_sum_over_lm_eval_windows(tiny):
    """max_length 16: a 45-token text needs 3 windows; each window is scored
    with the float64 forward on just the tokens it reads."""
    folder, weights, sp = tiny
    lm16 = ev.ElmLM(pretrained=str(folder), dtype="fp32", max_length=16, batch_size=2)
    text = ("Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my "
            "purse, and nothing particular to interest me on shore, I thought I would sail about a little.")
    tokens, L = sp.encode(text), 16
    assert len(tokens) > 2 * L and len(tokens) % L  # 3 windows, the last one partial
    # The windows as lm-eval's LM.loglikelihood_rolling docstring lays them out: BOS + the first
    # L-1 tokens predict the first L; then each window predicts the next (up to) L tokens from the
    # L tokens before its last one.
    total = 0.0
    lp = log_softmax(reference_logits(weights, TINY_32K, [BOS] + tokens[:L - 1]))
    total += sum(lp[i, t] for i, t in enumerate(tokens[:L]))
    done = L
    while done < len(tokens):
        end = min(done + L, len(tokens))
        inputs = tokens[end - L - 1:end - 1]
        lp = log_softmax(reference_logits(weights, TINY_32K, inputs))
        total += sum(lp[L - (end - t), tokens[t]] for t in range(done, end))
        done = end
    [ours] = lm16.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert ours == pytest.approx(total, abs=1e-4)
    whole = log_softmax(reference_logits(weights, TINY_32K, [BOS] + tokens[:-1]))
    assert abs(ours - sum(whole[i, t] for i, t in enumerate(tokens))) > 1e-2  # windows matter


def gen(lm, prompt, **kwargs):
    return lm.generate_until([Instance("generate_until", {}, (prompt, kwargs), 0)])[0]


def test_generate_until_is_generate_cut_at_each_stop_sequence(lm, monkeypatch):
    prompt = "Once upon a time there was"
    full = generate(lm.model, lm.tokenizer, prompt, 24)
    assert gen(lm, prompt, until=[], max_gen_toks=24) == full
    assert gen(lm, prompt, max_gen_toks=7) == generate(lm.model, lm.tokenizer, prompt, 7)

    steps = []
    real = ev.stream_generate

    def counting(*args, **kwargs):
        for r in real(*args, **kwargs):
            steps.append(r)
            yield r

    monkeypatch.setattr(ev, "stream_generate", counting)
    for at in (2, len(full) // 2, len(full) - 3):
        stop = full[at:at + 3]
        steps.clear()
        out = gen(lm, prompt, until=[stop], max_gen_toks=24)
        assert out == full[:full.find(stop)]
        assert len(steps) < 24 or at == len(full) - 3  # stopped once the stop sequence appeared
    a, b = full[len(full) // 2:len(full) // 2 + 2], full[4:6]
    assert gen(lm, prompt, until=[a, b], max_gen_toks=24) == full[:min(full.find(a), full.find(b))]


def test_sampling_follows_do_sample(lm):
    from elm_mlx.sample import SamplingParams

    assert lm.sampling({"do_sample": False, "temperature": 0.5}) == SamplingParams()
    assert lm.sampling({"do_sample": True, "temperature": 0.7, "top_p": 0.9}) == SamplingParams(temp=0.7, top_p=0.9)


# ---------------------------------------------------------------- the command

def test_eval_command_prints_the_table_and_writes_lm_eval_json(tiny, task_dir, tmp_path):
    out = tmp_path / "results.json"
    r = runner.invoke(app, ["eval", "--model", str(tiny[0]), "--dtype", "fp32", "--tasks", "elm_toy_mc",
                            "--include-path", str(task_dir), "--limit", "5", "--output", str(out)])
    assert r.exit_code == 0, r.output
    assert "elm_toy_mc" in r.stdout and "acc" in r.stdout and "|" in r.stdout
    results = json.loads(out.read_text())
    assert 0.0 <= results["results"]["elm_toy_mc"]["acc,none"] <= 1.0
    assert results["n-samples"]["elm_toy_mc"] == {"original": len(QUESTIONS), "effective": 5}
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_eval_refuses_bad_input_in_one_line(tiny, task_dir):
    for args, needle in [(["--tasks", "no_such_task_xyz", "--include-path", str(task_dir)], "no_such_task_xyz"),
                         ([], "--tasks"),
                         (["--paper", "--tasks", "arc_easy"], "--paper"),
                         (["--paper"], "none of OpenELM's four sizes")]:
        r = runner.invoke(app, ["eval", "--model", str(tiny[0]), *args])
        assert r.exit_code == 2, r.output
        assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = runner.invoke(app, ["eval", "--model", str(tiny[0]), "--tasks", "arc_easy", "--limit", "0"])
    assert r.exit_code == 2 and "'--limit'" in r.stderr  # click's range check


def test_without_lm_eval_eval_says_how_to_install_it(tiny):
    code = ("import sys; sys.modules['lm_eval'] = None; sys.argv = ['elm-mlx', 'eval', '--model', sys.argv[1], "
            "'--tasks', 'arc_easy']; from elm_mlx.cli import main; main()")
    r = subprocess.run([sys.executable, "-c", code, str(tiny[0])], capture_output=True, text=True,
                       env=os.environ | {"PYTHONPATH": ""})
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == 'error: elm-mlx eval needs lm-evaluation-harness: pip install "elm-mlx[eval]"'


def test_lm_eval_finds_the_backend_by_name():
    from lm_eval.api.registry import get_model

    assert get_model("elm-mlx") is ev.ElmLM


def test_lm_evals_own_command_line_runs_the_backend(tiny, task_dir, tmp_path):
    """`python -m elm_mlx.evaluate` is lm-eval's CLI with elm-mlx registered (lm-eval 0.4 has no plugin discovery)."""
    r = subprocess.run([sys.executable, "-m", "elm_mlx.evaluate", "--model", "elm-mlx", "--model_args",
                        f"pretrained={tiny[0]},dtype=fp32", "--tasks", "elm_toy_mc", "--include_path", str(task_dir),
                        "--limit", "3"], capture_output=True, text=True, env=os.environ | {"PYTHONPATH": ""})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "elm-mlx (" in r.stdout and "|elm_toy_mc|" in r.stdout.replace(" ", "")


def test_eval_outside_a_git_repository_prints_no_git_noise(tiny, task_dir, tmp_path):
    """lm-eval asks git for the working folder's commit; outside a repository git's
    "fatal: not a git repository" must not reach the user's terminal."""
    from hostile import ELM_MLX

    r = subprocess.run([ELM_MLX, "eval", "--model", str(tiny[0]), "--dtype", "fp32",
                        "--tasks", "elm_toy_mc", "--include-path", str(task_dir), "--limit", "3"], cwd=tmp_path,
                       capture_output=True, text=True,
                       env=os.environ | {"PYTHONPATH": "", "GIT_CEILING_DIRECTORIES": str(tmp_path.parent)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "elm_toy_mc" in r.stdout and "fatal" not in r.stderr, r.stderr


def test_transformers_says_nothing_of_pytorch_once_elm_mlx_is_imported():
    """mlx-lm, lm-eval and `convert --to mlx-lm` import transformers for tokenizers; without PyTorch
    it prints "PyTorch was not found" on every command (torch hidden here as if not installed)."""
    code = "import sys; sys.modules['torch'] = None; import elm_mlx; import transformers"
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env | {"PYTHONPATH": ""})
    assert r.returncode == 0 and "PyTorch" not in r.stderr, r.stderr
