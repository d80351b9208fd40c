"""The compiled decode step: one token through the model, the repetition
penalty and the sampler as one `mx.compile`d function.

Decoding a small model is bound by the cost of issuing work, not by
arithmetic: an eager step of a 28-layer model builds ~4,000 MLX graph nodes
in Python and the CPU backend runs them one by one. Here the step is a pure
function of (token, position as an int32 array, the whole fixed-size KV
buffers of elm_mlx/cache.py, the repetition penalty's seen-set), so MLX
traces it once per cache capacity (a bucket of 256 positions), fuses its
elementwise work, and replays the trace for every token: no Python graph
building per token, ~1,400 nodes for that model (gpt-fast's design on MLX;
Model.decode holds the step's forward). The batch engine's decode rows run
the same forward over B rows at per-row offsets (`batch_forward`, one trace
per capacity bucket, power-of-two B and block widths), with sampling per
sequence outside it. Speculative verification runs a block of k + 1 positions
through the same forward, padded to a fixed width so one trace serves every
block: a single sequence's (`verify_block`) and, in the batch engine, each
speculative row's as a part of the decode rows' pass (Model.decode_parts: the
tokens packed, each a row of its own, for the projections, RoPE, the cache
writes and the FFN, so the weights are read once; attention per part, so no row
pays k + 1 positions of attention but the speculative one), or alone on its row
when no row decodes plainly (`row_blocks`). Prefill and the batch engine's
prompt chunks stay eager (Model.__call__; the chunks packed, each on its row of
the BatchCache: batch.prefill); the eager forward is also the reference these
steps must equal (tests/test_step.py, tests/test_batch.py)."""

import mlx.core as mx
from mlx.utils import tree_flatten

from .sample import apply_allowed, apply_repetition_penalty, make_sampler


def _structure(temp, top_k, top_p, min_p, penalty, constrained=False) -> tuple:
    """What the trace depends on: which filters run (and top-k's k, a shape).
    The values themselves are array inputs (`_knobs`), so one trace, and one
    set of fused kernels, serves every temperature a server is asked for."""
    return (temp != 0, top_k, top_p < 1.0, min_p > 0.0, penalty != 1.0, bool(constrained))


def _knobs(temp, top_p, min_p, penalty) -> mx.array:
    return mx.array([temp or 1.0, top_p, min_p, penalty], mx.float32)


def _trace(model, structure: tuple):
    """The compiled function for one sampling structure: (token[B, 1],
    offset[1], keys, values, seen, knobs, key, allowed) -> (next token[B], keys, values, seen)."""
    sampled, top_k, use_top_p, use_min_p, penalized, constrained = structure

    def step(token, offset, keys, values, seen, knobs, key, allowed):
        logits, keys, values = model.decode(token, offset, keys, values)
        if constrained:  # structured output's mask, before every other transform (sample.py)
            logits = apply_allowed(logits, allowed)
        if penalized:  # in the logits' dtype, as the eager path's Python float is
            logits = apply_repetition_penalty(logits, seen, knobs[3].astype(logits.dtype))
        # Python numbers choose the filters; knobs[0..2] are their values.
        sampler = make_sampler(float(sampled), top_k, 0.5 if use_top_p else 1.0, 0.5 if use_min_p else 0.0,
                               values=(knobs[0], knobs[1], knobs[2]))
        y = sampler(logits, key if sampled else None)
        if penalized:
            seen = seen | (mx.arange(seen.shape[-1]) == y[:, None]).any(axis=0)
        return y, keys, values, seen

    # The weights are constants of the trace (passing them as inputs would
    # swap the model's array objects during tracing); decode_step retraces
    # when they change. A sampled draw takes the sequence's own random key
    # (sample.py's SequenceSampler), so that seeded sampling draws what the
    # eager path, and the server's batches, draw.
    return mx.compile(step)


def _traced(model, name, build):
    """The compiled function `name` of this model, built once and kept on the model (so later calls,
    chat turns and server requests reuse it); all are dropped when its weights change, since the
    traces hold the weights as constants. mx.compile traces again for each new input shape itself."""
    weights = tuple(id(p) for _, p in tree_flatten(model.parameters()))
    traces = model.__dict__.setdefault("_elm_decode_steps", {})
    if traces.get("weights") != weights:  # new weights loaded: the old traces hold the old ones
        traces.clear()
        traces["weights"] = weights
    if name not in traces:
        traces[name] = build()
    return traces[name]


