"""An lm-evaluation-harness backend, `elm-mlx`, and the runs `elm-mlx eval` makes.

The backend follows lm-eval's own conventions where they decide scores, by
using lm-eval's code for them: TemplateLM's request encoding (the continuation
is the tokens of encode(context + continuation) past those of encode(context),
trailing spaces of the context moved into the continuation, BOS as the context
of an empty one), and utils.get_rolling_token_windows / make_disjoint_window
for loglikelihood_rolling. BOS is prepended by default (add_bos_token=True: the
model card's setting, because lm-eval's default is off). Scoring is ours
(score.py): requests sorted by length, right-padded batches, one forward pass per
batch with context and continuation together; one-token continuations of the
same context (MMLU's " A"/" B"/" C"/" D") share one row. generate_until runs
elm_mlx.generate's loop, greedy unless the task asks for sampling, and stops as
soon as a stop sequence appears.

lm-eval 0.4 finds models only in its own registry (no plugin entry points), so
the name exists once this module is imported: `elm-mlx eval`, `python -m
elm_mlx.evaluate` (lm-eval's own command line with elm-mlx registered), or
`import elm_mlx.evaluate` before `lm_eval.simple_evaluate(model="elm-mlx", ...)`.
"""

import json
import logging
import os
import subprocess
import sys
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, handle_non_serializable, make_disjoint_window, make_table
from tqdm import tqdm

from .checkpoint import dtype_label
from .errors import ElmError
from .files import atomic_write_text
from .generate import stream_generate
from .load import load
from .sample import SamplingParams
from .score import batches, next_token_logprobs, score_batch

log = logging.getLogger(__name__)

SAMPLING_KEYS = {"temperature": "temp", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                 "repetition_penalty": "repetition_penalty"}


