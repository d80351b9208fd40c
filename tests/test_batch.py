"""The batch engine (elm_mlx/batch.py): every sequence gets exactly what it gets alone
(`generate_tokens`, the single-sequence path), whoever runs beside it, whenever it joins
or leaves; logprobs equal a direct log-softmax of the model's logits."""

import itertools

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import TINY, random_weights
from engine import build

from elm_mlx.batch import BatchEngine
from elm_mlx.generate import generate_tokens
from elm_mlx.sample import apply_frequency_presence

ARCHS = list(TINY)


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return build(TINY[request.param], random_weights(TINY[request.param], seed=11))


@pytest.fixture(scope="module")
def tied():
    return build(TINY["tied"], random_weights(TINY["tied"], seed=12))


def prompts(n, vocab=512, seed=0):
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(3, vocab, size=int(rng.integers(1, 40))).tolist() for _ in range(n)]


def alone(model, ids, n, **sampling):
    return list(itertools.islice(generate_tokens(model, ids, **sampling), n))


def run(engine, joins=None, cancel=None):
    """Steps until idle; joins: {step: [(ids, max_tokens, sampling)]} added before that step;
    cancel: {step: seq index} cancelled before that step. Returns the sequences in order added."""
    joins, cancel, seqs = joins or {}, cancel or {}, []
    for step in itertools.count():
        for ids, n, sampling in joins.get(step, []):
            seqs.append(engine.add(ids, n, **sampling))
        if step in cancel:
            engine.cancel(seqs[cancel[step]])
        if not engine.has_work() and step >= max(joins, default=0):
            return seqs
        engine.step()


def test_a_prompt_longer_than_a_prefill_chunk_is_read_in_chunks_alone(tied):
    # A step whose only segment is a prompt's non-final chunk wants no logits (it once failed: the
    # head was indexed with an empty list, a float array).
    rng = np.random.default_rng(5)
    p = [1] + rng.integers(3, 512, 50).tolist()
    seq = run(BatchEngine(tied, prefill_chunk=16), {0: [(p, 6, {})]})[0]
    assert seq.tokens == alone(tied, p, 6) and seq.finish == "length"


def test_eight_concurrent_greedy_sequences_equal_their_single_runs(model):
    ps = prompts(8, seed=1)
    engine = BatchEngine(model, max_batch=8)
    seqs = run(engine, {0: [(p, 12, {}) for p in ps]})
    for p, seq in zip(ps, seqs):
        assert seq.tokens == alone(model, p, 12) and seq.finish == "length"
    stats = engine.stats()
    assert (stats["active"], stats["queued"], stats["finished"], stats["generated_tokens"]) == (0, 0, 8, 96)


SAMPLINGS = [
    dict(temp=1.0, seed=3),
    dict(temp=0.7, top_p=0.9, seed=4),
    dict(temp=1.2, top_k=20, min_p=0.02, seed=5, repetition_penalty=1.3),
    dict(temp=0.0, repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.4),
    dict(temp=0.9, frequency_penalty=1.5, presence_penalty=-0.5, seed=6),
    dict(),
]


def test_seeded_sampled_sequences_equal_their_single_runs(tied):
    ps = prompts(len(SAMPLINGS), seed=2)
    seqs = run(BatchEngine(tied, max_batch=8), {0: [(p, 16, s) for p, s in zip(ps, SAMPLINGS)]})
    for p, s, seq in zip(ps, SAMPLINGS, seqs):
        assert seq.tokens == alone(tied, p, 16, **s), s
    # and the seeds matter: another seed draws other tokens
    assert alone(tied, ps[0], 16, temp=1.0, seed=3) != alone(tied, ps[0], 16, temp=1.0, seed=30)


