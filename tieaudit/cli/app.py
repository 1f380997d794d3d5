"""The typer application and `main()`, which maps every failure to the documented exit codes."""

from __future__ import annotations

import os
import sys
import traceback
from typing import Annotated

import typer

from tieaudit._version import __version__
from tieaudit.cli.check import check
from tieaudit.cli.fix_cmd import fix
from tieaudit.cli.graph_cmd import graph
from tieaudit.cli.merge_cmd import merge
from tieaudit.cli.rules_cmd import explain, rules

app = typer.Typer(
    name="tieaudit",
    help="Find, explain and repair broken weight tying in Hugging Face checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tieaudit {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = None,
) -> None:
    """Find, explain and repair broken weight tying in Hugging Face checkpoints.

    Exit codes: 0 clean, 1 findings at or above --fail-on, 2 could not audit, 3 nothing auditable.
    """


app.command("check")(check)
app.command("fix")(fix)
app.command("merge")(merge)
app.command("graph")(graph)
app.command("rules")(rules)
app.command("explain")(explain)


def _fast_path(argv: list[str]) -> bool:
    """`rules`, `rules -f text|json` and `explain CODE` run without typer's argument coercion, which imports
    pydantic (~0.1 s of a 0.3 s start-up budget). Same functions, same output; any other form goes to typer."""
    if argv == ["rules"] or (len(argv) == 3 and argv[0] == "rules" and argv[1] in ("-f", "--format")):
        rules(argv[2] if len(argv) == 3 else "text")
        return True
    if len(argv) == 2 and argv[0] == "explain" and not argv[1].startswith("-"):
        explain(argv[1])
        return True
    return False


def main() -> None:
    """Console entry point: the commands map their own errors; this is the last line of defence."""
    try:
        if _fast_path(sys.argv[1:]):
            sys.exit(0)
        app()
    except typer.Exit as done:  # raised by a command run on the fast path
        sys.exit(done.exit_code)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        sys.stderr.write("tieaudit: interrupted\n")
        sys.exit(130)
    except BaseException as exc:
        if os.environ.get("TIEAUDIT_DEBUG"):
            traceback.print_exc()
        sys.stderr.write(f"tieaudit: internal error: {type(exc).__name__}: {exc}\n")
        sys.exit(2)