@register_model("elm-mlx")
class ElmLM(TemplateLM):
    """model_args: pretrained (folder, preset or hub id), dtype (bf16, fp16, fp32),
    tokenizer (a tokenizer.model), add_bos_token (default True), max_length
    (tokens of context, default the model's 2048), max_gen_toks (default 256),
    batch_size (default 8). trust_remote_code is accepted and ignored: no
    checkpoint code is ever run."""

    def __init__(self, pretrained: str, dtype: str | None = None, tokenizer: str | None = None,
                 add_bos_token: bool = True, max_length: int | None = None, max_gen_toks: int = 256,
                 batch_size=8, max_batch_size=None, device=None, trust_remote_code: bool = False,
                 adapter_path: str | None = None, **unknown):
        super().__init__()
        if unknown:
            raise ElmError(f"model_args {', '.join(sorted(unknown))}: not elm-mlx's (it takes pretrained, dtype, "
                           "tokenizer, add_bos_token, max_length, max_gen_toks, batch_size, adapter_path)")
        self.pretrained = str(pretrained)
        self.model, self.tokenizer = load(self.pretrained, dtype=dtype, tokenizer=tokenizer, adapter_path=adapter_path)
        self.add_bos_token = bool(add_bos_token)
        context = self.model.config.max_context_length
        self._max_length = int(max_length or context)
        if not 1 <= self._max_length <= context:
            raise ElmError(f"max_length {max_length}: expected 1 to the model's context, {context}")
        self._max_gen_toks = int(max_gen_toks)
        # lm-eval's "auto" searches for the largest batch that fits a GPU; MLX has unified memory
        # and score.py bounds the logits per batch, so a fixed size serves.
        self.batch_size = int(batch_size) if str(batch_size).isdigit() and int(batch_size) > 0 else 8

    # ------------------------------------------------------------ lm-eval's interface

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return "llama-2"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list:
        add_bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.tokenizer.encode(string, add_bos=add_bos)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    def get_model_info(self) -> dict:
        return {"model": self.pretrained, "dtype": dtype_label(self.model.dtype), "add_bos_token": self.add_bos_token,
                "max_length": self.max_length}

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list:
        """requests: (cache key or None, context ids, continuation ids) -> [(log p, is greedy)]."""
        seqs, n_scored = [], []
        for _, context, continuation in requests:
            if not continuation or len(continuation) > self.max_length:
                raise ElmError(f"a continuation of {len(continuation)} tokens: expected 1 to max_length "
                               f"({self.max_length})")
            # Too long: keep the end, as lm-eval's HF backend does.
            seqs.append((list(context) + list(continuation))[-(self.max_length + 1):])
            n_scored.append(len(continuation))
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        # One-token continuations of one context share a forward pass.
        shared = defaultdict(list)
        for i in order:
            if n_scored[i] == 1:
                shared[tuple(seqs[i][:-1])].append(i)
        groups = [g for g in shared.values() if len(g) > 1]
        grouped = {i for g in groups for i in g}
        results = [None] * len(seqs)

        def done(i, answer):
            results[i] = answer
            if requests[i][0] is not None:
                self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)

        with tqdm(total=len(seqs), desc="loglikelihood", disable=disable_tqdm) as bar:
            rest = [i for i in order if i not in grouped]
            for batch in batches(rest, n_scored, self.batch_size):
                for i, answer in zip(batch, score_batch(self.model, [seqs[i] for i in batch],
                                                        [n_scored[i] for i in batch])):
                    done(i, answer)
                bar.update(len(batch))
            for start in range(0, len(groups), self.batch_size):
                batch = groups[start:start + self.batch_size]
                logprobs, argmax = next_token_logprobs(self.model, [seqs[g[0]][:-1] for g in batch])
                for row, group in enumerate(batch):
                    for i in group:
                        target = seqs[i][-1]
                        done(i, (float(logprobs[row, target]), bool(argmax[row] == target)))
                bar.update(sum(len(g) for g in batch))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list:
        """Each text is predicted after one BOS that is not itself scored (the HF backend,
        with add_bos_token=True, would also score a second BOS inside the text)."""
        windows, owner = [], []
        for j, (text,) in enumerate(req.args for req in requests):
            rolling = get_rolling_token_windows(token_list=self.tok_encode(text, add_special_tokens=False),
                                                prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                                                context_len=1)
            for context, continuation in map(make_disjoint_window, rolling):
                windows.append((None, context, continuation))
                owner.append(j)
        totals = [0.0] * len(requests)
        for j, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[j] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list:
        out = []
        for req in tqdm(requests, desc="generate_until", disable=disable_tqdm):
            context, gen_kwargs = req.args
            text = self.generate_one(context, gen_kwargs)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    # ------------------------------------------------------------ generation

    def generate_one(self, context: str, gen_kwargs: dict) -> str:
        """The continuation of context up to (not including) the first stop sequence."""
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        until = [s for s in kwargs.pop("until") if s]
        max_gen = kwargs.pop("max_gen_toks")
        sampling = self.sampling(kwargs)
        if not 0 <= max_gen < self.max_length:
            raise ElmError(f"max_gen_toks {max_gen}: expected 0 to max_length - 1 ({self.max_length - 1})")
        # Too long: keep the end of the context, leaving room for max_gen tokens (as the HF backend).
        ids = self.tok_encode(context)[-(self.max_length - max_gen):] or [self.prefix_token_id]
        longest = max((len(s) for s in until), default=0)
        text = ""
        for response in stream_generate(self.model, self.tokenizer, ids, max_gen, sampling=sampling):
            start = max(0, len(text) - longest + 1)
            text += response.text
            if any(s in text[start:] for s in until):
                break
        return text[:min((text.find(s) for s in until if s in text), default=len(text))]

    @staticmethod
    def sampling(kwargs: dict) -> SamplingParams:
        """SamplingParams from lm-eval's normalized gen_kwargs: greedy unless do_sample."""
        do_sample = kwargs.pop("do_sample", False)
        params = {ours: kwargs.pop(theirs) for theirs, ours in SAMPLING_KEYS.items() if theirs in kwargs}
        params = {k: v for k, v in params.items() if v is not None}
        for key in kwargs:
            log.warning("elm-mlx ignores the generation argument %r", key)
        if not do_sample:
            params["temp"] = 0.0
        return SamplingParams(**params)


# ------------------------------------------------------------ elm-mlx eval