def test_sequences_joining_mid_generation_and_a_queue_beyond_max_batch(tied):
    ps = prompts(9, seed=3)
    joins = {0: [(ps[0], 20, {}), (ps[1], 6, dict(temp=1.0, seed=1))],
             3: [(ps[2], 10, {}), (ps[3], 15, dict(temp=0.8, top_k=5, seed=2))],
             4: [(p, 8, {}) for p in ps[4:]]}
    engine = BatchEngine(tied, max_batch=3)
    seen_queued = []
    orig = engine.step
    engine.step = lambda: (seen_queued.append(engine.stats()["queued"]), orig())[1]
    seqs = run(engine, joins)
    for (ids, n, s), seq in zip([j for step in sorted(joins) for j in joins[step]], seqs):
        assert seq.tokens == alone(tied, ids, n, **s)
    assert max(seen_queued) >= 3 and engine.stats()["active"] == 0


def test_a_cancelled_sequence_leaves_the_others_intact(tied):
    ps = prompts(4, seed=4)
    engine = BatchEngine(tied, max_batch=4)
    seqs = run(engine, {0: [(p, 14, dict(temp=1.0, seed=i)) for i, p in enumerate(ps)]}, cancel={5: 1})
    assert seqs[1].finish == "cancelled" and 3 <= len(seqs[1].tokens) < 14
    assert seqs[1].tokens == alone(tied, ps[1], 14, temp=1.0, seed=1)[: len(seqs[1].tokens)]
    for i in (0, 2, 3):
        assert seqs[i].tokens == alone(tied, ps[i], 14, temp=1.0, seed=i)
    stats = engine.stats()
    assert (stats["active"], stats["cancelled"], stats["finished"]) == (0, 1, 3)


def test_a_cancelled_waiting_sequence_never_runs(tied):
    engine = BatchEngine(tied, max_batch=1)
    seqs = run(engine, {0: [(p, 5, {}) for p in prompts(3, seed=5)]}, cancel={1: 2})
    assert seqs[2].finish == "cancelled" and seqs[2].tokens == [] and seqs[1].finish == "length"


def test_eos_stops_a_sequence(tied):
    p = prompts(1, seed=6)[0]
    reference = alone(tied, p, 10)
    eos = reference[4]
    seq = run(BatchEngine(tied), {0: [(p, 10, dict(eos_id=eos))]})[0]
    assert seq.tokens == reference[: reference.index(eos) + 1] and seq.finish == "stop"


def test_a_growing_conversation_reuses_the_kept_cache(tied):
    engine = BatchEngine(tied, max_batch=2)
    first = prompts(1, seed=7)[0]
    a = run(engine, {0: [(first, 6, {})]})[0]
    follow = first + a.tokens + [5, 6, 7]
    b = run(engine, {0: [(follow, 6, {})]})[0]
    assert b.reused == len(first) + len(a.tokens) - 1  # the last reply token was never fed
    assert b.tokens == alone(tied, follow, 6)
    other = run(engine, {0: [([1, 9, 9, 9], 3, {})]})[0]  # only BOS in common
    assert other.reused == 1 and other.tokens == alone(tied, [1, 9, 9, 9], 3)


