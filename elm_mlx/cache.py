"""Per-layer KV cache. OpenELM layers have different KV-head counts, so each
layer owns its cache and its shape comes from the first keys it sees."""

import mlx.core as mx


class KVCache:
    # Grow in steps and write in place: concatenating per token would copy
    # the whole cache every step.
    step = 256

    def __init__(self):
        self.keys = None
        self.values = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        prev, n = self.offset, keys.shape[2]
        if self.keys is None or prev + n > self.keys.shape[2]:
            B, H, _, D = keys.shape
            grow = (n + self.step - 1) // self.step * self.step
            k = mx.zeros((B, H, grow, D), keys.dtype)
            v = mx.zeros((B, H, grow, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = k, v
            else:
                self.keys = mx.concatenate([self.keys[..., :prev, :], k], axis=2)
                self.values = mx.concatenate([self.values[..., :prev, :], v], axis=2)
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
