"""OpenELM configuration: Apple's config.json, and the eight presets built from
the layer-wise scaling rule with no weights needed."""

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import ElmError, quoted
from .files import read_text

# (layers, model_dim, head_dim) of the four sizes; every size uses 4 query heads
# per KV head, qkv multipliers 0.5 -> 1.0 and FFN multipliers 0.5 -> 4.0.
SIZES = {
    "270M": (16, 1280, 64),
    "450M": (20, 1536, 64),
    "1_1B": (28, 2048, 64),
    "3B": (36, 3072, 128),
}
PRESETS = [f"{s}{v}" for s in SIZES for v in ("", "-Instruct")]
GQA_GROUPS = 4
QKV_MULTIPLIERS = (0.5, 1.0)
FFN_MULTIPLIERS = (0.5, 4.0)


def make_divisible(v, divisor, min_value=None):
    """Round v to the nearest multiple of divisor, never below min_value
    (default: divisor) and never more than 10% below v (CoreNet's rule)."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _interpolate(lo, hi, n):
    # numpy float64 linspace then round(., 2): what CoreNet and Apple's HF
    # config code do. An mx.linspace in float32 could round differently.
    return [round(float(v), 2) for v in np.linspace(lo, hi, num=n, dtype=float)]


CONFIG_LIMIT = 16 << 20  # Apple's config.json is 1 KB


def read_config(path: Path) -> dict:
    """config.json as a dict; every way it can be unreadable is one ElmError naming it."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise ElmError(f"{path} not found: an OpenELM model folder needs a config.json")
    text = read_text(path, "config.json", CONFIG_LIMIT)
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ElmError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise ElmError(f"{path} is not valid JSON: nested too deeply") from None
    if not isinstance(d, dict):
        raise ElmError(f"{path}: expected a JSON object of settings, got a JSON {_json_type(d)}")
    return d


def _json_type(v) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(v), type(v).__name__)


# Field -> (check, what is expected): a config.json from the internet is checked
# before any number in it sizes an array.
def _int(lo):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _num(lo):
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > lo and v == v and v != float("inf")


def _ints(lo):
    return lambda v: isinstance(v, list) and all(_int(lo)(x) for x in v)


FIELD_TYPES = {
    "num_transformer_layers": (_int(1), "an integer >= 1"),
    "model_dim": (_int(1), "an integer >= 1"),
    "head_dim": (_int(1), "an integer >= 1"),
    "num_query_heads": (_ints(1), "a list of integers >= 1"),
    "num_kv_heads": (_ints(1), "a list of integers >= 1"),
    "ffn_multipliers": (lambda v: isinstance(v, list) and all(_num(0)(x) for x in v), "a list of numbers > 0"),
    "vocab_size": (_int(1), "an integer >= 1"),
    "ffn_dim_divisor": (_int(1), "an integer >= 1"),
    "normalize_qk_projections": (lambda v: isinstance(v, bool), "true or false"),
    "share_input_output_layers": (lambda v: isinstance(v, bool), "true or false"),
    "rope_freq_constant": (_num(0), "a number > 0"),
    "max_context_length": (_int(1), "an integer >= 1"),
    "rms_norm_eps": (_num(0), "a number > 0"),
    "bos_token_id": (_int(0), "an integer >= 0"),
    "eos_token_id": (_int(0), "an integer >= 0"),
}


def preset_name(name: str) -> str | None:
    """Canonical preset for '270M', 'openelm-1.1b-instruct', 'apple/OpenELM-3B', ...;
    None when name is not one."""
    m = re.fullmatch(r"(?:apple/)?(?:openelm-)?(270m|450m|1[._]1b|3b)(-instruct)?", name.lower())
    if not m:
        return None
    size = m.group(1).upper().replace(".", "_")
    return size + ("-Instruct" if m.group(2) else "")


