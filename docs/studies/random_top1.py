"""Why top-1 agreement on a random-weight model stays below 99% at 8 bits:
quantize one part at a time and watch the argmax flip while KL stays tiny.

    python docs/studies/random_top1.py FOLDER      # e.g. the random 270M of docs/QUANTIZATION.md
"""

import sys
from pathlib import Path

from elm_mlx.quant import Plan, make_plan
from elm_mlx.convert.report import compare, log_probs
from quant_sensitivity import quantized_model, unquantized_reference


def main(folder: Path):
    cfg, weights, tokens, ref = unquantized_reference(folder)
    emb = "transformer.token_embeddings"
    all8 = make_plan(cfg, "q8", 64, high=[])
    plans = {
        "q8 everything": all8,
        "q8 embedding only": Plan(8, 64, {emb: 8}),
        "q8 all but the embedding": Plan(8, 64, {m: b for m, b in all8.modules.items() if m != emb}),
        "q8 everything, group 32": make_plan(cfg, "q8", 32, high=[]),
        "q4 embedding only": Plan(4, 64, {emb: 4}),
    }
    for name, plan in plans.items():
        q = compare(ref, log_probs(quantized_model(cfg, weights, plan), tokens), tokens)
        print(f"{name:<28} KL {q.mean_kl:.6f}  top-1 {100 * q.top1_agreement:.2f}%", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
