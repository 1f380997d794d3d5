"""Adapter analysis: resolve the base, build its tie graph, read the adapter's edits, check they fit,
and forecast every tied group the adapter touches. Returns data for the adapter rules."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tieaudit.adapter import peft_table
from tieaudit.adapter.confirm import peft_views, touched_groups
from tieaudit.adapter.context import AdapterAlone, AdapterContext, BaseMismatch
from tieaudit.adapter.files import (
    SUPPORTED_TYPES,
    AdapterSettings,
    ModuleEdit,
    fit_problems,
    module_edits,
    read_settings,
    resolve_base,
)
from tieaudit.adapter.forecast import GroupInput, differs, forecast_group
from tieaudit.adapter.oracle import MAX_BYTES, OracleUnavailable
from tieaudit.checkpoint import open_checkpoint
from tieaudit.checkpoint.arrays import NUMPY_FLOAT_DTYPES as floating
from tieaudit.checkpoint.safetensors_header import read_into
from tieaudit.checkpoint.types import DTYPE_SIZES
from tieaudit.errors import InputError
from tieaudit.model import Comparison, Skipped, TieStatus
from tieaudit.ties.compare import PROBE_SEED, diff_tensors
from tieaudit.ties.declared import DeclaredTiesUnavailable, class_ties
from tieaudit.ties.graph import cast_reader, checkpoint_graph

if TYPE_CHECKING:
    from collections.abc import Sequence

    import numpy as np

    from tieaudit.adapter.confirm import PeftView
    from tieaudit.adapter.context import AdapterAlone, AdapterContext, BaseMismatch
    from tieaudit.adapter.forecast import GroupForecast
    from tieaudit.adapter.peft_table import Recorded
    from tieaudit.checkpoint import Checkpoint
    from tieaudit.checkpoint.types import ReadStats
    from tieaudit.ties.graph import TieGraph


@dataclass(frozen=True)
class AdapterAnalysis:
    context: AdapterContext
    comparisons: tuple[Comparison, ...]
    skipped: tuple[Skipped, ...]
    base_path: Path | None
    architecture: str | None
    base_stats: ReadStats | None = None  # bytes read from the base checkpoint


@dataclass(frozen=True)
class AdapterOptions:
    """How an adapter is checked against its base."""

    probes: int = 64  # seeded probe states for logit comparisons (0: weights only)
    confirm: bool = True  # hold the forecast to peft itself (`tieaudit.adapter.confirm`); False: say it is unconfirmed
    peft_max_bytes: int | None = None  # the peft check's memory bound (None: `oracle.MAX_BYTES`)
    require_base: bool = True  # a base that cannot be found is an error (TIE106); False: check the adapter alone
    forecast: str = "auto"  # the merge forecast's method: "auto", "lowrank" or "stream" (`forecast_group`)


def analyse_adapter(
    adapter: Checkpoint, path: str, base: str | None, options: AdapterOptions, stack: contextlib.ExitStack
) -> AdapterAnalysis:
    """Everything the adapter rules need."""

    assert adapter.adapter_config is not None
    settings = read_settings(adapter.adapter_config)
    skipped: list[Skipped] = []
    base_stats: list[ReadStats | None] = [None]
    # a relative base_model_name_or_path is joined to the adapter path as the user gave it, so reports and fix
    # hints name the base the way the user would type it
    base_path, how = resolve_base(base, settings, Path(path) if Path(path).is_dir() else Path(adapter.root))

    def result(
        graph: TieGraph | None,
        edits: dict[str, ModuleEdit],
        forecasts: list[GroupForecast],
        mismatches: list[BaseMismatch],
        comparisons: list[Comparison],
        arch: str | None,
        ignored: list[tuple[str, str]] | None = None,
        views: Sequence[PeftView] = (),
        unverified: Sequence[tuple[tuple[str, ...], str]] = (),
        alone: AdapterAlone | None = None,
        recorded: Sequence[Recorded] = (),
    ) -> AdapterAnalysis:
        ctx = AdapterContext(
            path=path,
            base=str(base_path) if base_path else None,
            settings=settings,
            graph=graph,
            edits=edits,
            forecasts=tuple(forecasts),
            mismatches=tuple(mismatches),
            probes=options.probes,
            adapter_config=adapter.adapter_config,
            ignored=tuple(ignored or []),
            peft=tuple(views),
            recorded=tuple(recorded),
            unverified=tuple(unverified),
            alone=alone,
        )
        return AdapterAnalysis(ctx, tuple(comparisons), tuple(skipped), base_path, arch, base_stats[0])

    modelled = settings.peft_type in SUPPORTED_TYPES
    if not modelled:
        skipped.append(
            Skipped(
                "forecast",
                f"peft_type {settings.peft_type} is not modelled by tieaudit (it models LORA and TRAINABLE_TOKENS): "
                "tied layers it touches are judged by peft itself, or reported as unverified",
            )
        )
    if base_path is None:
        skipped.append(Skipped("base", how))
        skipped.append(
            Skipped(
                "adapter-numbers",
                "without the base, the tie graph, the effective weights and the "
                "merge forecast (TIE101-TIE104) could not be computed",
            )
        )
        alone = adapter_alone(adapter, settings, how, options.require_base)
        return result(None, {}, [], [], [], alone.architecture, alone=alone)

    base_ckpt = stack.enter_context(open_checkpoint(base_path))
    base_stats[0] = base_ckpt.stats
    if base_ckpt.kind != "model":
        raise InputError(f"base {base_path} is itself an adapter; pass the base model directory")
    graph, arch = base_graph(base_ckpt, skipped)
    members = {n for g in graph.groups for n in g.members}
    edits = module_edits(adapter.tensors, settings, members) if modelled else {}
    mismatches = _shape_mismatches(adapter, base_ckpt, graph, edits)
    values = group_base_values(base_ckpt, graph)
    bad = {m.param for m in mismatches}
    # a saved base copy of a tied layer is compared with the base from the bytes the forecast reads anyway
    checks = copy_checks(adapter, base_ckpt, values, edits, bad)
    mismatches += base_copy_mismatches(adapter, base_ckpt, values, edits, bad | set(checks))
    if settings.use_dora or any(e.lora and e.lora.dora for e in edits.values()):
        skipped.append(
            Skipped(
                "dora",
                "DoRA magnitude vectors are not modelled: effective weights of DoRA layers "
                "and their merge forecast were not computed",
            )
        )

    applied, ignored = applied_edits(graph, edits, settings)
    forecasts, comparisons = forecast_groups(
        adapter, base_ckpt, graph, applied, settings, options.probes, mismatches, skipped, options.forecast, checks
    )
    late = {m: edits[m] for m, check in checks.items() if not check.settled}
    if late:  # not all read by the forecast (no low-rank pass over that base tensor), or they differ: compare now
        found = base_copy_mismatches(adapter, base_ckpt, values, late, bad)
        if found:
            mismatches += found
            dropped = {m.param for m in found}
            kept = [fc for fc in forecasts if not dropped & set(fc.members)]
            sources = {fc.source for fc in forecasts} - {fc.source for fc in kept}
            forecasts, comparisons = kept, [c for c in comparisons if c.source not in sources]
    views, recorded, unverified = _confirm(
        adapter,
        base_ckpt,
        graph,
        forecasts,
        _Asked(arch, settings, edits, options.probes, options.confirm, options.peft_max_bytes),
        mismatches,
        skipped,
    )
    comparisons += _view_comparisons(views)
    return result(graph, edits, forecasts, mismatches, comparisons, arch, ignored, views, unverified, recorded=recorded)


def adapter_alone(adapter: Checkpoint, settings: AdapterSettings, why: str, required: bool) -> AdapterAlone:
    """What the adapter alone shows when its base cannot be found: the class peft wrapped (auto_mapping), and the
    layers it changes that this class ties by declaration (from the class's default config; whether the real base
    ties them depends on its config, which is not at hand)."""

    arch = settings.base_model_class
    ties: dict[str, str] = {}
    unavailable = None if arch else "adapter_config.json names no base model class (auto_mapping)"
    if arch:
        try:
            ties = class_ties(arch)
        except DeclaredTiesUnavailable as exc:
            unavailable = str(exc)
    partner = {**{s: t for t, s in ties.items()}, **ties}
    edits = module_edits(adapter.tensors, settings, partner) if settings.peft_type in SUPPORTED_TYPES else {}
    pairs = {tuple(sorted((param, partner[param]))) for param, edit in edits.items() if edit.changes_weight}
    touched = tuple(sorted((a, b) for a, b in pairs))
    lora = {param for param, edit in edits.items() if edit.lora is not None}
    return AdapterAlone(
        reason=why,
        base_name=settings.base_model_name_or_path,
        architecture=arch,
        touched=touched,
        ties_unavailable=unavailable,
        both_adapted=any(a in lora and b in lora for a, b in touched),
        required=required,
    )


@dataclass(frozen=True)
class _Asked:
    """What holding an adapter's forecasts to peft needs besides the checkpoints."""

    architecture: str | None
    settings: AdapterSettings
    edits: dict[str, ModuleEdit]
    probes: int
    confirm: bool
    max_bytes: int | None


