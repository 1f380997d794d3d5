"""Writing a rendered report: stdout, or a file opened only after the audit."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tieaudit.cli.console import use_color
from tieaudit.cli.options import split_codes
from tieaudit.errors import UsageError, WriteError
from tieaudit.model import RuleDoc
from tieaudit.report import (
    FORMATS,  # the report package imports only the data model: cheap at start-up
    RenderOptions,
    render,
    render_batch,
)

if TYPE_CHECKING:
    from tieaudit.model import BatchReport, Report, RuleDoc
    from tieaudit.report import RenderOptions

GRAPH_FORMATS = ("text", "json", "mermaid", "dot")
COLOR_MODES = ("auto", "always", "never")


def check_choice(value: str, choices: tuple[str, ...], option: str) -> str:
    if value not in choices:
        raise UsageError(f"invalid value for {option}: {value!r} (choose from {', '.join(choices)})")
    return value


def report_format(value: str | None, configured: str | None = None) -> str:
    """`--format`, else TIEAUDIT_FORMAT, else the configuration file's `format`, else text."""
    env = os.environ.get("TIEAUDIT_FORMAT")
    for chosen, source in ((value, "--format"), (env, "TIEAUDIT_FORMAT"), (configured, "format")):
        if chosen:
            return check_choice(chosen, FORMATS, source)
    return "text"


@dataclass(frozen=True)
class Settings:
    """The effective settings of a command: its flags over the environment over the configuration file."""

    format: str
    fail_on: str
    select: list[str] | None
    ignore: list[str] | None


def settings(
    path: Path | str,
    *,
    config: Path | None,
    isolated: bool,
    format: str | None,
    fail_on: str | None,
    select: list[str] | None = None,
    ignore: list[str] | None = None,
) -> Settings:
    """Resolve a command's settings (see tieaudit.config): `--select`/`--ignore` replace the file's lists, and
    the file's `per-path-ignores` matching PATH are added to whichever applies."""
    key = str(path)
    return settings_for(
        [key], config=config, isolated=isolated, format=format, fail_on=fail_on, select=select, ignore=ignore
    )[key]


def settings_for(
    paths: Sequence[str],
    *,
    config: Path | None,
    isolated: bool,
    format: str | None,
    fail_on: str | None,
    select: list[str] | None = None,
    ignore: list[str] | None = None,
) -> dict[str, Settings]:
    """`settings` for each of several paths, reading the configuration once (only `per-path-ignores` differ)."""
    from tieaudit.config import load_config  # lazy: start-up (--help, rules, explain) does not need it

    cfg = load_config(config, isolated=isolated)
    chosen_select = split_codes(select) or (list(cfg.select) if cfg.select is not None else None)
    base_ignore = split_codes(ignore) or list(cfg.ignore)
    chosen_format = report_format(format, cfg.format)
    chosen_fail_on = fail_on or cfg.fail_on or "warning"
    result = {}
    for path in paths:
        chosen_ignore = base_ignore + list(cfg.ignores_for(path))
        result[path] = Settings(
            format=chosen_format, fail_on=chosen_fail_on, select=chosen_select, ignore=chosen_ignore or None
        )
    return result


def emit_report(
    report: Report, fmt: str, output: Path | None, color: str, quiet: bool, verbose: bool, timings: bool = False
) -> None:
    """Render `report` in `fmt` and write it to stdout or `output` (colour only for text on a terminal)."""

    emit(render(report, fmt, _options(fmt, output, color, quiet, verbose, timings)), output)


def emit_batch(
    batch: BatchReport, fmt: str, output: Path | None, color: str, quiet: bool, verbose: bool, timings: bool = False
) -> None:
    """`emit_report` for the one document covering every target of a batch."""

    emit(render_batch(batch, fmt, _options(fmt, output, color, quiet, verbose, timings)), output)


def _options(fmt: str, output: Path | None, color: str, quiet: bool, verbose: bool, timings: bool) -> RenderOptions:

    return RenderOptions(
        color=fmt == "text" and use_color(color, sys.stdout if output is None else None),
        width=terminal_width() if fmt == "text" and output is None else None,
        verbosity=-1 if quiet else (1 if verbose else 0),
        rules=rule_docs() if fmt == "sarif" else (),
        timings=timings,
    )


def terminal_width() -> int | None:
    """The terminal's width when stdout is one (findings are wrapped at words to it); None for files and pipes."""

    if not sys.stdout.isatty():
        return None
    return shutil.get_terminal_size().columns


def rule_docs() -> tuple[RuleDoc, ...]:
    """Every registered rule's documentation, for the formats that publish it (SARIF)."""
    from tieaudit.rules.registry import all_rules  # lazy: start-up (--help, rules, explain) does not need it

    return tuple(RuleDoc(r.code, r.name, r.severity, r.summary, r.explain) for r in all_rules())


def emit(document: str, output: Path | None) -> None:
    if output is None:
        sys.stdout.write(document)
        sys.stdout.flush()
        return
    tmp = output.with_name(f".{output.name}.tieaudit-tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(document)
        os.replace(tmp, output)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise WriteError(f"cannot write the report to {output}: {exc.strerror or exc}") from None
