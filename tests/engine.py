"""Test helpers that build MLX models from NumPy weights: ours, and mlx-lm's
as an independent reference (the float64 oracle is in reference.py)."""

import mlx.core as mx
import numpy as np
from checkpoints import hf_config
from mlx.utils import tree_flatten
from mlx_lm.models import openelm as mlx_lm_openelm

from elm_mlx.config import OpenELMConfig
from elm_mlx.model import Model

# What the batch engine promises a prompt partly read from a kept row (README, Serve): the same
# tokens, and log-probabilities within this of a fresh read (fp32), since the reused positions were
# computed by differently shaped operations.
REUSE_LOGPROB_TOL = 1e-5

# A tiny model over the real 32000-token vocabulary, for end-to-end text tests.
TINY_32K = hf_config(layers=3, model_dim=64, head_dim=16, num_query_heads=[4, 2, 8], num_kv_heads=[1, 2, 2],
                     ffn_multipliers=[1.0, 2.0, 1.5], vocab_size=32000, ffn_dim_divisor=32)


def build(cfg: dict, weights: dict, dtype=mx.float32) -> Model:
    model = Model(OpenELMConfig.from_dict(cfg))
    model.load_weights([(k, mx.array(v).astype(dtype)) for k, v in weights.items()])
    return model


def mlx_lm_model(cfg: dict, weights: dict):
    model = mlx_lm_openelm.Model(mlx_lm_openelm.ModelArgs.from_dict(cfg))
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    return model


def logits(model, tokens) -> np.ndarray:
    """float64 logits [L, vocab] of one sequence."""
    return np.array(model(mx.array([list(tokens)]))[0].astype(mx.float32), dtype=np.float64)


def param_dtypes(model) -> set:
    return {v.dtype for _, v in tree_flatten(model.parameters())}
