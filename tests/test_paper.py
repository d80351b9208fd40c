"""paper.py: the model card's numbers as copied (checked against the card's own
averages), which of the eight models a name is, and the comparison table."""

import pytest
from checkpoints import TINY

from elm_mlx import paper
from elm_mlx.config import PRESETS, OpenELMConfig
from elm_mlx.errors import ElmError


@pytest.mark.parametrize("scores,columns", [(paper.ZERO_SHOT_SCORES, paper.ZERO_SHOT),
                                            (paper.OPEN_LLM_SCORES, paper.OPEN_LLM)])
def test_copied_scores_reproduce_the_cards_averages(scores, columns):
    """A mistyped digit (0.1 or more) would move the average the card prints in its last column
    by more than the rounding of its entries can (0.01)."""
    assert sorted(scores) == sorted(PRESETS)
    for model, row in scores.items():
        assert len(row) == len(columns) + 1, model
        assert sum(row[:-1]) / len(columns) == pytest.approx(row[-1], abs=0.01), model


def test_every_column_is_one_of_the_cards_runs():
    runs = {(task, shots) for shots, tasks in paper.RUNS for task in tasks}
    columns = {(task, shots) for _, task, shots in paper.ZERO_SHOT + paper.OPEN_LLM}
    assert columns <= runs and {t for t, _ in runs} == set(paper.METRICS)
    # PIQA 0-shot is in both tables with the same number.
    for model in PRESETS:
        assert paper.ZERO_SHOT_SCORES[model][4] == paper.OPEN_LLM_SCORES[model][4]


@pytest.mark.parametrize("name,preset,want", [
    ("270M", "270M", "270M"), ("apple/OpenELM-3B-Instruct", "3B", "3B-Instruct"),
    ("/models/OpenELM-1_1B-instruct-q4", "1_1B", "1_1B-Instruct"), ("/models/my-450m", "450M", "450M")])
def test_paper_model_from_architecture_and_name(name, preset, want):
    assert paper.paper_model(name, OpenELMConfig.from_preset(preset)) == want


def test_other_architectures_have_no_published_scores():
    cfg = OpenELMConfig.from_dict(TINY["tied"])
    with pytest.raises(ElmError, match="none of OpenELM's four sizes"):
        paper.paper_model("tiny", cfg)


def test_comparison_reads_the_chosen_metric_and_subtracts_the_card():
    zero = {"results": {"arc_challenge": {"acc,none": 0.10, "acc_norm,none": 0.2645},
                        "arc_easy": {"acc_norm,none": 0.50}, "piqa": {"acc_norm,none": 0.70}}}
    five = {"results": {"winogrande": {"acc,none": 0.55}}, "groups": {"mmlu": {"acc,none": 0.30}}}
    rows = paper.comparison("270M", {0: zero, 5: five})
    by = {(r[0], r[1]): r for r in rows}
    assert by[("zero-shot", "ARC-c")][4:] == pytest.approx((26.45, 26.45, 0.0))
    assert by[("zero-shot", "ARC-e")][6] == pytest.approx(50.0 - 45.08)
    assert by[("OpenLLM", "MMLU")][4] == pytest.approx(30.0)
    assert by[("OpenLLM", "WinoGrande")][6] == pytest.approx(55.0 - 53.83)
    assert by[("zero-shot", "BoolQ")][4] is None and by[("OpenLLM", "ARC-c")][4] is None  # not run
    text = paper.format_comparison("270M", rows)
    assert "OpenELM-270M" in text and "+4.92" in text and len(text.splitlines()) == 2 + len(rows)