def batch_forward(model):
    """The batch engine's compiled decode forward: (tokens int32 [B, 1], offsets int32 [B], blocks,
    keys, values, window) -> ([logits [B, vocab], then each block's [1, width, vocab]], keys, values), where
    keys/values are the BatchCache's per-layer [rows >= B, kv heads, capacity, head_dim] buffers, row
    b decodes at position offsets[b], and blocks = [(tokens int32 [1, width], offset int32 [1], row
    int32 [1])] are speculative rows' blocks verified in the same pass (Model.decode_parts: the
    weights read once), attention reading each row's first `window` positions (an int: BatchCache.window).
    One trace per (capacity bucket, window, B, block widths): the engine pads B to a power of two. Sampling stays per sequence (sample.SequenceSampler: its own penalties, random
    key and constraint), outside."""
    def run(tokens, offsets, blocks, keys, values, window):
        return model.decode_parts([(tokens, offsets, None)] + [tuple(b) for b in blocks], keys, values, window=window)

    return _traced(model, "batch", lambda: mx.compile(run))


def row_blocks(model):
    """The batch engine's compiled verification: (tokens int32 [1, width], offset int32 [1], keys,
    values, row int32 [1], window) -> (logits [1, width, vocab], keys, values): one row's speculative
    block through the BatchCache buffers, in a step with no plain row (one trace per capacity,
    window and width)."""
    return _traced(model, "row", lambda: mx.compile(lambda t, o, k, v, r, w: model.decode(t, o, k, v, rows=r, window=w)))


def verify_block(model, width: int):
    """Speculative verification's compiled forward (speculative_tokens): run(block int32 [n <= width],
    cache) -> logits [n, vocab] at the block's positions, the cache advanced by n. The block is
    padded to `width` (the proposer's k + 1), so one trace per capacity bucket serves every block;
    the padding's cache positions lie past the offset, scratch. The same Model.decode trace
    family as row_blocks', over one sequence and `width` positions."""
    compiled = _traced(model, "block", lambda: mx.compile(model.decode))

    def run(block, cache):
        n = block.shape[0]
        c0 = cache[0]
        for c in cache:
            c.reserve(width, c.keys, c.values)
        logits, keys, values = compiled(padded(block, width)[None], mx.array([c0.offset], mx.int32), [c.keys for c in cache],
                                        [c.values for c in cache])
        for c, k, v in zip(cache, keys, values):
            c.keys, c.values = k, v
            c.offset += n
        return (logits if width > 1 else logits[:, None])[0, :n]

    return run


def padded(block: mx.array, width: int) -> mx.array:
    """A speculative block (int32 [n <= width]) padded with scratch tokens to its trace's width."""
    n = block.shape[0]
    return mx.concatenate([block, mx.zeros((width - n,), mx.int32)]) if n < width else block


def decode_step(model, *, temp=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, constrained=False):
    """step(token [B] ids, cache, seen, key=None, allowed=None) -> (next ids [B], seen): one token
    through the compiled step; the cache (holding at least the prompt, from
    the eager forward) advances by one position. seen
    (bool [vocab]) is the repetition penalty's set, None when it is off.
    constrained: every call passes `allowed` (bool [vocab]), structured
    output's mask for this token (sample.apply_allowed).
    Traces are kept on the model, so later calls (chat turns, server
    requests) reuse them."""
    structure = _structure(temp, top_k, top_p, min_p, repetition_penalty, constrained)
    knobs = _knobs(temp, top_p, min_p, repetition_penalty)
    fn = _traced(model, structure, lambda: _trace(model, structure))
    placeholder, no_key = mx.array(False), mx.zeros((2,), mx.uint32)

    def step(token, cache, seen, key=None, allowed=None):
        if constrained and allowed is None:
            raise ValueError("decode_step: a constrained step needs the allowed mask of every token")
        c0 = cache[0]
        if c0.keys is None:
            raise ValueError("decode_step: the cache is empty; run the prompt through the model first")
        for c in cache:
            c.reserve(1, c.keys, c.values)
        offset = mx.array([c0.offset], mx.int32)
        if key is None:  # greedy; or a caller without a sequence key: one from MLX's global generator
            key = mx.random.randint(0, 2**31 - 1, (2,)).astype(mx.uint32) if structure[0] else no_key
        y, keys, values, seen_out = fn(token.reshape(-1, 1), offset, [c.keys for c in cache],
                                       [c.values for c in cache], placeholder if seen is None else seen, knobs, key,
                                       placeholder if allowed is None else allowed)
        for c, k, v in zip(cache, keys, values):
            c.keys, c.values = k, v
            c.offset += 1
        return y, (None if seen is None else seen_out)

    return step