def nearest_preset(name: str) -> str | None:
    """The preset a near miss meant ('1.1b-instuct' -> '1_1B-Instruct'), or None."""
    import difflib

    lower = {p.lower(): p for p in PRESETS}
    key = name.lower().removeprefix("apple/").removeprefix("openelm-").replace(".", "_")
    close = difflib.get_close_matches(key, lower, n=1, cutoff=0.6)
    return lower[close[0]] if close else None


def models_table() -> str:
    """`elm-mlx models`: the presets with hub id, exact parameter count, layers, bf16 size, KV cache at 2048."""
    lines = [f"{'preset':<15}{'hub id':<30}{'parameters':>15}{'layers':>8}{'bf16 GB':>9}{'KV@2048 MiB':>13}"]
    for name in PRESETS:
        cfg = OpenELMConfig.from_preset(name)
        n = cfg.num_parameters()
        kv = cfg.kv_bytes_per_token() * cfg.max_context_length / 2**20
        lines.append(f"{name:<15}{'apple/OpenELM-' + name:<30}{n:>15,}{cfg.num_transformer_layers:>8}"
                     f"{n * 2 / 1e9:>9.2f}{kv:>13.1f}")
    return "\n".join(lines)


@dataclass
class OpenELMConfig:
    num_transformer_layers: int
    model_dim: int
    head_dim: int
    num_query_heads: list
    num_kv_heads: list
    ffn_multipliers: list
    vocab_size: int = 32000
    ffn_dim_divisor: int = 256
    normalize_qk_projections: bool = True
    share_input_output_layers: bool = True
    rope_freq_constant: float = 10000.0
    max_context_length: int = 2048
    rms_norm_eps: float = 1e-6
    bos_token_id: int = 1
    eos_token_id: int = 2

    @classmethod
    def from_preset(cls, name: str) -> "OpenELMConfig":
        canonical = preset_name(name)
        if canonical is None:
            near = nearest_preset(name)
            raise ElmError(f"unknown preset {name!r}: " + (f"did you mean {near}?" if near else
                                                            f"expected one of {', '.join(PRESETS)}"))
        layers, dim, head_dim = SIZES[canonical.split("-")[0]]
        q_heads = []
        for alpha in _interpolate(*QKV_MULTIPLIERS, layers):
            q_dim = int(make_divisible(dim * alpha, divisor=head_dim * GQA_GROUPS))
            q_heads.append(q_dim // head_dim)
        return cls(
            num_transformer_layers=layers,
            model_dim=dim,
            head_dim=head_dim,
            num_query_heads=q_heads,
            num_kv_heads=[q // GQA_GROUPS for q in q_heads],
            ffn_multipliers=_interpolate(*FFN_MULTIPLIERS, layers),
        )

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "OpenELMConfig":
        """Read Apple's HF config.json (or ours, which is the same plus a few
        keys). Errors name the file and key."""
        if not isinstance(d, dict):
            raise ElmError(f"{source}: expected a JSON object of settings, got a JSON {_json_type(d)}")
        if d.get("model_type") != "openelm":
            raise ElmError(f"{source}: model_type is {quoted(d.get('model_type'))}, expected 'openelm'")
        unsupported = {
            "ffn_with_glu": True,
            "activation_fn_name": "swish",
            "normalization_layer_name": "rms_norm",
        }
        for key, want in unsupported.items():
            if d.get(key, want) != want:
                raise ElmError(f"{source}: {key}={quoted(d[key])} is not supported (OpenELM uses {want!r})")
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for key, value in fields.items():
            ok, want = FIELD_TYPES[key]
            if not ok(value):
                raise ElmError(f"{source}: {key} is {quoted(value)}, expected {want}")
        missing = [k for k in ("num_transformer_layers", "model_dim", "head_dim", "num_query_heads",
                               "num_kv_heads", "ffn_multipliers") if k not in fields]
        if missing:
            raise ElmError(f"{source}: missing key(s) {', '.join(missing)}")
        cfg = cls(**fields)
        cfg._check(source)
        return cfg

    @classmethod
    def from_file(cls, path: Path) -> "OpenELMConfig":
        return cls.from_dict(read_config(path), source=str(path))

    def _check(self, source):
        n = self.num_transformer_layers
        for key in ("num_query_heads", "num_kv_heads", "ffn_multipliers"):
            value = getattr(self, key)
            if not isinstance(value, list) or len(value) != n:
                raise ElmError(f"{source}: {key} must be a list of num_transformer_layers={n} values, "
                               f"got {quoted(value)}")
        for i, (q, kv) in enumerate(zip(self.num_query_heads, self.num_kv_heads)):
            if kv <= 0 or q % kv:
                raise ElmError(f"{source}: layer {i} has {q} query heads and {kv} KV heads; "
                               "query heads must be a positive multiple of KV heads")
        for key, shape in self.weight_shapes().items():
            if max(shape) >= 2**31:  # MLX's array dimensions are 32-bit
                raise ElmError(f"{source}: model_dim, head_dim, the head counts and ffn_multipliers give {key} "
                               f"the shape {list(shape)}; a dimension must be < 2**31")
        for key in ("bos_token_id", "eos_token_id"):
            if getattr(self, key) >= self.vocab_size:
                raise ElmError(f"{source}: {key} is {getattr(self, key)}, past vocab_size {self.vocab_size}")

    @property
    def ffn_dims(self) -> list:
        return [int(make_divisible(m * self.model_dim, self.ffn_dim_divisor)) for m in self.ffn_multipliers]

    def weight_shapes(self) -> dict:
        """Every tensor of an HF checkpoint, with its PyTorch [out, in] shape."""
        d, hd = self.model_dim, self.head_dim
        shapes = {"transformer.token_embeddings.weight": (self.vocab_size, d)}
        for i, (q, kv, f) in enumerate(zip(self.num_query_heads, self.num_kv_heads, self.ffn_dims)):
            p = f"transformer.layers.{i}."
            shapes[p + "attn_norm.weight"] = (d,)
            shapes[p + "attn.qkv_proj.weight"] = ((q + 2 * kv) * hd, d)
            if self.normalize_qk_projections:
                shapes[p + "attn.q_norm.weight"] = (hd,)
                shapes[p + "attn.k_norm.weight"] = (hd,)
            shapes[p + "attn.out_proj.weight"] = (d, q * hd)
            shapes[p + "ffn_norm.weight"] = (d,)
            shapes[p + "ffn.proj_1.weight"] = (2 * f, d)
            shapes[p + "ffn.proj_2.weight"] = (d, f)
        shapes["transformer.norm.weight"] = (d,)
        if not self.share_input_output_layers:
            shapes["lm_head.weight"] = (self.vocab_size, d)
        return shapes

    def num_parameters(self) -> int:
        return sum(math.prod(s) for s in self.weight_shapes().values())  # Python ints: never overflow

    @property
    def fp16_safe(self) -> bool:
        """False for the 3B (model_dim 3072): its activations overflow float16, so it runs in bf16 or fp32."""
        return self.model_dim < 3072

    def kv_bytes_per_token(self, itemsize: int = 2) -> int:
        return 2 * self.head_dim * sum(self.num_kv_heads) * itemsize

    def to_dict(self) -> dict:
        """config.json in Apple's HF layout, so other OpenELM loaders
        (mlx-lm, transformers' remote code) read our folders too."""
        d = asdict(self)
        d.update(
            model_type="openelm",
            architectures=["OpenELMForCausalLM"],
            ffn_with_glu=True,
            activation_fn_name="swish",
            normalization_layer_name="rms_norm",
            num_gqa_groups=GQA_GROUPS,
            qkv_multipliers=list(QKV_MULTIPLIERS),
            rope_max_length=2 * self.max_context_length,
        )
        return d
