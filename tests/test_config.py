import json

import pytest
from checkpoints import TINY, openelm_270m_config, param_count

from elm_mlx.config import OpenELMConfig, make_divisible, preset_name
from elm_mlx.errors import ElmError

# Published parameter counts of Apple's HF artifacts (vocab 32000, tied head).
PARAMS = {"270M": 271_527_168, "450M": 457_179_136, "1_1B": 1_079_891_456, "3B": 3_036_647_424}


@pytest.mark.parametrize("size", PARAMS)
def test_preset_parameter_counts_without_weights(size):
    assert OpenELMConfig.from_preset(size).num_parameters() == PARAMS[size]
    assert OpenELMConfig.from_preset(size + "-Instruct").num_parameters() == PARAMS[size]


def test_270m_preset_equals_apple_config_json():
    apple = OpenELMConfig.from_dict(openelm_270m_config())
    assert OpenELMConfig.from_preset("270M") == apple


def test_layer_wise_scaling_tables():
    # Rows of the reference's per-layer tables (openelm.md 1.3).
    c = OpenELMConfig.from_preset("1_1B")
    assert (c.num_query_heads[0], c.num_query_heads[3], c.num_query_heads[18], c.num_query_heads[27]) == (16, 20, 28, 32)
    assert c.ffn_dims[13] == c.ffn_dims[14] == 4608  # the rounding edge at 2.19 and 2.31
    c = OpenELMConfig.from_preset("3B")
    assert c.head_dim == 128 and c.num_kv_heads[0] == 3 and c.num_kv_heads[-1] == 6
    assert c.ffn_dims[0] == 1536 and c.ffn_dims[-1] == 12288
    assert all(q == 4 * kv for q, kv in zip(c.num_query_heads, c.num_kv_heads))


def test_make_divisible_never_more_than_10_percent_down():
    assert make_divisible(100, 64) == 128  # 64 would be 36% below
    assert make_divisible(10, 256) == 256  # never below the divisor
    assert make_divisible(0.73 * 1280, 256) == 1024


@pytest.mark.parametrize("name", list(TINY))
def test_weight_shapes_match_an_independent_count(name):
    assert OpenELMConfig.from_dict(TINY[name]).num_parameters() == param_count(TINY[name])


@pytest.mark.parametrize("name,canonical", [
    ("270M", "270M"), ("270m-instruct", "270M-Instruct"), ("OpenELM-1.1B", "1_1B"),
    ("apple/OpenELM-3B-Instruct", "3B-Instruct"), ("7B", None), ("apple/OpenELM-270M-x", None),
])
def test_preset_names(name, canonical):
    assert preset_name(name) == canonical


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ElmError, match="unknown preset '7B'.*270M, 270M-Instruct"):
        OpenELMConfig.from_preset("7B")


def test_to_dict_round_trips_and_keeps_apple_fields():
    c = OpenELMConfig.from_preset("450M")
    d = json.loads(json.dumps(c.to_dict()))
    assert OpenELMConfig.from_dict(d) == c
    assert d["model_type"] == "openelm" and d["num_gqa_groups"] == 4 and d["rope_max_length"] == 4096


@pytest.mark.parametrize("change,message", [
    ({"model_type": "llama"}, "model_type is 'llama', expected 'openelm'"),
    ({"num_query_heads": [4, 4]}, "num_query_heads must be a list of num_transformer_layers=3 values"),
    ({"num_kv_heads": [1, 3, 2]}, "layer 1 has 4 query heads and 3 KV heads"),
    ({"ffn_with_glu": False}, "ffn_with_glu=False is not supported"),
    ({"head_dim": None}, None),
])
def test_bad_configs_name_the_key(change, message):
    d = dict(TINY["tied"], **change)
    if message is None:  # a key removed entirely
        d = {k: v for k, v in TINY["tied"].items() if k != "head_dim"}
        message = "missing key\\(s\\) head_dim"
    with pytest.raises(ElmError, match=f"my/config.json: {message}"):
        OpenELMConfig.from_dict(d, source="my/config.json")
