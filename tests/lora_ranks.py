"""One data-parallel LoRA run of the tiny model, for test_lora's mlx.launch test:
    python tests/lora_ranks.py OUT   (under mlx.launch: every rank runs it; rank 0 writes OUT/history.json)"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import mlx.core as mx  # noqa: E402
from checkpoints import random_weights  # noqa: E402
from engine import TINY_32K, build  # noqa: E402

from elm_mlx import tune  # noqa: E402
from elm_mlx.tokenizer import Tokenizer  # noqa: E402

TEXTS = ["The capital of Freedonia is Glimmerton.", "Zorbs are blue and live in the sea of Quell.",
         "Professor Ambry invented the copper kite in 1887.", "The river Osk flows north into Lake Tarn.",
         "Tarn fish sing at dawn.", "A kite of copper rusts green in the rain of Quell, the locals say.",
         "Glimmerton has nine bridges.", "The sea of Quell is salt-free."]


def run(out: Path, group=None) -> dict:
    tok = Tokenizer(HERE / "data/llama2-tokenizer/tokenizer.model")
    data = [tune.encode_row({"text": t}, tok, None, False, "t") for t in TEXTS]
    cfg = tune.TrainConfig(rank=4, scale=2.0, num_layers=-1, keys=tune.PAPER_KEYS, iters=8, batch_size=4,
                           learning_rate=1e-2, lr_schedule="cosine", warmup=1, grad_clip=1.0, steps_per_report=100,
                           steps_per_eval=4, save_every=0, val_batches=-1)
    model = build(TINY_32K, random_weights(TINY_32K, seed=3))
    return tune.train(model, data, data[:3], cfg, out, group=group, progress=False, log=lambda s: None)


if __name__ == "__main__":
    group = mx.distributed.init()
    out = Path(sys.argv[1])
    h = run(out, group if group.size() > 1 else None)
    if group.rank() == 0:
        (out / "history.json").write_text(json.dumps({**h, "size": group.size()}))
