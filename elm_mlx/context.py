"""A KV cache that knows which token ids it holds, so a prompt that starts the
same way (a chat's history, a client re-sending its conversation) reads only
what is new."""

from .cache import make_cache
from .generate import check_context, stream_generate


def common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class CachedContext:
    def __init__(self, model, compile: bool = True):
        self.model = model
        self.compile = compile  # decode with the compiled step (False: the eager reference)
        self.cache = make_cache(model)
        self.ids: list[int] = []  # what the cache holds, position by position
        self.reused = 0  # prompt tokens the last stream() found in the cache

    def keep(self, n: int):
        """Forget everything after the first n ids."""
        for c in self.cache:
            c.trim(max(0, c.offset - n))
        self.ids = self.ids[:n]

    def stream(self, tokenizer, ids: list[int], max_tokens: int, **kwargs):
        """stream_generate() over the prompt `ids`, reading only what follows the longest
        prefix already cached. Afterwards (finished, closed early or interrupted) the cache
        holds the prompt and the tokens yielded, and `ids` says so."""
        check_context(len(ids), self.model.config.max_context_length)
        # The last prompt token is always read again: its logits pick the first new token.
        self.reused = n = min(common_prefix(self.ids, ids), len(ids) - 1)
        self.keep(n)
        tokens = []
        try:
            for r in stream_generate(self.model, tokenizer, ids[n:], max_tokens, cache=self.cache,
                                     context=ids[:n], compile=self.compile, **kwargs):
                tokens.append(r.token)
                yield r
        finally:
            # Each yielded token is already in the cache (its step ran ahead). A Ctrl-C can
            # land mid-step, leaving some layers a position ahead: the shortest one decides.
            self.ids = ids + tokens
            self.keep(min([c.offset for c in self.cache] + [len(self.ids)]))
