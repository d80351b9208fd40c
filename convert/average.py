"""Checkpoint averaging (the OpenELM paper averages the last five checkpoints,
5k iterations apart). One tensor at a time: each source's copy is read,
added to a float32 sum and dropped, so memory stays near one checkpoint (the
output) plus one tensor, however many checkpoints are averaged."""

import mlx.core as mx

from ..errors import ElmError


def check_averageable(sources: list) -> None:
    for s in sources:
        if s.quantization is not None:
            raise ElmError(f"--average: {s.path} is quantized; average the unquantized checkpoints, then quantize")
    keys = set(sources[0].keys)
    for s in sources[1:]:
        if set(s.keys) != keys:
            diff = sorted(keys ^ set(s.keys))
            raise ElmError(f"--average: {s.path} and {sources[0].path} hold different tensors (e.g. {diff[0]})")


def averaged(sources: list, key: str) -> mx.array:
    total = None
    for s in sources:
        value = s.read(key).astype(mx.float32)
        total = value if total is None else total + value
        mx.eval(total)  # frees this source's copy before the next is read
    return total / len(sources)
