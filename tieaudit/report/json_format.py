"""The JSON report (schema_version 1): the contract scripts depend on."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from tieaudit.model import (
    SCHEMA_VERSION,
    BatchReport,
    Comparison,
    FileChange,
    Finding,
    FixOutcome,
    FixRun,
    MergeRun,
    Report,
    TieGroup,
)

if TYPE_CHECKING:
    from tieaudit.report import RenderOptions


def _num(x: float | None) -> float | None:
    # JSON has no inf/nan; a non-finite measurement is reported as null (the message says more)
    if x is None or not math.isfinite(x):
        return None
    return float(x)


def group_dict(g: TieGroup) -> dict[str, Any]:
    return {
        "source": g.source,
        "targets": list(g.targets),
        "declared": g.declared,
        "governing_flag": g.governing_flag,
        "flag_value": g.flag_value,
        "tied_by_config": g.tied_by_config,
        "stored": dict(g.stored),
        "disk_names": dict(g.disk_names),
        "observed": list(g.observed),
        "status": g.status.value,
    }


def comparison_dict(c: Comparison) -> dict[str, Any]:
    return {
        "stage": c.stage,
        "source": c.source,
        "target": c.target,
        "tensor": c.tensor,
        "max_abs_diff": _num(c.max_abs_diff),
        "rel_diff": _num(c.rel_diff),
        "max_abs_logit_diff": _num(c.max_abs_logit_diff),
        "top1_agreement": _num(c.top1_agreement),
        "bitwise_equal": c.bitwise_equal,
        "embedding_rows_max_abs_diff": _num(c.embedding_rows_max_abs_diff),
    }


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return _num(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def finding_dict(f: Finding) -> dict[str, Any]:
    return {
        "code": f.code,
        "name": f.name,
        "severity": f.severity.value,
        "message": f.message,
        "location": {
            "file": f.location.file,
            "tensor": f.location.tensor,
            "config_key": f.location.config_key,
            "line": f.location.line,
        },
        "evidence": _clean(dict(f.evidence)),
        "fix": None
        if f.fix is None
        else {"applicability": f.fix.applicability, "command": f.fix.command, "description": f.fix.description},
        "fingerprint": f.fingerprint,
    }


def outcome_dict(o: FixOutcome) -> dict[str, Any]:
    return {
        "code": o.code,
        "fingerprint": o.fingerprint,
        "tensor": o.tensor,
        "status": o.status,
        "action": o.action,
        "applicability": o.applicability,
    }


def change_dict(c: FileChange) -> dict[str, Any]:
    return {
        "kind": c.kind,
        "file": c.file,
        "tensor": c.tensor,
        "shape": None if c.shape is None else list(c.shape),
        "dtype": c.dtype,
        "bytes": c.nbytes,
        "pointer": c.pointer,
        "old": c.old,
        "new": c.new,
        "detail": c.detail,
    }


def fix_run_dict(run: FixRun, timings: bool = False) -> dict[str, Any]:
    return {
        "mode": run.mode,
        "dry_run": run.dry_run,
        "source_path": run.source_path,
        "written_to": run.written_to,
        "fixed": run.fixed,
        "total": run.total,
        "bytes_written": run.bytes_written,
        "seconds": run.seconds if timings else None,
        "changes": [change_dict(c) for c in run.changes],
        "notes": list(run.notes),
        "diffs": list(run.diffs),
    }


def merge_run_dict(run: MergeRun, timings: bool = False) -> dict[str, Any]:
    return {
        "adapter_path": run.adapter_path,
        "base_path": run.base_path,
        "written_to": run.written_to,
        "groups": [
            {
                "source": g.source,
                "members": list(g.members),
                "result": g.result,
                "why": g.why,
                "peft_mechanisms": list(g.peft_mechanisms),
                "peft_problem": g.peft_problem,
            }
            for g in run.groups
        ],
        "merged": list(run.merged),
        "replaced": list(run.replaced),
        "bytes_written": run.bytes_written,
        "base_bytes_read": run.base_bytes_read,
        "verified_by": run.verified_by,
        "seconds": run.seconds if timings else None,
        "changes": [change_dict(c) for c in run.changes],
        "notes": list(run.notes),
    }


def report_dict(r: Report, timings: bool = False) -> dict[str, Any]:
    """The report as JSON data; `seconds` fields are null unless `timings` (then the same input gives the same
    document on every run)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "tieaudit", "version": r.tool_version},
        "target": {
            "path": r.target.path,
            "kind": r.target.kind,
            "base": r.target.base,
            "layout": r.target.layout,
            "files": list(r.target.files),
            "architecture": r.target.architecture,
            "repo": None
            if r.target.repo is None
            else {"id": r.target.repo.repo_id, "revision": r.target.repo.revision, "commit": r.target.repo.commit},
        },
        "graph": {"groups": [group_dict(g) for g in r.groups]},
        "comparisons": [comparison_dict(c) for c in r.comparisons],
        "findings": [finding_dict(f) for f in r.findings],
        "skipped": [{"check": s.check, "reason": s.reason} for s in r.skipped],
        "fixes": [outcome_dict(x) for x in r.fixes],
        "fix_run": None if r.fix_run is None else fix_run_dict(r.fix_run, timings),
        "merge_run": None if r.merge_run is None else merge_run_dict(r.merge_run, timings),
        "stats": {
            "header_bytes_read": r.stats.header_bytes_read,
            "tensor_bytes_read": r.stats.tensor_bytes_read,
            "seconds": r.stats.seconds if timings else None,
        },
        "summary": {"findings": r.counts(), "fail_on": r.fail_on.value, "exit_code": r.exit_code},
    }


def render(report: Report, options: RenderOptions) -> str:
    return json.dumps(report_dict(report, options.timings), indent=2, allow_nan=False) + "\n"


def batch_dict(b: BatchReport, timings: bool = False) -> dict[str, Any]:
    """Many targets: each audited target's report exactly as `check PATH -f json` prints it, in order, the targets
    that could not be audited, and a combined summary whose exit code is the worst."""
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "tieaudit", "version": b.tool_version},
        "reports": [report_dict(r, timings) for r in b.reports],
        "errors": [{"path": e.path, "message": e.message, "exit_code": e.exit_code} for e in b.errors],
        "summary": {
            "targets": len(b.items),
            "audited": len(b.reports),
            "not_audited": len(b.errors),
            "findings": b.counts(),
            "fail_on": b.fail_on.value,
            "exit_code": b.exit_code,
        },
    }


def render_batch(batch: BatchReport, options: RenderOptions) -> str:
    return json.dumps(batch_dict(batch, options.timings), indent=2, allow_nan=False) + "\n"
