"""Chunked tensor comparisons with bounded memory.

Two stored tensors are read in the same row ranges, a chunk pair at a time, so the working set is
a few chunks (two in their dtype, two in float32, one difference; norms are float32 per chunk, summed in float64)
plus the probe logits (`probes x chunk_rows` floats): about 8 x CHUNK_BYTES whatever the vocabulary
size (measured: +228 MiB RSS for a 128256 x 2048 pair with 32 MiB chunks, see benchmarks/README.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
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
    acc = StreamingDiff(probes, shape[1] if len(shape) == 2 else None)
    h = probe_hidden_states(probes, shape[1]) if acc.want_logits else None
    track = False
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        a = read_a(start, stop)
        b = read_b(start, stop)
        # equality in the stored dtype, as transformers' torch.equal sees it
        same = torch.equal(a, b)
        if start == 0:
            track = h is not None and not same
        a32 = a.to(torch.float32)
        logits = LogitCache(h) if track and h is not None else None
        acc.update(start, a32, a32 if same else b.to(torch.float32), logits, same=same)
        del a, b, a32
    result = acc.result()
    if result.bitwise_equal or not acc.want_logits or track:
        return result
    logit_diff, top1 = logit_agreement(read_a, read_b, shape, probes=probes, chunk_bytes=chunk_bytes)
    return replace(result, max_abs_logit_diff=logit_diff, top1_agreement=top1)


class _Top1:
    """Running max |logit difference| and argmax of two logit streams, over vocabulary chunks."""

    def __init__(self, probes: int) -> None:
        import torch

        self.best = [torch.full((probes,), -math.inf), torch.full((probes,), -math.inf)]
        self.arg = [torch.zeros(probes, dtype=torch.long), torch.zeros(probes, dtype=torch.long)]
        self.max_diff = 0.0
        self.fed = False

    def update(self, start: int, la: torch.Tensor, lb: torch.Tensor) -> None:
        """Logits of one chunk of rows starting at `start` (`lb is la` when the chunks are equal)."""
        import torch

        self.fed = True
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


def probe_states(probes: int, hidden: int) -> np.ndarray:
    """Deterministic probe hidden states (standard normal, numpy's PCG64 seeded with PROBE_SEED), float32: the same
    on every run and machine, and the same for the numpy and the torch comparisons."""
    import numpy as np

    return np.random.default_rng(PROBE_SEED).standard_normal((probes, hidden), dtype=np.float32)


def probe_hidden_states(probes: int, hidden: int) -> torch.Tensor:
    """`probe_states` as a torch tensor."""
    import torch

    return torch.from_numpy(probe_states(probes, hidden))


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
    tracker = _Top1(probes)
    step = rows_per_chunk(shape, chunk_bytes)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        tracker.update(start, h @ read_a(start, stop).to(torch.float32).T, h @ read_b(start, stop).to(torch.float32).T)
    return tracker.result()


class StreamingDiff:
    """One comparison of two float32 tensors fed chunk by chunk: weight statistics always, probe logits
    for the chunks given a `LogitCache` (callers that compare several pairs in one pass share one cache
    per chunk, so a tensor used by several comparisons is multiplied once)."""

    def __init__(self, probes: int, hidden: int | None) -> None:
        self.want_logits = probes > 0 and hidden is not None
        self.top1 = _Top1(probes) if self.want_logits else None
        self.equal = True
        self.max_abs = 0.0
        self.sq_diff = 0.0
        self.sq_ref = 0.0

    def update(
        self,
        start: int,
        a: torch.Tensor,
        b: torch.Tensor,
        logits: LogitCache | None = None,
        *,
        same: bool | None = None,
    ) -> None:
        """`same`: whether the chunks are equal, when the caller already knows (e.g. in the stored dtype)."""
        import torch

        if same is None:
            same = a is b or torch.equal(a, b)
        self.sq_ref += float(torch.linalg.vector_norm(a)) ** 2
        if not same:
            self.equal = False
            d = a - b
            if d.numel():
                worst = float(torch.linalg.vector_norm(d, ord=math.inf))  # max |d| in one pass
                # a NaN in either tensor must not hide every other difference: it counts as infinitely far
                self.max_abs = max(self.max_abs, math.inf if worst != worst else worst)
                self.sq_diff += float(torch.linalg.vector_norm(d)) ** 2
            del d
        if self.top1 is not None and logits is not None:
            la = logits.of(a)
            self.top1.update(start, la, la if same else logits.of(b))

    def result(self) -> TensorDiff:
        if self.equal:
            return TensorDiff(True, 0.0, 0.0, 0.0 if self.want_logits else None, 1.0 if self.want_logits else None)
        if self.sq_ref > 0:
            rel = math.sqrt(self.sq_diff) / math.sqrt(self.sq_ref)
        else:
            rel = 0.0 if self.sq_diff == 0 else math.inf
        if self.top1 is None or not self.top1.fed:
            return TensorDiff(False, self.max_abs, rel)
        logit_diff, top1 = self.top1.result()
        return TensorDiff(False, self.max_abs, rel, logit_diff, top1)


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
