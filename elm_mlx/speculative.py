"""Speculative decoding, exact: prompt lookup and a draft model.

A proposer guesses the next k tokens cheaply (prompt lookup: what followed the
last n-gram where it occurred before, in the prompt or the text so far; a draft
model: its own k greedy or sampled tokens, from its own KV cache). The target
reads the pending token and the k guesses in ONE forward (compiled, of fixed
width: step.verify_block; eager with compile=False), which gives its
logits at every position; it keeps the longest prefix it agrees with plus its
own token at the first disagreement (or after the last guess), and `trim`s its
cache (and the draft's) past the rest. So each target forward yields 1 to k+1
tokens.

Exactness. Every verified position gets the same transforms plain decoding
applies (elm_mlx/sample.py, HF order), the repetition penalty counting the
tokens before that position: the "seen" set grows position by position inside
a block. Greedy: agreement means the guess is the target's argmax there, so the
output is plain greedy decoding's, token for token. Sampling: the standard
speculative-sampling rule (Leviathan et al. 2023, Chen et al. 2023): accept a
guess x drawn from q with probability min(1, p(x)/q(x)), on the first rejection
draw from normalize(max(p - q, 0)), after k acceptances draw from p; the tokens
then follow the target's p exactly. For prompt lookup q is a point mass on the
guess: accept with probability p(x), on rejection draw from p without x.

The generators keep `generate_tokens`' contract (yield ids one at a time, the
caller stops; when it closes the generator the cache holds nothing past what
was yielded) except that the cache may end one token short of what was
yielded (the last token is read by the next block's forward);
`context.CachedContext` already trims to what both hold.
"""

import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .cache import make_cache
from .errors import ArgumentError, ElmError, is_integer
from .sample import make_filter, penalize, seen_mask

DEFAULT_NGRAM = 2  # transformers' prompt lookup default (max_matching_ngram_size)
DEFAULT_DRAFT_TOKENS = 3  # mlx-lm's --num-draft-tokens default


@dataclass
class SpecStats:
    """Counters of one generation: guesses made and kept, target forwards (the
    prefill included) and tokens produced."""
    proposed: int = 0
    accepted: int = 0
    target_forwards: int = 0
    tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """1.0 for plain decoding; up to k+1 when every guess is kept."""
        return self.tokens / self.target_forwards if self.target_forwards else 0.0


def plain_step_seconds(model, repeats: int = 3) -> float:
    """One eager one-token forward of `model`, the fastest of `repeats`: an upper bound on what a
    plain decoding step costs (the compiled step `generate` uses is as fast or faster)."""
    cache = make_cache(model)
    mx.eval(model(mx.array([[1]]), cache))  # the first call allocates
    best = float("inf")
    for _ in range(repeats):
        for c in cache:
            c.trim(c.offset - 1)
        tic = time.perf_counter()
        mx.eval(model(mx.array([[1]]), cache))
        best = min(best, time.perf_counter() - tic)
    return best


def did_not_pay(generation_tps: float, step_seconds: float, acceptance_rate: float,
                tokens_per_forward: float) -> str | None:
    """A one-time notice when speculative decoding was slower than plain decoding at most would be
    (`step_seconds`: plain_step_seconds): the measured acceptance and the speed-up bound, and what to
    try. None when it may have paid: the bound errs on the side of silence."""
    bound = generation_tps * step_seconds
    if bound >= 0.95:
        return None
    return (f"(speculative decoding did not pay here: {100 * acceptance_rate:.0f}% of guesses kept, "
            f"{tokens_per_forward:.2f} tokens per forward, {generation_tps:.1f} tok/s = at most {bound:.2f}x "
            f"plain decoding's ~{1 / step_seconds:.0f}+ tok/s. Try without --prompt-lookup / --draft-model, "
            "or fewer guesses; on a CPU set OPENBLAS_NUM_THREADS=1 (BENCHMARKS.md, Speculative decoding))")


def check_options(prompt_lookup: int = 0, ngram: int = DEFAULT_NGRAM, draft_model=None,
                  num_draft_tokens: int = DEFAULT_DRAFT_TOKENS, target=None):
    """Raises ArgumentError naming the argument at fault (the CLI says the flag)."""
    for name, value, minimum, want in [
        ("prompt_lookup", prompt_lookup, 0, "an integer >= 0 (0 means off; Apple's model card uses 10)"),
        ("ngram", ngram, 1, "an integer >= 1"),
        ("num_draft_tokens", num_draft_tokens, 1, "an integer >= 1"),
    ]:
        if not is_integer(value) or value < minimum:
            raise ArgumentError(name, value, want)
    if prompt_lookup and draft_model is not None:
        raise ElmError("prompt lookup and a draft model: choose one way to propose tokens")
    if draft_model is not None and target is not None:
        check_draft(target, draft_model)


