"""`tieaudit fix PATH --untie|--retie`: repair a checkpoint's weight tying, atomically."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from tieaudit.cli import options as o
from tieaudit.cli.console import err, guarded, progress_reporter
from tieaudit.cli.output import COLOR_MODES, check_choice, emit_report, settings
from tieaudit.errors import UsageError

UntieOpt = Annotated[bool, typer.Option("--untie", help="Untie broken pairs: store both tensors, flag false.")]
RetieOpt = Annotated[bool, typer.Option("--retie", help="Tie pairs: one stored tensor, flag true.")]
OutputDirOpt = Annotated[
    Path | None, typer.Option("--output-dir", help="Write a complete fixed copy to DIR (absent or empty).")
]
InPlaceOpt = Annotated[bool, typer.Option("--in-place", help="Fix PATH itself (needs -y when stdin is not a TTY).")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before fixing in place.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Write nothing; exit 1 if anything would change.")]
DiffOpt = Annotated[
    bool, typer.Option("--diff", help="Like --dry-run, and print a diff of the JSON files and the tensor changes.")
]
UnsafeOpt = Annotated[
    bool, typer.Option("--unsafe-fixes", help="Allow fixes that discard stored values (retie of differing tensors).")
]
SourceOpt = Annotated[
    list[str] | None,
    typer.Option("--source", help="With --retie --unsafe-fixes: the tensor whose values the tied pair keeps."),
]


@guarded
def fix(
    path: o.PathArg,
    revision: o.RevisionOpt = None,
    untie: UntieOpt = False,
    retie: RetieOpt = False,
    output_dir: OutputDirOpt = None,
    in_place: InPlaceOpt = False,
    yes: YesOpt = False,
    dry_run: DryRunOpt = False,
    diff: DiffOpt = False,
    unsafe_fixes: UnsafeOpt = False,
    source: SourceOpt = None,
    format: o.FormatOpt = None,
    output: o.OutputOpt = None,
    fail_on: o.FailOnOpt = None,
    exit_zero: o.ExitZeroOpt = False,
    probe_tokens: o.ProbeOpt = 64,
    quiet: o.QuietOpt = False,
    verbose: o.VerboseOpt = False,
    progress: o.ProgressOpt = None,
    color: o.ColorOpt = "auto",
    timings: o.TimingsOpt = False,
    config: o.ConfigOpt = None,
    isolated: o.IsolatedOpt = False,
) -> None:
    """Repair weight tying so the checkpoint loads as intended; re-audit the result.

    Exit codes: 0 nothing left at or above --fail-on, 1 findings remain (with --dry-run/--diff: something
    would change), 2 bad input or a failed write (the original is intact), 3 nothing to fix at PATH.
    """
    from tieaudit.report.text import (  # lazy: start-up (--help, rules, explain) does not need it
        fix_summary_line,
        summary_line,
    )

    chosen = settings(path, config=config, isolated=isolated, format=format, fail_on=fail_on)
    fmt = chosen.format
    check_choice(color, COLOR_MODES, "--color")
    if untie == retie:
        raise UsageError("choose one strategy: --untie or --retie")
    if output_dir is not None and in_place:
        raise UsageError("--output-dir and --in-place exclude each other")
    preview = dry_run or diff
    if not preview and output_dir is None and not in_place:
        raise UsageError("choose where to write: --output-dir DIR or --in-place (or preview with --dry-run/--diff)")
    if source and not unsafe_fixes:
        raise UsageError("--source chooses which tensor wins an unsafe retie: it needs --unsafe-fixes")
    if in_place and not preview and not yes:
        if not sys.stdin.isatty():
            raise UsageError("--in-place rewrites PATH: pass -y/--yes to confirm (stdin is not a terminal)")
        if not typer.confirm(f"Fix {path} in place?", default=False, err=True):
            err("tieaudit: nothing changed")
            raise typer.Exit(1)
    from tieaudit.repair.fix import fix as run_fix  # lazy: start-up (--help, rules, explain) does not need it

    with progress_reporter(progress, fmt != "text") as callback:
        report = run_fix(
            path,
            revision=revision,
            mode="untie" if untie else "retie",
            output_dir=output_dir,
            in_place=in_place,
            dry_run=preview,
            diffs=diff,
            unsafe_fixes=unsafe_fixes,
            sources=o.split_codes(source) or (),
            fail_on=chosen.fail_on,
            exit_zero=exit_zero,
            probe_tokens=probe_tokens,
            progress=callback,
        )
    emit_report(report, fmt, output, color, quiet, verbose, timings)
    if not quiet:
        err(fix_summary_line(report))
        if not preview and report.fix_run and report.fix_run.written_to:
            err(summary_line(report))
    raise typer.Exit(report.exit_code)
