"""Affine group quantization (mx.quantize) with an OpenELM-aware recipe, stored
in mlx-lm's layout: `<module>.weight` packed in uint32, `<module>.scales` and
`<module>.biases` in the compute dtype, and a config.json entry
{"quantization": {"group_size", "bits", "mode", "<module>": {...overrides}}}.

The recipe (measured in docs/QUANTIZATION.md): the tied embedding, which is
also the output head, and the four matrices of the first block are by far the
most sensitive (per-module KL); they get 8 bits under q4 and stay unquantized
under q8. Layer-wise scaling makes the first block OpenELM's narrowest, so this
costs little (2% of the 270M's parameters besides the embedding).
"""

from dataclasses import dataclass

import mlx.core as mx

from ..config import OpenELMConfig
from ..errors import ElmError

LEVELS = {"q4": 4, "q8": 8}
GROUP_SIZES = (32, 64, 128)
HIGH_BITS = 8


@dataclass
class Plan:
    """Bits for every quantized module (HF path without `.weight`)."""

    bits: int
    group_size: int
    modules: dict  # module -> bits

    def config_entry(self) -> dict:
        """mlx-lm's "quantization" entry: the default, plus the modules that differ."""
        entry = {"group_size": self.group_size, "bits": self.bits, "mode": "affine"}
        for module, bits in self.modules.items():
            if bits != self.bits:
                entry[module] = {"group_size": self.group_size, "bits": bits, "mode": "affine"}
        return entry


def sensitive_modules(cfg: OpenELMConfig) -> list:
    """The modules the recipe gives more bits: the embedding / head and block 0."""
    head = ["transformer.token_embeddings"] + ([] if cfg.share_input_output_layers else ["lm_head"])
    return head + [f"transformer.layers.0.{m}" for m in ("attn.qkv_proj", "attn.out_proj", "ffn.proj_1",
                                                         "ffn.proj_2")]


def make_plan(cfg: OpenELMConfig, level: str, group_size: int, high: list | None = None) -> Plan:
    """Every 2-D weight whose input width the group size divides is quantized;
    `high` (default: the recipe's sensitive modules) get 8 bits under q4 and
    stay in the float dtype under q8."""
    if level not in LEVELS:
        raise ElmError(f"--quant {level!r}: expected one of {', '.join(LEVELS)}")
    if group_size not in GROUP_SIZES:
        raise ElmError(f"--group-size {group_size}: expected one of {', '.join(map(str, GROUP_SIZES))}")
    bits = LEVELS[level]
    high = set(sensitive_modules(cfg) if high is None else high)
    modules = {}
    for key, shape in cfg.weight_shapes().items():
        module = key.removesuffix(".weight")
        if len(shape) != 2 or shape[1] % group_size or (module in high and bits >= HIGH_BITS):
            continue
        modules[module] = HIGH_BITS if module in high else bits
    if not modules:
        raise ElmError(f"--group-size {group_size} divides no layer's input width (model_dim {cfg.model_dim}): "
                       "nothing to quantize; choose a smaller group size")
    return Plan(bits, group_size, modules)


def quantize(key: str, weight: mx.array, plan: Plan) -> dict:
    """The stored tensors for one weight: itself if the plan leaves it alone,
    else its packed weight, scales and biases."""
    module = key.removesuffix(".weight")
    if module not in plan.modules:
        return {key: weight}
    q, scales, biases = mx.quantize(weight, group_size=plan.group_size, bits=plan.modules[module])
    return {key: q, f"{module}.scales": scales, f"{module}.biases": biases}
