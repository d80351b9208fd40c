"""Per-token cost of structured output's mask (elm_mlx/constrain.py) at OpenELM-270M's
vocabulary (Llama-2's 32000 pieces; the mask cost depends on the vocab and grammar, not on
the model's layers). Walks random valid paths through a strict JSON schema, drawing each
token uniformly from the allowed set, and times allowed() (llguidance bitmask + NumPy unpack
+ mx.array) and the mx.where that applies it to [32000] logits.

    python bench/structured_mask.py [--tokenizer PATH] [--runs N]
"""

import argparse
import statistics
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from elm_mlx.constrain import Constraint
from elm_mlx.sample import apply_allowed
from elm_mlx.tokenizer import Tokenizer

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "color": {"enum": ["red", "green", "blue"]},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 5},
                         "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 4}},
          "required": ["name", "age", "color", "tags", "flags"], "additionalProperties": False}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[1] /
                                               "tests/data/llama2-tokenizer/tokenizer.model"))
    ap.add_argument("--runs", type=int, default=20)
    a = ap.parse_args()
    tok = Tokenizer(a.tokenizer)
    rng = np.random.default_rng(0)
    logits = mx.random.normal((32000,))
    mask_t, apply_t, compile_t = [], [], []
    for run in range(a.runs):
        t0 = time.perf_counter()
        c = Constraint(tok, json_schema=SCHEMA | {"$comment": str(run)})  # a cache miss each run
        compile_t.append(time.perf_counter() - t0)
        for _ in range(500):
            t0 = time.perf_counter()
            m = c.allowed()
            mx.eval(m)
            t1 = time.perf_counter()
            mx.eval(apply_allowed(logits, m))
            apply_t.append(time.perf_counter() - t1)
            mask_t.append(t1 - t0)
            token = int(rng.choice(np.flatnonzero(np.array(m))))
            if token == tok.eos_id:
                break
            c.advance(token)
    ms = lambda xs: 1000 * statistics.mean(xs)
    print(f"vocab 32000, {len(mask_t)} tokens over {a.runs} schema instances: mask {ms(mask_t):.3f} ms/token "
          f"(median {1000 * statistics.median(mask_t):.3f}), applying it {ms(apply_t):.3f} ms/token, "
          f"schema compile + matcher {ms(compile_t):.1f} ms/request")


if __name__ == "__main__":
    main()