def _confirm(
    adapter: Checkpoint,
    base_ckpt: Checkpoint,
    graph: TieGraph,
    forecasts: list[GroupForecast],
    asked: _Asked,
    mismatches: list[BaseMismatch],
    skipped: list[Skipped],
) -> tuple[list[PeftView], list[Recorded], list[tuple[tuple[str, ...], str]]]:
    """peft's verdicts on every tied group the adapter touches: from the shipped peft table where it vouches for a
    forecast (`tieaudit.adapter.peft_table`), else by running peft; and the groups neither peft nor the forecast
    could judge (with why)."""

    settings = asked.settings
    bad = {m.param for m in mismatches}
    groups = [g for g in touched_groups(adapter, settings, graph, base_ckpt) if not any(m in bad for m in g)]
    if not groups:
        return [], [], []
    forecast_of = {fc.source for fc in forecasts}
    why_not = "--no-peft-check" if not asked.confirm else None
    views: list[PeftView] = []
    recorded: list[Recorded] = []
    not_recorded: dict[str, str] = {}  # group source -> why the table could not vouch for it
    peft_fails = False
    values = group_base_values(base_ckpt, graph)
    # peft is run on tied matrices: a group of tied vectors (a bias, e.g. XLM-R's lm_head.bias) has no forward of its
    # own to run it on, whichever way peft would be asked
    vectors = {
        g[0]: "a tied vector has no forward of its own to run peft on"
        for g in groups
        if not any(m in values and len(base_ckpt.tensors[values[m]].shape) == 2 for m in g)
    }
    if asked.confirm:
        assert adapter.adapter_config is not None
        ask = []
        for g in groups:
            if g[0] in vectors:
                continue
            sig = peft_table.signature(g, adapter.tensors, asked.edits, settings, adapter.adapter_config.data)
            own = {m: asked.edits[m] for m in g if m in asked.edits}
            why = (
                peft_table.why_not(asked.architecture, adapter.adapter_config, settings, own, sig)
                if g[0] in forecast_of
                else "tieaudit has no forecast for this adapter"
            )
            if why is None:
                recorded.append(peft_table.Recorded(g[0], g, peft_table.recorded_version(), sig))
            else:
                not_recorded[g[0]] = why
                ask.append(g)
        if ask:
            try:
                limit = MAX_BYTES if asked.max_bytes is None else asked.max_bytes
                views = peft_views(adapter, base_ckpt, graph, ask, values, forecasts, settings, asked.probes, limit)
                views = [replace(v, not_recorded=not_recorded.get(v.source)) for v in views]
            except OracleUnavailable as exc:
                why_not, peft_fails = str(exc), exc.peft_fails
    if why_not is not None:
        about = "" if not recorded else f" about {', '.join(g[0] for g in groups if g[0] in not_recorded)}"
        table = "; ".join(sorted(set(not_recorded.values()) - {"tieaudit has no forecast for this adapter"}))
        because = f"{why_not}; the shipped peft table: {table}" if table else why_not
        skipped.append(
            Skipped(
                "peft-confirmation",
                f"peft was not asked{about} ({because}): the adapter findings rest on tieaudit's own forecast",
            )
        )
    seen = {v.source for v in views} | {r.source for r in recorded}
    # a group is unverified when nothing judged it; and when peft itself fails on the adapter, whatever the forecast
    # says: the adapted model fails for its users too
    unverified = [
        (g, why_not or vectors.get(g[0]) or "peft gave no answer")
        for g in groups
        if g[0] not in seen and (peft_fails or g[0] not in forecast_of)
    ]
    return views, recorded, unverified


