"""`tieaudit merge ADAPTER --output-dir DIR`: merge a LoRA adapter so the merged model computes what it did."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tieaudit.cli import options as o
from tieaudit.cli.console import err, guarded, progress_reporter
from tieaudit.cli.output import COLOR_MODES, check_choice, emit_report, settings

MergeOutputOpt = Annotated[
    Path, typer.Option("--output-dir", help="Write the merged model to DIR (absent or empty).", show_default=False)
]


@guarded
def merge(
    path: o.PathArg,
    output_dir: MergeOutputOpt,
    base: o.BaseOpt = None,
    revision: o.RevisionOpt = None,
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
    peft_max_memory: o.PeftMemoryOpt = None,
    config: o.ConfigOpt = None,
    isolated: o.IsolatedOpt = False,
) -> None:
    """Merge the LoRA adapter at PATH into its base, exactly, also on tied embeddings; re-audit the result.

    A tied pair stays tied when the adapter keeps it equal, and is untied (weights and config) when it does not.
    Exit codes: 0 the merged model is clean, 1 it has findings at or above --fail-on, 2 bad input or a failed
    write (nothing is written), 3 nothing to merge at PATH.
    """
    from tieaudit.report.text import (  # lazy: start-up (--help, rules, explain) does not need it
        merge_summary_line,
        summary_line,
    )

    chosen = settings(path, config=config, isolated=isolated, format=format, fail_on=fail_on)
    fmt = chosen.format
    check_choice(color, COLOR_MODES, "--color")
    from tieaudit.repair.merge import merge as run_merge  # lazy: start-up (--help, rules, explain) does not need it

    with progress_reporter(progress, fmt != "text") as callback:
        report = run_merge(
            path,
            revision=revision,
            output_dir=output_dir,
            base=base,
            fail_on=chosen.fail_on,
            exit_zero=exit_zero,
            probe_tokens=probe_tokens,
            progress=callback,
            peft_max_memory=peft_max_memory,
        )
    emit_report(report, fmt, output, color, quiet, verbose, timings)
    if not quiet:
        err(merge_summary_line(report))
        err(summary_line(report))
    raise typer.Exit(report.exit_code)