def check_draft(target, draft, target_tokenizer=None, draft_tokenizer=None):
    """A draft must speak the target's vocabulary: same size, and (when both
    tokenizers are given) the same pieces."""
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise ElmError(f"--draft-model: its vocabulary has {dv} tokens, the model's {tv}: a draft must use the "
                       "model's tokenizer (every OpenELM size shares Llama-2's)")
    if target_tokenizer is not None and draft_tokenizer is not None:
        if target_tokenizer.pieces() != draft_tokenizer.pieces():
            raise ElmError(f"--draft-model: its tokenizer ({draft_tokenizer.path}) differs from the model's "
                           f"({target_tokenizer.path}): a draft must use the model's tokenizer")


def make_transform(temp, top_k, top_p, min_p, repetition_penalty, frequency_penalty=0.0, presence_penalty=0.0):
    """(logits[R, V], seen[R or 1, V] or None, counts[R or 1, V] or None) -> the logits a
    choice is made from: penalized, and for sampling scaled and filtered as sample.py does."""
    filter_ = make_filter(temp, top_k, top_p, min_p) if temp > 0 else None

    def transform(logits, seen, counts=None):
        logits = penalize(logits, seen, counts, repetition_penalty, frequency_penalty, presence_penalty)
        return logits if filter_ is None else filter_(logits)
    return transform


class PromptLookup:
    """Guesses what followed an earlier occurrence of the last `ngram` tokens
    (then of shorter n-grams) in the prompt and the text so far: the most
    recent one that leaves all N guesses after it, else the first (the one
    leaving the most). The most recent alone sits just behind the end when the
    text repeats itself and leaves fewer than N tokens to guess: 1.95 tokens
    per forward instead of 3.48 on the edit benchmark (BENCHMARKS.md)."""

    def __init__(self, num_tokens: int, ngram: int = DEFAULT_NGRAM):
        self.num_tokens, self.ngram = num_tokens, ngram

    def propose(self, history: list, k: int, transform, greedy: bool):
        """(guesses int32[<= k], None: the guesses are point masses)."""
        h = np.asarray(history, dtype=np.int64)
        for n in range(min(self.ngram, len(h) - 1), 0, -1):
            # Windows start at 0 .. len-1-n, so each has a next token; the suffix itself is not one.
            windows = np.lib.stride_tricks.sliding_window_view(h[:-1], n)
            hits = np.flatnonzero((windows == h[-n:]).all(axis=1))
            if hits.size:
                follows = hits + n  # where each occurrence's continuation starts
                whole = follows[len(h) - follows >= k]  # those with all k guesses after them
                start = int(whole[-1] if whole.size else follows[0])
                return mx.array(h[start:start + k].astype(np.int32)), None
        return mx.array([], dtype=mx.int32), None

    def kept(self, n: int):
        pass


class DraftModel:
    """A smaller model (or the same one quantized) with its own KV cache, which
    holds a prefix of the history: what it lacks is read at the next proposal,
    what was rejected is trimmed by kept()."""

    def __init__(self, draft, num_tokens: int = DEFAULT_DRAFT_TOKENS, penalize: bool = False):
        self.model, self.num_tokens, self.penalize = draft, num_tokens, penalize
        self.cache = make_cache(draft)

    def propose(self, history: list, k: int, transform, greedy: bool):
        """(guesses int32[k], their distributions q[k, V] (None when greedy)), lazily."""
        if k == 0:
            return mx.array([], dtype=mx.int32), None
        held = min(self.cache[0].offset, len(history) - 1)  # the pending token is always read
        self.kept(held)
        feed = mx.array(history[held:])
        seen = seen_mask(history, self.model.config.vocab_size) if self.penalize else None
        guesses, qs = [], []
        for _ in range(k):
            logits = transform(self.model(feed[None], self.cache, last_only=True)[0], seen)
            d = mx.argmax(logits, axis=-1) if greedy else mx.random.categorical(logits)
            guesses.append(d)
            if not greedy:
                qs.append(mx.softmax(logits, axis=-1))
            if seen is not None:
                seen[d] = True
            feed = d
        return mx.concatenate(guesses).astype(mx.int32), (None if greedy else mx.concatenate(qs))

    def kept(self, n: int):
        """The first n history tokens are right; forget cached positions after them."""
        for c in self.cache:
            c.trim(max(0, c.offset - n))


def make_proposer(target, prompt_lookup=0, ngram=DEFAULT_NGRAM, draft_model=None,
                  num_draft_tokens=DEFAULT_DRAFT_TOKENS, repetition_penalty=1.0):
    check_options(prompt_lookup, ngram, draft_model, num_draft_tokens, target)
    if draft_model is not None:
        return DraftModel(draft_model, num_draft_tokens, penalize=repetition_penalty != 1.0)
    return PromptLookup(prompt_lookup, ngram)


