"""Chunked tensor comparisons with bounded memory.

Two stored tensors are read in the same row ranges, a chunk pair at a time, so the working set is
a few chunks (two in their dtype, two in float32, one difference; norms are float32 per chunk, summed in float64)
plus the probe logits (`probes x chunk_rows` floats): about 8 x CHUNK_BYTES whatever the vocabulary
size (measured: +228 MiB RSS for a 128256 x 2048 pair with 32 MiB chunks, see benchmarks/README.md).
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
    the logits `h @ W.T` of `probes` seeded hidden states (only when the weights differ).

    One pass in the common cases: when the first chunk already differs, the logits are computed in the
    same pass; when the tensors are equal no logits are needed. Only a pair equal at first and different
    later is read a second time for its logits."""
    import torch

    rows = shape[0] if shape else 1
    step = rows_per_chunk(shape, chunk_bytes)
    want_logits = probes > 0 and len(shape) == 2
    tracker: _Top1 | None = None
    equal = True
    max_abs = 0.0
    sq_diff = 0.0
    sq_ref = 0.0
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        a = read_a(start, stop)
        b = read_b(start, stop)
        same = torch.equal(a, b)
        a32 = a.to(torch.float32)
        sq_ref += float(torch.linalg.vector_norm(a32)) ** 2
        b32 = a32
        if not same:
            if equal and start == 0 and want_logits:
                tracker = _Top1(probes, shape[1])
            equal = False
            b32 = b.to(torch.float32)
            d = a32 - b32
            if d.numel():
                # nan_to_num: a NaN in either tensor must not hide every other difference
                max_abs = max(max_abs, float(torch.nan_to_num(d.abs_(), nan=math.inf, posinf=math.inf).max()))
                sq_diff += float(torch.linalg.vector_norm(d)) ** 2
            del d
        if tracker is not None:
            tracker.update(start, a32, b32)
        del a, b, a32, b32
    rel = math.sqrt(sq_diff) / math.sqrt(sq_ref) if sq_ref > 0 else (0.0 if sq_diff == 0 else math.inf)
    if equal:
        return TensorDiff(True, 0.0, 0.0, 0.0 if want_logits else None, 1.0 if want_logits else None)
    if not want_logits:
        return TensorDiff(False, max_abs, rel)
    if tracker is None:
        logit_diff, top1 = logit_agreement(read_a, read_b, shape, probes=probes, chunk_bytes=chunk_bytes)
    else:
        logit_diff, top1 = tracker.result()
    return TensorDiff(False, max_abs, rel, logit_diff, top1)


class _Top1:
    """Running max |logit difference| and argmax of `h @ A.T` and `h @ B.T`, over vocabulary chunks."""

    def __init__(self, probes: int, hidden: int) -> None:
        import torch

        self.h = probe_hidden_states(probes, hidden)
        self.best = [torch.full((probes,), -math.inf), torch.full((probes,), -math.inf)]
        self.arg = [torch.zeros(probes, dtype=torch.long), torch.zeros(probes, dtype=torch.long)]
        self.max_diff = 0.0

    def update(self, start: int, a32: torch.Tensor, b32: torch.Tensor) -> None:
        import torch

        la = self.h @ a32.T
        lb = la if b32 is a32 else self.h @ b32.T
        if lb is not la:
            self.max_diff = max(
                self.max_diff, float(torch.nan_to_num((la - lb).abs(), nan=math.inf, posinf=math.inf).max())
            )
        for i, logits in enumerate((la, lb)):
            val, idx = logits.max(dim=1)
            better = val > self.best[i]
            self.best[i][better] = val[better]
            self.arg[i][better] = idx[better] + start

    def result(self) -> tuple[float, float]:
        return self.max_diff, float((self.arg[0] == self.arg[1]).float().mean())


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
    tracker = _Top1(probes, hidden)
    step = rows_per_chunk(shape, chunk_bytes)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        tracker.update(start, read_a(start, stop).to(torch.float32), read_b(start, stop).to(torch.float32))
    return tracker.result()


class StreamingDiff:
    """One comparison fed chunk by chunk, for callers that compare several tensor pairs in one pass over
    the rows (the adapter forecast). Probe logits come from a per-chunk cache shared by all comparisons,
    so a tensor used by several comparisons is multiplied once per chunk."""

    def __init__(self, probes: int, hidden: int | None) -> None:
        import torch

        self.want_logits = probes > 0 and hidden is not None
        self.equal = True
        self.max_abs = 0.0
        self.sq_diff = 0.0
        self.sq_ref = 0.0
        self.max_logit = 0.0
        if self.want_logits:
            self.best_a = torch.full((probes,), -math.inf)
            self.arg_a = torch.zeros(probes, dtype=torch.long)
            self.best_b = self.best_a.clone()
            self.arg_b = self.arg_a.clone()

    def update(self, start: int, a: torch.Tensor, b: torch.Tensor, logits: LogitCache | None = None) -> None:
        import torch

        same = a is b or torch.equal(a, b)
        self.sq_ref += float(torch.linalg.vector_norm(a)) ** 2
        if not same:
            self.equal = False
            d = a - b
            if d.numel():
                self.max_abs = max(self.max_abs, float(torch.nan_to_num(d.abs(), nan=math.inf, posinf=math.inf).max()))
                self.sq_diff += float(torch.linalg.vector_norm(d)) ** 2
        if not self.want_logits or logits is None:
            return
        la = logits.of(a)
        lb = la if same else logits.of(b)
        if lb is not la:
            self.max_logit = max(
                self.max_logit, float(torch.nan_to_num((la - lb).abs(), nan=math.inf, posinf=math.inf).max())
            )
        for lg, best, arg in ((la, self.best_a, self.arg_a), (lb, self.best_b, self.arg_b)):
            val, idx = lg.max(dim=1)
            better = val > best
            best[better] = val[better]
            arg[better] = idx[better] + start

    def result(self) -> TensorDiff:
        if self.equal:
            return TensorDiff(True, 0.0, 0.0, 0.0 if self.want_logits else None, 1.0 if self.want_logits else None)
        if self.sq_ref > 0:
            rel = math.sqrt(self.sq_diff) / math.sqrt(self.sq_ref)
        else:
            rel = 0.0 if self.sq_diff == 0 else math.inf
        if not self.want_logits:
            return TensorDiff(False, self.max_abs, rel)
        top1 = float((self.arg_a == self.arg_b).float().mean())
        return TensorDiff(False, self.max_abs, rel, self.max_logit, top1)


class LogitCache:
    """`h @ X.T` for the tensors of one chunk, computed once per distinct tensor object."""

    def __init__(self, h: torch.Tensor) -> None:
        self.h = h
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def of(self, x: torch.Tensor) -> torch.Tensor:
        hit = self._cache.get(id(x))
        if hit is not None and hit[0] is x:
            return hit[1]
        out = self.h @ x.T
        self._cache[id(x)] = (x, out)
        return out
