"""`tieaudit graph PATH`: the tie graph alone."""

from __future__ import annotations

import json

from tieaudit.cli import options as o
from tieaudit.cli.console import guarded, use_color
from tieaudit.cli.output import GRAPH_FORMATS, check_choice, emit


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
    import sys

    from tieaudit.auditing import audit
    from tieaudit.report import RenderOptions
    from tieaudit.report.graph_formats import dot, mermaid
    from tieaudit.report.json_format import group_dict
    from tieaudit.report.text import render_graph

    fmt = check_choice(format, GRAPH_FORMATS, "--format")
    report = audit(path, base, select=["TIE"], probe_tokens=0, revision=revision)
    if fmt == "json":
        doc = {
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
        emit(json.dumps(doc, indent=2) + "\n", output)
    elif fmt == "mermaid":
        emit(mermaid(report), output)
    elif fmt == "dot":
        emit(dot(report), output)
    else:
        opts = RenderOptions(color=use_color(color, sys.stdout if output is None else None))
        emit(render_graph(report, opts), output)