def run_eval(model: str, tasks: list, *, num_fewshot=None, limit=None, output=None, paper=False, batch_size=8,
             include_path=None, dtype=None, tokenizer=None, adapter_path=None, say=print) -> dict:
    """`elm-mlx eval`: lm-eval's tables via say, its JSON to `output`. paper: the
    model card's runs and the ours-vs-card table instead of `tasks`."""
    from lm_eval.tasks import TaskManager

    def tasks_index():  # lm-eval indexes every task it has (seconds): once, after the cheap checks
        return TaskManager(include_path=str(include_path) if include_path else None)

    if not paper:
        manager = tasks_index()
        check_tasks(manager, tasks)  # before loading the model
        results = evaluate(ElmLM(model, dtype=dtype, tokenizer=tokenizer, batch_size=batch_size,
                                 adapter_path=adapter_path), tasks,
                           num_fewshot, limit, manager)
        say(tables(results))
        if output:
            write_json(results, output)
        return results

    from . import paper as card
    from .config import OpenELMConfig
    from .hub import resolve

    folder = resolve(model, dtype, tokenizer)
    which = card.paper_model(model, OpenELMConfig.from_file(folder / "config.json"))
    lm = ElmLM(str(folder), dtype=dtype, tokenizer=tokenizer, batch_size=batch_size, adapter_path=adapter_path)
    manager = tasks_index()
    runs = {}
    for shots, names in card.RUNS:
        runs[shots] = evaluate(lm, names, shots, limit, manager)
        say(tables(runs[shots]))
    rows = card.comparison(which, runs)
    say(card.format_comparison(which, rows))
    report = {"model": model, "paper_model": f"OpenELM-{which}",
              "comparison": [dict(zip(("table", "task", "shots", "metric", "ours", "card", "difference"), r))
                             for r in rows],
              "runs": {str(k): v for k, v in runs.items()}}
    if output:
        write_json(report, output)
    return report


def evaluate(lm: ElmLM, tasks: list, num_fewshot: int | None = None, limit: int | None = None,
             manager=None) -> dict:
    """One lm-eval run (lm-eval's results dict, without per-sample logs). manager: an
    lm_eval TaskManager (default: lm-eval's tasks)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = manager or TaskManager()
    check_tasks(manager, tasks)
    with quiet_git_hash():
        results = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                                  log_samples=False)
    if results is None:
        raise ElmError("lm-eval returned no results")
    results.pop("samples", None)
    return results


@contextmanager
def quiet_git_hash():
    """lm-eval records the git commit of the working folder by running `git describe` with git's
    stderr on the user's terminal: outside a repository that prints "fatal: not a git repository".
    While it runs, the same question is asked with git's stderr kept (the same answer)."""
    import lm_eval.evaluator
    from lm_eval.loggers.utils import get_commit_from_path

    def git_hash():
        try:
            return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
        except (subprocess.CalledProcessError, FileNotFoundError):
            return get_commit_from_path(os.getcwd())

    original = lm_eval.evaluator.get_git_commit_hash
    lm_eval.evaluator.get_git_commit_hash = git_hash
    try:
        yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = original


def check_tasks(manager, tasks: list) -> None:
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise ElmError(f"--tasks {','.join(unknown)}: not lm-eval task or group names (`lm-eval ls tasks` "
                       "lists them; a local task's YAML folder goes to --include-path)")


def tables(results: dict) -> str:
    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text


def write_json(obj, path: str) -> None:
    """To path via a temporary file and a rename; '-' is stdout."""
    text = json.dumps(obj, indent=2, default=handle_non_serializable, ensure_ascii=False)
    if path == "-":
        sys.stdout.write(text + "\n")
        return
    atomic_write_text(Path(path), text + "\n")


def main():
    """lm-eval's command line with the elm-mlx backend registered:
    python -m elm_mlx.evaluate --model elm-mlx --model_args pretrained=270M,dtype=fp32 --tasks arc_easy"""
    from lm_eval.__main__ import cli_evaluate

    with quiet_git_hash():
        cli_evaluate()


if __name__ == "__main__":
    main()
