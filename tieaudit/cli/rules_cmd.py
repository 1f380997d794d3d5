"""`tieaudit rules` and `tieaudit explain CODE`: the rule registry, without importing torch."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from tieaudit.cli import options as o
from tieaudit.cli.console import guarded
from tieaudit.cli.output import check_choice
from tieaudit.errors import UsageError


@guarded
def rules(format: o.RulesFormatOpt = "text") -> None:
    """List every rule: code, name, default severity and when it fires."""
    from tieaudit.rules import all_rules  # lazy: start-up (--help, rules, explain) does not need it

    fmt = check_choice(format, ("text", "json"), "--format")
    items = all_rules()
    if fmt == "json":
        doc = [
            {"code": r.code, "name": r.name, "severity": r.severity.value, "family": r.family, "summary": r.summary}
            for r in items
        ]
        typer.echo(json.dumps(doc, indent=2))
        return
    width = max(len(r.name) for r in items)
    for r in items:
        typer.echo(f"{r.code}  {r.name:<{width}}  {r.severity.value:<7}  {r.summary}")


@guarded
def explain(code: Annotated[str, typer.Argument(help="Rule code or name, e.g. TIE002.")]) -> None:
    """Explain one rule: what it means, why it matters, how to fix it."""
    from tieaudit.rules import get_rule  # lazy: start-up (--help, rules, explain) does not need it

    r = get_rule(code)
    if r is None:
        raise UsageError(f"unknown rule {code!r}: see `tieaudit rules`")
    typer.echo(f"{r.code} {r.name} (default severity: {r.severity.value})\n")
    typer.echo(f"When: {r.summary}.\n")
    typer.echo(r.explain)
