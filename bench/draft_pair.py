"""Train the draft-model benchmark pair: two tiny OpenELMs of different sizes
on the same corpus (tests/train_tiny.py's recipe), so that the draft agrees
with the target about as often as a real smaller OpenELM would with a larger
one on familiar text. Target: tests/train_tiny.py's TINY_TRAINED (6 layers,
model_dim 256); draft: 2 layers, model_dim 128. Both tied, Llama-2 vocabulary,
written with the tokenizer so that `elm-mlx` loads them with no flags.

    LD_PRELOAD=.../libopenblas.so.0 python bench/draft_pair.py OUT [--steps 600]
    elm-mlx bench -M OUT/target --draft-model OUT/draft --dtype fp32 --method edit
"""

import argparse
import shutil
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

from checkpoints import hf_config  # noqa: E402
from train_tiny import TINY_TRAINED, TOKENIZER, train  # noqa: E402

DRAFT = hf_config(layers=2, model_dim=128, head_dim=32, num_query_heads=[4, 4], num_kv_heads=[1, 1],
                  ffn_multipliers=[1.0, 2.0], vocab_size=32000, ffn_dim_divisor=64)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--steps", type=int, default=600)
    args = p.parse_args()
    for name, config in [("target", TINY_TRAINED), ("draft", DRAFT)]:
        print(f"training the {name} ...", flush=True)
        train(args.out / name, args.steps, config=config, log=lambda m: print(m, flush=True))
        shutil.copyfile(TOKENIZER, args.out / name / "tokenizer.model")


if __name__ == "__main__":
    main()
