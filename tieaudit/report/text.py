"""The human report: the tie graph, then findings in a ruff-like layout."""

from __future__ import annotations

import io
import json
import math
from typing import TYPE_CHECKING

from rich._wrap import divide_line
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from tieaudit.model import (
    BatchReport,
    FileChange,
    Finding,
    FixStatus,
    Report,
    Severity,
    TargetError,
    TieGroup,
    TieStatus,
)

if TYPE_CHECKING:
    from tieaudit.report import RenderOptions

_SEVERITY_STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}
_STATUS_STYLE = {
    TieStatus.TIED: "green",
    TieStatus.UNTIED: "blue",
    TieStatus.DIVERGED: "bold red",
    TieStatus.MISSING: "bold red",
}


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.3g}"


def _group_lines(g: TieGroup) -> list[str]:
    flag = g.governing_flag or "observed in the files only"
    if g.governing_flag and g.flag_value is not None:
        flag = f"{g.governing_flag} = {str(g.flag_value).lower()}"
    arrow = ", ".join(escape(t) for t in g.targets)
    status = f"[{_STATUS_STYLE[g.status]}]{g.status.value.upper():<8}[/]"
    lines = [f"  {status} {escape(g.source)} -> {arrow}  [dim]({escape(flag)})[/]"]
    width = max(len(n) for n in g.members)
    for i, name in enumerate(g.members):
        file = g.stored.get(name)
        where = escape(file) if file else "[red](not stored)[/]"
        disk = f" [dim](on disk: {escape(g.disk_names[name])})[/]" if name in g.disk_names else ""
        role = "source" if i == 0 else "target"
        lines.append(f"           {role}  {escape(name):<{width}}  {where}{disk}")
    return lines


def _finding_lines(f: Finding) -> list[str]:
    loc = f.location
    where = loc.file or "-"
    if loc.line:
        where += f":{loc.line}"
    head = (
        f"[bold]{escape(where)}[/]: [{_SEVERITY_STYLE[f.severity]}]{f.code}[/] "
        f"[dim]{f.name}[/] [{_SEVERITY_STYLE[f.severity]}]{f.severity.value}[/]"
    )
    lines = [head, f"  {escape(f.message)}"]
    if loc.tensor:
        lines.append(f"  [dim]tensor:[/] {escape(loc.tensor)}")
    if f.fix is not None:
        how = f.fix.command or f.fix.description or ""
        lines.append(f"  [green]fix ({f.fix.applicability}):[/] {escape(how)}")
        if f.fix.command and f.fix.description:
            lines.append(f"  [dim]{escape(f.fix.description)}[/]")
    return lines


