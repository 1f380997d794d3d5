"""`tieaudit check PATH`: audit one checkpoint and print the report."""

from __future__ import annotations

from tieaudit.cli import options as o
from tieaudit.cli.console import err, guarded, progress_reporter
from tieaudit.cli.output import COLOR_MODES, check_choice, emit_report, report_format


@guarded
def check(
    path: o.PathArg,
    base: o.BaseOpt = None,
    format: o.FormatOpt = "text",
    output: o.OutputOpt = None,
    fail_on: o.FailOnOpt = "warning",
    exit_zero: o.ExitZeroOpt = False,
    select: o.SelectOpt = None,
    ignore: o.IgnoreOpt = None,
    probe_tokens: o.ProbeOpt = 64,
    deep: o.DeepOpt = False,
    quiet: o.QuietOpt = False,
    verbose: o.VerboseOpt = False,
    progress: o.ProgressOpt = None,
    color: o.ColorOpt = "auto",
) -> None:
    """Audit a checkpoint's weight tying; exit 1 when findings reach --fail-on."""
    import typer

    from tieaudit.auditing import audit
    from tieaudit.report.text import summary_line

    fmt = report_format(format)
    check_choice(color, COLOR_MODES, "--color")
    with progress_reporter(progress) as callback:
        report = audit(
            path,
            base,
            select=o.split_codes(select),
            ignore=o.split_codes(ignore),
            fail_on=fail_on,
            exit_zero=exit_zero,
            probe_tokens=probe_tokens,
            progress=callback,
            deep=deep,
        )
    emit_report(report, fmt, output, color, quiet, verbose)
    if not quiet:
        err(summary_line(report))
    raise typer.Exit(report.exit_code)
