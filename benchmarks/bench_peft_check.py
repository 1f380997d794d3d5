"""What holding adapter verdicts to peft itself costs (issue 16), on the Llama-3.2-1B-shaped tied bf16 base and the
LoRA r=16 adapter of bench_adapter.py (q_proj, v_proj, embed_tokens), in one run:

    (a) tieaudit check ADAPTER --base BASE -f json                  peft confirms the forecast (the default)
    (b) tieaudit check ADAPTER --base BASE -f json --no-peft-check  the forecast alone (numpy only)
    (c) tieaudit merge ADAPTER --base BASE --output-dir DIR         the merge, held to peft before the commit
    (d) in-process: the time of peft's answer inside (c) (PeftCheck.ask: build the tied layers, apply the adapter,
        probe) and of the check of the written weights (PeftCheck.verify)

Each command: 1 warm-up run, then the median (and range) of N runs (3; 1 with --quick), wall time and peak RSS
of the child. The tie-map cache is warm (repeat audits, as in CI after the first). The table replaces the
"## peft check" section of benchmarks/README.md.

Usage: .venv/bin/python benchmarks/bench_peft_check.py [--workdir DIR] [--quick] [--no-readme]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_adapter as ba
import bench_check as bc

SECTION = "## peft check"
MIB = 2**20


def row(label: str, runs: Sequence[bc.Run]) -> str:
    walls = sorted(r.wall for r in runs)
    rss = max(r.peak_rss for r in runs) / MIB
    codes = sorted({r.exit for r in runs})
    return (
        f"| {label} | {statistics.median(walls):.2f} s ({walls[0]:.2f}–{walls[-1]:.2f}) | {rss:.0f} MiB | "
        f"{', '.join(map(str, codes))} |"
    )


def in_process_merge(adapter: Path, base: Path, out: Path) -> tuple[float, float, float]:
    """(merge wall, PeftCheck.ask, PeftCheck.verify) seconds, one in-process merge."""
    import tieaudit.repair.merging as merging

    spent = {"ask": 0.0, "verify": 0.0}
    ask, verify = merging.PeftCheck.ask.__func__, merging.PeftCheck.verify  # type: ignore[attr-defined]

    def timed_ask(cls, *a, **k):
        t = time.perf_counter()
        try:
            return ask(cls, *a, **k)
        finally:
            spent["ask"] += time.perf_counter() - t

    def timed_verify(self, *a, **k):
        t = time.perf_counter()
        try:
            return verify(self, *a, **k)
        finally:
            spent["verify"] += time.perf_counter() - t

    merging.PeftCheck.ask = classmethod(timed_ask)  # type: ignore[method-assign,assignment]
    merging.PeftCheck.verify = timed_verify  # type: ignore[method-assign]
    started = time.perf_counter()
    merging.merge(adapter, base=base, output_dir=out)
    return time.perf_counter() - started, spent["ask"], spent["verify"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=bc.DEFAULT_WORKDIR)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else 3
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base = ba.ensure_base(workdir)
    adapter, _ = ba.ensure_adapter(workdir, base)
    exe = bc.tieaudit_exe()
    lines = []
    with tempfile.TemporaryDirectory(dir=workdir, prefix="scratch-peft-") as tmp:
        scratch = Path(tmp)
        os.environ["TIEAUDIT_CACHE_DIR"] = str(scratch / "tiemap-cache")
        check = [exe, "check", str(adapter), "--base", str(base), "-f", "json"]
        a = bc.measure(check, repeats, scratch, "(a) check")
        b = bc.measure([*check, "--no-peft-check"], repeats, scratch, "(b) check --no-peft-check")
        merges = []
        for i in range(repeats + 1):
            out = scratch / f"merged-{i}"
            run = bc.run_measured([exe, "merge", str(adapter), "--base", str(base), "--output-dir", str(out)], scratch)
            if i:
                merges.append(run)
            bc._log(f"(c) merge run {i}: {run.wall:.2f} s, exit {run.exit}")
            os.system(f"rm -rf {out}")
        wall, ask, verify = in_process_merge(adapter, base, scratch / "merged-inproc")
    lines = [
        "| command | wall, median (range) | peak RSS | exit |",
        "|---|--:|--:|--:|",
        row("(a) `check ADAPTER --base BASE -f json` (peft confirms)", a),
        row("(b) `check ... --no-peft-check` (forecast alone)", b),
        row("(c) `merge ADAPTER --base BASE --output-dir DIR` (held to peft)", merges),
    ]
    cost = statistics.median(r.wall for r in a) - statistics.median(r.wall for r in b)
    lines += [
        "",
        f"- the peft check adds {cost:.2f} s to `check` ((a) − (b), medians of this run);",
        f"- inside one in-process merge of {wall:.2f} s: peft's answer {ask:.2f} s, the check of the written weights "
        f"{verify:.2f} s.",
    ]
    info = ba.machine_info()
    section = "\n".join(
        [SECTION, "", *lines, "", *bc.machine_sentence(info), f"({time.perf_counter() - started:.0f} s in all)", ""]
    )
    print(section)
    if not args.no_readme:
        bc.replace_readme_section(SECTION, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
