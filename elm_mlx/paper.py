"""The OpenELM model card's evaluation: its lm-eval runs and its published scores.

Source: the apple/OpenELM model card (HF README), section "Evaluation", as
collected in the project's reference notes (openelm.md, section 6). Apple ran
lm-evaluation-harness @ dc90fec (2024-03-15) with add_bos_token=True, batch size 1:
0-shot arc_challenge, arc_easy, boolq, hellaswag, piqa, race, winogrande, sciq,
truthfulqa_mc2; 5-shot mmlu, winogrande; 25-shot arc_challenge,
crows_pairs_english; 10-shot hellaswag. The card's tables give percentages.

The card does not say which of lm-eval's metrics each column is. METRICS is our
reading, from the numbers' sizes: HellaSwag 46.71 for the 270M is a normalized
accuracy (plain accuracy is ~10 points lower at that size), likewise ARC; the
leaderboard-style runs use the Open LLM Leaderboard's metrics (acc_norm for ARC
and HellaSwag, mc2 for TruthfulQA, acc for MMLU and WinoGrande).
"""

from .config import SIZES
from .errors import ElmError

# (shots, lm-eval tasks) in the card's command lines, one lm-eval run each.
RUNS = [
    (0, ["arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "race", "winogrande", "sciq",
         "truthfulqa_mc2"]),
    (5, ["mmlu", "winogrande"]),
    (25, ["arc_challenge", "crows_pairs_english"]),
    (10, ["hellaswag"]),
]

METRICS = {
    "arc_challenge": "acc_norm", "arc_easy": "acc_norm", "boolq": "acc", "hellaswag": "acc_norm",
    "piqa": "acc_norm", "race": "acc", "winogrande": "acc", "sciq": "acc", "truthfulqa_mc2": "acc",
    "mmlu": "acc", "crows_pairs_english": "pct_stereotype",
}

# The card's columns as (label, task, shots).
ZERO_SHOT = [("ARC-c", "arc_challenge", 0), ("ARC-e", "arc_easy", 0), ("BoolQ", "boolq", 0),
             ("HellaSwag", "hellaswag", 0), ("PIQA", "piqa", 0), ("SciQ", "sciq", 0),
             ("WinoGrande", "winogrande", 0)]
OPEN_LLM = [("ARC-c", "arc_challenge", 25), ("CrowS-Pairs", "crows_pairs_english", 25),
            ("HellaSwag", "hellaswag", 10), ("MMLU", "mmlu", 5), ("PIQA", "piqa", 0), ("RACE", "race", 0),
            ("TruthfulQA", "truthfulqa_mc2", 0), ("WinoGrande", "winogrande", 5)]

# Card table "zero-shot": the ZERO_SHOT columns, then their average.
ZERO_SHOT_SCORES = {
    "270M": [26.45, 45.08, 53.98, 46.71, 69.75, 84.70, 53.91, 54.37],
    "270M-Instruct": [30.55, 46.68, 48.56, 52.07, 70.78, 84.40, 52.72, 55.11],
    "450M": [27.56, 48.06, 55.78, 53.97, 72.31, 87.20, 58.01, 57.56],
    "450M-Instruct": [30.38, 50.00, 60.37, 59.34, 72.63, 88.00, 58.96, 59.95],
    "1_1B": [32.34, 55.43, 63.58, 64.81, 75.57, 90.60, 61.72, 63.44],
    "1_1B-Instruct": [37.97, 52.23, 70.00, 71.20, 75.03, 89.30, 62.75, 65.50],
    "3B": [35.58, 59.89, 67.40, 72.44, 78.24, 92.70, 65.51, 67.39],
    "3B-Instruct": [39.42, 61.74, 68.17, 76.36, 79.00, 92.50, 66.85, 69.15],
}
# Card table "OpenLLM Leaderboard": the OPEN_LLM columns, then their average.
OPEN_LLM_SCORES = {
    "270M": [27.65, 66.79, 47.15, 25.72, 69.75, 30.91, 39.24, 53.83, 45.13],
    "270M-Instruct": [32.51, 66.01, 51.58, 26.70, 70.78, 33.78, 38.72, 53.20, 46.66],
    "450M": [30.20, 68.63, 53.86, 26.01, 72.31, 33.11, 40.18, 57.22, 47.69],
    "450M-Instruct": [33.53, 67.44, 59.31, 25.41, 72.63, 36.84, 40.48, 58.33, 49.25],
    "1_1B": [36.69, 71.74, 65.71, 27.05, 75.57, 36.46, 36.98, 63.22, 51.68],
    "1_1B-Instruct": [41.55, 71.02, 71.83, 25.65, 75.03, 39.43, 45.95, 64.72, 54.40],
    "3B": [42.24, 73.29, 73.28, 26.76, 78.24, 38.76, 34.98, 67.25, 54.35],
    "3B-Instruct": [47.70, 72.33, 76.87, 24.80, 79.00, 38.47, 38.76, 67.96, 55.73],
}


def published(model: str) -> dict:
    """{(task, shots): percentage} the card gives for one of the eight models."""
    out = {}
    for columns, scores in ((ZERO_SHOT, ZERO_SHOT_SCORES), (OPEN_LLM, OPEN_LLM_SCORES)):
        for (_, task, shots), value in zip(columns, scores[model]):
            out[(task, shots)] = value
    return out


def paper_model(name: str, cfg) -> str:
    """Which of the card's eight models `name` (a preset, hub id or folder) with
    config `cfg` is: the size from the architecture, -Instruct from the name."""
    shape = (cfg.num_transformer_layers, cfg.model_dim, cfg.head_dim)
    size = next((s for s, dims in SIZES.items() if dims == shape), None)
    if size is None:
        raise ElmError(f"--paper: {name} ({shape[0]} layers, model_dim {shape[1]}) is none of OpenELM's four "
                       f"sizes ({', '.join(SIZES)}); the model card has scores only for those")
    return size + ("-Instruct" if "instruct" in str(name).lower() else "")


def our_score(results: dict, task: str) -> float | None:
    """A task's metric from one lm-eval run's results, in percent (None if absent)."""
    entry = results.get("results", {}).get(task) or results.get("groups", {}).get(task) or {}
    value = entry.get(f"{METRICS[task]},none")
    return None if value is None else 100 * float(value)


def comparison(model: str, runs: dict) -> list:
    """Rows (table, label, shots, metric, ours or None, published, difference or None).
    runs: {shots: lm-eval results of that run}."""
    rows, card = [], published(model)
    for table, columns in (("zero-shot", ZERO_SHOT), ("OpenLLM", OPEN_LLM)):
        for label, task, shots in columns:
            ours = our_score(runs[shots], task) if shots in runs else None
            paper = card[(task, shots)]
            rows.append((table, label, shots, METRICS[task], ours, paper, None if ours is None else ours - paper))
    return rows


def format_comparison(model: str, rows: list) -> str:
    lines = [f"OpenELM-{model}: ours vs the model card (percent)",
             f"{'table':<10}{'task':<13}{'shots':>6}  {'metric':<15}{'ours':>8}{'card':>8}{'diff':>8}"]
    for table, label, shots, metric, ours, paper, diff in rows:
        o = "-" if ours is None else f"{ours:.2f}"
        d = "-" if diff is None else f"{diff:+.2f}"
        lines.append(f"{table:<10}{label:<13}{shots:>6}  {metric:<15}{o:>8}{paper:>8.2f}{d:>8}")
    return "\n".join(lines)
