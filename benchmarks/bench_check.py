"""Benchmark `tieaudit check` against the transformers load a user would otherwise run.

On the four Llama-3.2-1B-shaped checkpoints of builders.py (generated once under the work directory), each as a
measured subprocess (wall time, peak RSS of the child): `tieaudit check DIR -f json` and
`AutoModelForCausalLM.from_pretrained(DIR)`, warm on every variant and also cold on tied-clean; and the start-up
commands (`--version`, `--help`, `rules`, `explain TIE001`). What is measured and the targets: benchmarks/README.md,
"Check". The tables go to stdout and to the "check" block of the README; raw runs to WORKDIR/results.json.

Usage: .venv/bin/python benchmarks/bench_check.py [--workdir DIR] [--quick] [--no-readme]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import builders as b
import common as c

BLOCK = "check"
STARTUP_TARGET = 0.3  # seconds: --version, --help, rules, explain
COLD_TARGET = 1.0  # seconds: `tieaudit check` on tied-clean, cold
COLD_SHARE = 0.25  # ... and at most this share of from_pretrained's cold wall time
STARTUP = (["--version"], ["--help"], ["rules"], ["explain", "TIE001"])


@dataclass
class Row(c.Runs):
    variant: str
    command: str
    state: str  # "cold" or "warm"
    argv: list[str]
    runs: list[c.Run]
    verdict: str = ""
    problems: list[str] = field(default_factory=list)
    tensor_bytes: int | None = None
    header_bytes: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def measure(argv: list[str], repeats: int, scratch: Path, label: str, cold: Path | None) -> list[c.Run]:
    state = "warm" if cold is None else "cold"
    return c.measure(argv, repeats, scratch, f"{label} ({state})", cold=None if cold is None else [cold])


def startup_rows(repeats: int, scratch: Path) -> list[Row]:
    rows = []
    for args in STARTUP:
        argv = [c.tieaudit_exe(), *args]
        runs = c.measure(argv, repeats, scratch, f"tieaudit {' '.join(args)}")
        row = Row("(start-up)", f"`tieaudit {' '.join(args)}`", "warm", argv, runs)
        first_line = (runs[-1].stdout.strip().splitlines() or ["(no output)"])[0]
        row.verdict = {"--help": "usage", "rules": "rule table", "explain": "TIE001 explained"}.get(args[0], first_line)
        if {r.exit for r in runs} != {0}:
            row.problems.append(f"exit {sorted({r.exit for r in runs})}, expected 0")
        rows.append(row)
    return rows


def audit_row(v: b.Variant, directory: Path, repeats: int, scratch: Path, cold: bool) -> Row:
    argv = [c.tieaudit_exe(), "check", str(directory), "-f", "json"]
    runs = measure(argv, repeats, scratch, f"{v.name} tieaudit", directory if cold else None)
    row = Row(v.name, "`tieaudit check DIR -f json`", "cold" if cold else "warm", argv, runs)
    reports = [c.last_json(r.stdout) for r in runs]
    for run, report in zip(runs, reports, strict=True):
        if report is None:
            row.problems.append(f"exit {run.exit}, no JSON report: {run.stderr.strip()[-300:]}")
    good = [r for r in reports if r is not None]
    if not good:
        row.verdict = "no report"
        return row
    report = good[-1]
    row.tensor_bytes = report["stats"]["tensor_bytes_read"]
    row.header_bytes = report["stats"]["header_bytes_read"]
    if any(r["stats"]["tensor_bytes_read"] != row.tensor_bytes for r in good):
        row.problems.append("tensor_bytes_read differs between runs")
    row.verdict = ", ".join(f"{f['code']} ({f['severity']})" for f in report["findings"]) or "clean"
    codes = sorted({f["code"] for f in report["findings"]})
    if {r.exit for r in runs} != {v.expect_exit}:
        row.problems.append(f"exit {sorted({r.exit for r in runs})}, expected {v.expect_exit}")
    if codes != sorted(v.expect_codes):
        row.problems.append(f"findings {codes or 'none'}, expected {list(v.expect_codes) or 'none'}")
    return row


def load_row(v: b.Variant, directory: Path, repeats: int, scratch: Path, cold: bool) -> Row:
    argv = [sys.executable, "-c", b.LOAD_SCRIPT, str(directory)]
    runs = measure(argv, repeats, scratch, f"{v.name} transformers", directory if cold else None)
    row = Row(v.name, "`AutoModelForCausalLM.from_pretrained(DIR)`", "cold" if cold else "warm", argv, runs)
    row.verdict, row.problems = b.load_verdict(runs[-1], v)
    return row


def find(rows: Sequence[Row], variant: str, state: str, tool: str) -> Row:
    return next(r for r in rows if r.variant == variant and r.state == state and r.command.startswith(tool))


def results_table(rows: Sequence[Row]) -> str:
    def cells(r: Row) -> list[object]:
        verdict = r.verdict + ("" if r.ok else f" ✗ ({'; '.join(r.problems)})")
        rss, tensors, headers = f"{r.peak_rss / c.MIB:,.0f}", c.fmt_bytes(r.tensor_bytes), c.fmt_bytes(r.header_bytes)
        return [r.variant, r.command, r.state, r.wall_cell, rss, tensors, headers, r.exit, verdict]

    columns = ["variant", "command", "state", "wall s (min–max)", "peak RSS MiB", "tensor bytes read"]
    columns += ["header bytes read", "exit", "verdict"]
    return c.table(columns, map(cells, rows), "lllrrrrrl")


def target_checks(rows: Sequence[Row]) -> list[c.Check]:
    checks: list[c.Check] = []
    for r in rows:
        if r.variant == "(start-up)":
            checks.append((r.ok and r.wall < STARTUP_TARGET, f"{r.command} < {STARTUP_TARGET} s: {r.wall:.2f} s"))
    audits = [r for r in rows if r.command.startswith("`tieaudit check")]
    worst = max(audits, key=lambda r: r.peak_rss)
    checks.append(
        (
            worst.peak_rss < c.RSS_TARGET,
            f"peak RSS of `tieaudit check` under {c.RSS_TARGET / c.GIB:.1f} GiB: worst {worst.peak_rss / c.MIB:,.0f} "
            f"MiB ({worst.variant}, {worst.state})",
        )
    )
    by_name = {v.name: v for v in b.VARIANTS}
    for r in audits:
        if by_name[r.variant].header_only:
            read = c.fmt_bytes(r.tensor_bytes)
            checks.append((r.tensor_bytes == 0, f"{r.variant} ({r.state}): header only, tensor bytes read = {read}"))
    for r in rows:
        if r.variant in by_name:
            what = "tieaudit verdict" if r.command.startswith("`tieaudit") else "transformers behaviour"
            detail = "as expected" if r.ok else "; ".join(r.problems)
            checks.append((r.ok, f"{r.variant} ({r.state}): {what} {detail}"))
    cold, load = find(rows, b.BASE, "cold", "`tieaudit"), find(rows, b.BASE, "cold", "`AutoModel")
    what = f"{b.BASE}: `tieaudit check` cold ≤ {COLD_TARGET:.1f} s: {cold.wall:.2f} s"
    checks.append((cold.wall <= COLD_TARGET, what))
    checks.append(
        c.ratio_check(
            cold.wall <= COLD_SHARE * load.wall,
            f"{b.BASE}: `from_pretrained` cold / `tieaudit check` cold",
            load.wall,
            cold.wall,
            f"≥ {1 / COLD_SHARE:.0f}×, i.e. tieaudit ≤ {COLD_SHARE:.0%} of the load",
        )
    )
    return checks


def report(rows: Sequence[Row], info: dict[str, str], repeats: int, elapsed: float) -> str:
    commands = dict.fromkeys(
        f"- `{c.shell(r.argv, {b.LOAD_SCRIPT: 'LOAD_SCRIPT'})}`" for r in rows if r.variant in ("(start-up)", b.BASE)
    )
    notes = [n for n in (c.cold_note(rows),) if n]
    return "\n\n".join(
        [
            c.machine_block(info, c.protocol(repeats, cold=True), elapsed) + "".join(f"\n- {n}" for n in notes),
            results_table(rows),
            "Target checks:\n\n" + c.check_lines(target_checks(rows)),
            f"Command lines (for `{b.BASE}`; the other variants differ only in the directory):\n\n"
            + "\n".join(commands),
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = c.parse_args(__doc__, argv)
    started = time.perf_counter()
    built = b.build_checkpoints(args.workdir)
    c.log(f"[build] {'built ' + ', '.join(built) if built else 'all checkpoints cached'}")
    rows: list[Row] = []
    with c.session(args.workdir, "scratch-") as scratch:
        rows += startup_rows(args.repeats, scratch)
        for v in b.VARIANTS:
            directory = args.workdir / v.name
            states = (True, False) if v.name == b.BASE else (False,)
            rows += [audit_row(v, directory, args.repeats, scratch, cold) for cold in states]
            rows += [load_row(v, directory, args.repeats, scratch, cold) for cold in states]
    info = c.machine_info()
    print(results_table(rows))
    print(c.cold_note(rows) or "")
    c.write_raw(args.workdir / "results.json", info, args.repeats, rows=rows)
    if not args.no_readme:
        c.write_generated(BLOCK, report(rows, info, args.repeats, time.perf_counter() - started))
    return c.finish(target_checks(rows))


if __name__ == "__main__":
    sys.exit(main())
