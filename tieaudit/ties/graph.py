"""The tie graph: declared ties (from the model class) joined with what the files show.

For every declared or observed (target, source) pair this module works out, the way transformers'
`tie_weights(missing_keys=...)` does when loading, whether the pair loads tied, untied, diverged or
with a randomly initialised tensor. It returns data; the rules turn it into findings.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from tieaudit.checkpoint.arrays import NUMPY_FLOAT_DTYPES as FLOAT_DTYPES
from tieaudit.checkpoint.config import load_dtype
from tieaudit.checkpoint.pickled import torch_dtype
from tieaudit.checkpoint.types import TensorInfo
from tieaudit.model import Comparison, Progress, Skipped, TieGroup, TieStatus
from tieaudit.threads import numeric_threads
from tieaudit.ties.compare import RowReader, TensorDiff, diff_tensors
from tieaudit.ties.declared import DeclaredTies, DeclaredTiesUnavailable, Flag, declared_ties, validate_flag_types

if TYPE_CHECKING:
    import torch

    from tieaudit.checkpoint import Checkpoint


OBSERVED_STORAGE = "shared-storage"
OBSERVED_METADATA = "safetensors-metadata"
OBSERVED_EQUAL = "bitwise-equal"
OBSERVED_ABSENT = "target-absent"
# one member of a declared pair is absent and the other is in a safetensors file save_pretrained wrote
# ({"format": "pt"}): save_pretrained drops a tensor only when it shares storage with one it keeps, so the absent one
# *was* the stored one when the model was saved
OBSERVED_SAVE_RULE = "dropped-by-save-pretrained"

_STATUS_ORDER = {TieStatus.TIED: 0, TieStatus.UNTIED: 1, TieStatus.DIVERGED: 2, TieStatus.MISSING: 3}


class TensorSource(Protocol):
    """What graph building needs from a checkpoint: `Checkpoint` and the live-model view provide it."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, dict[str, str]]

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor: ...


@dataclass(frozen=True)
class PairState:
    """One (target, source) pair and how a loader treats it."""

    target: str  # in-memory names
    source: str
    declared: bool
    tied_by_config: bool
    flag: Flag | None
    target_info: TensorInfo | None  # None: not stored
    source_info: TensorInfo | None
    status: TieStatus
    diff: TensorDiff | None = None
    compared_as: str | None = None  # the dtype both were cast to before comparing (None: as stored)
    covered_by: str | None = None  # both absent, but this stored sibling target supplies the source
    observed: tuple[str, ...] = ()
    # stored tensors whose shape differs from what the config builds: (name, stored, expected)
    expected_mismatch: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()

    @property
    def shape_mismatch(self) -> bool:
        return bool(self.target_info and self.source_info and self.target_info.shape != self.source_info.shape)

    @property
    def dtype_mismatch(self) -> bool:
        return bool(self.target_info and self.source_info and self.target_info.dtype != self.source_info.dtype)

    @property
    def both_stored(self) -> bool:
        return self.target_info is not None and self.source_info is not None


@dataclass(frozen=True)
class TieGraph:
    groups: tuple[TieGroup, ...]
    pairs: tuple[PairState, ...]
    comparisons: tuple[Comparison, ...]
    declared: DeclaredTies | None
    disk_names: dict[str, str] = field(default_factory=dict)  # in-memory -> on-disk, for every stored tensor


def build_graph(
    ckpt: TensorSource,
    declared: DeclaredTies | None,
    *,
    probes: int = 64,
    progress: Progress | None = None,
    load_dtype: str | None = None,
) -> TieGraph:
    """Join declared ties with the stored tensors and measure every stored pair.

    `load_dtype` is the safetensors code of the dtype transformers loads in (the config's `dtype`):
    it compares tied tensors with `torch.equal` after that cast, and so does tieaudit."""
    rename = declared.rename if declared else (lambda name: name)
    mem_to_disk: dict[str, str] = {}
    for disk in ckpt.tensors:
        mem_to_disk.setdefault(rename(disk), disk)

    candidates = _candidate_pairs(ckpt, declared, rename, mem_to_disk)
    active = declared.active if declared else {}
    to_compare = sum(
        ckpt.tensors[mem_to_disk[c.source]].nbytes + ckpt.tensors[mem_to_disk[c.target]].nbytes
        for c in candidates
        if (c.target in active or _reader_ties(c.target, declared)) and _both(c, mem_to_disk)
    )
    comparer = _Comparer(ckpt, probes, progress, total=to_compare, load_dtype=load_dtype)
    with numeric_threads() if to_compare else contextlib.nullcontext():
        pairs = [_pair_state(c, ckpt, declared, mem_to_disk, comparer) for c in candidates]
    pairs = _resolve_covered(pairs)
    groups = _groups(pairs, declared, mem_to_disk, ckpt)
    return TieGraph(
        groups=tuple(groups),
        pairs=tuple(pairs),
        comparisons=tuple(comparer.comparisons),
        declared=declared,
        disk_names=mem_to_disk,
    )


