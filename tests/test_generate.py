import mlx.core as mx
import numpy as np
import pytest
from checkpoints import random_weights
from engine import TINY_32K, build, mlx_lm_model
from mlx_lm.models.cache import make_prompt_cache

from elm_mlx import ElmError, generate, stream_generate
from elm_mlx.sample import apply_repetition_penalty, make_sampler
from elm_mlx.tokenizer import Tokenizer

PROMPT = "Once upon a time there was"


@pytest.fixture(scope="module")
def weights():
    return random_weights(TINY_32K, seed=3)


@pytest.fixture(scope="module")
def model(weights):
    return build(TINY_32K, weights)



class EosAt(Tokenizer):
    """The real tokenizer with another id playing EOS, to make a stop happen."""

    def __init__(self, path, eos):
        super().__init__(path)
        self.eos_id = eos


def mlx_lm_greedy(model, ids, n, eos=2, penalty=1.0):
    """Greedy decoding over mlx-lm's model and cache; the penalty is applied
    the transformers way, in NumPy, over every id in the context."""
    cache = make_prompt_cache(model)
    context, out = list(ids), []
    logits = model(mx.array([ids]), cache=cache)[0, -1]
    for _ in range(n):
        x = np.array(logits.astype(mx.float32))
        if penalty != 1.0:
            seen = np.array(sorted(set(context)))
            x[seen] = np.where(x[seen] > 0, x[seen] / penalty, x[seen] * penalty)
        t = int(x.argmax())
        out.append(t)
        context.append(t)
        if t == eos:
            break
        logits = model(mx.array([[t]]), cache=cache)[0, -1]
    return out


def tokens_of(model, tok, prompt, n, **kw):
    return [r.token for r in stream_generate(model, tok, prompt, n, **kw)]


def test_greedy_matches_a_greedy_loop_over_mlx_lm(model, weights, tok):
    ours = tokens_of(model, tok, PROMPT, 24)
    assert ours == mlx_lm_greedy(mlx_lm_model(TINY_32K, weights), tok.encode(PROMPT), 24)


def test_repetition_penalty_has_transformers_semantics(model, weights, tok):
    ours = tokens_of(model, tok, PROMPT, 24, repetition_penalty=1.2)
    assert ours == mlx_lm_greedy(mlx_lm_model(TINY_32K, weights), tok.encode(PROMPT), 24, penalty=1.2)
    assert ours != tokens_of(model, tok, PROMPT, 24)  # random weights repeat: the penalty must bite


def test_generate_returns_the_continuation_only(model, tok):
    responses = list(stream_generate(model, tok, PROMPT, 16))
    text = generate(model, tok, PROMPT, 16)
    assert text == "".join(r.text for r in responses)
    assert PROMPT + text == tok.decode(tok.encode(PROMPT) + [r.token for r in responses])


def test_last_response_carries_stats_and_length(model, tok):
    responses = list(stream_generate(model, tok, PROMPT, 10))
    assert len(responses) == 10
    assert [r.finish_reason for r in responses] == [None] * 9 + ["length"]
    last = responses[-1]
    assert last.prompt_tokens == len(tok.encode(PROMPT)) and last.generation_tokens == 10
    assert last.prompt_tps > 0 and last.generation_tps > 0 and last.peak_memory_gb > 0


def test_stops_at_eos_without_printing_it(model, tok, llama_tokenizer):
    greedy = tokens_of(model, tok, PROMPT, 12)
    eos = greedy[5]
    fake = EosAt(llama_tokenizer, eos)
    responses = list(stream_generate(model, fake, PROMPT, 12))
    stop = greedy.index(eos)
    assert [r.token for r in responses] == greedy[: stop + 1]
    assert responses[-1].finish_reason == "stop"
    assert "".join(r.text for r in responses) == tok.decode(tok.encode(PROMPT) + greedy[:stop])[len(PROMPT):]


def test_ignore_eos_generates_exactly_max_tokens(model, tok, llama_tokenizer):
    greedy = tokens_of(model, tok, PROMPT, 12)
    fake = EosAt(llama_tokenizer, greedy[2])
    responses = list(stream_generate(model, fake, PROMPT, 12, ignore_eos=True))
    assert [r.token for r in responses] == greedy and responses[-1].finish_reason == "length"
    with pytest.raises(ElmError, match="--ignore-eos"):
        list(stream_generate(model, fake, PROMPT, 12, ignore_eos=True, regex="[ab]+"))


