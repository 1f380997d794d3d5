"""Comparisons of weights that differ from one base weight W0 by LoRA deltas and replaced rows, from the factors.

Every weight an adapter forecast compares without a `modules_to_save` copy (a tied member at run time, the shared
weight after PEFT's merge) is

    X = W0 + sum_k c_k * L_k @ R_k,  then some rows replaced by trained token rows,

where ``L_k @ R_k`` is a LoRA delta of rank r (scaling folded into ``R_k``) and ``c_k`` is 0, 1 or 2. So:

- the difference of two such weights is ``L @ (R_a - R_b)`` of rank sum(r) plus the replaced rows: W0 cancels, and
  its max and Frobenius norm come from rank-r products, a block of rows at a time;
- ``||X||_F^2 = ||W0||^2 + 2 <L^T W0, R_x> + <L^T L, R_x R_x^T>`` and ``||L R_d||_F^2 = <L^T L, R_d R_d^T>``
  (corrected on replaced rows): the only full matrix read is W0, once, in row chunks, and a difference is
  materialised a block at a time only for its max;
- probe logits ``h @ X.T = h @ W0.T + (h @ R_x^T) @ L^T``: one product with W0 per chunk, shared by every weight.

So a check reads W0 once and does one (probes x vocab x hidden) product instead of materialising each weight, and it
needs numpy only (no torch import). `forecast.forecast_group` uses this for every group without a full copy; the
streaming path there (every weight materialised) is its reference, and the two agree (tests/test_lowrank.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tieaudit.ties.compare import TensorDiff, rows_per_chunk

if TYPE_CHECKING:
    import numpy as np

ArrayReader = Callable[[int, int], "np.ndarray"]  # (start, stop) -> float32 rows (see compare_lowrank's read_ahead)
BLOCK_ROWS = 512  # rows of a difference materialised at a time (a few MB: stays in cache)
BOUND_SLACK = 1e-3  # float32 rounding of a rank-r product stays far below this fraction of its Cauchy-Schwarz bound


@dataclass(frozen=True)
class Factor:
    """One LoRA delta: rows a..b of it are ``left[a:b] @ right`` (scaling already folded into ``right``)."""

    left: np.ndarray  # [vocab, r] float32
    right: np.ndarray  # [r, hidden] float32


@dataclass(frozen=True)
class LowRankWeight:
    """``W0 + sum_k coeffs[k] * factor_k``, then the rows in ``rows`` (row index -> float32 values) replaced."""

    coeffs: tuple[float, ...]
    rows: Mapping[int, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class PairResult:
    diff: TensorDiff  # as `compare.StreamingDiff` measures it, the first weight being the reference
    probe_rows_max: float  # max |a - b| over the probe rows given (0.0 when none)


class _Top1:
    """Running argmax of one weight's probe logits over vocabulary chunks."""

    def __init__(self, probes: int) -> None:
        import numpy as np

        self.best = np.full(probes, -np.inf, dtype=np.float32)
        self.arg = np.zeros(probes, dtype=np.int64)

    def update(self, start: int, logits: np.ndarray) -> None:
        """``logits``: [rows, probes] for the vocabulary rows start..start+rows."""
        import numpy as np

        if not logits.shape[0]:
            return
        idx = logits.argmax(axis=0)
        val = logits[idx, np.arange(logits.shape[1])]
        better = val > self.best
        self.best[better] = val[better]
        self.arg[better] = idx[better] + start


class _PairAcc:
    def __init__(self) -> None:
        self.equal = True
        self.max_abs = 0.0
        self.sq_fix = 0.0  # ||replaced rows of the difference||^2 - ||the low-rank rows they replace||^2
        self.max_logit = 0.0
        self.rows_max = 0.0

    def add(self, worst: float) -> None:
        """One more max |a - b| (of some rows) seen: NaN counts as infinite."""
        if worst != 0.0:
            self.equal = False
            self.max_abs = max(self.max_abs, math.inf if worst != worst else worst)


