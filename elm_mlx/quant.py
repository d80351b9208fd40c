"""Every quantization path (convert, load, bench) in one place, with one plan
format: mlx-lm's per-module "quantization" config entry. Affine group
quantization (mx.quantize) with an OpenELM-aware recipe, stored in mlx-lm's
layout: `<module>.weight` packed in uint32, `<module>.scales` and
`<module>.biases` in the compute dtype, and a config.json entry
{"quantization": {"group_size", "bits", "mode", "<module>": {...overrides}}}.

The recipe (measured in docs/QUANTIZATION.md): the tied embedding, which is
also the output head, and the four matrices of the first block are by far the
most sensitive (per-module KL); they get 8 bits under q4 and stay unquantized
under q8. Layer-wise scaling makes the first block OpenELM's narrowest, so this
costs little (2% of the 270M's parameters besides the embedding). The
`-uniform` levels quantize every module alike, as mlx-lm's convert does.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .config import OpenELMConfig
from .errors import ElmError, quoted

RECIPE = {"q4": 4, "q8": 8}  # the OpenELM recipe: sensitive modules get more bits
UNIFORM = {"q4-uniform": 4, "q8-uniform": 8}  # every module alike
LEVELS = RECIPE | UNIFORM
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64  # mlx-lm's affine default
HIGH_BITS = 8
STORED_BITS = (2, 3, 4, 5, 6, 8)  # widths a folder may declare (mlx-lm writes all of these)


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


def make_plan(cfg: OpenELMConfig, level: str, group_size: int = DEFAULT_GROUP_SIZE, high: list | None = None) -> Plan:
    """Every 2-D weight whose input width the group size divides is quantized;
    `high` (default: the recipe's sensitive modules; none for a -uniform level)
    get 8 bits under q4 and stay in the float dtype under q8."""
    if level not in LEVELS:
        raise ElmError(f"--quant {level!r}: expected one of {', '.join(LEVELS)}")
    if group_size not in GROUP_SIZES:
        raise ElmError(f"--group-size {group_size}: expected one of {', '.join(map(str, GROUP_SIZES))}")
    bits = LEVELS[level]
    if high is None:
        high = sensitive_modules(cfg) if level in RECIPE else []
    high = set(high)
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


def quantize_weight(key: str, weight: mx.array, plan: Plan) -> dict:
    """The stored tensors for one weight: itself if the plan leaves it alone,
    else its packed weight, scales and biases."""
    module = key.removesuffix(".weight")
    if module not in plan.modules:
        return {key: weight}
    q, scales, biases = mx.quantize(weight, group_size=plan.group_size, bits=plan.modules[module])
    return {key: q, f"{module}.scales": scales, f"{module}.biases": biases}


def read_quantization(raw: dict, source: str) -> dict | None:
    """mlx-lm's "quantization" entry of config.json: {"group_size", "bits", "mode",
    optional per-module overrides}; None for an unquantized folder."""
    q = raw.get("quantization")
    if q is None:
        return None
    if not isinstance(q, dict) or not isinstance(q.get("bits"), int) or not isinstance(q.get("group_size"), int):
        raise ElmError(f"{source}: \"quantization\" must be an object with integer bits and group_size, got {quoted(q)}")
    if q.get("mode", "affine") != "affine":
        raise ElmError(f"{source}: quantization mode {quoted(q['mode'])} is not supported (expected 'affine')")
    return q


def module_params(entry: dict, module: str) -> tuple:
    """(bits, group_size) of one module under a "quantization" entry: its
    override if there is one, else the entry's default."""
    q = entry.get(module)
    q = q if isinstance(q, dict) else entry
    return q.get("bits"), q.get("group_size")


def quantize_model(model, entry: dict, modules) -> None:
    """Swap the named modules (HF paths without `.weight`) for quantized layers
    with the entry's per-module bits and group size, as mlx-lm's loader does.
    Float weights already in them are quantized; loading packed ones after
    this fills them instead."""
    modules = set(modules)

    def params(path, module):
        if path not in modules or not hasattr(module, "to_quantized"):
            return False
        bits, group_size = module_params(entry, path)
        return {"bits": bits, "group_size": group_size, "mode": "affine"}

    nn.quantize(model, group_size=entry["group_size"], bits=entry["bits"], class_predicate=params)


def quantize_in_memory(model, level: str, group_size: int = DEFAULT_GROUP_SIZE):
    """Quantize a loaded float model in place by make_plan (what `convert
    --quant` would store), for benchmarks and studies."""
    plan = make_plan(model.config, level, group_size)
    quantize_model(model, plan.config_entry(), plan.modules)
    mx.eval(model.parameters())
    return model


def quantized_paths(model) -> dict:
    """{module path: (bits, group size)} of the quantized layers."""
    return {path: (m.bits, m.group_size) for path, m in model.named_modules()
            if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}


def quant_label(model) -> str | None:
    """'q4', or 'q4/8' for a recipe mixing widths; None when not quantized."""
    bits = sorted({b for b, _ in quantized_paths(model).values()})
    return "q" + "/".join(map(str, bits)) if bits else None


def config_entry_of(model) -> dict | None:
    """The "quantization" entry describing an already quantized model (None if it is not)."""
    done = quantized_paths(model)
    if not done:
        return None
    (bits, group_size), *_ = sorted(done.values())
    entry = {"group_size": group_size, "bits": bits, "mode": "affine"}
    for path, (b, g) in done.items():
        if (b, g) != (bits, group_size):
            entry[path] = {"group_size": g, "bits": b, "mode": "affine"}
    return entry


def quantize_like(target, source) -> None:
    """Quantize target's layers that are quantized in source (same module
    paths, bits and group sizes), so that source's packed arrays load into target."""
    entry = config_entry_of(source)
    if entry is not None:
        quantize_model(target, entry, quantized_paths(source))