class _HangingConsole(Console):
    """Prints each line wrapped at words to ``wrap_at`` columns, continuation lines indented two more than the first;
    a word longer than a line (a path, a tensor name) is never broken. ``wrap_at`` None: one output line per line
    (files and pipes, where grep and diff want whole findings)."""

    def __init__(self, *args: object, wrap_at: int | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.wrap_at = wrap_at

    def print(self, *objects: object, **kwargs: object) -> None:
        if self.wrap_at is None or len(objects) != 1 or not isinstance(objects[0], str) or kwargs:
            super().print(*objects, **kwargs)  # type: ignore[arg-type]
            return
        text = Text.from_markup(objects[0])
        lead = len(text.plain) - len(text.plain.lstrip(" "))
        body = text[lead:]
        # break at spaces only (fold=False): a word longer than the line stays whole on a line of its own
        offsets = divide_line(body.plain, max(self.wrap_at - lead - 2, 20), fold=False)
        for n, line in enumerate(body.divide(offsets)):
            line.rstrip()
            super().print(Text(" " * (lead if n == 0 else lead + 2)) + line)


def _console(buf: io.StringIO, options: RenderOptions) -> Console:
    return _HangingConsole(
        file=buf,
        force_terminal=options.color,
        no_color=not options.color,
        color_system="standard" if options.color else None,
        width=options.width or 100,
        highlight=False,
        soft_wrap=True,
        wrap_at=options.width,
    )


def _print_graph(console: Console, report: Report) -> None:
    t = report.target
    arch = t.architecture or "unknown architecture"
    console.print(f"[bold]{escape(t.name)}[/]  [dim]{escape(arch)}, {t.kind}, {t.layout}[/]")
    if t.repo is not None:
        console.print(f"  [dim]commit {escape(t.repo.commit)} in the local Hugging Face cache: {escape(t.path)}[/]")
    if report.groups:
        for g in report.groups:
            for line in _group_lines(g):
                console.print(line)
    else:
        console.print("[dim]no tied or tie-able tensors declared or observed[/]")
    console.print()


def render_graph(report: Report, options: RenderOptions) -> str:
    """The tie graph alone (`tieaudit graph`)."""
    buf = io.StringIO()
    console = _console(buf, options)
    _print_graph(console, report)
    for s in report.skipped:
        console.print(f"[yellow]skipped[/] {escape(s.check)}: {escape(s.reason)}")
    return buf.getvalue()


def render(report: Report, options: RenderOptions) -> str:
    buf = io.StringIO()
    console = _console(buf, options)
    if options.verbosity >= 0:
        _print_graph(console, report)
    for f in report.findings:
        for line in _finding_lines(f):
            console.print(line)
        console.print()
    if options.verbosity >= 1 and report.comparisons:
        console.print("[bold]comparisons[/] (float32)")
        for c in report.comparisons:
            if c.stage == "merge-reload" and c.tensor:
                what = f"{escape(c.tensor)} merged and reloaded vs as the adapter uses it"
            elif c.stage == "merged" and c.tensor:
                what = f"{escape(c.tensor)} as written vs as the adapter uses it"
            else:
                what = f"{escape(c.target)} vs {escape(c.source)}"
            console.print(
                f"  {c.stage}: {what}: max|Δ| {_fmt(c.max_abs_diff)}, "
                f"rel {_fmt(c.rel_diff)}, logits max|Δ| {_fmt(c.max_abs_logit_diff)}, top-1 {_fmt(c.top1_agreement)}"
            )
        console.print()
    if options.verbosity >= 0:
        for s in report.skipped:
            console.print(f"[yellow]skipped[/] {escape(s.check)}: {escape(s.reason)}")
        if report.skipped:
            console.print()
    if report.fix_run is not None:
        _print_fix(console, report)
    if report.merge_run is not None and options.verbosity >= 0:
        _print_merge(console, report, options.verbosity)
    if not report.findings and options.verbosity >= 0:
        if report.skipped:
            console.print("[green]No tie problems found[/] in what could be checked (see skipped above).")
        else:
            console.print("[green]No tie problems found.[/]")
    return buf.getvalue()


_OUTCOME_STYLE = {"fixed": "green", "would-fix": "green", "remains": "yellow", "not-fixed": "yellow"}


def _print_fix(console: Console, report: Report) -> None:
    run = report.fix_run
    assert run is not None
    title = f"fix --{run.mode}" + (" (dry run: nothing written)" if run.dry_run else "")
    console.print(f"[bold]{escape(title)}[/]")
    for o in report.fixes:
        style = _OUTCOME_STYLE.get(o.status, "yellow")
        tensor = f" {escape(o.tensor)}" if o.tensor else ""
        console.print(f"  [{style}]{o.status:<9}[/] {o.code}{tensor}: {escape(o.action)}")
    if not report.fixes:
        console.print("  [dim]no findings to fix[/]")
    for note in run.notes:
        console.print(f"  [dim]note:[/] {escape(note)}")
    console.print()
    if run.changes:
        console.print("[bold]changes[/]" + (" (planned)" if run.dry_run or not run.written_to else ""))
        for c in run.changes:
            console.print(f"  {escape(_change_text(c))}")
        console.print()
    for diff in run.diffs:
        console.print(escape(diff.rstrip("\n")))
        console.print()


def _print_merge(console: Console, report: Report, verbosity: int) -> None:
    run = report.merge_run
    assert run is not None
    console.print(f"[bold]merge[/] {escape(run.adapter_path)} onto {escape(run.base_path)}")
    for g in run.groups:
        style = "green" if g.result == "tied" else "blue"
        console.print(f"  [{style}]{g.result:<6}[/] {escape(' / '.join(g.members))}: {escape(g.why)}")
        if g.peft_problem:
            console.print(f"         [dim]peft's merge_and_unload would get this wrong: {escape(g.peft_problem)}[/]")
    console.print(
        f"  LoRA merged into {len(run.merged)} weight{'s' if len(run.merged) != 1 else ''}; "
        f"{len(run.replaced)} replaced by trained copies or token rows"
    )
    measured = [c for c in report.comparisons if c.stage == "merged"]
    if measured:
        worst = max(measured, key=lambda c: c.max_abs_diff or 0.0)
        logits = [c.max_abs_logit_diff for c in measured if c.max_abs_logit_diff is not None]
        console.print(
            f"  measured, as written vs as the unmerged adapter uses it ({len(measured)} weights): "
            f"worst max|Δ| {_fmt(worst.max_abs_diff)} ({escape(worst.tensor or worst.target)})"
            + (f", probe logits max|Δ| {_fmt(max(logits))}" if logits else "")
        )
    checked = [c for c in report.comparisons if c.stage == "peft"]
    if run.verified_by and checked:
        console.print(
            f"  verified against {escape(run.verified_by)}: the {len(checked)} written tied weights reproduce the "
            "adapter as peft runs it, within the stored dtype's rounding"
        )
    for note in run.notes:
        console.print(f"  [dim]note:[/] {escape(note)}")
    console.print()
    if verbosity >= 1 and run.changes:
        console.print("[bold]changes[/] (against the base)")
        for c in run.changes:
            console.print(f"  {escape(_change_text(c))}")
        console.print()


def merge_summary_line(report: Report) -> str:
    """One line for stderr after `tieaudit merge`."""
    run = report.merge_run
    if run is None:
        return summary_line(report)
    return (
        f"tieaudit: merged {run.adapter_path} into {run.written_to} "
        f"({run.bytes_written:,} bytes written, {run.seconds:.1f} s)"
    )


def _change_text(c: FileChange) -> str:
    if c.kind == "set-config":
        old = "absent" if c.old is None else json.dumps(c.old)
        return f"{c.file}: {c.pointer}: {old} -> {json.dumps(c.new)}"
    if c.kind == "drop-tensor" and c.shape is None:
        return f"- {c.tensor}  ({c.detail})"
    if c.kind in ("store-tensor", "drop-tensor"):
        sign = "+" if c.kind == "store-tensor" else "-"
        size = abs(c.nbytes or 0)
        return f"{sign} {c.tensor}  {list(c.shape or ())} {c.dtype}  {size:,} bytes  in {c.file}  ({c.detail})"
    if c.kind in ("new-file", "rewrite-file"):
        verb = "new file" if c.kind == "new-file" else "rewritten"
        return f"{c.file}: {verb}, {c.nbytes or 0:,} bytes of tensors"
    return f"{c.file}: {c.detail}"


def fix_summary_line(report: Report) -> str:
    """One line for stderr after `tieaudit fix`: what was (or would be) fixed."""
    run = report.fix_run
    if run is None:
        return summary_line(report)
    if run.dry_run:
        would = sum(1 for o in report.fixes if o.status is FixStatus.WOULD_FIX)
        state = (
            f"{len(run.changes)} change{'s' if len(run.changes) != 1 else ''} planned"
            if run.changes
            else "nothing to change"
        )
        return (
            f"tieaudit: would fix {would} of {run.total} (--{run.mode}): {state}; "
            f"nothing written (exit {report.exit_code})"
        )
    if run.written_to is None:
        return f"tieaudit: fixed 0 of {run.total} (--{run.mode}): nothing this strategy can change; nothing written"
    return (
        f"tieaudit: fixed {run.fixed} of {run.total} (--{run.mode}), wrote {run.written_to} "
        f"({run.bytes_written:,} bytes written)"
    )


def summary_line(report: Report) -> str:
    """One line for stderr after any format."""
    return (
        f"tieaudit: {report.target.name}: {_counts_line(report.counts())} "
        f"(fail-on {report.fail_on.value}, exit {report.exit_code})"
    )


def _counts_line(c: dict[str, int]) -> str:
    return (
        f"{c['error']} error{'s' if c['error'] != 1 else ''}, "
        f"{c['warning']} warning{'s' if c['warning'] != 1 else ''}, {c['info']} info"
    )


def batch_summary_line(batch: BatchReport) -> str:
    """One line for stderr after a batch: how many targets, how many failed, the combined counts, the exit code."""
    n = len(batch.items)
    failing = sum(1 for r in batch.reports if r.exit_code != 0)
    parts = [f"{n} checkpoint{'s' if n != 1 else ''}"]
    if failing:
        parts.append(f"{failing} with findings at or above {batch.fail_on.value}")
    if batch.errors:
        parts.append(f"{len(batch.errors)} not audited")
    return f"tieaudit: {', '.join(parts)}: {_counts_line(batch.counts())} (exit {batch.exit_code})"


def render_batch(batch: BatchReport, options: RenderOptions) -> str:
    """Each target's report in order (in -q mode each under a line naming it), the targets that could not be
    audited, then a table of all of them."""
    buf = io.StringIO()
    console = _console(buf, options)
    for item in batch.items:
        if isinstance(item, TargetError):
            if options.verbosity < 0:
                continue  # -q: findings only (the error went to stderr as it happened)
            console.print(f"[bold]{escape(item.path)}[/]  [bold red]not audited[/] (exit {item.exit_code})")
            console.print(f"  {escape(item.message)}")
            console.print()
            continue
        if options.verbosity < 0 and item.findings:
            console.print(f"[bold]── {escape(item.target.name)}[/]")
        text = render(item, options)
        buf.write(text)  # the console writes through to buf: nothing buffered to interleave with
        if options.verbosity >= 0 and not text.endswith("\n\n"):
            console.print()
    if options.verbosity >= 0:
        width = max(len(_item_name(i)) for i in batch.items) if batch.items else 0
        n = len(batch.items)
        console.print(f"[bold]{n} checkpoint{'s' if n != 1 else ''}[/]")
        for item in batch.items:
            name = escape(f"{_item_name(item):<{width}}")
            if isinstance(item, TargetError):
                console.print(f"  {name}  [bold red]not audited[/]  exit {item.exit_code}")
            else:
                style = "green" if item.exit_code == 0 else "bold red"
                console.print(f"  {name}  [{style}]{_counts_line(item.counts())}[/]  exit {item.exit_code}")
    return buf.getvalue()


def _item_name(item: Report | TargetError) -> str:
    return item.path if isinstance(item, TargetError) else item.target.name
