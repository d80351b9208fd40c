"""Speculative decoding (prompt lookup, draft model) against plain decoding:
greedy token for token, sampling in distribution."""

import itertools
import re

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import TINY, hf_config, random_weights
from engine import TINY_32K, build

from elm_mlx import ElmError, load, stream_generate
from elm_mlx.cache import make_cache
from elm_mlx.context import CachedContext
from elm_mlx.generate import generate_tokens
from elm_mlx.speculative import DraftModel, PromptLookup, SpecStats, speculative_tokens

ARCHS = ["tied", "untied", "no_qk_norm", "odd_layers", "head_dim_128"]


@pytest.fixture(scope="module")
def models():
    return {name: build(TINY[name], random_weights(TINY[name], seed=i)) for i, name in enumerate(ARCHS)}


def perturbed(cfg, seed, noise):
    """A model close to the seed's random one: a draft that agrees often, not always."""
    w = random_weights(cfg, seed=seed)
    rng = np.random.default_rng(100 + seed)
    return build(cfg, {k: v + noise * v.std() * rng.standard_normal(v.shape).astype(np.float32) for k, v in w.items()})


def take(gen, n):
    out = list(itertools.islice(gen, n))
    gen.close()
    return out


def prompt(length, seed, vocab=512, period=None):
    """Random ids; with `period`, a block repeated so that lookups find n-grams."""
    rng = np.random.default_rng(seed)
    if period is None:
        return [1] + rng.integers(3, vocab, length - 1).tolist()
    block = rng.integers(3, vocab, period).tolist()
    return [1] + (block * (length // period + 1))[: length - 1]


CASES = [  # (prompt, tokens to generate)
    (prompt(6, seed=1), 40),
    (prompt(40, seed=2, period=7), 40),
    (prompt(250, seed=3, period=31), 24),  # the KV cache grows at 256 positions: blocks straddle it
    # Every id once, each followed by 5: a lookup always finds the last token and
    # guesses 5 next, which the model seldom says: rejections.
    ([1] + [t for i in range(6, 512) for t in (i, 5)], 12),
]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_prompt_lookup_greedy_is_plain_greedy(models, arch, penalty):
    model = models[arch]
    stats = SpecStats()
    combos = [(1, 1), (3, 2), (10, 3), (4, 1)]  # (N, K), rotated so that each architecture meets each
    shift = ARCHS.index(arch)
    for (ids, n), (num, ngram) in zip(CASES, combos[shift:] + combos[:shift]):
        plain = take(generate_tokens(model, ids, repetition_penalty=penalty), n)
        spec = take(speculative_tokens(model, ids, PromptLookup(num, ngram), repetition_penalty=penalty,
                                       stats=stats), n)
        assert spec == plain, (len(ids), num, ngram)
    # Both outcomes of verification happened, so both were checked.
    assert 0 < stats.accepted < stats.proposed


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_draft_model_greedy_is_plain_greedy(models, arch, penalty):
    model = models[arch]
    cfg = TINY[arch]
    close, other = perturbed(cfg, ARCHS.index(arch), 0.15), models[ARCHS[(ARCHS.index(arch) + 1) % len(ARCHS)]]
    stats = SpecStats()
    combos = [(close, 4), (other, 1), (close, 1), (other, 4)]  # any 3 in a row hold a close draft
    shift = ARCHS.index(arch)
    for (ids, n), (draft, num) in zip(CASES[:3], combos[shift:] + combos[:shift]):
        plain = take(generate_tokens(model, ids, repetition_penalty=penalty), n)
        spec = take(speculative_tokens(model, ids, DraftModel(draft, num, penalize=penalty != 1.0),
                                       repetition_penalty=penalty, stats=stats), n)
        assert spec == plain, (len(ids), num)
    assert 0 < stats.accepted < stats.proposed


def test_a_model_drafting_for_itself_is_always_right(models):
    model = models["tied"]
    stats = SpecStats()
    ids = prompt(20, seed=5)
    spec = take(speculative_tokens(model, ids, DraftModel(model, 4), stats=stats), 21)
    assert spec == take(generate_tokens(model, ids), 21)
    assert stats.accepted == stats.proposed == 16  # 4 blocks of 4 guesses after the prefill
    assert stats.target_forwards == 5 and stats.tokens_per_forward == 21 / 5


def test_lookup_proposes_what_followed_the_last_match():
    lookup = PromptLookup(3, ngram=2)
    guess, q = lookup.propose([1, 5, 6, 7, 8, 9, 5, 6, 7, 4, 5, 6], 3, None, True)
    assert guess.tolist() == [7, 4, 5] and q is None  # the most recent "5 6", not the first
    guess, _ = lookup.propose([1, 5, 6, 7, 9, 6], 3, None, True)  # no "9 6" before: falls back to "6"
    assert guess.tolist() == [7, 9, 6]
    assert lookup.propose([1, 2, 3], 3, None, True)[0].tolist() == []


# ---------------------------------------------------------------- through stream_generate


@pytest.fixture(scope="module")
def model32k(tiny32k_model):
    return tiny32k_model



TEXT = "The cat sat on the mat. The dog sat on the log. The cat sat on the"


@pytest.mark.parametrize("kw", [dict(prompt_lookup=5), dict(draft_model="self", num_draft_tokens=2)])
def test_stream_generate_speculates_with_stats(model32k, tok, kw):
    kw = {**kw, "draft_model": model32k} if "draft_model" in kw else kw
    plain = list(stream_generate(model32k, tok, TEXT, 17, repetition_penalty=1.2))
    spec = list(stream_generate(model32k, tok, TEXT, 17, repetition_penalty=1.2, **kw))
    assert [r.token for r in spec] == [r.token for r in plain]
    assert "".join(r.text for r in spec) == "".join(r.text for r in plain)
    assert [r.finish_reason for r in spec] == [r.finish_reason for r in plain]
    assert plain[-1].acceptance_rate is None and plain[-1].tokens_per_forward is None
    assert 0 <= spec[-1].acceptance_rate <= 1 and spec[-1].tokens_per_forward >= 1


def test_cached_context_resumes_after_speculation(model32k, tok):
    ids = tok.encode(TEXT)
    context = CachedContext(model32k)
    first = [r.token for r in context.stream(tok, ids, 9, prompt_lookup=4)]
    follow = ids + first + tok.encode(" and then", add_bos=False)
    second = [r.token for r in context.stream(tok, follow, 6, prompt_lookup=4)]
    assert context.reused >= len(ids) + len(first) - 1
    assert second == [r.token for r in stream_generate(model32k, tok, follow, 6)]


def test_a_stop_inside_a_block_leaves_nothing_after_it_in_the_cache(models):
    model = models["tied"]
    ids = prompt(20, seed=5)
    for taken in range(1, 12):
        cache = make_cache(model)
        take(speculative_tokens(model, ids, DraftModel(model, 4), cache=cache), taken)
        assert cache[0].offset in (len(ids) + taken - 1, len(ids) + taken), taken


def test_a_cache_passed_in_is_continued(model32k, tok):
    cache = make_cache(model32k)
    ids = tok.encode(TEXT)
    out = [r.token for r in stream_generate(model32k, tok, ids, 8, cache=cache, prompt_lookup=3)]
    assert cache[0].offset in (len(ids) + 7, len(ids) + 8)  # the last token may wait for the next block
    assert all(c.offset == cache[0].offset for c in cache)
    assert out == [r.token for r in stream_generate(model32k, tok, ids, 8)]


@pytest.mark.parametrize("kw,message", [
    (dict(prompt_lookup=-1), "prompt_lookup=-1: expected an integer >= 0"),
    (dict(prompt_lookup=3, ngram=0), "ngram=0: expected an integer >= 1"),
    (dict(draft_model="other", num_draft_tokens=0), "num_draft_tokens=0: expected an integer >= 1"),
    (dict(prompt_lookup=3, draft_model="other"), "choose one"),
    (dict(draft_model="other"), "its vocabulary has 512 tokens, the model's 32000"),
])
def test_bad_options_name_the_flag(model32k, models, tok, kw, message):
    kw = {**kw, "draft_model": models["tied"]} if "draft_model" in kw else kw
    with pytest.raises(ElmError, match=message):
        list(stream_generate(model32k, tok, TEXT, 4, **kw))


def test_a_draft_with_another_tokenizer_is_refused(model32k, tok, tmp_path):
    from elm_mlx.speculative import check_draft

    class Other:
        path = tmp_path / "tokenizer.model"

        def pieces(self):
            return tok.pieces()[::-1]

    with pytest.raises(ElmError, match="its tokenizer .* differs from the model's"):
        check_draft(model32k, model32k, tok, Other())
    check_draft(model32k, model32k, tok, tok)


# ---------------------------------------------------------------- sampling keeps the target's distribution

# Four tokens, so that the joint law of 4 generated tokens has 4^4 = 256 outcomes
# and is computed exactly from the model (the oracle), with no sampling noise.
VOCAB4 = hf_config(layers=1, model_dim=32, head_dim=16, num_query_heads=[4], num_kv_heads=[2],
                   ffn_multipliers=[2.0], vocab_size=4, ffn_dim_divisor=16)
PROMPT4 = [1, 2, 3, 0, 2, 3, 0, 2]
STEPS, RUNS = 4, 1500


def exact_law(model, ids, steps, temp, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0):
    """P(x1..x_steps | ids) under plain sampling (the penalty, then the filters, as
    sample.py), computed for all 4^steps sequences: one batched forward per depth."""
    from elm_mlx.sample import apply_repetition_penalty, make_filter

    law = np.ones(1)
    prefixes = np.zeros((1, 0), dtype=np.int32)
    for _ in range(steps):
        seqs = np.concatenate([np.tile(ids, (len(prefixes), 1)), prefixes], axis=1)
        logits = model(mx.array(seqs))[:, -1, :]
        seen = mx.array(np.stack([np.isin(np.arange(4), s) for s in seqs]))
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        p = np.array(mx.softmax(make_filter(temp, top_k, top_p, min_p)(logits), axis=-1), dtype=np.float64)
        law = (law[:, None] * p).reshape(-1)
        prefixes = np.concatenate([np.repeat(prefixes, 4, axis=0), np.tile(np.arange(4), len(prefixes))[:, None]],
                                  axis=1).astype(np.int32)
    return law  # index: x1 x2 x3 x4 as base-4 digits, as `prefixes` enumerates them


def chi_square_critical(df: int, z: float) -> float:
    """Wilson-Hilferty: the chi-square quantile at the normal quantile z."""
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


@pytest.mark.parametrize("method,sampling", [
    ("plain", dict(temp=1.0)),  # checks the oracle itself
    ("lookup", dict(temp=0.8, top_k=3, repetition_penalty=1.3)),
    ("draft", dict(temp=1.0)),
    ("draft", dict(temp=0.7, top_p=0.9, min_p=0.05, repetition_penalty=1.3)),
])
def test_speculative_sampling_keeps_the_distribution(method, sampling):
    """Chi-square goodness of fit of RUNS seeded 4-token samples against the exact
    law, cells with expected count < 5 pooled. The bound is the chi-square
    quantile at 1 - 1e-4 (z = 3.719): a correct sampler fails it with probability
    about 1e-4 per case. Sequences the law gives probability 0 must never occur."""
    model = build(VOCAB4, random_weights(VOCAB4, seed=11))
    draft = perturbed(VOCAB4, 11, 0.6)
    law = exact_law(model, PROMPT4, STEPS, **sampling)
    mx.random.seed(1234)
    counts = np.zeros(len(law))
    stats = SpecStats()
    for _ in range(RUNS):
        if method == "plain":
            gen = generate_tokens(model, PROMPT4, **sampling)
        else:
            proposer = PromptLookup(3, 2) if method == "lookup" else DraftModel(
                draft, 3, penalize=sampling.get("repetition_penalty", 1.0) != 1.0)
            gen = speculative_tokens(model, PROMPT4, proposer, stats=stats, **sampling)
        x = take(gen, STEPS)
        counts[int("".join(map(str, x)), 4)] += 1
    assert counts[law == 0].sum() == 0
    expected = law * RUNS
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    keep = expected > 0
    chi2 = (((observed - expected) ** 2)[keep] / expected[keep]).sum()
    df = keep.sum() - 1
    assert chi2 < chi_square_critical(df, 3.719), (chi2, df)
    if method != "plain":  # the rule was exercised both ways
        assert 0 < stats.accepted < stats.proposed


# ---------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def folder32k(tmp_path_factory, llama_tokenizer):
    import shutil

    from checkpoints import make_hf_checkpoint

    path = tmp_path_factory.mktemp("tiny32k")
    make_hf_checkpoint(path, TINY_32K, seed=5)
    shutil.copyfile(llama_tokenizer, path / "tokenizer.model")
    return path


@pytest.mark.parametrize("flags", [["--prompt-lookup", "4", "--ngram", "1"], ["--draft-model", "SELF",
                                                                           "--num-draft-tokens", "2"]])
def test_generate_command_speculates_and_reports(folder32k, flags):
    from typer.testing import CliRunner

    from elm_mlx.cli import app

    flags = [str(folder32k) if f == "SELF" else f for f in flags]
    base = ["generate", "-M", str(folder32k), TEXT, "-m", "10", "--dtype", "fp32", "--repetition-penalty", "1.2"]
    plain, spec = CliRunner().invoke(app, base), CliRunner().invoke(app, base + flags)
    assert plain.exit_code == 0 and spec.exit_code == 0, spec.stderr
    assert spec.stdout == plain.stdout
    assert re.search(r"speculative: \d+% of guesses accepted, \d\.\d\d tokens per forward", spec.stderr)
    assert "speculative" not in plain.stderr


def test_generate_command_refuses_a_draft_with_another_vocabulary(folder32k, tmp_path, llama_tokenizer):
    import shutil

    from checkpoints import make_hf_checkpoint
    from typer.testing import CliRunner

    from elm_mlx.cli import app

    make_hf_checkpoint(tmp_path / "small", TINY["tied"], seed=1)
    shutil.copyfile(llama_tokenizer, tmp_path / "small" / "tokenizer.model")
    r = CliRunner().invoke(app, ["generate", "-M", str(folder32k), "Hi", "-m", "3", "--draft-model",
                                 str(tmp_path / "small")])
    assert r.exit_code == 2
    # Refused while loading (its 512-token config does not fit the tokenizer), before any generation.
    assert f"error: {tmp_path / 'small' / 'config.json'}: vocab_size is 512" in r.stderr


def flowed(text: str) -> str:
    """bench's report with its lines re-joined (it wraps them to 100 columns)."""
    return " ".join(text.split())


@pytest.mark.parametrize("flags", [["--prompt-lookup", "4"], ["--draft-model", "SELF", "--num-draft-tokens", "2"]])
def test_bench_times_speculation_beside_plain_decoding(folder32k, tmp_path, flags):
    import json

    from typer.testing import CliRunner

    from elm_mlx.cli import app

    flags = [str(folder32k) if f == "SELF" else f for f in flags]
    out = tmp_path / "runs.json"
    r = CliRunner().invoke(app, ["bench", "-M", str(folder32k), "--dtype", "fp32", "--method", "edit", "-g", "9",
                                 "-n", "2", "--json", str(out), *flags])
    assert r.exit_code == 0, r.stderr
    runs = json.loads(out.read_text())
    name = "lookup 4" if "--prompt-lookup" in flags else "draft 2"
    assert [x["engine"] for x in runs] == ["elm-mlx", name, name, "elm-mlx"]
    assert all(x["prompt_tokens"] == 108 for x in runs)
    spec = [x for x in runs if x["engine"] == name]
    assert all(0 <= x["acceptance_rate"] <= 1 and 1 <= x["tokens_per_forward"] <= 5 for x in spec)
    assert "acceptance_rate" not in runs[0]
    assert re.search(rf"{name}: \d+% of guesses accepted, \d\.\d\d tokens per forward of the model; speed-up over "
                     r"plain decoding \(elm-mlx\) \d+\.\d\dx generation", flowed(r.stdout))
    assert "output: the same 9 token ids in every run of every engine" in flowed(r.stdout)


def test_chat_replies_are_the_same_with_speculation(folder32k):
    import io

    from elm_mlx.chat import Chat, say
    from elm_mlx.sample import SamplingParams

    model, tok = load(folder32k, dtype="fp32")
    replies = []
    for spec in [{}, dict(prompt_lookup=3), dict(draft_model=model, num_draft_tokens=2)]:
        chat, out = Chat(model, tok, None, None, 8, SamplingParams(repetition_penalty=1.2), speculation=spec), []
        for text in [TEXT, "The dog sat on the"]:
            buf = io.StringIO()
            say(chat, text, buf)
            out.append(buf.getvalue())
        replies.append(out)
        assert (chat.last.acceptance_rate is None) == (not spec)
    assert replies[0] == replies[1] == replies[2]


@pytest.mark.parametrize("proposer", ["lookup", "draft"])
def test_frequency_and_presence_penalties_count_position_by_position(models, proposer):
    model = models["untied"]
    penalties = dict(frequency_penalty=0.7, presence_penalty=0.4, repetition_penalty=1.1)
    stats = SpecStats()
    for ids, n in CASES[:3]:
        make = PromptLookup(3, 2) if proposer == "lookup" else DraftModel(model, 3, penalize=True)
        plain = take(generate_tokens(model, ids, **penalties), n)
        assert take(speculative_tokens(model, ids, make, stats=stats, **penalties), n) == plain
        assert plain != take(generate_tokens(model, ids, repetition_penalty=1.1), n)  # the penalties bite
    # Guesses were checked (the penalties keep this model from repeating, so lookups rarely hit).
    assert stats.proposed > 0 and (stats.accepted > 0 or proposer == "lookup")


def test_server_speculates_per_request(folder32k, tmp_path):
    from serving import request, running_server

    with running_server(folder32k, tmp_path / "serve.log", "--dtype", "fp32", "--draft-model", str(folder32k),
                        "--num-draft-tokens", "2") as url:
        body = {"prompt": TEXT, "max_tokens": 10, "temperature": 0, "repetition_penalty": 1.0}
        _, default = request(url, "POST", "/v1/completions", body)
        _, more = request(url, "POST", "/v1/completions", body | {"num_draft_tokens": 4})
        _, lookup = request(url, "POST", "/v1/completions", body | {"prompt_lookup": 3})
        with_logprobs = request(url, "POST", "/v1/completions", body | {"logprobs": 0})
        status, error = request(url, "POST", "/v1/completions", body | {"prompt_lookup": -1})
    model, tok = load(folder32k, dtype="fp32")
    text = "".join(r.text for r in stream_generate(model, tok, TEXT, 10))
    assert default["choices"][0]["text"] == more["choices"][0]["text"] == lookup["choices"][0]["text"] == text
    # The model drafting for itself is always right: 2 or 4 guesses kept per forward.
    assert default["usage"]["acceptance_rate"] == more["usage"]["acceptance_rate"] == 1.0
    assert default["usage"]["tokens_per_forward"] < more["usage"]["tokens_per_forward"]
    assert 0 <= lookup["usage"]["acceptance_rate"] <= 1
    assert with_logprobs[0] == 400 and with_logprobs[1]["error"]["param"] == "logprobs"
    assert status == 400 and error["error"]["param"] == "prompt_lookup"


def test_prompt_lookup_guesses_from_the_latest_occurrence_that_leaves_n_tokens():
    lookup = PromptLookup(3, 2)
    # (7, 8) occurs at 1 and 6, both with three tokens after them: the latest wins.
    guesses, q = lookup.propose([1, 7, 8, 9, 10, 11, 7, 8, 12, 7, 8], 3, None, True)
    assert guesses.tolist() == [12, 7, 8] and q is None
    # The latest occurrence (at 5) leaves two tokens before the end; the one at 1 leaves all three.
    assert lookup.propose([5, 7, 8, 9, 10, 7, 8, 7, 8], 3, None, True)[0].tolist() == [9, 10, 7]
    # None leaves three: the first, which leaves the most; then shorter n-grams; then nothing.
    assert lookup.propose([4, 7, 8, 7, 8], 3, None, True)[0].tolist() == [7, 8]
    assert lookup.propose([4, 8, 5, 6, 8], 3, None, True)[0].tolist() == [5, 6, 8]
    assert lookup.propose([4, 5, 6], 3, None, True)[0].tolist() == []
