"""`tieaudit fix`: audit, plan, write a staged fixed copy, re-audit it, then switch atomically."""

from __future__ import annotations

import contextlib
import difflib
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from tieaudit.auditing import AuditOptions, audit, audit_open, severity
from tieaudit.checkpoint import open_checkpoint
from tieaudit.checkpoint.config import load_dtype
from tieaudit.checkpoint.hub import is_cache_snapshot, resolve
from tieaudit.errors import InputError, UsageError, WriteError
from tieaudit.model import FileChange, Finding, FixOutcome, FixRun, FixStatus, Progress, Report, Severity
from tieaudit.repair.fix_layout import WeightOutput, layout_weights, new_config_text, new_index_text, write_weight_files
from tieaudit.repair.fix_plan import MODES, FixPlan, FixRefused, FixRequest, plan_fix
from tieaudit.repair.lock import write_lock
from tieaudit.repair.oracle import LibraryOracle
from tieaudit.repair.staging import (
    carry_metadata,
    check_output_dir,
    clean_stale_staging,
    commit_in_place,
    commit_output_dir,
    current_umask,
    fsync_tree,
    populate,
    staged,
    step,
    write_text,
)
from tieaudit.rules import selected

if TYPE_CHECKING:
    from tieaudit.checkpoint import Checkpoint


def fix(
    path: str | os.PathLike[str],
    *,
    mode: str,
    output_dir: str | os.PathLike[str] | None = None,
    in_place: bool = False,
    dry_run: bool = False,
    diffs: bool = False,
    unsafe_fixes: bool = False,
    sources: Sequence[str] = (),
    fail_on: str | Severity = Severity.WARNING,
    exit_zero: bool = False,
    probe_tokens: int = 64,
    progress: Progress | None = None,
    revision: str | None = None,
) -> Report:
    """Repair the weight tying of the checkpoint at ``path`` (docs/commands.md, `tieaudit fix`); a Hub repo id is
    read from the local Hugging Face cache (at ``revision``) and needs ``output_dir``.

    ``dry_run``: plan and report, write nothing; ``diffs``: also give unified diffs of the JSON files the fix
    rewrites (``fix_run.diffs``). Returns the report of the fixed checkpoint (or, with ``dry_run``, of the
    original with the planned changes); ``report.fix_run`` says what was changed and ``report.fixes`` what became
    of each finding.
    Raises `TieauditError` subclasses (exit 2) for bad input or a failed write; the original is then intact.
    """

    started = time.perf_counter()
    if mode not in MODES:
        raise UsageError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    dry = dry_run
    if not dry and (output_dir is None) == (not in_place):
        raise UsageError("give exactly one of output_dir and in_place=True (or dry_run=True)")
    if sources and not unsafe_fixes:
        raise UsageError("sources choose which tensor wins an unsafe retie: they need unsafe_fixes=True")
    fail_level = severity(fail_on)

    display = resolve(path, revision).path
    rules = selected(None, None)

    with contextlib.ExitStack() as stack:
        ckpt = stack.enter_context(open_checkpoint(display))
        dest = _check_destination(display, output_dir, in_place) if not dry else None
        if dest is not None and in_place:
            stack.enter_context(write_lock(dest, display))  # one in-place rewrite of a checkpoint at a time
        if dest is not None:
            clean_stale_staging(dest)  # a run killed mid-write left its staging directory next to the destination
        if ckpt.kind != "model":
            raise UsageError("tieaudit fix repairs model checkpoints; for an adapter use `tieaudit merge`")
        if ckpt.index_file is None and len(ckpt.weight_files) > 1:
            raise InputError("several weight files and no shard index: transformers cannot load this layout")
        options = AuditOptions(tuple(rules), fail_level, exit_zero, probe_tokens)
        before, graph = audit_open(ckpt, display, None, options, stack, started, progress)
        assert graph is not None
        if progress:
            progress("planning the fix", 0, 0)
        request = FixRequest(mode=mode, unsafe=unsafe_fixes, sources=tuple(sources))
        _check_sources(request, graph.disk_names)

        try:
            plan = plan_fix(
                graph,
                before.findings,
                ckpt.config,
                ckpt.index_mismatches,
                request,
                LibraryOracle(ckpt, load_dtype(ckpt.config)),
            )
        except FixRefused as exc:
            raise InputError(f"cannot fix {display}: {exc}") from None
        weights = layout_weights(ckpt, plan)
        config_text = new_config_text(ckpt, plan)
        index_text = new_index_text(ckpt, plan, weights)
        changes = _changes(ckpt, plan, weights, config_text is not None, index_text is not None)
        json_diffs = _diffs(ckpt, config_text, index_text) if diffs else ()
        if dry or not changes:
            outcomes = _outcomes(before.findings, plan, None, dry)
            run = _fix_run(request, plan, display, None, changes, outcomes, 0, started, json_diffs, dry)
            return replace(before, fixes=outcomes, fix_run=run)

        assert dest is not None
        final = dest if output_dir is not None else Path(ckpt.root)
        after, written = _write(
            ckpt, plan, weights, config_text, index_text, final, in_place, fail_level, exit_zero, before.findings
        )
    after = replace(after, target=replace(after.target, path=os.fspath(output_dir) if output_dir else display))
    outcomes = _outcomes(before.findings, plan, after.findings, False)
    run = _fix_run(request, plan, display, after.target.path, changes, outcomes, written, started, json_diffs, False)
    return replace(after, fixes=outcomes, fix_run=run)


