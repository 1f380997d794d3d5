"""What holding adapter verdicts to peft itself costs (issue 16), on builders.py's tied base and LoRA adapter, warm:

    (a) TIEAUDIT_NO_TABLE=1 tieaudit check ADAPTER --base BASE -f json   peft run to confirm the forecast (what
                                                                        the default costs where the shipped peft
                                                                        table does not cover the adapter)
    (b) tieaudit check ADAPTER --base BASE -f json --no-peft-check  the forecast alone (numpy only)
    (c) tieaudit merge ADAPTER --base BASE --output-dir DIR         the merge, held to peft before the commit
    (d) in-process: the time of peft's answer inside one merge (PeftCheck.ask) and of the check of the written
        weights (PeftCheck.verify)

The table goes to stdout and to the "peft-check" block of benchmarks/README.md.

Usage: .venv/bin/python benchmarks/bench_peft_check.py [--workdir DIR] [--quick] [--no-readme]
"""

from __future__ import annotations

import importlib
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import builders as b
import common as c

BLOCK = "peft-check"
MERGE_MODULES = ("tieaudit.repair.merge", "tieaudit.repair.merging")  # where PeftCheck lives (renamed once)


def in_process_merge(adapter: Path, base: Path, out: Path) -> tuple[float, float, float]:
    """(merge wall, PeftCheck.ask, PeftCheck.verify) seconds, one in-process merge."""
    import tieaudit

    module: Any = next(
        (m for m in map(_module, MERGE_MODULES) if m is not None and hasattr(m, "PeftCheck")),
        None,
    )
    if module is None:
        raise LookupError(f"no PeftCheck in {', '.join(MERGE_MODULES)}")
    spent = {"ask": 0.0, "verify": 0.0}
    ask, verify = module.PeftCheck.ask.__func__, module.PeftCheck.verify

    def timed_ask(cls: Any, *a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return ask(cls, *a, **k)
        finally:
            spent["ask"] += time.perf_counter() - t

    def timed_verify(self: Any, *a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return verify(self, *a, **k)
        finally:
            spent["verify"] += time.perf_counter() - t

    module.PeftCheck.ask, module.PeftCheck.verify = classmethod(timed_ask), timed_verify
    try:
        started = time.perf_counter()
        tieaudit.merge(adapter, base=base, output_dir=out)
        return time.perf_counter() - started, spent["ask"], spent["verify"]
    finally:
        module.PeftCheck.ask, module.PeftCheck.verify = classmethod(ask), verify


def _module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


@dataclass
class Row(c.Runs):
    label: str
    runs: list[c.Run]
    expect_exit: int


def main(argv: Sequence[str] | None = None) -> int:
    args = c.parse_args(__doc__, argv)
    started = time.perf_counter()
    base = b.ensure_base(args.workdir)
    adapter = b.ensure_adapter(args.workdir, base)
    exe, n = c.tieaudit_exe(), args.repeats
    with c.session(args.workdir, "scratch-peft-") as scratch:
        check = [exe, "check", str(adapter), "--base", str(base), "-f", "json"]
        out = scratch / "merged"
        merge = [exe, "merge", str(adapter), "--base", str(base), "--output-dir", str(out)]
        rows = [
            Row(
                "(a) `TIEAUDIT_NO_TABLE=1 check ADAPTER --base BASE -f json` (peft run)",
                c.measure(["env", "TIEAUDIT_NO_TABLE=1", *check], n, scratch, "(a)"),
                1,
            ),
            Row(
                "(b) `check ... --no-peft-check` (forecast alone)",
                c.measure([*check, "--no-peft-check"], n, scratch, "(b)"),
                1,
            ),
            Row(
                "(c) `merge ADAPTER --base BASE --output-dir DIR` (held to peft)",
                c.measure(merge, n, scratch, "(c)", before=lambda: shutil.rmtree(out, ignore_errors=True)),
                0,
            ),
        ]
        shutil.rmtree(out, ignore_errors=True)
        try:
            inside, why = in_process_merge(adapter, base, scratch / "merged-in-process"), ""
        except Exception as exc:  # tieaudit failed in-process: reported; the measured rows above still stand
            inside, why = None, f"{type(exc).__name__}: {exc}"
            c.log(f"[bench] (d) failed: {why}")
    columns = ["command", "wall s, median (min–max)", "peak RSS MiB", "exit"]
    table = c.table(columns, ([r.label, r.wall_cell, f"{r.peak_rss / c.MIB:,.0f}", r.exit] for r in rows), "lrrr")
    facts = f"- the peft check adds {rows[0].wall - rows[1].wall:.2f} s to `check` ((a) − (b), medians of this run)\n"
    if inside is None:
        facts += f"- (d) not measured: {why}"
    else:
        facts += (
            f"- (d) inside one in-process merge of {inside[0]:.2f} s: peft's answer (`PeftCheck.ask`) {inside[1]:.2f} "
            f"s, the check of the written weights (`PeftCheck.verify`) {inside[2]:.2f} s"
        )
    checks = [(all(x.exit == r.expect_exit for x in r.runs), f"{r.label} exits {r.expect_exit}") for r in rows]
    info = c.machine_info()
    print(table, facts, sep="\n\n")
    c.write_raw(args.workdir / "peft-check-results.json", info, n, rows=rows, in_process_merge_ask_verify=inside)
    if not args.no_readme:
        machine = c.machine_block(info, c.protocol(n), time.perf_counter() - started)
        c.write_generated(BLOCK, f"{machine}\n\n{table}\n\n{facts}\n\nChecks:\n\n{c.check_lines(checks)}")
    return c.finish(checks)


if __name__ == "__main__":
    sys.exit(main())
