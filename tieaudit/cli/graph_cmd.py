"""`tieaudit graph PATH`: the tie graph alone."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

from tieaudit._version import __version__
from tieaudit.cli import options as o
from tieaudit.cli.console import err, guarded, use_color
from tieaudit.cli.output import GRAPH_FORMATS, check_choice, emit
from tieaudit.errors import UsageError
from tieaudit.model import BatchReport, TargetError
from tieaudit.report import RenderOptions

if TYPE_CHECKING:
    from tieaudit.model import Report


@guarded
def graph(
    path: o.PathArg,
    base: o.BaseOpt = None,
    revision: o.RevisionOpt = None,
    format: o.GraphFormatOpt = "text",
    output: o.OutputOpt = None,
    color: o.ColorOpt = "auto",
) -> None:
    """Show which tensors are tied, which flag governs them, where each is stored, and each tie's status."""

    import typer

    from tieaudit.auditing import audit  # lazy: start-up (--help, rules, explain) does not need it
    from tieaudit.batch import collect, expand_targets  # lazy: start-up (--help, rules, explain) does not need it
    from tieaudit.report.graph_formats import dot, mermaid  # lazy: start-up (--help, rules, explain) does not need it
    from tieaudit.report.text import render_graph  # lazy: start-up (--help, rules, explain) does not need it

    fmt = check_choice(format, GRAPH_FORMATS, "--format")
    targets = expand_targets([path])  # a trainer's output directory: its final model and every checkpoint-*
    if len(targets) > 1 and fmt == "mermaid":
        raise UsageError(
            f"--format mermaid draws one checkpoint; {path} holds {len(targets)} ({', '.join(targets[:3])}"
            f"{', ...' if len(targets) > 3 else ''}): give one of them, or use --format text, json or dot"
        )

    def draw(target: str) -> Report:
        return audit(target, base, select=["TIE"], probe_tokens=0, revision=revision)

    errors: tuple[TargetError, ...] = ()
    if len(targets) == 1:
        reports = [draw(targets[0])]
    else:  # the others are still drawn when one cannot be read, as `check` does
        batch = collect(targets, draw, on_error=lambda e: err(f"tieaudit: error: {e.path}: {e.message}"))
        reports, errors = list(batch.reports), batch.errors
        if not reports:
            raise typer.Exit(batch.exit_code)  # every target failed: the worst of their exit codes
    if fmt == "json":
        docs = [_json_doc(r) for r in reports]
        doc = docs[0] if len(docs) == 1 else {"schema_version": 1, "targets": docs}
        emit(json.dumps(doc, indent=2) + "\n", output)
    elif fmt == "mermaid":
        emit(mermaid(reports[0]), output)
    elif fmt == "dot":
        emit("".join(dot(r) for r in reports), output)  # several digraphs in one file: `dot` renders each
    else:
        opts = RenderOptions(color=use_color(color, sys.stdout if output is None else None))
        emit("".join(render_graph(r, opts) for r in reports), output)
    if errors:  # the worst exit code of the targets that could not be drawn (findings do not fail `graph`)
        raise typer.Exit(BatchReport(__version__, errors).exit_code)


def _json_doc(report: Report) -> dict[str, object]:
    from tieaudit.report.json_format import group_dict  # lazy: start-up (--help, rules, explain) does not need it

    return {
        "schema_version": 1,
        "target": {
            "path": report.target.path,
            "repo": None if report.target.repo is None else str(report.target.repo),
            "architecture": report.target.architecture,
            "layout": report.target.layout,
        },
        "graph": {"groups": [group_dict(g) for g in report.groups]},
        "skipped": [{"check": s.check, "reason": s.reason} for s in report.skipped],
    }