def _fix_run(
    request: FixRequest,
    plan: FixPlan,
    source: str,
    written_to: str | None,
    changes: Sequence[FileChange],
    outcomes: Sequence[FixOutcome],
    written: int,
    started: float,
    diffs: tuple[str, ...],
    dry: bool,
) -> FixRun:
    return FixRun(
        mode=request.mode,
        dry_run=dry,
        source_path=source,
        written_to=written_to,
        changes=tuple(changes),
        fixed=sum(1 for o in outcomes if o.status is FixStatus.FIXED),
        total=len(outcomes),
        bytes_written=written,
        seconds=round(time.perf_counter() - started, 3),
        notes=plan.notes,
        diffs=diffs,
    )


def _check_destination(display: str, output_dir: str | os.PathLike[str] | None, in_place: bool) -> Path:
    root = Path(display).resolve()
    if in_place:
        if is_cache_snapshot(root):
            raise UsageError(
                f"{display} is a Hugging Face cache snapshot; fix a copy with --output-dir instead of editing the cache"
            )
        if not os.access(root, os.W_OK) or not os.access(root.parent, os.W_OK):
            raise WriteError(
                f"cannot fix {display} in place: no write permission on it or its parent directory "
                "(an in-place fix swaps the directory atomically); use --output-dir"
            )
        return root
    assert output_dir is not None
    return check_output_dir(output_dir, [root], "the checkpoint directory (use --in-place to fix it in place)")


def _check_sources(request: FixRequest, disk_names: dict[str, str]) -> None:
    known = set(disk_names) | set(disk_names.values())
    for name in request.sources:
        if name not in known:
            raise UsageError(f"--source {name}: no such stored tensor in this checkpoint")


def _write(
    ckpt: Checkpoint,
    plan: FixPlan,
    weights: WeightOutput,
    config_text: tuple[str, str] | None,
    index_text: tuple[str, str] | None,
    final: Path,
    in_place: bool,
    fail_level: Severity,
    exit_zero: bool,
    before_findings: Sequence[Finding],
) -> tuple[Report, int]:

    def failed(exc: OSError) -> str:
        where = exc.filename or final
        return f"cannot write the fixed checkpoint ({where}): {exc.strerror or exc}; {_intact(in_place)}"

    with staged(final, failed) as stage:
        skip = set(weights.files_written)
        if index_text is not None and ckpt.index_file:
            skip.add(ckpt.index_file)
        if config_text is not None and ckpt.config is not None:
            skip.add(ckpt.config.rel)
        populate(Path(ckpt.root), stage.path, skip, link=in_place)
        step("staged")
        written = write_weight_files(ckpt, weights, stage.path)
        step("weights")
        if index_text is not None and ckpt.index_file:
            written += write_text(stage.path / ckpt.index_file, index_text[1])
        step("index")
        if config_text is not None and ckpt.config is not None:
            written += write_text(stage.path / ckpt.config.rel, config_text[1])
        step("config")
        carry_metadata(Path(ckpt.root), stage.path, skip)
        fsync_tree(stage.path)
        after = audit(stage.path, fail_on=fail_level, exit_zero=exit_zero)
        _refuse_regressions(before_findings, after.findings)
        step("verified")
        if in_place:
            order = [*weights.new_files, *weights.rewritten]
            order += [rel for rel in (ckpt.index_file, ckpt.config.rel if ckpt.config else None) if rel in skip]
            commit_in_place(stage.path, final, [r for r in order if r is not None])
        else:
            os.chmod(stage.path, 0o777 & ~current_umask())
            commit_output_dir(stage.path, final)
        stage.committed = True
        return after, written