def test_stop_strings_cut_the_text_where_one_first_appears(model, tok):
    full = generate(model, tok, PROMPT, 24)
    # a stop string spanning a token boundary, and one that never appears
    stop = full[len(full) // 3: len(full) // 3 + 4]
    assert stop.strip() and full.find(stop) >= 1
    responses = list(stream_generate(model, tok, PROMPT, 24, stop=[stop, "never in this text \u2047"]))
    assert "".join(r.text for r in responses) == full[: full.find(stop)]
    assert responses[-1].finish_reason == "stop" and len(responses) < 24
    # held-back text that turned out not to begin a stop string is flushed at the end
    tail = full[-3:] + "\u2047"  # begins with the text's last characters, never completed
    responses = list(stream_generate(model, tok, PROMPT, 24, stop=tail))
    assert "".join(r.text for r in responses) == full and responses[-1].finish_reason == "length"
    with pytest.raises(ElmError, match="stop strings"):
        list(stream_generate(model, tok, PROMPT, 4, stop=[""]))


def test_prompt_as_ids_and_empty_prompt(model, tok):
    assert tokens_of(model, tok, tok.encode(PROMPT), 5) == tokens_of(model, tok, PROMPT, 5)
    text = generate(model, tok, "", 5)  # BOS only: no leading space to keep
    assert not text.startswith(" ") or text.strip() == ""


def test_seeded_sampling_is_reproducible(model, tok):
    a = tokens_of(model, tok, PROMPT, 16, temp=1.5, seed=7)
    assert a == tokens_of(model, tok, PROMPT, 16, temp=1.5, seed=7)
    assert a != tokens_of(model, tok, PROMPT, 16, temp=1.5, seed=8)


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=0.999)])
def test_filters_that_leave_one_token_are_greedy(model, tok, kw):
    assert tokens_of(model, tok, PROMPT, 8, temp=1.0, seed=0, **kw) == tokens_of(model, tok, PROMPT, 8)


@pytest.mark.parametrize("kw,allowed", [
    (dict(top_k=2), {0, 1}),
    (dict(top_p=0.7), {0, 1}),  # 0.5 + 0.3 reaches 0.7
    (dict(top_p=0.85), {0, 1, 2}),
    (dict(min_p=0.5), {0, 1}),  # keeps p >= 0.25
    (dict(), {0, 1, 2, 3}),
])
def test_sampling_filters_keep_the_right_tokens(kw, allowed):
    logits = mx.log(mx.array([[0.5, 0.3, 0.15, 0.05]]))
    sample = make_sampler(temp=1.0, **kw)
    mx.random.seed(0)
    drawn = {int(sample(logits)[0]) for _ in range(300)}
    assert drawn == allowed


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = mx.array([[2.0, -2.0, 1.0, -1.0]])
    seen = mx.array([True, True, False, False])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_prompt_over_the_context_is_refused(model, tok):
    with pytest.raises(ElmError, match="the prompt is 2048 tokens; OpenELM's context is 2048 tokens"):
        generate(model, tok, [1] * 2048, 4)


def test_generation_stops_at_the_context_end(model, tok):
    responses = list(stream_generate(model, tok, [1] + [450] * 2041, 100))
    assert len(responses) == 6 and responses[-1].finish_reason == "length"


@pytest.mark.parametrize("kw,message", [
    (dict(temp=-1), "temp=-1: expected a number in \\[0, 2\\]"),
    (dict(temp=float("nan")), "temp=nan: expected a number"),
    (dict(top_p=0), "top_p=0: expected a number in \\(0, 1\\]"),
    (dict(top_k=-3), "top_k=-3: expected an integer >= 0"),
    (dict(top_k=1.5), "top_k=1.5: expected an integer >= 0"),
    (dict(min_p=1.0), "min_p=1.0: expected a number in \\[0, 1\\)"),
    (dict(repetition_penalty=0), "repetition_penalty=0: expected a number > 0"),
    (dict(seed=-1), "seed=-1: expected an integer from 0 to"),
    (dict(seed=2**64), "seed=18446744073709551616: expected an integer from 0 to"),
    (dict(max_tokens=-1), "max_tokens=-1: expected an integer >= 0"),
])
def test_bad_sampling_values_name_the_argument(model, tok, kw, message):
    with pytest.raises(ElmError, match=message):
        generate(model, tok, PROMPT, **kw)


def test_zero_tokens_generates_nothing(model, tok):
    assert generate(model, tok, PROMPT, 0) == ""


def test_a_cache_carries_the_context_into_the_next_call(model, tok):
    from elm_mlx.cache import make_cache

    first = tokens_of(model, tok, PROMPT, 6)
    cache = make_cache(model)
    turn1 = [r.token for r in stream_generate(model, tok, PROMPT, 6, cache=cache)]
    follow = tok.encode(" and then", add_bos=False)
    turn2 = [r.token for r in stream_generate(model, tok, follow, 5, cache=cache)]
    assert turn1 == first
    assert turn2 == tokens_of(model, tok, tok.encode(PROMPT) + turn1 + follow, 5)
    # Every yielded token is in the cache, the last one too (its step ran ahead),
    # so a next turn continues right after it.
    assert cache[0].offset == len(tok.encode(PROMPT)) + 6 + len(follow) + 5


def test_cached_context_counts_against_the_window(model, tok):
    from elm_mlx.cache import make_cache

    cache = make_cache(model)
    list(stream_generate(model, tok, [1] * 2000, 1, cache=cache))
    with pytest.raises(ElmError, match="the prompt is 60 tokens after 2001 cached tokens"):
        generate(model, tok, [5] * 60, 4, cache=cache)


def test_verbose_prints_the_text_and_a_stats_line(model, tok, capsys):
    text = generate(model, tok, PROMPT, 5, verbose=True)
    out = capsys.readouterr().out
    assert out.startswith(text + "\n") and "generation: 5 tokens" in out and "peak memory" in out
