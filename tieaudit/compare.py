"""Chunked tensor comparisons with bounded memory.

Two stored tensors are read in the same row ranges, a chunk pair at a time, so the working set is
about `4 * chunk_bytes` (two chunks in their dtype, two in float32) plus the probe logits
(`probes x chunk_rows` floats), whatever the vocabulary size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Rows per chunk are chosen so one float32 chunk stays under this many bytes.
CHUNK_BYTES = 32 * 2**20
PROBE_SEED = 0

RowReader = Callable[[int, int], "torch.Tensor"]  # (start, stop) -> rows of one tensor


@dataclass(frozen=True)
class TensorDiff:
    """How two same-shaped tensors differ, in float32."""

    bitwise_equal: bool  # torch.equal on every chunk: what transformers checks before tying
    max_abs_diff: float
    rel_diff: float  # ||a - b||_F / ||a||_F (inf when a is zero and b is not)
    max_abs_logit_diff: float | None = None
    top1_agreement: float | None = None


def rows_per_chunk(shape: tuple[int, ...], chunk_bytes: int = CHUNK_BYTES) -> int:
    row_elems = math.prod(shape[1:]) if len(shape) > 1 else 1
    return max(1, chunk_bytes // max(1, row_elems * 4))


def diff_tensors(
    read_a: RowReader,
    read_b: RowReader,
    shape: tuple[int, ...],
    *,
    probes: int = 0,
    chunk_bytes: int = CHUNK_BYTES,
) -> TensorDiff:
    """Compare two tensors of one shape chunk by chunk; with `probes` > 0 and a 2-D shape, also compare
    the logits `h @ W.T` of `probes` seeded hidden states (only when the weights differ)."""
    import torch

    rows = shape[0] if shape else 1
    step = rows_per_chunk(shape, chunk_bytes)
    equal = True
    max_abs = 0.0
    sq_diff = 0.0
    sq_ref = 0.0
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        a = read_a(start, stop)
        b = read_b(start, stop)
        if not torch.equal(a, b):
            equal = False
        a32 = a.to(torch.float32)
        d = a32 - b.to(torch.float32)
        if d.numel():
            # nan_to_num: a NaN in either tensor must not hide every other difference
            max_abs = max(max_abs, float(torch.nan_to_num(d.abs(), nan=math.inf).max()))
            sq_diff += float((d.double() ** 2).sum())
            sq_ref += float((a32.double() ** 2).sum())
        del a, b, a32, d
    rel = math.sqrt(sq_diff) / math.sqrt(sq_ref) if sq_ref > 0 else (0.0 if sq_diff == 0 else math.inf)
    if equal:
        return TensorDiff(True, 0.0, 0.0, 0.0 if probes else None, 1.0 if probes else None)
    if probes <= 0 or len(shape) != 2:
        return TensorDiff(False, max_abs, rel)
    logit_diff, top1 = logit_agreement(read_a, read_b, shape, probes=probes, chunk_bytes=chunk_bytes)
    return TensorDiff(False, max_abs, rel, logit_diff, top1)


def probe_hidden_states(probes: int, hidden: int) -> torch.Tensor:
    """Deterministic probe hidden states (standard normal, seed 0): the same on every run and machine."""
    import torch

    gen = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randn(probes, hidden, generator=gen, dtype=torch.float32)


def logit_agreement(
    read_a: RowReader,
    read_b: RowReader,
    shape: tuple[int, ...],
    *,
    probes: int,
    chunk_bytes: int = CHUNK_BYTES,
) -> tuple[float, float]:
    """Max |logit difference| and top-1 agreement of `h @ A.T` versus `h @ B.T` over probe states,
    streaming over vocabulary rows with a running argmax."""
    import torch

    rows, hidden = shape
    h = probe_hidden_states(probes, hidden)
    step = rows_per_chunk(shape, chunk_bytes)
    best_a = torch.full((probes,), -math.inf)
    best_b = torch.full((probes,), -math.inf)
    arg_a = torch.zeros(probes, dtype=torch.long)
    arg_b = torch.zeros(probes, dtype=torch.long)
    max_diff = 0.0
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        la = h @ read_a(start, stop).to(torch.float32).T
        lb = h @ read_b(start, stop).to(torch.float32).T
        max_diff = max(max_diff, float(torch.nan_to_num((la - lb).abs(), nan=math.inf).max()))
        for logits, best, arg in ((la, best_a, arg_a), (lb, best_b, arg_b)):
            val, idx = logits.max(dim=1)
            better = val > best
            best[better] = val[better]
            arg[better] = idx[better] + start
    top1 = float((arg_a == arg_b).float().mean())
    return max_diff, top1
