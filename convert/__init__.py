"""`elm-mlx convert`: OpenELM checkpoints (Apple's HF folders, CoreNet .pt
files, elm-mlx / mlx-lm / mlx-community folders) -> one folder with MLX
safetensors, config.json and tokenizer.model, optionally averaged over several
checkpoints, quantized, and laid out for mlx-lm too.

The output is written to a temporary folder beside the target and renamed at
the end, under a lock on the target: an interrupted or killed conversion
leaves nothing that loads, and two conversions into one folder never mix.
"""

import errno
import fcntl
import json
import os
import shutil
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
from tqdm import tqdm

from ..chat_template import TEMPLATE_FILE, find_template, self_contained
from ..checkpoint import dtype_name, parse_dtype
from ..errors import ElmError
from ..quant import make_plan, quantize_model, quantize_weight
from ..tokenizer import Tokenizer, check_tokenizer_json, resolve_tokenizer
from .average import averaged, check_averageable
from .sources import open_source, same_architecture

LAYOUTS = ("elm", "mlx-lm")


class OutputExists(ElmError, FileExistsError):
    """The output folder exists (perhaps just written by a concurrent conversion)."""


@contextmanager
def output_lock(out: Path):
    """Holds an exclusive lock on `out` (a `.NAME.lock` file beside it) for the
    whole conversion. Partial folders found under the lock belong to no running
    conversion: a killed one left them, so they are removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out.parent / f".{out.name}.lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another conversion into {out} to finish...", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        for stale in out.parent.glob(f".{out.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        yield
    finally:
        os.close(fd)  # releases the lock; the empty lock file stays (unlinking it would race)


@contextmanager
def atomic_folder(out: Path):
    """Yields a temporary folder that becomes `out` only if the block succeeds.
    Raises OutputExists if `out` appeared meanwhile."""
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        yield tmp
        os.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if out.exists():
            raise OutputExists(f"{out} already exists: remove it or choose another -o") from None
        hint = ": the disk is full (or out of inodes); free space or choose another -o" \
            if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise ElmError(f"could not write {out}: {e.strerror or e}{hint}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_space(out: Path, nbytes: int) -> None:
    free = shutil.disk_usage(out.parent).free
    if free < nbytes * 1.02 + (16 << 20):
        raise ElmError(f"not enough disk space for {out}: the weights need {nbytes / 1e9:.2f} GB, "
                       f"{free / 1e9:.2f} GB is free on that disk")


def build_weights(sources, dtype, plan=None, average=False, progress=True, desc="") -> dict:
    """The output tensors, one source tensor at a time: read (or average),
    cast floats to dtype, quantize per the plan."""
    weights = {}
    for key in tqdm(sources[0].keys, desc=desc, unit="tensor", disable=not progress):
        value = averaged(sources, key) if average else sources[0].read(key)
        if mx.issubdtype(value.dtype, mx.floating) and value.dtype != dtype:
            value = value.astype(dtype)
        parts = quantize_weight(key, value, plan) if plan is not None else {key: value}
        mx.eval(list(parts.values()))
        weights |= parts
    return weights


def _check_options(srcs, dtype, quant, group_size, average, layout, report):
    if layout not in LAYOUTS:
        raise ElmError(f"--to {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if len(srcs) > 1 and not average:
        raise ElmError(f"{len(srcs)} checkpoints given: add --average to average them, or convert one at a time")
    if average and len(srcs) < 2:
        raise ElmError("--average needs at least two checkpoints")
    if group_size is not None and quant is None:
        raise ElmError(f"--group-size {group_size} only applies with --quant q4 or --quant q8")
    if report and quant is None:
        raise ElmError("--report measures what quantization changed: use it with --quant q4 or --quant q8")
    return parse_dtype(dtype)


def convert(src, out, dtype: str = "bf16", tokenizer=None, progress: bool = True, label: str | None = None, *,
            quant: str | None = None, group_size: int | None = None, average: bool = False, layout: str = "elm",
            preset: str | None = None, config=None, report: bool = False) -> Path:
    """Convert one checkpoint (or average several: src a list, average=True)
    into the folder `out`. quant: None, "q4" or "q8"; layout "mlx-lm" adds the
    files mlx_lm.load needs; preset / config (CoreNet YAML) give the size of
    .pt checkpoints; report writes quality.json (see report.py); label names
    the source on the progress bar (default: its file or folder name)."""
    srcs = [Path(s) for s in (src if isinstance(src, (list, tuple)) else [src])]
    out = Path(out)
    if out.exists():
        raise OutputExists(f"{out} already exists: remove it or choose another -o")
    mx_dtype = _check_options(srcs, dtype, quant, group_size, average, layout, report)
    group_size = group_size or 64
    sources = [open_source(p, preset, config) for p in srcs]
    try:
        same_architecture(sources)
        if average:
            check_averageable(sources)
        first, cfg = sources[0], sources[0].config
        plan = None
        if quant is not None:
            if first.quantization is not None:
                raise ElmError(f"{first.path} is already quantized: quantize from the unquantized checkpoint")
            if mx_dtype == mx.float16 and not cfg.fp16_safe:
                raise ElmError("--dtype fp16 with --quant on OpenELM-3B: its activations overflow float16; "
                               "a quantized 3B computes in bf16 (leave --dtype at bf16)")
            plan = make_plan(cfg, quant, group_size)
        tok = Tokenizer(resolve_tokenizer(first.tokenizer_dir, tokenizer))  # before the slow part: fail fast
        # Kept with the output, so it stays -Instruct whatever it is named.
        template = find_template(first.tokenizer_dir) if first.tokenizer_dir is not None else None
        if first.tokenizer_dir is not None:
            check_tokenizer_json(first.tokenizer_dir, tok)
        name = dtype_name(mx_dtype)
        with output_lock(out):
            if out.exists():
                raise OutputExists(f"{out} already exists (another conversion wrote it meanwhile)")
            weights = build_weights(sources, mx_dtype, plan, average, progress,
                                    desc=f"{label or first.path.name} -> {quant or name}")
            bits = sum(v.nbytes for v in weights.values()) * 8 / cfg.num_parameters()
            check_space(out, sum(v.nbytes for v in weights.values()))
            with atomic_folder(out) as tmp:
                _write(tmp, first, weights, name, plan, tok, layout, template)
                del weights
                if report:
                    _report(tmp, sources, mx_dtype, average, plan, tok, progress)
            size = sum(f.stat().st_size for f in out.iterdir())
    finally:
        for s in sources:
            s.close()
    if progress:
        print(f"wrote {out}: {size / 1e9:.3f} GB on disk, {bits:.2f} bits per weight"
              + (f" ({quant}, group size {group_size})" if quant else ""), file=sys.stderr)
    return out


def save_safetensors(path: Path, weights: dict, metadata: dict) -> None:
    """mx.save_safetensors, whose write errors (a full disk, no inodes left) are a bare
    RuntimeError without an errno: turned into the OSError they are."""
    try:
        mx.save_safetensors(str(path), weights, metadata=metadata)
    except RuntimeError as e:
        try:
            st = os.statvfs(path.parent)
            full = st.f_bavail * st.f_frsize < sum(v.nbytes for v in weights.values()) or st.f_favail == 0
        except OSError:
            full = False
        if full:
            raise OSError(errno.ENOSPC, f"No space left on device (MLX: {e})", str(path)) from None
        raise OSError(errno.EIO, f"MLX could not write it ({e})", str(path)) from None


def _write(tmp: Path, first, weights: dict, name: str, plan, tok: Tokenizer, layout: str, template) -> None:
    save_safetensors(tmp / "model.safetensors", weights, metadata={"format": "mlx"})
    meta = dict(first.meta) | {"torch_dtype": name, "elm_mlx": {"dtype": name}}
    quantization = plan.config_entry() if plan is not None else first.quantization
    if quantization is not None:
        # mlx-lm writes both; it and we read "quantization".
        meta |= {"quantization": quantization, "quantization_config": quantization}
    (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    (tmp / "tokenizer.model").write_bytes(tok.model_bytes())  # rebuilt, if read from tokenizer.json
    if layout == "mlx-lm":
        from .mlx_lm import write_index, write_tokenizer_files

        write_index(tmp, weights, ["model.safetensors"])
        write_tokenizer_files(tmp, template)
    if template is not None:  # as any tool renders it: BOS and Apple's empty system turn written in
        (tmp / TEMPLATE_FILE).write_text(self_contained(template))


def _report(tmp: Path, sources, dtype, average: bool, plan, tok: Tokenizer, progress: bool) -> None:
    """quality.json: the quantized weights just written against the same source in `dtype`."""
    from ..model import Model
    from .report import TEXT, compare, log_probs

    cfg = sources[0].config
    tokens = tok.encode(TEXT)
    if max(tokens) >= cfg.vocab_size:
        raise ElmError(f"--report: the report text needs the Llama-2 vocabulary; this model has "
                       f"{cfg.vocab_size} tokens")
    reference = Model(cfg)
    reference.load_weights(list(build_weights(sources, dtype, None, average, progress, "report: reference").items()))
    ref = log_probs(reference, tokens)
    del reference
    quantized = Model(cfg)
    quantize_model(quantized, plan.config_entry(), plan.modules)
    quantized.load_weights(list(mx.load(str(tmp / "model.safetensors")).items()))
    quality = compare(ref, log_probs(quantized, tokens), tokens)
    (tmp / "quality.json").write_text(json.dumps(quality.__dict__, indent=2) + "\n")
    if progress:
        print("\n".join(quality.lines()), file=sys.stderr)
