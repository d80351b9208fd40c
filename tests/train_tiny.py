"""Train a tiny OpenELM with MLX on public-domain text, to get a checkpoint
whose weights have the statistics of trained ones (for quantization studies:
random weights are unrealistically easy or hard to quantize).

The model is OpenELM's architecture at a small size: 6 layers, model_dim 256,
head_dim 32, layer-wise scaling of heads (4 -> 8 query heads, 4 per KV head, as
in the real sizes) and FFN widths (0.5 -> 4.0 x model_dim), the real 32000-token
Llama-2 vocabulary and tokenizer, tied embeddings. Training: next-token
cross-entropy (softmax over the tokens the corpus uses) on tests/data/corpus.txt plus the quality report's text (all
public-domain passages), AdamW
(lr 3e-3, betas 0.9/0.95, weight decay 0.1, as CoreNet's recipe), 64-token
windows at random offsets, batch 8, fixed seeds. Written as an Apple-layout HF
folder (fp32 safetensors + config.json) that every converter path reads.

    python tests/train_tiny.py OUT [--steps 120]
"""

import argparse
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # run as a script: checkpoints.py is beside it

from checkpoints import hf_config, make_hf_checkpoint  # noqa: E402
from elm_mlx.convert.report import TEXT  # noqa: E402

from elm_mlx.config import OpenELMConfig  # noqa: E402
from elm_mlx.model import Model  # noqa: E402
from elm_mlx.tokenizer import Tokenizer  # noqa: E402

CORPUS = HERE / "data/corpus.txt"
TOKENIZER = HERE / "data/llama2-tokenizer/tokenizer.model"
TINY_TRAINED = hf_config(layers=6, model_dim=256, head_dim=32, num_query_heads=[4, 4, 4, 8, 8, 8],
                         num_kv_heads=[1, 1, 1, 2, 2, 2], ffn_multipliers=[0.5, 1.0, 1.5, 2.5, 3.25, 4.0],
                         vocab_size=32000, ffn_dim_divisor=64)


def train(out: Path, steps: int = 120, tokenizer: Path = TOKENIZER, seed: int = 0, log=print,
          config: dict = TINY_TRAINED, batch: int = 8) -> dict:
    mx.random.seed(seed)
    rng = np.random.default_rng(seed)
    # The report text (Pride and Prejudice's opening, the Gettysburg Address) is
    # in the corpus on purpose: OpenELM's pretraining data (RefinedWeb, the Pile,
    # Dolma) holds these famous public-domain passages many times, so a real
    # model predicts them confidently; a model that never saw them is near-uniform
    # there and every near-tie flips under any perturbation.
    ids = np.array(Tokenizer(tokenizer).encode(CORPUS.read_text() + "\n" + TEXT), dtype=np.int32)
    model = Model(OpenELMConfig.from_dict(config))
    # CoreNet's init: linear std in^-0.5, embeddings d^-0.5, residual outputs / sqrt(2L).
    params = {}
    for k, v in tree_flatten(model.parameters()):
        if v.ndim == 2:
            std = v.shape[1] ** -0.5
            if k.endswith(("out_proj.weight", "proj_2.weight")):
                std *= (2 * len(model.layers)) ** -0.5
            params[k] = mx.random.normal(v.shape) * std
    model.load_weights(list(params.items()), strict=False)

    # The softmax runs over the corpus's own tokens (about 1,300 of 32,000): the
    # output head is most of the compute at this size, and a full-vocabulary
    # softmax made training ~25x slower on a CPU. Rows of tokens the corpus never
    # uses stay at their initialization either way (a full softmax only nudges them).
    used = np.unique(ids)
    rows = mx.array(used)
    remap = np.zeros(32000, dtype=np.int32)
    remap[used] = np.arange(len(used))

    def loss_fn(m, x, y):
        h = m.transformer(x)
        return nn.losses.cross_entropy(h @ m.transformer.token_embeddings.weight[rows].T, y).mean()

    schedule = optim.cosine_decay(3e-3, steps, 3e-4)
    opt = optim.AdamW(learning_rate=schedule, betas=[0.9, 0.95], weight_decay=0.1)
    step = nn.value_and_grad(model, loss_fn)
    seq = 64
    for i in range(steps):
        starts = rng.integers(0, len(ids) - seq - 1, batch)
        x = mx.array(np.stack([ids[s:s + seq] for s in starts]))
        y = mx.array(remap[np.stack([ids[s + 1:s + seq + 1] for s in starts])])
        loss, grads = step(model, x, y)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)
        if i % 100 == 0 or i == steps - 1:
            log(f"step {i}: loss {loss.item():.3f}")
    weights = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    make_hf_checkpoint(out, config, weights=weights)
    return weights


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--steps", type=int, default=120)
    a = p.parse_args()
    train(a.out, a.steps)