def _view_comparisons(views: Sequence[PeftView]) -> list[Comparison]:
    """peft's own numbers, beside the forecast's: stages `peft-adapter` and `peft-merge-reload` (probe rows and
    logits only: peft is run on the probes, not on whole weights)."""
    out = []
    for v in views:
        for target, g in v.runtime.items():
            out.append(
                Comparison(
                    "peft-adapter",
                    v.source,
                    target,
                    None,
                    g.rows_max_abs_diff,
                    None,
                    g.max_abs_logit_diff,
                    g.top1_agreement,
                    None,
                )
            )
        for m, mg in (v.merged or {}).items():
            target = next((t for t in v.members if t != v.source), v.source)
            out.append(
                Comparison(
                    "peft-merge-reload",
                    v.source,
                    target,
                    m,
                    None if mg is None else mg.rows_max_abs_diff,
                    None,
                    None if mg is None else mg.max_abs_logit_diff,
                    None if mg is None else mg.top1_agreement,
                    None,
                )
            )
    return out


def applied_edits(
    graph: TieGraph, edits: dict[str, ModuleEdit], settings: AdapterSettings
) -> tuple[dict[str, ModuleEdit], list[tuple[str, str]]]:
    """The edits peft really applies when loading onto this base.

    LoRA factors or token rows the file holds for a layer the config does not name (ensure_weight_tying saves the
    tied head's) are used only when peft re-ties that layer to the embedding's adapter; otherwise peft silently
    ignores them. A plain weight the file holds for a layer peft does not wrap (`lm_head.weight`, saved by
    ensure_weight_tying with modules_to_save) is another matter: `set_peft_model_state_dict` loads it into the base's
    own parameter, which a tied base shares between every member of the group, so every member that peft does not
    wrap runs with those values."""
    tied_groups = {n: g.members for g in graph.groups if g.tied_by_config for n in g.members}
    applied: dict[str, ModuleEdit] = {}
    ignored: list[tuple[str, str]] = []
    overwrites: dict[tuple[str, ...], ModuleEdit] = {}  # tied group -> the plain weight loaded into its parameter
    for name, edit in edits.items():
        plain = edit.full_copy is not None and not edit.named_in_config
        if edit.named_in_config or not edit.changes_weight or (name in tied_groups and settings.peft_ties_on_load()):
            applied[name] = edit
        elif plain:
            applied[name] = edit
            if name in tied_groups:
                overwrites[tied_groups[name]] = edit  # the last one loaded wins (they are equal when saved tied)
        elif name in tied_groups:
            ignored.append(
                (
                    name,
                    "peft re-ties a head to the embedding's adapter only for layers named "
                    "embed_tokens/lm_head, and this config names neither",
                )
            )
        else:
            ignored.append((name, "this base does not tie the pair, so peft attaches nothing to this layer"))
    for members, edit in overwrites.items():
        for m in members:
            if m not in applied:
                applied[m] = ModuleEdit(m, m.rpartition(".")[0], full_copy=edit.full_copy, named_in_config=False)
    return applied, ignored