class Verifier:
    """One sequence's speculative decoding, apart from the forward that checks its guesses (so
    that `speculative_tokens` runs it on its own cache and the batch engine on a row of its
    cache): `first(logits)` picks the token after the prompt, `block()` gives the
    tokens to read next (the pending token, then up to k guesses), and `settle(logits)` turns
    the target's logits at those positions into the tokens produced and the number of cache
    positions to trim. `key`: the random key of the draws (None: MLX's global generator).
    stats.tokens is the caller's to count (what it passes on; a block may end past a stop)."""

    def __init__(self, vocab: int, history: list, proposer, *, temp=0.0, top_k=0, top_p=1.0, min_p=0.0,
                 repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0, max_tokens=None, key=None,
                 stats: SpecStats | None = None):
        self.vocab, self.proposer, self.max_tokens, self.key = vocab, proposer, max_tokens, key
        self.greedy, self.penalize = temp == 0, repetition_penalty != 1.0
        self.transform = make_transform(temp, top_k, top_p, min_p, repetition_penalty, frequency_penalty,
                                        presence_penalty)
        self.history = list(history)
        self.seen = seen_mask(self.history, vocab) if self.penalize else None  # every token before the pending one
        # OpenAI's penalties count the output only (as sample.SequenceSampler): before the pending token.
        self.counts = mx.zeros((vocab,), mx.float32) if (frequency_penalty or presence_penalty) else None
        self.stats = SpecStats() if stats is None else stats
        self.pending = self.guesses = self.q = None
        self.produced = 0

    def _next_key(self):
        if self.key is None:
            return None
        self.key, key = mx.random.split(self.key)
        return key

    def _choose(self, logits):  # [R, V] transformed -> [R]
        return mx.argmax(logits, axis=-1) if self.greedy else mx.random.categorical(logits, key=self._next_key())

    def first(self, logits) -> int:
        """logits [1, V] at the prompt's last position -> the first token."""
        seen, counts = (None if a is None else a[None] for a in (self.seen, self.counts))
        y = self._choose(self.transform(logits, seen, counts)).item()
        self.stats.target_forwards += 1
        self.produced = 1
        self.history.append(y)
        self.pending = y
        return y

    def block(self) -> mx.array:
        """The pending token and the proposer's guesses (int32 [1 + k], k >= 0), to be read at the
        positions after everything produced before the pending token."""
        n = self.proposer.num_tokens
        k = n if self.max_tokens is None else min(n, self.max_tokens - self.produced - 1)
        self.guesses, self.q = self.proposer.propose(self.history, max(k, 0), self.transform, self.greedy)
        return mx.concatenate([mx.array([self.pending], dtype=mx.int32), self.guesses])

    def settle(self, logits) -> tuple[list[int], int]:
        """logits [1 + k, V], the model's at block()'s positions -> (the tokens produced: the guesses
        kept, then the model's own; how many of the block's positions to trim from the cache)."""
        return self.accept(*self.check(logits))

    def check(self, logits) -> tuple:
        """settle()'s work on the device, unread: (each position's pick, whether each guess is kept).
        The batch engine queues it with the step that verified the block and reads it a step later
        (accept), so reading it waits for nothing queued after."""
        guesses, q, k, vocab = self.guesses, self.q, self.guesses.shape[0], self.vocab
        tokens = mx.concatenate([mx.array([self.pending], dtype=mx.int32), guesses])
        rows_seen = rows_counts = None
        if self.penalize or self.counts is not None:  # position i has seen every earlier token, the pending one, guesses 1..i
            grown = mx.cumsum((tokens[:, None] == mx.arange(vocab)[None]).astype(mx.float32), axis=0)
            rows_seen = self.seen[None] | (grown > 0) if self.penalize else None
            rows_counts = self.counts[None] + grown if self.counts is not None else None
        logits = self.transform(logits, rows_seen, rows_counts)  # [k+1, V]
        if self.greedy:
            pick = mx.argmax(logits, axis=-1)
            agree = guesses == pick[:k]
        else:
            p = mx.softmax(logits, axis=-1)
            p_guess = mx.take_along_axis(p[:k], guesses[:, None], axis=-1)[:, 0]
            u = mx.random.uniform(shape=(k,), key=self._next_key())
            if q is None:  # a point mass on each guess
                agree = u < p_guess
                residual = mx.where(mx.arange(vocab)[None] == guesses[:, None], 0.0, p[:k])
            else:
                q_guess = mx.take_along_axis(q, guesses[:, None], axis=-1)[:, 0]
                agree = u * q_guess < p_guess
                residual = mx.maximum(p[:k] - q, 0.0)
                # p == q up to rounding (a draft that is the model) can leave nothing: then p itself.
                residual = mx.where(residual.sum(axis=-1, keepdims=True) > 0, residual, p[:k])
            # One draw per position, each from what the rule says a stop there draws from;
            # only the one at the first rejection (or after the last guess) is used.
            pick = mx.random.categorical(mx.log(mx.concatenate([residual, p[k:]])), key=self._next_key())
        return pick, agree

    def accept(self, pick, agree) -> tuple[list[int], int]:
        """settle() of check()'s arrays: reads them and moves the state past the tokens produced."""
        guesses, k = self.guesses, self.guesses.shape[0]
        mx.eval(pick, agree)
        agree, pick = agree.tolist(), pick.tolist()
        a = next((i for i, ok in enumerate(agree) if not ok), k)
        kept = guesses[:a].tolist()
        self.proposer.kept(len(self.history) + a)
        if self.penalize:
            self.seen[mx.array([self.pending] + kept)] = True
        if self.counts is not None:
            self.counts = self.counts.at[mx.array([self.pending] + kept)].add(1.0)
        self.pending = pick[a]
        out = kept + [self.pending]
        self.stats.target_forwards += 1
        self.stats.proposed += k
        self.stats.accepted += a
        self.produced += len(out)
        self.history += out
        return out, k - a