def compare_lowrank(
    w0: ArrayReader,
    shape: tuple[int, int],
    factors: Sequence[Factor],
    pairs: Sequence[tuple[LowRankWeight, LowRankWeight]],
    *,
    h: np.ndarray | None = None,
    probe_rows: Sequence[int] = (),
    chunk_rows: int | None = None,
    read_ahead: bool = False,
) -> list[PairResult]:
    """Compare each pair ``(a, b)`` of weights built on W0 (read through ``w0``, once, in row chunks).

    Returns, per pair, what `compare.StreamingDiff` would measure on the materialised float32 weights (``a`` the
    reference of the relative difference; probe logits ``h @ W.T`` when ``h`` is given) and the max |a - b| over
    ``probe_rows``. ``chunk_rows``: rows of W0 per read (default: ``compare.CHUNK_BYTES`` of float32).
    ``read_ahead``: the next chunk is read on another thread while this one is compared (so what ``w0`` returns
    must stay valid until the call after next).

    Working set: one chunk of W0 in float32 (``compare.CHUNK_BYTES``), one block of a difference (``BLOCK_ROWS``
    rows) and the probe logits of each distinct weight for one chunk."""
    import numpy as np

    vocab, hidden = shape
    f32 = np.float32
    rank = sum(f.left.shape[1] for f in factors)
    left = np.hstack([f.left for f in factors]).astype(f32, copy=False) if factors else np.zeros((vocab, 0), f32)
    left = np.ascontiguousarray(left)

    # equal expressions (the same coefficients and the same replaced-row arrays) are one weight: e.g. the shared
    # weight after a merge of one LoRA is the run-time weight of the layer that carries it
    weights: list[LowRankWeight] = []
    index: dict[int, int] = {}
    by_value: dict[tuple[object, ...], int] = {}
    for a, b in pairs:
        for one in (a, b):
            key = (tuple(one.coeffs), tuple(sorted((r, id(v)) for r, v in one.rows.items())))
            if key not in by_value:
                by_value[key] = len(weights)
                weights.append(one)
            index[id(one)] = by_value[key]

    def right_of(coeffs: Sequence[float]) -> np.ndarray:
        if not factors:
            return np.zeros((0, hidden), f32)
        return np.vstack([np.float32(c) * f.right for c, f in zip(coeffs, factors, strict=True)]).astype(f32)

    right = [right_of(one.coeffs) for one in weights]
    pair_ix = [(index[id(a)], index[id(b)]) for a, b in pairs]
    right_diff = [right[i] - right[j] for i, j in pair_ix]
    has_delta = [bool(rd.any()) for rd in right_diff]
    pair_rows = [sorted(set(weights[i].rows) | set(weights[j].rows)) for i, j in pair_ix]
    probe_set = sorted(set(probe_rows))

    probes = h.shape[0] if h is not None else 0
    h_right_t = [(h @ r.T).T.copy() for r in right] if h is not None else []  # [rank, probes] each
    # one product per chunk gives the probe logits and W0 @ R_k^T (for <W0, delta_k>): w @ [h; R_1; ...; R_n].T
    factor_right = np.vstack([f.right for f in factors]).astype(f32) if factors else np.zeros((0, hidden), f32)
    product = np.ascontiguousarray(np.vstack([h, factor_right]) if h is not None else factor_right)
    col_coeff = [np.repeat(np.asarray(one.coeffs, np.float64), [f.left.shape[1] for f in factors]) for one in weights]
    top1 = [_Top1(probes) for _ in weights] if h is not None else []
    distinct = {ij: k for k, ij in reversed(list(enumerate(pair_ix)))}  # (i, j) -> first pair measuring it
    accs = [_PairAcc() for _ in pairs]

    sq0 = 0.0
    cross = np.zeros(rank, np.float64)  # per column c of L: sum over rows of L[:, c] * (W0 @ R^T)[:, c]
    row_fix = [0.0] * len(weights)  # ||replaced rows||^2 - ||the rows they replace||^2

    def unreplaced(wi: int, rows: list[int], start: int, w: np.ndarray, lc: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (absolute) of ``W0 + deltas`` of weight ``wi``, before any replacement, from the chunk ``w``
        of W0 starting at ``start``."""
        at = [r - start for r in rows]
        out: np.ndarray = w[at] + lc[at] @ right[wi]
        return out

    def rows_of(wi: int, rows: list[int], start: int, w: np.ndarray, lc: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (absolute) of weight ``wi``, replacements applied."""
        own = weights[wi].rows
        out = unreplaced(wi, rows, start, w, lc)
        for k, r in enumerate(rows):
            if r in own:
                out[k] = own[r]
        return out

    step = chunk_rows or rows_per_chunk(shape)
    for start, stop, w in _chunks(w0, vocab, step, read_ahead):
        flat = w.reshape(-1)
        sq0 += float(np.dot(flat, flat))
        lc = left[start:stop]
        both = w @ product.T if product.shape[0] else None  # [rows, probes + rank]: the one product with W0
        if rank and both is not None:
            cross += np.einsum("ij,ij->j", lc, both[:, probes:], dtype=np.float64)
        for wi, wt in enumerate(weights):
            replaced = [r for r in wt.rows if start <= r < stop]
            if replaced:
                before = unreplaced(wi, replaced, start, w, lc)
                after = np.stack([np.asarray(wt.rows[r], dtype=f32) for r in replaced])
                row_fix[wi] += float(np.sum(np.square(after, dtype=np.float64))) - float(
                    np.sum(np.square(before, dtype=np.float64))
                )
        logits: list[np.ndarray] = []
        if h is not None and both is not None:
            base_logits = both[:, :probes]  # [rows, probes]
            for wi, wt in enumerate(weights):
                lg = base_logits + lc @ h_right_t[wi] if rank and right[wi].any() else base_logits.copy()
                for r, values in wt.rows.items():
                    if start <= r < stop:
                        lg[r - start] = h @ np.asarray(values, dtype=f32)
                top1[wi].update(start, lg)
                logits.append(lg)
        for p, (i, j) in enumerate(pair_ix):
            acc = accs[p]
            if distinct[(i, j)] != p or i == j:
                continue
            fixed = [r for r in pair_rows[p] if start <= r < stop]
            # replaced rows: exactly, from this chunk of W0; the low-rank rest after the loop (it needs no W0)
            if fixed:
                exact = rows_of(i, fixed, start, w, lc) - rows_of(j, fixed, start, w, lc)
                for k, r in enumerate(fixed):
                    low = lc[r - start] @ right_diff[p] if has_delta[p] else np.zeros(hidden, f32)
                    acc.sq_fix += float(np.sum(np.square(exact[k], dtype=np.float64))) - float(
                        np.sum(np.square(low, dtype=np.float64))
                    )
                    worst = float(np.abs(exact[k]).max())
                    acc.add(worst)
                    if r in probe_set:
                        acc.rows_max = max(acc.rows_max, worst)
            if h is not None:
                gap = np.abs(logits[i] - logits[j])
                worst_logit = float(gap.max()) if gap.size else 0.0
                acc.max_logit = max(acc.max_logit, math.inf if worst_logit != worst_logit else worst_logit)
        del w, logits

    for p, (i, j) in enumerate(pair_ix):
        if distinct[(i, j)] != p or i == j or not has_delta[p]:
            continue
        acc, skip = accs[p], set(pair_rows[p])
        acc.add(_max_abs_product(left, right_diff[p], skip))
        for r in probe_set:
            if r not in skip:
                acc.rows_max = max(acc.rows_max, float(np.abs(left[r] @ right_diff[p]).max()))

    gram = left.T.astype(np.float64) @ left.astype(np.float64)  # L^T L
    results = []
    for i, j in pair_ix:
        acc = accs[distinct[(i, j)]]
        if acc.equal:
            diff = TensorDiff(True, 0.0, 0.0, 0.0 if h is not None else None, 1.0 if h is not None else None)
            results.append(PairResult(diff, 0.0))
            continue
        r64 = right[i].astype(np.float64)
        sq_ref = sq0 + 2.0 * float(cross @ col_coeff[i]) + float(np.sum(gram * (r64 @ r64.T))) + row_fix[i]
        sq_ref = max(sq_ref, 0.0)
        d64 = right_diff[distinct[(i, j)]].astype(np.float64)
        sq_diff = max(float(np.sum(gram * (d64 @ d64.T))) + acc.sq_fix, 0.0)  # ||L (R_a - R_b)||^2, rows replaced
        rel = math.sqrt(sq_diff) / math.sqrt(sq_ref) if sq_ref > 0 else 0.0 if sq_diff == 0 else math.inf
        if h is None:
            diff = TensorDiff(False, acc.max_abs, rel)
        else:
            agree = float((top1[i].arg == top1[j].arg).mean()) if probes else 1.0
            diff = TensorDiff(False, acc.max_abs, rel, acc.max_logit, agree)
        results.append(PairResult(diff, acc.rows_max))
    return results


def _max_abs_product(left: np.ndarray, right: np.ndarray, skip: set[int]) -> float:
    """max |(left @ right)[i, j]| over the rows i not in ``skip`` (NaN: NaN), materialising few rows.

    Each row's largest entry is at most ``||left[i]|| * max_j ||right[:, j]||`` (Cauchy-Schwarz), so rows are taken
    in decreasing order of ``||left[i]||``, a block at a time, until no row left can beat the max found; the result
    is the one the full product gives. Non-finite factors take every row."""
    import numpy as np

    rows = left.shape[0]
    if not rows or not right.size:
        return 0.0
    norms = np.sqrt(np.einsum("ij,ij->i", left, left, dtype=np.float64))
    col = float(np.sqrt(np.einsum("ij,ij->j", right, right, dtype=np.float64)).max())
    finite = bool(np.isfinite(norms).all()) and math.isfinite(col)
    order = np.argsort(-norms, kind="stable") if finite else np.arange(rows)
    if skip:
        order = order[~np.isin(order, np.fromiter(skip, np.int64, len(skip)))]
    best = 0.0
    for b in range(0, order.size, BLOCK_ROWS):
        idx = order[b : b + BLOCK_ROWS]
        if finite and norms[idx[0]] * col * (1.0 + BOUND_SLACK) < best:
            break
        with np.errstate(invalid="ignore", over="ignore"):  # a non-finite factor gives NaN/inf: reported as such
            d = left[idx] @ right
        worst = max(float(d.max()), -float(d.min()))
        if worst != worst:
            return math.nan
        best = max(best, worst)
    return best


def _chunks(w0: ArrayReader, rows: int, step: int, ahead: bool) -> Iterator[tuple[int, int, np.ndarray]]:
    """(start, stop, rows of W0) for each chunk; with ``ahead``, the next chunk is read on a worker thread while the
    caller works on this one (reading and decoding release the GIL)."""
    spans = [(a, min(rows, a + step)) for a in range(0, rows, step)]
    if not ahead or len(spans) < 2:
        for a, b in spans:
            yield a, b, w0(a, b)
        return
    from concurrent.futures import ThreadPoolExecutor  # lazy: only a read-ahead starts a thread

    with ThreadPoolExecutor(1, thread_name_prefix="tieaudit-read") as pool:
        pending = pool.submit(w0, *spans[0])
        for k, (a, b) in enumerate(spans):
            w = pending.result()
            if k + 1 < len(spans):
                pending = pool.submit(w0, *spans[k + 1])
            yield a, b, w
