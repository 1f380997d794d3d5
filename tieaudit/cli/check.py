"""`tieaudit check PATH...`: audit one checkpoint (or many) and print the report."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from tieaudit.cli import options as o
from tieaudit.cli.console import err, guarded, progress_reporter
from tieaudit.cli.output import COLOR_MODES, check_choice, emit_batch, emit_report, settings_for
from tieaudit.errors import UsageError

if TYPE_CHECKING:
    from collections.abc import Callable

    from tieaudit.model import Report


@guarded
def check(
    paths: o.PathsArg,
    base: o.BaseOpt = None,
    revision: o.RevisionOpt = None,
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
    timings: o.TimingsOpt = False,
    peft_max_memory: o.PeftMemoryOpt = None,
    config: o.ConfigOpt = None,
    isolated: o.IsolatedOpt = False,
    no_cache: o.NoCacheOpt = False,
    no_peft_check: o.NoPeftCheckOpt = False,
    no_base: o.NoBaseOpt = False,
    against: o.AgainstOpt = None,
) -> None:
    """Audit checkpoints' weight tying; exit 1 when findings reach --fail-on.

    Several PATHs, or a trainer's output directory (its checkpoint-* folders, and itself when it holds a model),
    give one report covering all of them; the exit code is the worst (2, then 3, then 1, then 0).
    Settings come from the flags, then TIEAUDIT_FORMAT, then [tool.tieaudit] in the nearest pyproject.toml
    (or tieaudit.toml, or --config FILE; --isolated ignores them).
    """
    import typer

    from tieaudit.auditing import (  # lazy: start-up (--help, rules, explain) does not need it
        audit,
        check_selectors,
        severity,
    )
    from tieaudit.batch import (  # lazy: start-up (--help, rules, explain) does not need it
        collect,
        expand_targets,
        is_batch,
    )
    from tieaudit.report.text import (  # lazy: start-up (--help, rules, explain) does not need it
        batch_summary_line,
        summary_line,
    )

    given = list(paths)
    if revision is not None and len(given) > 1:
        raise UsageError("--revision applies to a single Hub repo id; give one PATH")
    targets = expand_targets(given)
    chosen = settings_for(
        targets, config=config, isolated=isolated, format=format, fail_on=fail_on, select=select, ignore=ignore
    )
    first = chosen[targets[0]]
    for s in chosen.values():
        check_selectors(s.select, s.ignore)  # a bad selector is a usage error before anything is read
    check_choice(color, COLOR_MODES, "--color")
    batch = is_batch(given)

    with progress_reporter(progress, first.format != "text") as callback, _cache_off(no_cache):

        def audit_one(target: str) -> Report:
            s = chosen[target]
            step = _prefixed(callback, target, targets) if batch else callback
            return audit(
                target,
                base,
                select=s.select,
                ignore=s.ignore,
                fail_on=s.fail_on,
                exit_zero=exit_zero,
                probe_tokens=probe_tokens,
                progress=step,
                deep=deep,
                revision=revision,
                peft_check=not no_peft_check,
                peft_max_memory=peft_max_memory,
                require_base=not no_base,
                against=against,
            )

        if not batch:
            report = audit_one(targets[0])
        else:
            result = collect(
                targets,
                audit_one,
                fail_on=severity(first.fail_on),
                on_error=lambda e: err(f"tieaudit: error: {e.path}: {e.message}"),
            )
    # the report is written once the progress display has stopped (while it runs, rich redirects stdout)
    if not batch:
        emit_report(report, first.format, output, color, quiet, verbose, timings)
        if not quiet:
            err(summary_line(report))
        raise typer.Exit(report.exit_code)
    emit_batch(result, first.format, output, color, quiet, verbose, timings)
    if not quiet:
        err(batch_summary_line(result))
    raise typer.Exit(result.exit_code)


def _prefixed(
    callback: Callable[[str, int, int], None] | None, target: str, targets: list[str]
) -> Callable[[str, int, int], None] | None:
    """A progress callback that names the target of a batch it reports on."""
    if callback is None:
        return None
    label = f"[{targets.index(target) + 1}/{len(targets)}] {Path(target).name or target}"

    def step(message: str, done: int, total: int) -> None:
        callback(f"{label}: {message}", done, total)

    return step


def _cache_off(off: bool) -> contextlib.AbstractContextManager[None]:
    """`--no-cache`: the tie-map cache is off for the duration of the command."""
    from tieaudit.ties import cache  # lazy: start-up (--help, rules, explain) does not need it

    return cache.disabled() if off else contextlib.nullcontext()
