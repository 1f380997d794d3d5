"""Markdown for a pull-request comment or `$GITHUB_STEP_SUMMARY`: a headline, a summary table of the findings,
details per finding (evidence and the fix command), and a Mermaid diagram of the tie graph with broken edges
marked. A batch gets a table of its targets first, then each target's section one heading level down."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from tieaudit.model import BatchReport, Report, Severity
from tieaudit.report.graph_formats import mermaid

if TYPE_CHECKING:
    from tieaudit.report import RenderOptions

_ICON = {Severity.ERROR: "🔴", Severity.WARNING: "🟠", Severity.INFO: "🔵"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _counts_text(c: dict[str, int]) -> str:
    return (
        f"**{c['error']}** error{'s' if c['error'] != 1 else ''}, **{c['warning']}** "
        f"warning{'s' if c['warning'] != 1 else ''}, **{c['info']}** info"
    )


def render(report: Report, options: RenderOptions) -> str:
    return _section(report, "##")


def _section(report: Report, h: str, graph: bool = True) -> str:
    c = report.counts()
    state = "✅ passed" if report.exit_code == 0 else "❌ failed"
    t = report.target
    out = [
        f"{h} tieaudit: `{t.name}` {state}",
        "",
        f"{t.architecture or 'unknown architecture'}, {t.kind}, {t.layout}: {_counts_text(c)} "
        f"(fail-on {report.fail_on.value}, exit {report.exit_code}).",
        "",
    ]
    if report.findings:
        out += ["| | code | rule | where | tensor |", "|---|---|---|---|---|"]
        for f in report.findings:
            where = (f.location.file or "-") + (f":{f.location.line}" if f.location.line else "")
            out.append(
                f"| {_ICON[f.severity]} {f.severity.value} | `{f.code}` | {f.name} | `{_cell(where)}` | "
                f"{'`' + _cell(f.location.tensor) + '`' if f.location.tensor else '-'} |"
            )
        out.append("")
        for f in report.findings:
            subject = f.location.tensor or f.location.file or ""
            out += [f"<details><summary><b>{f.code}</b> {f.name}: {subject}</summary>", "", f.message, ""]
            if f.fix is not None:
                if f.fix.command:
                    out += [f"Fix ({f.fix.applicability}):", "", "```sh", f.fix.command, "```", ""]
                if f.fix.description:
                    out += [f.fix.description, ""]
            if f.evidence:
                evidence = json.dumps(dict(f.evidence), indent=2, default=str)
                out += ["Evidence:", "", "```json", evidence, "```", ""]
            out += ["</details>", ""]
    else:
        out += ["No tie problems found.", ""]
    if graph:
        out += [f"{h}# Tie graph", "", "```mermaid", mermaid(report).rstrip("\n"), "```", ""]
    if report.skipped:
        out += [f"{h}# Skipped", ""]
        out += [f"- **{s.check}**: {s.reason}" for s in report.skipped]
        out.append("")
    return "\n".join(out)


def render_batch(batch: BatchReport, options: RenderOptions) -> str:
    state = "✅ passed" if batch.exit_code == 0 else "❌ failed"
    n = len(batch.items)
    out = [
        f"## tieaudit: {n} checkpoint{'s' if n != 1 else ''} {state}",
        "",
        f"{_counts_text(batch.counts())} in all (fail-on {batch.fail_on.value}, exit {batch.exit_code}).",
        "",
        "| checkpoint | result | errors | warnings | info | exit |",
        "|---|---|---|---|---|---|",
    ]
    for item in batch.items:
        if isinstance(item, Report):
            c = item.counts()
            result = "✅ passed" if item.exit_code == 0 else "❌ failed"
            out.append(
                f"| `{_cell(item.target.name)}` | {result} | {c['error']} | {c['warning']} | {c['info']} "
                f"| {item.exit_code} |"
            )
        else:
            why = _cell(item.message)
            out.append(f"| `{_cell(item.path)}` | ⚠️ not audited: {why} | - | - | - | {item.exit_code} |")
    out.append("")
    passing = [r for r in batch.reports if not r.findings and not r.skipped]
    for report in batch.reports:
        if report not in passing:  # a checkpoint without findings is its table row: no section, no graph
            out.append(_section(report, "###"))
    if passing:
        out += [
            f"{len(passing)} checkpoint{'s' if len(passing) != 1 else ''} without findings: "
            + ", ".join(f"`{_cell(r.target.name)}`" for r in passing)
            + ".",
            "",
        ]
    return "\n".join(out)