@dataclass
class _Candidate:
    target: str
    source: str
    declared: bool
    observed: set[str] = field(default_factory=set)


def _candidate_pairs(
    ckpt: TensorSource,
    declared: DeclaredTies | None,
    rename: Callable[[str], str],
    mem_to_disk: dict[str, str],
) -> list[_Candidate]:
    found: dict[tuple[str, str], _Candidate] = {}
    if declared:
        for target, source in declared.potential.items():
            found[(target, source)] = _Candidate(target, source, declared=True)

    def observe(target: str, source: str, how: str) -> None:
        for key in ((target, source), (source, target)):
            if key in found:
                found[key].observed.add(how)
                return
        found[(target, source)] = _Candidate(target, source, declared=False, observed={how})

    # save_model() and some converters leave {removed: kept} in the safetensors header
    for meta in ckpt.metadata.values():
        for removed, kept in meta.items():
            if kept in ckpt.tensors and removed not in ckpt.tensors and removed != kept:
                observe(rename(removed), rename(kept), OBSERVED_METADATA)
    # pickled checkpoints keep tied tensors as two names of one storage
    by_storage: dict[tuple[str, str], list[str]] = defaultdict(list)
    for disk, info in ckpt.tensors.items():
        if info.storage_id is not None:
            by_storage[info.storage_id].append(disk)
    declared_targets = set(declared.potential) if declared else set()
    for names in by_storage.values():
        if len(names) < 2:
            continue
        mems = sorted(rename(n) for n in names)
        sources = [m for m in mems if m not in declared_targets] or mems
        for other in mems:
            if other != sources[0]:
                observe(other, sources[0], OBSERVED_STORAGE)
    return list(found.values())


def _both(c: _Candidate, mem_to_disk: dict[str, str]) -> bool:
    return c.target in mem_to_disk and c.source in mem_to_disk


def compare_dtype(load_dtype: str | None, src: TensorInfo, tgt: TensorInfo) -> str | None:
    """The dtype a loader compares a pair in: the load dtype, else float32 when the stored dtypes differ
    (None: as stored)."""
    if load_dtype in FLOAT_DTYPES and {src.dtype, tgt.dtype} <= FLOAT_DTYPES:
        return load_dtype
    if src.dtype != tgt.dtype and {src.dtype, tgt.dtype} <= FLOAT_DTYPES:
        return "F32"
    return None


def cast_reader(ckpt: TensorSource, name: str, cast: str | None) -> Callable[[int, int], torch.Tensor]:
    """Row reader of a stored tensor, cast to the safetensors dtype `cast` (None: as stored)."""
    if cast is None:
        return lambda a, b: ckpt.read_rows(name, a, b)

    dtype = torch_dtype(cast)
    return lambda a, b: ckpt.read_rows(name, a, b).to(dtype)


class _Comparer:
    """Measures stored pairs once each, in row chunks, and records the on-disk comparisons."""

    def __init__(
        self, ckpt: TensorSource, probes: int, progress: Progress | None, total: int, load_dtype: str | None
    ) -> None:
        self.ckpt = ckpt
        self.load_dtype = load_dtype
        self.probes = probes
        self.progress = progress
        self.total = total
        self.done = 0
        self.cache: dict[tuple[str, str], TensorDiff] = {}
        self.comparisons: list[Comparison] = []

    def compare_dtype(self, src: TensorInfo, tgt: TensorInfo) -> str | None:
        return compare_dtype(self.load_dtype, src, tgt)

    def _counted(self, info: TensorInfo, cast: str | None, label: str, cap: int) -> RowReader:
        """A row reader of ``info`` that reports the stored bytes read (a second pass for logits does not count
        past the pair's share, ``cap``)."""
        read = cast_reader(self.ckpt, info.name, cast)
        per_row = info.nbytes // info.shape[0] if info.shape and info.shape[0] else info.nbytes

        def counted(start: int, stop: int) -> torch.Tensor:
            rows = read(start, stop)
            self.done = min(self.done + (stop - start) * per_row, cap)
            if self.progress:
                self.progress(label, self.done, self.total)
            return rows

        return counted

    def compare(self, source: str, target: str, src: TensorInfo, tgt: TensorInfo) -> TensorDiff | None:
        key = (src.name, tgt.name)
        if key in self.cache:
            return self.cache[key]
        label = f"comparing {target} with {source}"
        if self.progress:
            self.progress(label, self.done, self.total)
        after = self.done + src.nbytes + tgt.nbytes
        result: TensorDiff | None = None
        cast = self.compare_dtype(src, tgt)
        if src.shape == tgt.shape and (src.dtype == tgt.dtype or cast is not None):
            if src.storage_id is not None and src.storage_id == tgt.storage_id:
                # one storage under two names: equal by construction, no need to read it
                result = TensorDiff(True, 0.0, 0.0, 0.0 if self.probes else None, 1.0 if self.probes else None)
            else:
                result = diff_tensors(
                    self._counted(src, cast, label, after),
                    self._counted(tgt, cast, label, after),
                    src.shape,
                    probes=self.probes,
                )
        self.done = after
        if result is not None:
            self.cache[key] = result
        self.comparisons.append(
            Comparison(
                stage="on-disk",
                source=source,
                target=target,
                tensor=None,
                max_abs_diff=result.max_abs_diff if result else None,
                rel_diff=result.rel_diff if result else None,
                max_abs_logit_diff=result.max_abs_logit_diff if result else None,
                top1_agreement=result.top1_agreement if result else None,
                bitwise_equal=result.bitwise_equal if result else False,
            )
        )
        return result


