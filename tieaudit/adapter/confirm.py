"""An adapter's forecast held to peft itself: for every tied group of the base the adapter touches, peft's own run
of the tied layers (`tieaudit.adapter.oracle`) gives the run-time and merge-reload verdicts, and says whether
tieaudit's forecast (`tieaudit.adapter.forecast`) agrees with them (the same verdicts, probe-logit numbers within 2 %).
The adapter rules follow peft where the two disagree, and say so.

"Touched" is read from the files, not from tieaudit's model of them: a group is touched when the adapter file holds
a tensor under one of its members' modules or adapter_config.json names one of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from tieaudit.adapter.files import PREFIX
from tieaudit.adapter.forecast import differs
from tieaudit.adapter.oracle import OracleUnavailable, ask_peft
from tieaudit.model import TieStatus
from tieaudit.ties.compare import PROBE_SEED, probe_states

if TYPE_CHECKING:
    import numpy as np

    from tieaudit.adapter.files import AdapterSettings
    from tieaudit.adapter.forecast import GroupForecast
    from tieaudit.adapter.oracle import MemberProbe
    from tieaudit.checkpoint import Checkpoint
    from tieaudit.ties.graph import TieGraph

AGREE = 0.02  # the forecast's probe-logit numbers must be within 2 % of peft's
DIFFERS = 1e-5  # a probe-logit or row difference above this, relative to its scale, is a real difference
MIN_PROBES = 16  # the check runs even with --probe-tokens 0


@dataclass(frozen=True)
class ProbeGap:
    """Two versions of one weight, compared on the probes through peft's and transformers' own forward."""

    rows_max_abs_diff: float
    max_abs_logit_diff: float
    logit_scale: float
    top1_agreement: float

    @property
    def differs(self) -> bool:
        return self.max_abs_logit_diff > DIFFERS * max(self.logit_scale, 1e-12) or self.rows_max_abs_diff > DIFFERS


@dataclass(frozen=True)
class PeftView:
    """What peft does with one tied group: the members as the unmerged adapter runs them (each target against the
    source) and after peft's merge_and_unload -> save_pretrained -> from_pretrained (each member against its run-time
    self; None: the member is dropped and loads randomly initialised)."""

    source: str
    members: tuple[str, ...]
    peft_version: str
    runtime: dict[str, ProbeGap]  # target -> run-time source versus run-time target
    merged: dict[str, ProbeGap | None] | None  # None when peft's merge path raises (merge_error)
    merge_error: str | None
    config_tied_after_merge: bool | None
    agrees: bool  # tieaudit's forecast gives the same verdicts and numbers (False when there is no forecast)
    disagreement: str | None  # what differs, in words; or why there is no forecast
    in_file: frozenset[str] = frozenset()  # members whose modules the adapter file holds tensors for
    not_recorded: str | None = None  # why the shipped peft table could not answer instead (peft was run)

    def runtime_untied(self) -> list[str]:
        return [t for t, g in self.runtime.items() if g.differs]

    def corrupted(self) -> list[str]:
        if self.merged is None:
            return list(self.members)
        return [m for m, g in self.merged.items() if g is None or g.differs]


def gap(a: MemberProbe, b: MemberProbe) -> ProbeGap:
    """``b`` against the reference ``a``."""
    import numpy as np

    logit_diff = float(np.abs(a.logits - b.logits).max()) if a.logits.size else 0.0
    scale = float(np.abs(a.logits).max()) if a.logits.size else 0.0
    rows = float(np.abs(a.rows - b.rows).max()) if a.rows.size and a.rows.shape == b.rows.shape else 0.0
    top1 = float(np.mean(a.logits.argmax(axis=1) == b.logits.argmax(axis=1))) if a.logits.size else 1.0
    return ProbeGap(rows, logit_diff, scale, top1)


def in_file(adapter: Checkpoint, members: Sequence[str]) -> frozenset[str]:
    """The members whose modules the adapter file holds tensors for."""

    modules = {m: m.rpartition(".")[0] for m in members}
    return frozenset(
        m for m, mod in modules.items() if mod and any(k.startswith(f"{PREFIX}{mod}.") for k in adapter.tensors)
    )


def touched_groups(
    adapter: Checkpoint, settings: AdapterSettings, graph: TieGraph, base: Checkpoint | None = None
) -> list[tuple[str, ...]]:
    """Members of every group the base ties (and loads intact) whose modules the adapter file or config mentions. With
    ``base``, a group of vectors (tied biases) counts only when the adapter file holds one of them by name: a LoRA
    on the module that owns a tied bias leaves the bias alone."""

    out = []
    for g in graph.groups:
        if not g.tied_by_config or g.status is not TieStatus.TIED:
            continue
        modules = [m.rpartition(".")[0] for m in g.members]
        if not (in_file(adapter, g.members) or any(settings.named(mod) for mod in modules if mod)):
            continue
        if base is not None and not _has_matrix(base, graph, g.members) and not _holds(adapter, g.members):
            continue
        out.append(g.members)
    return out


def _has_matrix(base: Checkpoint, graph: TieGraph, members: Sequence[str]) -> bool:
    shapes = [base.tensors[graph.disk_names[m]].shape for m in members if graph.disk_names.get(m) in base.tensors]
    return not shapes or any(len(s) >= 2 for s in shapes)


def _holds(adapter: Checkpoint, members: Sequence[str]) -> bool:
    """The adapter file holds a tensor for one of ``members`` itself (its module's copy of that parameter)."""
    for m in members:
        module, _, leaf = m.rpartition(".")
        if any(k.startswith(f"{PREFIX}{module}.") and k.endswith(f".{leaf}") for k in adapter.tensors):
            return True
    return False


def peft_views(
    adapter: Checkpoint,
    base: Checkpoint,
    graph: TieGraph,
    groups: Sequence[tuple[str, ...]],
    values: dict[str, str],
    forecasts: Sequence[GroupForecast],
    settings: AdapterSettings,
    probes: int,
    max_bytes: int,
) -> list[PeftView]:
    """Ask peft about ``groups`` (each: the source first), and compare with the forecasts. Raises
    `tieaudit.adapter.oracle.OracleUnavailable` when peft cannot be asked."""

    # peft is run on the tied matrices: a group of tied vectors (a bias, e.g. XLM-R's lm_head.bias) has no forward of
    # its own to probe, and stays unverified
    groups = [g for g in groups if any(m in values and len(base.tensors[values[m]].shape) == 2 for m in g)]
    members = [m for g in groups for m in g if m in values and len(base.tensors[values[m]].shape) == 2]
    if not members:
        raise OracleUnavailable("the touched tied groups hold no matrix to probe (tied vectors only)")
    shape = base.tensors[values[members[0]]].shape
    vocab, hidden = int(shape[0]), int(shape[1])
    # the forecast's own probe states (compare.probe_states), so its logit numbers and peft's are comparable
    ids, h = probe_inputs(vocab, hidden, probes, settings)
    oracle = ask_peft(base, adapter.root, {m: values[m] for m in members}, ids, h, merge=True, max_bytes=max_bytes)
    by_source = {fc.source: fc for fc in forecasts}
    views = []
    for g in groups:
        source, targets = g[0], [t for t in g[1:] if t in oracle.runtime]
        if source not in oracle.runtime:
            continue
        rt = {t: gap(oracle.runtime[source], oracle.runtime[t]) for t in targets}
        merged: dict[str, ProbeGap | None] | None = None
        if oracle.merged is not None:
            merged = {}
            for m in g:
                if m not in oracle.runtime:
                    continue
                after = oracle.merged.get(m)
                merged[m] = None if after is None else gap(oracle.runtime[m], after)
        view = PeftView(
            source,
            g,
            oracle.peft_version,
            rt,
            merged,
            oracle.merge_error,
            oracle.merged_config_tied,
            False,
            None,
            in_file(adapter, g),
        )
        fc = by_source.get(source)
        why = _disagreement(view, fc, probes) if fc is not None else "tieaudit has no forecast for this adapter"
        views.append(_with(view, why))
    return views


def _with(view: PeftView, why: str | None) -> PeftView:

    return replace(view, agrees=why is None, disagreement=why)


def _close(forecast: float | None, measured: float) -> bool:
    if forecast is None:
        return True  # --probe-tokens 0: the forecast has no logits to compare, the verdicts decide
    return abs(forecast - measured) <= AGREE * max(abs(measured), 1e-6)


def _disagreement(view: PeftView, fc: GroupForecast, probes: int) -> str | None:
    """None when the forecast gives peft's verdicts and (with probes) its numbers; else what differs."""

    problems = []
    for t, g in view.runtime.items():
        d = fc.adapter_diffs.get(t)
        if d is None:
            continue
        if differs(d) != g.differs:
            problems.append(f"run time, {t}: forecast {'differs' if differs(d) else 'equal'}, peft the opposite")
        elif g.differs and probes > 0 and not _close(d.max_abs_logit_diff, g.max_abs_logit_diff):
            problems.append(
                f"run time, {t}: probe logits max |Δ| {d.max_abs_logit_diff:.3g} forecast, "
                f"{g.max_abs_logit_diff:.3g} with peft"
            )
    if view.merge_error is not None:
        return f"peft's own merge path fails ({view.merge_error}); the forecast assumed it runs"
    if view.merged is not None:
        for m, mg in view.merged.items():
            f = fc.members_forecast.get(m)
            if f is None:
                continue
            f_bad = f.dropped or f.merge_diff is None or differs(f.merge_diff)
            p_bad = mg is None or mg.differs
            if f_bad != p_bad:
                problems.append(f"merge, {m}: forecast {'changed' if f_bad else 'kept'}, peft the opposite")
            elif (
                mg is not None
                and f.merge_diff is not None
                and mg.differs
                and probes > 0
                and not _close(f.merge_diff.max_abs_logit_diff, mg.max_abs_logit_diff)
            ):
                problems.append(
                    f"merge, {m}: probe logits max |Δ| {f.merge_diff.max_abs_logit_diff:.3g} forecast, "
                    f"{mg.max_abs_logit_diff:.3g} with peft"
                )
    return "; ".join(problems) or None


def probe_inputs(vocab: int, hidden: int, probes: int, settings: AdapterSettings) -> tuple[list[int], np.ndarray]:
    """Probe token ids (seeded rows and every trainable-token index) and the forecast's probe hidden states
    (`compare.probe_states`; at least MIN_PROBES of each, so a check runs even with --probe-tokens 0)."""
    import numpy as np

    n = max(probes, MIN_PROBES)
    rows = np.random.default_rng(PROBE_SEED).integers(0, vocab, size=min(n, vocab))
    ids = sorted({int(i) for i in rows} | {i for i in token_indices(settings) if 0 <= i < vocab})
    return ids, probe_states(probes if probes > 0 else n, hidden)


def token_indices(settings: AdapterSettings) -> set[int]:
    """Every trainable-token index adapter_config.json names: the rows an adapter is most likely to get wrong."""
    tti = settings.trainable_token_indices
    if isinstance(tti, list):
        return {int(i) for i in tti}
    if isinstance(tti, dict):
        return {int(i) for idx in tti.values() for i in idx}
    return set()