def speculative_tokens(model, prompt_ids: list, proposer, *, temp=0.0, top_k=0, top_p=1.0, min_p=0.0,
                       repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0, seed=None, cache=None,
                       context=(), max_tokens=None, stats: SpecStats | None = None, compile: bool = True):
    """Yields token ids (the caller stops) with plain decoding's distribution
    (greedy: its exact tokens). `max_tokens`, when given, keeps blocks from
    guessing past it. `stats` is updated as tokens are produced. compile: verify
    each block through the compiled fixed-width forward (step.verify_block);
    False: the eager forward, the reference."""
    if seed is not None:
        mx.random.seed(seed)
    cache = make_cache(model) if cache is None else cache
    state = Verifier(model.config.vocab_size, list(context) + list(prompt_ids), proposer, temp=temp, top_k=top_k,
                     top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                     frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, max_tokens=max_tokens,
                     stats=stats)
    stats = state.stats
    stats.tokens += 1
    yield state.first(model(mx.array(prompt_ids)[None], cache, last_only=True)[0])
    if compile:
        from .step import verify_block

        verify = verify_block(model, proposer.num_tokens + 1)
    else:
        def verify(block, cache):
            return model(block[None], cache)[0]
    while True:
        tokens = state.block()
        out, drop = state.settle(verify(tokens, cache))
        for c in cache:
            c.trim(drop)
        for i, t in enumerate(out):
            stats.tokens += 1
            try:
                yield t
            except GeneratorExit:  # stopped inside the block (EOS, max_tokens): the cache ends with what was taken
                for c in cache:
                    c.trim(max(0, len(out) - 2 - i))
                raise


def load_draft(name: str, target, target_tokenizer, dtype=None, tokenizer_file=None):
    """The draft model named by --draft-model (a folder, preset or hub id, as
    --model), refused unless it shares the target's vocabulary and tokenizer. A draft
    folder without a tokenizer uses --tokenizer, else the model's own."""
    from .hub import resolve
    from .load import load

    folder = resolve(name, dtype, tokenizer_file, flag="--draft-model")
    if tokenizer_file is None and not (folder / "tokenizer.model").is_file():
        tokenizer_file = target_tokenizer.path  # a draft without one speaks the model's (and must)
    draft, draft_tokenizer = load(folder, dtype=dtype, tokenizer=tokenizer_file)
    check_draft(target, draft, target_tokenizer, draft_tokenizer)
    return draft


@dataclass(frozen=True)
class Speculation:
    """What the speculative-decoding flags say (the draft model still a name),
    validated once; `generate_kwargs` loads the draft for stream_generate."""
    prompt_lookup: int = 0
    ngram: int = DEFAULT_NGRAM
    draft_model: str | None = None
    num_draft_tokens: int = DEFAULT_DRAFT_TOKENS

    def __post_init__(self):
        check_options(self.prompt_lookup, self.ngram, self.draft_model, self.num_draft_tokens)

    def generate_kwargs(self, target, target_tokenizer, dtype=None, tokenizer_file=None) -> dict:
        """stream_generate's keywords, the draft loaded and checked against the target."""
        draft = None
        if self.draft_model is not None:
            draft = load_draft(self.draft_model, target, target_tokenizer, dtype, tokenizer_file)
        return dict(prompt_lookup=self.prompt_lookup, ngram=self.ngram, draft_model=draft,
                    num_draft_tokens=self.num_draft_tokens)