def base_graph(base_ckpt: Checkpoint, skipped: list[Skipped]) -> tuple[TieGraph, str | None]:

    graph, why_not = checkpoint_graph(base_ckpt, base=True)
    skipped.extend(why_not)
    return graph, (graph.declared.architecture if graph.declared else None)


def _group_shape(
    base_ckpt: Checkpoint, graph: TieGraph, members: tuple[str, ...]
) -> tuple[str, tuple[int, ...]] | None:
    for m in members:
        disk = graph.disk_names.get(m)
        if disk is not None and disk in base_ckpt.tensors:
            return disk, tuple(base_ckpt.tensors[disk].shape)
    return None


def _shape_mismatches(
    adapter: Checkpoint, base_ckpt: Checkpoint, graph: TieGraph, edits: dict[str, ModuleEdit]
) -> list[BaseMismatch]:

    out = []
    for g in graph.groups:
        found = _group_shape(base_ckpt, graph, g.members)
        if found is None:
            continue
        _, shape = found
        for m in g.members:
            e = edits.get(m)
            if e is None:
                continue
            transposed = bool(graph.declared and m in graph.declared.transposed)
            problems = fit_problems(e, adapter.tensors, shape, transposed, "the base weight")
            if problems:
                out.append(BaseMismatch(m, "shape", "; ".join(problems)))
    return out


