"""Which OpenELM matrices are most sensitive to 4-bit quantization, and what the
recipe buys: the measurement behind convert/quantize.py's default.

For a checkpoint folder (Apple HF layout): the unquantized model's next-token
distributions on the report text are the reference; then
  1. each 2-D weight alone is quantized to 4 bits (everything else unquantized)
     and the mean KL to the reference is recorded (per-module sensitivity);
  2. whole-model plans are compared: uniform q4, q4 with only the embedding at
     8 bits, the default q4 recipe, uniform q8 and the q8 recipe - KL, top-1
     agreement, bits per weight.
Compute in float32 so only quantization moves the distributions.

    python docs/studies/quant_sensitivity.py FOLDER [--group-size 64] [--top 12]
"""

import argparse
import sys
from pathlib import Path

import mlx.core as mx
from elm_mlx.quant import make_plan, quantize_model, quantize_weight, sensitive_modules
from elm_mlx.convert.report import TEXT, compare, log_probs

from elm_mlx.checkpoint import load_weights
from elm_mlx.config import OpenELMConfig, read_config
from elm_mlx.model import Model
from elm_mlx.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "tests/data/llama2-tokenizer/tokenizer.model"


def unquantized_reference(folder: Path):
    """(config, fp32 weights, report-text token ids, the unquantized model's log-probs on them)."""
    cfg = OpenELMConfig.from_dict(read_config(folder / "config.json"))
    weights = load_weights(folder, cfg, mx.float32)
    mx.eval(list(weights.values()))
    tokens = Tokenizer(TOKENIZER).encode(TEXT)
    reference = Model(cfg)
    reference.load_weights(list(weights.items()))
    return cfg, weights, tokens, log_probs(reference, tokens)


def quantized_model(cfg, weights: dict, plan) -> Model:
    stored = {}
    for key, value in weights.items():
        stored |= quantize_weight(key, value, plan)
    model = Model(cfg)
    quantize_model(model, plan.config_entry(), plan.modules)
    model.load_weights(list(stored.items()))
    mx.eval(model.parameters())
    return model


def bits_per_weight(cfg, weights: dict, plan) -> float:
    total = 0
    for key, value in weights.items():
        total += sum(v.nbytes for v in quantize_weight(key, value.astype(mx.bfloat16), plan).values())
    return total * 8 / cfg.num_parameters()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--top", type=int, default=12, help="how many of the most sensitive modules to print")
    a = p.parse_args()
    cfg, weights, tokens, ref = unquantized_reference(a.folder)

    q4 = make_plan(cfg, "q4", a.group_size, high=[])
    print(f"per-module sensitivity ({len(q4.modules)} modules, one at a time at 4 bits, group {a.group_size}):")
    rows = []
    for module in q4.modules:
        one = make_plan(cfg, "q4", a.group_size, high=[])
        one.modules = {module: 4}
        rows.append((compare(ref, log_probs(quantized_model(cfg, weights, one), tokens), tokens).mean_kl, module))
        print(f"  {module:<42} KL {rows[-1][0]:.6f}", file=sys.stderr, flush=True)
    rows.sort(reverse=True)
    total = sum(kl for kl, _ in rows)
    for kl, module in rows[: a.top]:
        print(f"  {module:<42} KL {kl:.6f}  ({100 * kl / total:.1f}% of the sum)")

    plans = {
        "q4 uniform": make_plan(cfg, "q4", a.group_size, high=[]),
        "q4 + 8-bit embedding": make_plan(cfg, "q4", a.group_size, high=["transformer.token_embeddings"]),
        "q4 recipe (default)": make_plan(cfg, "q4", a.group_size),
        "q8 uniform": make_plan(cfg, "q8", a.group_size, high=[]),
        "q8 recipe (default)": make_plan(cfg, "q8", a.group_size),
    }
    high = ", ".join(sensitive_modules(cfg))
    print(f"\nwhole-model plans (recipe: 8 bits under q4, unquantized under q8: {high}):")
    print(f"  {'plan':<24}{'bits/weight':>12}{'mean KL':>12}{'top-1':>9}{'ppl':>10}  (unquantized ppl)")
    for name, plan in plans.items():
        q = compare(ref, log_probs(quantized_model(cfg, weights, plan), tokens), tokens)
        print(f"  {name:<24}{bits_per_weight(cfg, weights, plan):>12.2f}{q.mean_kl:>12.5f}"
              f"{100 * q.top1_agreement:>8.2f}%{q.ppl_quantized:>10.2f}  ({q.ppl_reference:.2f})")


if __name__ == "__main__":
    main()