def _pair_state(
    c: _Candidate,
    ckpt: TensorSource,
    declared: DeclaredTies | None,
    mem_to_disk: dict[str, str],
    comparer: _Comparer,
) -> PairState:
    tgt = ckpt.tensors.get(mem_to_disk[c.target]) if c.target in mem_to_disk else None
    src = ckpt.tensors.get(mem_to_disk[c.source]) if c.source in mem_to_disk else None
    tied = bool(declared and c.declared and c.target in declared.active)
    flag = declared.flags.get(c.target) if (declared and c.declared) else None
    observed = set(c.observed)
    if tgt is None and src is not None:
        observed.add(OBSERVED_ABSENT)
    present = src if tgt is None else tgt if src is None else None
    saved_by_transformers = present is not None and ckpt.metadata.get(present.file, {}).get("format") == "pt"
    if c.declared and saved_by_transformers and present is not None and present.file.endswith(".safetensors"):
        observed.add(OBSERVED_SAVE_RULE)
    # only a pair the loader ties needs its contents: an untied pair's verdict is structural (headers only), unless
    # another reader ties it (TIE005: whether that reader serves the stored head's weights depends on them)
    measure = tied or (c.declared and _reader_ties(c.target, declared))
    diff = comparer.compare(c.source, c.target, src, tgt) if (src and tgt and measure) else None
    compared_as = comparer.compare_dtype(src, tgt) if (diff is not None and src and tgt) else None
    if diff and diff.bitwise_equal:
        observed.add(OBSERVED_EQUAL)
    if src and tgt and src.storage_id is not None and src.storage_id == tgt.storage_id:
        observed.add(OBSERVED_STORAGE)

    expected_mismatch = []
    if declared:
        for name, info in ((c.target, tgt), (c.source, src)):
            exp = declared.expected.get(name)
            if info is not None and exp is not None and tuple(info.shape) != exp:
                expected_mismatch.append((name, tuple(info.shape), exp))

    status = _status(c, tied, declared, src, tgt, diff, bool(expected_mismatch))
    return PairState(
        target=c.target,
        source=c.source,
        declared=c.declared,
        tied_by_config=tied,
        flag=flag,
        target_info=tgt,
        source_info=src,
        status=status,
        diff=diff,
        compared_as=compared_as,
        observed=tuple(sorted(observed)),
        expected_mismatch=tuple(expected_mismatch),
    )


def head_was_source(pair: PairState) -> str | None:
    """What in the files shows that the absent member of a pair held the stored one's values when saved (None:
    nothing does, e.g. a .bin without the head: torch.save keeps tied tensors under both names)."""
    if OBSERVED_METADATA in pair.observed:
        return f"the safetensors metadata records {pair.target} as removed in favour of {pair.source}"
    present = pair.source_info or pair.target_info
    if OBSERVED_SAVE_RULE in pair.observed and present is not None:
        return f"save_pretrained wrote {present.file} and drops a tensor only when it shares storage with one it keeps"
    return None


def _reader_ties(target: str, declared: DeclaredTies | None) -> bool:
    """Whether a reader other than transformers (tieaudit.ties.readers) ties this pair: it is the output head's and a
    reader reads its flag as true (or ties it whatever the flag says)."""
    return bool(declared and target == declared.head and any(view.value for view in declared.readers))