def group_base_values(base_ckpt: Checkpoint, graph: TieGraph) -> dict[str, str]:
    """Each tie-group member -> the stored base tensor its values load from (its own, or its tied group's)."""
    out: dict[str, str] = {}
    for g in graph.groups:
        found = _group_shape(base_ckpt, graph, g.members)
        if found is None:
            continue
        for m in g.members:
            own = graph.disk_names.get(m)
            if own is not None and own in base_ckpt.tensors:
                out[m] = own
            elif g.tied_by_config:
                out[m] = found[0]
    return out


def base_copy_mismatches(
    adapter: Checkpoint,
    base_ckpt: Checkpoint,
    values: Mapping[str, str],
    edits: dict[str, ModuleEdit],
    skip: set[str],
    proven_equal: frozenset[str] = frozenset(),
) -> list[BaseMismatch]:
    """Base copies (`base_layer.weight`) in the adapter that differ from the base's weight. ``values``: parameter ->
    the stored base tensor it loads (see `group_base_values`); ``proven_equal``: adapter keys already found
    byte-identical to the base (see `same_bytes`)."""

    out = []
    for m, disk in values.items():
        e = edits.get(m)
        if e is None or e.base_copy is None or m in skip or e.base_copy in proven_equal:
            continue
        equal, read = same_bytes(adapter, e.base_copy, base_ckpt, disk)
        adapter.stats.tensor_bytes += read
        base_ckpt.stats.tensor_bytes += read
        if equal:
            continue  # the common case, settled by comparing the stored bytes (no float conversion)
        # a base saved in another precision (bf16 weights, an adapter trained on float32) is the same base:
        # both are compared in the narrower dtype, so only differences beyond its rounding count
        narrow = _narrower(adapter.tensors[e.base_copy].dtype, base_ckpt.tensors[disk].dtype)
        shape = tuple(base_ckpt.tensors[disk].shape)
        d = diff_tensors(cast_reader(adapter, e.base_copy, narrow), cast_reader(base_ckpt, disk, narrow), shape)
        if differs(d):
            out.append(
                BaseMismatch(
                    m,
                    "base-copy-differs",
                    f"the base copy saved in the adapter ({e.base_copy}) differs from the base's weight",
                    d.max_abs_diff,
                    d.rel_diff,
                )
            )
    return out


