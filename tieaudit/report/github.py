"""GitHub Actions workflow commands: one `::error|warning|notice file=...,line=...,title=...::message` per finding,
shown as annotations on the run and, for files in the repository, on the pull request diff. In a batch, a target
that could not be audited is one `::error` naming it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tieaudit.model import BatchReport, Report, Severity
from tieaudit.report.paths import finding_line, finding_path

if TYPE_CHECKING:
    from tieaudit.report import RenderOptions

LEVELS = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "notice"}


def _data(text: str) -> str:
    """Escape a command's message (GitHub's toolkit escapeData)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _property(text: str) -> str:
    """Escape a command property value (GitHub's toolkit escapeProperty)."""
    return _data(text).replace(":", "%3A").replace(",", "%2C")


def render(report: Report, options: RenderOptions) -> str:
    lines = []
    for f in report.findings:
        props = ",".join(
            (
                f"file={_property(finding_path(report, f))}",
                f"line={finding_line(f)}",
                f"title={_property(f'tieaudit ({f.code})')}",
            )
        )
        message = f"{f.name}: {f.message}"
        if f.location.tensor:
            message += f" [tensor {f.location.tensor}]"
        if f.fix is not None and f.fix.command:
            message += f" Fix: {f.fix.command}"
        lines.append(f"::{LEVELS[f.severity]} {props}::{_data(message)}")
    return "".join(line + "\n" for line in lines)


def render_batch(batch: BatchReport, options: RenderOptions) -> str:
    parts = []
    for item in batch.items:
        if isinstance(item, Report):
            parts.append(render(item, options))
        else:
            title = _property("tieaudit (not audited)")
            parts.append(f"::error title={title}::{_data(f'{item.path}: {item.message} (exit {item.exit_code})')}\n")
    return "".join(parts)
