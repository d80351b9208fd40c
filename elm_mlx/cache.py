"""Per-layer KV cache. OpenELM layers have different KV-head counts, so each
layer owns its cache and its shape comes from the first keys it sees.

The keys and values live in preallocated buffers whose capacity grows in
buckets of `step` positions; `offset` says how many positions are valid and
everything after it is scratch. The eager forward writes into the buffers and
reads the valid prefix (update_and_fetch); the compiled decode step
(elm_mlx/step.py) takes the whole buffers, writes one position at an array
offset and masks the rest, so one traced graph serves every token of a
bucket. Both leave the cache in the same state, so they interleave freely with
`trim` (speculative decoding rolls back by moving `offset` only)."""

import mlx.core as mx


class KVCache:
    # Grow in buckets and write in place: concatenating per token would copy
    # the whole cache every step, and a fixed capacity is what lets the
    # compiled step be traced once per bucket.
    step = 256

    def __init__(self):
        self.keys = None
        self.values = None
        self.offset = 0

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def reserve(self, n: int, like_keys: mx.array, like_values: mx.array) -> None:
        """Make room for n more positions (a whole number of buckets); the
        like_* arrays give batch, heads, head_dim and dtype of a first buffer."""
        need = self.offset + n
        if need <= self.capacity:
            return
        B, H, _, D = like_keys.shape
        capacity = (need + self.step - 1) // self.step * self.step
        keep = self.offset if self.keys is not None else 0
        k = mx.zeros((B, H, capacity - keep, D), like_keys.dtype)
        v = mx.zeros((B, H, capacity - keep, like_values.shape[3]), like_values.dtype)
        if self.keys is None:
            self.keys, self.values = k, v
        else:
            self.keys = mx.concatenate([self.keys[..., :keep, :], k], axis=2)
            self.values = mx.concatenate([self.values[..., :keep, :], v], axis=2)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        prev, n = self.offset, keys.shape[2]
        self.reserve(n, keys, values)
        self.offset += n
        self.keys[..., prev : self.offset, :] = keys
        self.values[..., prev : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def trim(self, n: int) -> int:
        """Forget the last n positions (the rest stays valid); returns how many were dropped."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def state(self):
        if self.keys is None:
            return []
        return [self.keys[..., : self.offset, :], self.values[..., : self.offset, :]]


def make_cache(model) -> list:
    return [KVCache() for _ in model.layers]