class CopyCheck:
    """Whether an adapter's saved base copy (`base_layer.weight`) holds the base tensor's bytes, judged from the base
    rows another pass reads anyway (the forecast's pass over W0): the copy's matching rows are read and compared as
    the base rows go by. ``settled``: every row was seen and all were equal; otherwise the caller compares the two
    tensors itself (`base_copy_mismatches`)."""

    def __init__(self, adapter: Checkpoint, copy_name: str, base: Checkpoint, base_name: str) -> None:
        found = adapter.byte_range(copy_name)
        assert found is not None
        self.fd, self.offset, _ = found
        self.adapter, self.copy_name, self.base_name = adapter, copy_name, base_name
        self.row_bytes = base.row_bytes(base_name)
        self.rows = base.row_count(base_name)
        self.seen: list[tuple[int, int]] = []
        self.equal = True
        self._buf: np.ndarray | None = None  # the copy's rows, refilled
        self._same: np.ndarray | None = None

    def __call__(self, start: int, stored: np.ndarray) -> None:
        import numpy as np

        n = stored.nbytes
        self._buf = _scratch(self._buf, n, np.uint8)
        mine = self._buf[:n]
        read_into(self.fd, self.offset + start * self.row_bytes, mine, self.adapter.tensors[self.copy_name].file)
        self.adapter.stats.tensor_bytes += n
        self.seen.append((start, start + n // self.row_bytes))
        if self.equal:
            self._same = _scratch(self._same, n // 8, np.bool_)
            self.equal = equal_bytes(mine, stored, self._same)

    @property
    def settled(self) -> bool:
        covered = 0
        for a, b in sorted(self.seen):
            if a != covered:
                return False
            covered = b
        return self.equal and covered == self.rows


def copy_checks(
    adapter: Checkpoint, base: Checkpoint, values: Mapping[str, str], edits: dict[str, ModuleEdit], skip: set[str]
) -> dict[str, CopyCheck]:
    """A `CopyCheck` for each saved base copy that is stored like its base tensor (same dtype and shape, both in
    safetensors files), keyed by the member it belongs to."""
    out = {}
    for m, disk in values.items():
        e = edits.get(m)
        if e is None or e.base_copy is None or m in skip or not base.tensors[disk].shape:
            continue
        if _byte_comparable(adapter, e.base_copy, base, disk):
            out[m] = CopyCheck(adapter, e.base_copy, base, disk)
    return out


def _fan_out(checks: list[CopyCheck]) -> Callable[[int, np.ndarray], None]:
    def tee(start: int, stored: np.ndarray) -> None:
        for check in checks:
            check(start, stored)

    return tee


def same_bytes(a: Checkpoint, name_a: str, b: Checkpoint, name_b: str, chunk: int = 32 * 2**20) -> tuple[bool, int]:
    """Whether two stored safetensors tensors have identical dtype, shape and bytes (False when it cannot tell), and
    how many bytes were read from each. Touches no shared state, so it may run on another thread.

    The two buffers are allocated once and refilled (fresh buffers per chunk cost a page fault per 4 KiB)."""
    import numpy as np

    ia, ib = a.tensors[name_a], b.tensors[name_b]
    ra, rb = a.byte_range(name_a), b.byte_range(name_b)
    if not _byte_comparable(a, name_a, b, name_b) or ra is None or rb is None:
        return False, 0
    chunk = max(8, chunk - chunk % 8)
    size = min(chunk, ra[2])
    buf_a, buf_b = np.empty(size, np.uint8), np.empty(size, np.uint8)
    same = np.empty(size // 8, np.bool_)
    read = 0
    for done in range(0, ra[2], chunk):
        n = min(chunk, ra[2] - done)
        read += n
        read_into(ra[0], ra[1] + done, buf_a[:n], ia.file)
        read_into(rb[0], rb[1] + done, buf_b[:n], ib.file)
        if not equal_bytes(buf_a[:n], buf_b[:n], same):
            return False, read
    return True, read


def _byte_comparable(a: Checkpoint, name_a: str, b: Checkpoint, name_b: str) -> bool:
    """Whether two stored tensors can be compared byte for byte: same dtype and shape, both in safetensors files."""
    ia, ib = a.tensors[name_a], b.tensors[name_b]
    ra, rb = a.byte_range(name_a), b.byte_range(name_b)
    same_layout = ia.dtype == ib.dtype and tuple(ia.shape) == tuple(ib.shape)
    return same_layout and ra is not None and rb is not None and ra[2] == rb[2]


def equal_bytes(a: np.ndarray, b: np.ndarray, scratch: np.ndarray) -> bool:
    """Whether two uint8 buffers of one length hold the same bytes, compared 8 at a time into ``scratch`` (bool, at
    least len // 8 long, reused by the caller: no temporary per chunk)."""
    import numpy as np

    words = a.nbytes // 8
    out = scratch[:words]
    np.equal(a[: words * 8].view(np.uint64), b[: words * 8].view(np.uint64), out=out)
    return bool(out.all()) and a[words * 8 :].tobytes() == b[words * 8 :].tobytes()


def _scratch(buf: np.ndarray | None, n: int, dtype: Any) -> np.ndarray:
    """``buf`` when it holds at least ``n`` elements, else a new one that does (refilled buffers, not fresh ones)."""
    import numpy as np

    return buf if buf is not None and buf.size >= n else np.empty(n, dtype)


def _narrower(a: str, b: str) -> str | None:
    """The floating dtype of lower precision of two (None: the same dtype, or not both floating)."""

    if a == b or a not in floating or b not in floating:
        return None
    if DTYPE_SIZES[a] == DTYPE_SIZES[b]:
        return "F32"
    return a if DTYPE_SIZES[a] < DTYPE_SIZES[b] else b


def forecast_groups(
    adapter: Checkpoint,
    base_ckpt: Checkpoint,
    graph: TieGraph,
    edits: dict[str, ModuleEdit],
    settings: AdapterSettings,
    probes: int,
    mismatches: list[BaseMismatch],
    skipped: list[Skipped],
    method: str = "auto",
    checks: Mapping[str, CopyCheck] | None = None,
) -> tuple[list[GroupForecast], list[Comparison]]:
    import numpy as np

    bad = {m.param for m in mismatches}
    forecasts, comparisons = [], []
    for g in graph.groups:
        touched = [m for m in g.members if m in edits and edits[m].changes_weight]
        if not touched:
            continue
        if not g.tied_by_config or g.status is not TieStatus.TIED:
            continue  # an untied pair merges correctly; a broken base is `tieaudit check BASE`'s business
        if any(m in bad for m in g.members):
            continue
        if any(edits[m].lora and edits[m].lora.dora for m in touched):  # type: ignore[union-attr]
            continue
        found = _group_shape(base_ckpt, graph, g.members)
        if found is None or len(found[1]) != 2:
            skipped.append(Skipped("merge-forecast", f"{g.source}: no 2-D stored weight in the base"))
            continue
        disk, shape = found
        vocab = shape[0]
        gen = np.random.default_rng(PROBE_SEED)
        probe_rows = sorted({int(i) for i in gen.integers(0, vocab, size=min(probes, vocab))})
        group_edits = {m: edits[m] for m in g.members if m in edits}
        group = GroupInput(
            g.source,
            g.members,
            (shape[0], shape[1]),
            disk,
            group_edits,
            settings,
            probes,
            probe_rows,
            _embed_scale(base_ckpt),
            graph.declared.transposed if graph.declared else frozenset(),
        )
        riders = [c for m, c in (checks or {}).items() if c.base_name == disk]
        fc = forecast_group(group, base_ckpt, adapter, method, _fan_out(riders) if riders else None)
        forecasts.append(fc)
        for target, d in fc.adapter_diffs.items():
            comparisons.append(
                Comparison(
                    "adapter",
                    fc.source,
                    target,
                    None,
                    d.max_abs_diff,
                    d.rel_diff,
                    d.max_abs_logit_diff,
                    d.top1_agreement,
                    d.bitwise_equal,
                )
            )
        for m, f in fc.members_forecast.items():
            d2 = f.merge_diff
            comparisons.append(
                Comparison(
                    "merge-reload",
                    fc.source,
                    next((t for t in fc.members if t != fc.source), fc.source),
                    m,
                    d2.max_abs_diff if d2 else None,
                    d2.rel_diff if d2 else None,
                    d2.max_abs_logit_diff if d2 else None,
                    d2.top1_agreement if d2 else None,
                    d2.bitwise_equal if d2 else False,
                    f.embedding_rows_diff,
                )
            )
    return forecasts, comparisons


def _embed_scale(base_ckpt: Checkpoint) -> float:
    """Gemma-family models scale embedding outputs by sqrt(hidden_size); the rows compared are outputs."""
    cfg: dict[str, object] = base_ckpt.config.data if base_ckpt.config else {}
    sub = cfg.get("text_config")
    text: dict[str, object] = sub if isinstance(sub, dict) else cfg
    model_type = str(text.get("model_type") or cfg.get("model_type") or "")
    hidden = text.get("hidden_size")
    if model_type.startswith("gemma") and isinstance(hidden, int):
        return float(math.sqrt(hidden))
    return 1.0
