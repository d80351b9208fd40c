"""The compiled decode step: one token through the model, the repetition
penalty and the sampler as one `mx.compile`d function.

Decoding a small model is bound by the cost of issuing work, not by
arithmetic: an eager step builds a graph of ~25 MLX primitives per layer in
Python and the CPU backend runs them one by one. Here the step is a pure
function of (token, position as an int32 array, the whole fixed-size KV
buffers of elm_mlx/cache.py, the repetition penalty's seen-set), so MLX
traces it once per cache capacity (a bucket of 256 positions), fuses its
elementwise work, and replays the trace for every token: no Python graph
building per token, fewer kernels (gpt-fast's design on MLX). Prefill and
speculative verification stay eager (Model.__call__), which is also the
reference this step must equal (tests/test_step.py)."""

import mlx.core as mx
from mlx.utils import tree_flatten

from .sample import apply_repetition_penalty, make_sampler


def _trace(model, sampling: tuple):
    """The compiled function for one sampling setup: (token[B, 1], offset[1],
    keys, values, seen) -> (next token[B], keys, values, seen)."""
    temp, top_k, top_p, min_p, penalty = sampling
    sampler = make_sampler(temp, top_k, top_p, min_p)

    def step(token, offset, keys, values, seen):
        logits, keys, values = model.decode(token, offset, keys, values)
        if penalty != 1.0:
            logits = apply_repetition_penalty(logits, seen, penalty)
        y = sampler(logits)
        if penalty != 1.0:
            seen = seen | (mx.arange(seen.shape[-1]) == y[:, None]).any(axis=0)
        return y, keys, values, seen

    # The weights are constants of the trace (passing them as inputs would
    # swap the model's array objects during tracing); decode_step retraces
    # when they change. The random state goes in and out, so that seeded
    # sampling draws what the eager path draws.
    state = [mx.random.state] if temp else []
    return mx.compile(step, inputs=state, outputs=state)


def decode_step(model, *, temp=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0):
    """step(token [B] ids, cache, seen) -> (next ids [B], seen): one token
    through the compiled step; the cache advances by one position. seen
    (bool [vocab]) is the repetition penalty's set, None when it is off.
    Traces are kept on the model, so later calls (chat turns, server
    requests) reuse them."""
    sampling = (temp, top_k, top_p, min_p, repetition_penalty)
    weights = tuple(id(p) for _, p in tree_flatten(model.parameters()))
    traces = model.__dict__.setdefault("_elm_decode_steps", {})
    if traces.get("weights") != weights:  # new weights loaded: the old traces hold the old ones
        traces.clear()
        traces["weights"] = weights
    if sampling not in traces:
        traces[sampling] = _trace(model, sampling)
    fn = traces[sampling]
    placeholder = mx.array(False)

    def step(token, cache, seen):
        c0 = cache[0]
        for c in cache:
            c.reserve(1, c.keys, c.values)
        offset = mx.array([c0.offset], mx.int32)
        y, keys, values, seen_out = fn(token.reshape(-1, 1), offset, [c.keys for c in cache],
                                       [c.values for c in cache], placeholder if seen is None else seen)
        for c, k, v in zip(cache, keys, values):
            c.keys, c.values = k, v
            c.offset += 1
        return y, (None if seen is None else seen_out)

    return step