def _intact(in_place: bool) -> str:
    return "the checkpoint is unchanged" if in_place else "nothing was written to the output directory"


def _refuse_regressions(before: Sequence[Finding], after: Sequence[Finding]) -> None:
    """A fix must never add a problem: if the staged copy has an error the original did not, stop."""
    known = {(f.code, f.location.tensor) for f in before}
    new = [f for f in after if f.severity is Severity.ERROR and (f.code, f.location.tensor) not in known]
    if new:
        raise WriteError(
            f"internal check failed: the fixed copy would have {new[0].code} ({new[0].message}); nothing was changed"
        )


def _outcomes(
    before: Sequence[Finding], plan: FixPlan, after: Sequence[Finding] | None, dry: bool
) -> tuple[FixOutcome, ...]:
    """What became of each finding: judged by the re-audit `after` when the fix was written, else by the plan."""
    remaining = {(f.code, f.location.tensor, f.location.config_key) for f in after or ()}
    out = []
    for f in before:
        planned = plan.outcomes[f.fingerprint]
        if after is None:
            status = (FixStatus.WOULD_FIX if dry else FixStatus.FIXED) if planned.fixable else FixStatus.NOT_FIXED
        elif (f.code, f.location.tensor, f.location.config_key) not in remaining:
            status = FixStatus.FIXED
        else:
            status = FixStatus.REMAINS if planned.fixable else FixStatus.NOT_FIXED
        out.append(FixOutcome(f.code, f.fingerprint, f.location.tensor, status, planned.action, planned.applicability))
    return tuple(out)


def _changes(ckpt: Checkpoint, plan: FixPlan, weights: WeightOutput, config: bool, index: bool) -> list[FileChange]:
    changes: list[FileChange] = []
    where = {name: file for name, (file, _, _) in weights.final.items()}
    for s in plan.stores:
        changes.append(
            FileChange(
                "store-tensor",
                where[s.name],
                tensor=s.name,
                shape=tuple(s.info.shape),
                dtype=s.info.dtype,
                nbytes=s.info.nbytes,
                detail=s.why,
            )
        )
    for d in plan.drops:
        changes.append(
            FileChange(
                "drop-tensor",
                d.info.file,
                tensor=d.name,
                shape=tuple(d.info.shape),
                dtype=d.info.dtype,
                nbytes=-d.info.nbytes,
                detail=d.why,
            )
        )
    for rel in weights.new_files:
        changes.append(FileChange("new-file", rel, nbytes=_size(weights, rel), detail="new shard"))
    for rel in weights.rewritten:
        changes.append(FileChange("rewrite-file", rel, nbytes=_size(weights, rel), detail="rewritten"))
    if index and ckpt.index_file:
        changes.append(
            FileChange(
                "rewrite-index",
                ckpt.index_file,
                detail="regenerated from the shards" if plan.rebuild_index else "updated for the changed tensors",
            )
        )
    if config:
        for pointer, value in plan.config.items():
            changes.append(
                FileChange("set-config", "config.json", pointer=pointer, old=plan.config_old.get(pointer), new=value)
            )
    return changes


def _size(weights: WeightOutput, rel: str) -> int:
    entries = weights.new_files.get(rel) or weights.rewritten.get(rel) or []
    return sum(info.nbytes for _, info, _ in entries)


def _diffs(
    ckpt: Checkpoint, config_text: tuple[str, str] | None, index_text: tuple[str, str] | None
) -> tuple[str, ...]:
    out = []
    for rel, texts in ((ckpt.config.rel if ckpt.config else "config.json", config_text), (ckpt.index_file, index_text)):
        if texts is None or rel is None:
            continue
        old, new = texts
        out.append(
            "".join(
                difflib.unified_diff(
                    old.splitlines(keepends=True), new.splitlines(keepends=True), f"a/{rel}", f"b/{rel}"
                )
            )
        )
    return tuple(out)
