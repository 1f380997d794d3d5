"""Markdown for a pull-request comment or `$GITHUB_STEP_SUMMARY`: a headline, a summary table of the findings,
details per finding (evidence and the fix command), and a Mermaid diagram of the tie graph with broken edges
marked."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from tieaudit.model import Report, Severity
from tieaudit.report.graph_formats import mermaid

if TYPE_CHECKING:
    from tieaudit.report import RenderOptions

_ICON = {Severity.ERROR: "🔴", Severity.WARNING: "🟠", Severity.INFO: "🔵"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(report: Report, options: RenderOptions) -> str:
    c = report.counts()
    state = "✅ passed" if report.exit_code == 0 else "❌ failed"
    t = report.target
    out = [
        f"## tieaudit: `{t.path}` {state}",
        "",
        f"{t.architecture or 'unknown architecture'}, {t.kind}, {t.layout}: "
        f"**{c['error']}** error{'s' if c['error'] != 1 else ''}, **{c['warning']}** "
        f"warning{'s' if c['warning'] != 1 else ''}, **{c['info']}** info "
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
    out += ["### Tie graph", "", "```mermaid", mermaid(report).rstrip("\n"), "```", ""]
    if report.skipped:
        out += ["### Skipped", ""]
        out += [f"- **{s.check}**: {s.reason}" for s in report.skipped]
        out.append("")
    return "\n".join(out)
