"""`tieaudit check PATH`: audit one checkpoint and print the report."""

from __future__ import annotations

from tieaudit.cli import options as o
from tieaudit.cli.console import err, guarded, progress_reporter
from tieaudit.cli.output import COLOR_MODES, check_choice, emit_report, settings


@guarded
def check(
    path: o.PathArg,
    base: o.BaseOpt = None,
    format: o.FormatOpt = None,
    output: o.OutputOpt = None,
    fail_on: o.FailOnOpt = None,
    exit_zero: o.ExitZeroOpt = False,
    select: o.SelectOpt = None,
    ignore: o.IgnoreOpt = None,
    probe_tokens: o.ProbeOpt = 64,
    deep: o.DeepOpt = False,
    quiet: o.QuietOpt = False,
    verbose: o.VerboseOpt = False,
    progress: o.ProgressOpt = None,
    color: o.ColorOpt = "auto",
    config: o.ConfigOpt = None,
    isolated: o.IsolatedOpt = False,
) -> None:
    """Audit a checkpoint's weight tying; exit 1 when findings reach --fail-on.

    Settings come from the flags, then TIEAUDIT_FORMAT, then [tool.tieaudit] in the nearest pyproject.toml
    (or tieaudit.toml, or --config FILE; --isolated ignores them).
    """
    import typer

    from tieaudit.auditing import audit
    from tieaudit.report.text import summary_line

    chosen = settings(
        path, config=config, isolated=isolated, format=format, fail_on=fail_on, select=select, ignore=ignore
    )
    check_choice(color, COLOR_MODES, "--color")
    with progress_reporter(progress) as callback:
        report = audit(
            path,
            base,
            select=chosen.select,
            ignore=chosen.ignore,
            fail_on=chosen.fail_on,
            exit_zero=exit_zero,
            probe_tokens=probe_tokens,
            progress=callback,
            deep=deep,
        )
    emit_report(report, chosen.format, output, color, quiet, verbose)
    if not quiet:
        err(summary_line(report))
    raise typer.Exit(report.exit_code)