def _status(
    c: _Candidate,
    tied: bool,
    declared: DeclaredTies | None,
    src: TensorInfo | None,
    tgt: TensorInfo | None,
    diff: TensorDiff | None,
    bad_shape: bool,
) -> TieStatus:
    if tied:
        # transformers' tie_weights(missing_keys=...): both present must be equal; one present is tied
        # to the other (tying is symmetric); both absent is random init unless a sibling supplies it
        if src and tgt:
            if bad_shape or diff is None or not diff.bitwise_equal:
                return TieStatus.DIVERGED
            return TieStatus.TIED
        if src or tgt:
            return TieStatus.DIVERGED if bad_shape else TieStatus.TIED
        return TieStatus.MISSING
    if c.declared or (declared and c.target in declared.model_keys):
        # untied by the flag (or an observed tie the class does not declare): each tensor must be stored
        if src and tgt:
            return TieStatus.DIVERGED if bad_shape else TieStatus.UNTIED
        return TieStatus.MISSING
    # unknown architecture: only the files speak; a tie they record is taken as intended
    return TieStatus.TIED if (OBSERVED_METADATA in c.observed or OBSERVED_STORAGE in c.observed) else TieStatus.UNTIED


def _resolve_covered(pairs: list[PairState]) -> list[PairState]:
    """A tied pair with both tensors absent still loads when a sibling target of the same source is stored
    (T5: encoder.embed_tokens stored, shared and lm_head absent)."""
    stored_targets: dict[str, str] = {}
    for p in pairs:
        if p.tied_by_config and p.target_info is not None:
            stored_targets.setdefault(p.source, p.target)
    out = []
    for p in pairs:
        if p.status is TieStatus.MISSING and p.tied_by_config and p.source in stored_targets:
            p = replace(p, status=TieStatus.TIED, covered_by=stored_targets[p.source])
        out.append(p)
    return out


def _groups(
    pairs: Iterable[PairState],
    declared: DeclaredTies | None,
    mem_to_disk: dict[str, str],
    ckpt: TensorSource,
) -> list[TieGroup]:
    by_source: dict[str, list[PairState]] = defaultdict(list)
    for p in pairs:
        by_source[p.source].append(p)
    groups = []
    for source, members in by_source.items():
        members.sort(key=lambda p: p.target)
        names = [source, *(p.target for p in members)]
        stored = {n: (ckpt.tensors[mem_to_disk[n]].file if n in mem_to_disk else None) for n in names}
        disk = {n: mem_to_disk[n] for n in names if n in mem_to_disk and mem_to_disk[n] != n}
        flag = next((p.flag for p in members if p.flag), None)
        status = max((p.status for p in members), key=lambda s: _STATUS_ORDER[s])
        observed = sorted({o for p in members for o in p.observed})
        groups.append(
            TieGroup(
                source=source,
                targets=tuple(p.target for p in members),
                declared=any(p.declared for p in members),
                governing_flag=flag.ref if flag else None,
                flag_value=flag.value if flag else None,
                tied_by_config=all(p.tied_by_config for p in members),
                stored=stored,
                disk_names=disk,
                status=status,
                observed=tuple(observed),
            )
        )
    groups.sort(key=lambda g: g.source)
    return groups


def checkpoint_graph(
    ckpt: Checkpoint, probes: int = 0, progress: Progress | None = None, base: bool = False
) -> tuple[TieGraph, list[Skipped]]:
    """The one path from a checkpoint directory to its tie graph: the model class's declared ties (when the config
    names a class tieaudit can read), joined with the files, compared in the dtype transformers loads in. Also
    returns what could not be checked. ``base``: the checkpoint is an adapter's base (the reasons say so)."""

    skipped: list[Skipped] = []
    declared = None
    if ckpt.config is None:
        why = (
            "the base has no config.json"
            if base
            else "no config.json: only ties recorded in the weight files were checked"
        )
        skipped.append(Skipped("declared-ties", why))
    else:
        validate_flag_types(ckpt.config)
        if progress:
            progress("reading the model class's declared ties", 0, 0)
        try:
            declared = declared_ties(Path(ckpt.root), ckpt.config)
        except DeclaredTiesUnavailable as exc:
            why = (
                f"base: {exc}"
                if base
                else f"{exc}; only ties recorded in the weight files (shared storage, safetensors metadata) were "
                "checked, and missing-tensor rules could not be applied"
            )
            skipped.append(Skipped("declared-ties", why))
    graph = build_graph(ckpt, declared, probes=probes, progress=progress, load_dtype=load_dtype(ckpt.config))
    return graph, skipped