def test_a_long_prompt_is_read_in_chunks_while_others_keep_decoding(tied):
    long = prompts(1, seed=8)[0] * 5
    short = prompts(1, seed=9)[0]
    engine = BatchEngine(tied, max_batch=4, prefill_chunk=24)
    a = engine.add(short, 30)
    engine.step()
    b = engine.add(long, 5)
    progress = []
    while engine.has_work():
        before = len(a.tokens)
        engine.step()
        progress.append(len(a.tokens) - before)
    chunks = -(-len(long) // 24)
    # The running stream got a token at every step: its first decode step only queues the draw
    # (pipelined, BatchEngine.step), and every later one reads a token while a chunk is read.
    assert progress[: chunks + 1] == [0] + [1] * chunks
    assert a.tokens == alone(tied, short, 30) and b.tokens == alone(tied, long, 5)


def direct_log_softmax(model, ids):
    """float64 log-softmax of the model's logits at every position of one forward."""
    logits = np.array(model(mx.array([ids]))[0].astype(mx.float32), dtype=np.float64)
    return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        logits.max(-1, keepdims=True)


def test_logprobs_equal_a_direct_log_softmax(tied):
    ps = prompts(3, seed=10)
    seqs = run(BatchEngine(tied), {0: [(p, 8, dict(logprobs=5)) for p in ps]})
    for p, seq in zip(ps, seqs):
        ref = direct_log_softmax(tied, p + seq.tokens)[len(p) - 1:-1]
        for row, tok, t in zip(ref, seq.tokens, seq_records(seq)):
            assert abs(t.logprob - row[tok]) <= 1e-4
            top = np.argsort(-row)[:5]
            assert [i for i, _ in t.top_logprobs] == top.tolist()
            assert np.allclose([v for _, v in t.top_logprobs], row[top], atol=1e-4)


def seq_records(seq):
    return seq.records


@pytest.fixture(autouse=True)
def _record_tokens(monkeypatch):
    """Keeps each sequence's Token records on it (the engine hands them to its caller only)."""
    from elm_mlx import batch

    real = batch.BatchEngine._take

    def take(self, seq, drawn):
        t = real(self, seq, drawn)
        seq.__dict__.setdefault("records", []).append(t)
        return t

    monkeypatch.setattr(batch.BatchEngine, "_take", take)


def test_logprobs_are_taken_after_the_sampling_transforms(tied):
    p = prompts(1, seed=11)[0]
    s = dict(temp=0.7, top_k=4, seed=1, frequency_penalty=0.8, presence_penalty=0.3)
    seq = run(BatchEngine(tied), {0: [(p, 6, dict(logprobs=10, **s))]})[0]
    ref = np.array(tied(mx.array([p + seq.tokens]))[0].astype(mx.float32), dtype=np.float64)[len(p) - 1:-1]
    counts = np.zeros(ref.shape[1])
    for row, tok, t in zip(ref, seq.tokens, seq.records):
        row = (row - 0.8 * counts - 0.3 * (counts > 0)) / 0.7
        kept = np.argsort(-row)[:4]
        lp = row[kept] - np.log(np.exp(row[kept] - row[kept].max()).sum()) - row[kept].max()
        assert tok in kept and abs(t.logprob - lp[list(kept).index(tok)]) <= 1e-4
        assert [i for i, _ in t.top_logprobs] == kept.tolist()  # the filtered-out tokens are not listed
        assert np.allclose([v for _, v in t.top_logprobs], lp, atol=1e-4)
        counts[tok] += 1
    assert seq.tokens == alone(tied, p, 6, **s)


def test_frequency_and_presence_penalties_follow_openai():
    logits = mx.array([[1.0, 1.0, 1.0, 1.0]])
    counts = mx.array([0.0, 1.0, 3.0, 0.0])
    out = apply_frequency_presence(logits, counts, 0.5, 0.25)
    assert out.tolist() == [[1.0, 0.25, -0.75, 1.0]]


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_cache_rows_logits_equal_the_float64_reference(arch):
    """The engine's two forwards over one BatchCache, rows at different lengths: prompt chunks on
    their rows (batch.prefill, eager, packed; one row's prompt in two chunks) and the decode rows' compiled
    step beside a row still reading, against tests/reference.py's float64 NumPy forward of each
    whole sequence."""
    from reference import reference_logits

    from elm_mlx.batch import BatchCache, decode, prefill
    from elm_mlx.step import batch_forward

    cfg, weights = TINY[arch], random_weights(TINY[arch], seed=13)
    model = build(cfg, weights)
    ps = prompts(3, seed=14)
    cache = BatchCache(model, 3)
    cut = len(ps[0]) // 2  # prompts hold at least two tokens
    assert prefill(model, cache, [(0, ps[0][:cut])], [False]) == [None]
    # Packed: row 0's second chunk beside row 1's whole prompt, only row 0's logits wanted.
    read = dict(enumerate(prefill(model, cache, [(0, ps[0][cut:]), (1, ps[1])], [True, False])))
    assert read[1] is None
    stepped, verified = decode(batch_forward(model), cache, {0: 5, 1: 7})
    assert verified == {}
    read[2] = prefill(model, cache, [(2, ps[2])], [True])[0]
    assert cache.lengths == [len(ps[0]) + 1, len(ps[1]) + 1, len(ps[2])]
    got = {0: read[0][0], 2: read[2][0], 3: stepped[0], 4: stepped[1]}
    wholes = {0: ps[0], 2: ps[2], 3: ps[0] + [5], 4: ps[1] + [7]}
    for n, seq in wholes.items():
        ref = reference_logits(weights, cfg, seq)[-1]
        row = np.array(got[n].astype(mx.float32))
        assert np.abs(row - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max()), n


# ---------------------------------------------------------------- speculative sequences in the batch

def lookup_prompts(n, seed):
    """Prompts that repeat themselves, so prompt lookup finds guesses."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        phrase = rng.integers(3, 512, size=int(rng.integers(4, 9))).tolist()
        out.append([1] + phrase * 4 + rng.integers(3, 512, size=3).tolist())
    return out


@pytest.mark.parametrize("proposer", ["lookup", "draft"])
def test_speculative_sequences_decode_inside_the_batch_as_plain_greedy(model, proposer):
    from elm_mlx.speculative import make_proposer

    ps = lookup_prompts(3, seed=7) + prompts(3, seed=8)
    engine = BatchEngine(model, max_batch=8)

    def make():
        if proposer == "lookup":
            return make_proposer(model, prompt_lookup=4)
        return make_proposer(model, draft_model=model, num_draft_tokens=3)

    seqs = [engine.add(p, 14, proposer=make() if i % 2 == 0 else None) for i, p in enumerate(ps)]
    run(engine)
    for p, seq in zip(ps, seqs):
        assert seq.tokens == alone(model, p, 14) and seq.finish == "length"
    stats = [s.spec.stats for s in seqs if s.spec is not None]
    assert all(st.tokens == 14 for st in stats)
    assert sum(st.accepted for st in stats) > 0  # guesses were kept, so blocks really were verified
    assert engine.stats()["generated_tokens"] == 6 * 14


def test_a_speculative_sequence_stops_inside_a_block_and_its_row_is_reused(tied):
    from elm_mlx.speculative import make_proposer

    p = lookup_prompts(1, seed=9)[0]
    plain = alone(tied, p, 20)
    stop = next(i for i in range(6, 20) if plain[i] not in plain[:i]) + 1  # a token new at that point: "EOS"
    engine = BatchEngine(tied, max_batch=2)
    seq = engine.add(p, 20, eos_id=plain[stop - 1], proposer=make_proposer(tied, prompt_lookup=5))
    run(engine)
    assert seq.tokens == plain[:stop] and seq.finish == "stop"
    assert seq.spec.stats.target_forwards < stop  # guesses were kept: fewer forwards than tokens
    # the row keeps a consistent prefix: a follow-up continuing the text equals a fresh run
    follow = p + seq.tokens + [5, 6]
    seq2 = run(engine, {0: [(follow, 6, {})]})[0]
    assert seq2.reused > len(p) and seq2.tokens == alone(tied, follow, 6)


def test_seeded_speculative_sampling_in_the_batch_is_reproducible_beside_any_company(tied):
    from elm_mlx.speculative import make_proposer

    p = lookup_prompts(1, seed=10)[0]
    s = dict(temp=0.8, seed=21)

    def once(company):
        engine = BatchEngine(tied, max_batch=4)
        seq = engine.add(p, 16, proposer=make_proposer(tied, prompt_lookup=3), **s)
        for q in prompts(company, seed=11):
            engine.add(q, 10, temp=1.0, seed=5)
        run(engine)
        return seq.tokens

    assert once(0) == once(3)


def test_compiled_rows_across_capacity_and_batch_buckets_with_joins_leaves_and_reuse(model, monkeypatch):
    # A capacity step of 8 positions makes every few tokens a new capacity bucket (a buffer grown
    # and a new trace); rows join and leave so the compiled step runs 1, 2, 4 and 8 rows (B a
    # power of two, hole rows fed scratch), and a row given up is reused by a prompt that
    # continues what it holds. Every sequence still decodes what it decodes alone.
    from elm_mlx.batch import BatchCache

    monkeypatch.setattr(BatchCache, "step", 8)
    ps = prompts(9, seed=21)
    first = ps[0] + alone(model, ps[0], 5)
    engine = BatchEngine(model, max_batch=8)
    joins = {0: [(ps[0], 5, {})], 2: [(ps[1], 9, {})], 4: [(p, 7, {}) for p in ps[2:7]],
             9: [(first + [7, 8], 6, {}), (ps[8], 11, {})]}
    seqs = run(engine, joins, cancel={6: 3})
    expected = [ps[0], ps[1], *ps[2:7], first + [7, 8], ps[8]]
    for n, (p, seq) in enumerate(zip(expected, seqs)):
        if n == 3:  # cancelled at step 6: what it got is a prefix of its run alone
            assert seq.finish == "cancelled" and seq.tokens == alone(model, p, len(seq.tokens))
        else:
            assert seq.tokens == alone(model, p, seq.max_tokens), n
    assert seqs[7].reused == len(first) - 1  # all it held: the prompt and 4 of its 5 tokens


def test_a_rows_compiled_verification_equals_the_eager_forward_and_leaves_other_rows(model):
    """batch.verify_row (a speculative block through the compiled forward, on its own row of the
    BatchCache): the block's logits equal one eager forward over that row's ids and the block,
    padded or not, and the other rows' cached positions are untouched."""
    from elm_mlx.batch import BatchCache, prefill, verify_row
    from elm_mlx.step import row_blocks

    cache = BatchCache(model, 4)
    ids = prompts(4, seed=3)
    prefill(model, cache, list(enumerate(ids)), [False] * 4)  # four rows holding their prompts
    before = [np.array(k) for k in cache.keys]
    verify = row_blocks(model)
    at = 2
    for block in ([5, 9, 11, 13, 17], [7, 3]):
        logits = np.array(verify_row(verify, cache, at, mx.array(block, mx.int32), 5))
        ref = np.array(model(mx.array([ids[at] + block]))[0, -len(block):])
        assert logits.shape == ref.shape and np.abs(logits - ref).max() <= 1e-5
        ids[at] = ids[at] + block
        assert cache.lengths == [len(p) for p in ids]
    for k, old in zip(cache.keys, before):
        rows = [r for r in range(4) if r != at]
        n = min(len(ids[r]) for r in rows)
        np.testing.assert_array_equal(np.array(k)[rows, :, :n], old[rows, :, :n])


def test_blocks_verified_in_the_decode_rows_pass_equal_eager_forwards(model):
    """batch.decode with speculative blocks (Model.decode_parts: the decode rows and each block packed
    into one compiled pass): every decode row's logits and every block's equal one eager forward over
    that row's ids, for a block on a row inside the decode rows' range (written after that row's
    scratch token) and one past it, at two block widths, and the rows advance by what they were given."""
    from elm_mlx.batch import BatchCache, decode, prefill
    from elm_mlx.step import batch_forward

    cache = BatchCache(model, 6)
    ids = prompts(6, seed=21)
    prefill(model, cache, list(enumerate(ids)), [False] * 6)
    compiled = batch_forward(model)
    for last, blocks in (({0: 5, 2: 9}, {1: ([7, 3, 8], 5), 5: ([4], 5)}), ({1: 6, 3: 2}, {0: ([11, 13], 3)})):
        rows, verified = decode(compiled, cache, last, {r: (mx.array(b, mx.int32), w) for r, (b, w) in blocks.items()})
        assert sorted(verified) == sorted(blocks)
        for row, token in last.items():
            ids[row] = ids[row] + [token]
            ref = np.array(model(mx.array([ids[row]]))[0, -1])
            assert np.abs(np.array(rows[row]) - ref).max() <= 1e-5, row
        for row, (block, _) in blocks.items():
            ids[row] = ids[row] + block
            ref = np.array(model(mx.array([ids[row]]))[0, -len(block):])
            got = np.array(verified[row])
            assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-5, row
        assert cache.lengths == [len(p) for p in ids]


def test_plain_steps_are_pipelined_and_an_end_on_eos_wastes_only_a_draw(tied):
    """A plain sequence's token is drawn in one step and read in the next (BatchEngine.pending),
    after being fed: tokens equal generate_tokens' whether the sequence ends on its length or on
    EOS, an EOS it was fed stays in its kept row (real keys and values of its ids), and nothing
    is left pending once the engine is idle."""
    ids = prompts(2, seed=30)
    want = alone(tied, ids[1], 12)
    eos = next(t for i, t in enumerate(want) if i >= 3 and want.index(t) == i)  # first seen at 3 or later
    engine = BatchEngine(tied, max_batch=2)
    a = engine.add(ids[0], 7)
    b = engine.add(ids[1], 12, eos_id=eos)
    engine.step()  # both prompts read: first tokens, read at once
    assert len(a.tokens) == len(b.tokens) == 1 and not engine.pending
    rows = a.row, b.row
    engine.step()  # fed, the next tokens drawn, not read
    assert set(engine.pending) == {a, b} and len(a.tokens) == len(b.tokens) == 1
    while engine.has_work():
        engine.step()
    assert not engine.pending
    assert a.tokens == alone(tied, ids[0], 7) and a.finish == "length"
    stop = want.index(eos) + 1
    assert b.tokens == want[:stop] and b.finish == "stop"
    assert engine.kept[rows[1]] == ids[1] + b.tokens  # EOS fed: in the row
    assert engine.kept[rows[0]] == ids[0] + a.tokens[:-1]  # the last token of a length end is never fed


@pytest.mark.parametrize("fused_kernels", [False, True])
def test_decode_parts_with_a_block_equal_eager_forwards_on_either_kernel_path(model, fused_kernels):
    """Model.decode_parts, eager (not compiled), on both attention paths (RoPE as matrices and explicit
    GQA matmuls on a CPU; mx.fast's RoPE and SDPA on a GPU): decode rows and a block on a row past them,
    each token's logits equal to one eager forward over its row's ids."""
    from elm_mlx.batch import BatchCache, prefill

    cache = BatchCache(model, 4)
    ids = prompts(4, seed=41)
    prefill(model, cache, list(enumerate(ids)), [False] * 4)
    block = [9, 4, 17]
    parts = [(mx.array([[5], [6], [7]], mx.int32), mx.array(cache.lengths[:3], mx.int32), None),
             (mx.array([block], mx.int32), mx.array([cache.lengths[3]], mx.int32), mx.array([3], mx.int32))]
    (rows, blk), _, _ = model.decode_parts(parts, cache.keys, cache.values, fused_kernels=fused_kernels)
    for r, token in enumerate([5, 6, 7]):
        ref = np.array(model(mx.array([ids[r] + [token]]))[0, -1])
        assert np.abs(np.array(rows[r]) - ref).max() <= 1e-5, r
    ref = np.array(model(mx.array([ids[3] + block]))[0, -len(block):])
    assert blk.shape == (1, 3, ref.shape[-1]) and np.abs(np.array(blk[0]) - ref).max() <= 1e-5


def test_a_block_rows_scratch_token_is_written_after_the_block():
    """A speculative row inside the decode rows' range is fed a scratch token too (the compiled pass
    runs rows 0..B-1); it goes past the block's positions, so no two writes of the pass collide."""
    from elm_mlx.batch import BatchCache, decode

    class Model:  # what BatchCache reads
        config = type("C", (), dict(num_kv_heads=[1], head_dim=4))()
        dtype = mx.float32
        layers = [None]

    seen = {}

    def compiled(tokens, offsets, parts, keys, values, window):
        seen["offsets"], seen["blocks"] = offsets.tolist(), [(p[1].tolist(), p[2].tolist()) for p in parts]
        return [mx.zeros((tokens.shape[0], 8))] + [mx.zeros((1, p[0].shape[1], 8)) for p in parts], keys, values

    cache = BatchCache(Model(), 4)
    cache.lengths = [10, 20, 30, 40]
    decode(compiled, cache, {0: 5, 3: 6}, {1: (mx.array([1, 2, 3], mx.int32), 4)})
    assert seen["blocks"] == [([20], [1])]
    assert seen["offsets"] == [10, 24, 30, 40]  # row 1: its scratch token after its block's 4 positions
    assert cache.lengths == [11, 23, 30, 41]


def test_a_block_beside_plain_rows_is_read_in_the_next_step_and_alone_at_once(tied):
    """Beside pipelined plain rows, a block verified in one step is read in the next (while that
    step computes) and the row gets no block in that step; once it runs alone, each block is read
    in its own step. Every text equals its greedy text alone."""
    from elm_mlx.speculative import make_proposer

    p, q = lookup_prompts(1, seed=31)[0], prompts(1, seed=32)[0]
    engine = BatchEngine(tied, max_batch=2)
    spec = engine.add(p, 24, proposer=make_proposer(tied, prompt_lookup=4))
    plain = engine.add(q, 5)
    engine.step()  # both prompts read: the first tokens
    assert len(spec.tokens) == 1 and spec.unsettled is None
    engine.step()  # its block verified beside the plain row, not read yet
    assert spec.unsettled is not None and len(spec.tokens) == 1 and spec.spec.stats.target_forwards == 1
    engine.step()  # read while this step computes; no block in this step
    assert spec.unsettled is None and len(spec.tokens) > 1 and spec.spec.stats.target_forwards == 2
    engine.step()  # the next block, verified beside the plain row
    assert spec.unsettled is not None and spec.spec.stats.target_forwards == 2
    while plain.finish is None:
        engine.step()
    if spec.unsettled is not None:
        engine.step()  # the block of the plain row's last step, read
    while spec.finish is None:  # alone: a block is verified and read in the same step
        before = spec.spec.stats.target_forwards
        engine.step()
        assert spec.unsettled is None and spec.spec.stats.target_forwards == before + 1
    assert spec.tokens == alone(tied, p, 24) and plain.tokens == alone(tied, q, 5)
    assert spec.spec.stats.accepted > 0  # guesses were kept: real blocks were verified


def test_a_sequence_cancelled_with_a_block_unread_keeps_a_consistent_row(tied):
    """A speculative sequence cancelled while its block is verified but unread: it ends with the tokens
    it had, its row keeps a prefix of them, and a prompt continuing its text reuses the row and
    decodes what it decodes alone."""
    from elm_mlx.speculative import make_proposer

    p, q = lookup_prompts(1, seed=33)[0], prompts(1, seed=34)[0]
    engine = BatchEngine(tied, max_batch=2)
    spec = engine.add(p, 30, proposer=make_proposer(tied, prompt_lookup=4))
    engine.add(q, 12)
    engine.step()
    engine.step()
    assert spec.unsettled is not None
    had = list(spec.tokens)
    engine.cancel(spec)
    engine.step()
    assert spec.finish == "cancelled" and spec.tokens == had and spec.unsettled is None
    kept = engine.kept[next(r for r in range(2) if engine.kept[r][: len(p)] == p)]
    assert kept == (p + had)[: len(kept)] and len(kept) >= len(p)
    while engine.has_work():
        engine.step()
    follow = p + had + [7, 8]
    again = run(engine, {0: [(follow, 6, {})]})[0]
    assert again.reused >= len(p) and again.tokens == alone(tied, follow, 6)


def test_attention_windows_smaller_than_the_buffer_change_no_token(model, monkeypatch):
    """The compiled pass's attention reads each row's first BatchCache.window(need) positions, a power
    of two below the capacity: with windows from 4 up, rows of different lengths, a prompt-lookup
    request's blocks beside them and one alone cross several windows (new traces), and every text
    equals its greedy text alone."""
    from elm_mlx.batch import BatchCache
    from elm_mlx.speculative import make_proposer

    monkeypatch.setattr(BatchCache, "step", 64)
    monkeypatch.setattr(BatchCache, "smallest_window", 4)
    used = []
    window = BatchCache.window
    monkeypatch.setattr(BatchCache, "window", lambda self, need: used.append((need, window(self, need))) or used[-1][1])
    ps = [p[:6] for p in prompts(3, seed=51)] + [lookup_prompts(1, seed=52)[0]]
    engine = BatchEngine(model, max_batch=4)
    seqs = [engine.add(p, 20 + 6 * i) for i, p in enumerate(ps[:3])]
    seqs.append(engine.add(ps[3], 40, proposer=make_proposer(model, prompt_lookup=3)))
    run(engine)
    for p, seq in zip(ps, seqs):
        assert seq.tokens == alone(model, p, seq.max_tokens)
    windows = {w for _, w in used}
    assert {8, 16, 32} <= windows and all(need <= w for need, w in used)  # buffers of 64 and 128 positions
