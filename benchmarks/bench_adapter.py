"""Benchmark `tieaudit check ADAPTER --base BASE` against the merge a user would otherwise run.

On builders.py's tied Llama-3.2-1B-shaped base (`tied-clean`) and its real peft LoRA (`adapter-lora-qv-embed`),
each as a measured subprocess (wall time, peak RSS of the child):

    (i)   tieaudit check ADAPTER --base BASE -f json            cold, warm, and warm with one core busy
    (ii)  python -c REFERENCE_SCRIPT BASE ADAPTER ...           the transformers + peft path: load, attach, logits,
                                                                merge_and_unload, save_pretrained, reload, logits;
                                                                cold, warm, and warm with one core busy
    (iii) tieaudit check ADAPTER --base BASE --deep -f json     warm: the forecast plus tieaudit's own real merge
    (iv)  tieaudit check ADAPTER --base BASE --no-peft-check    the forecast alone (peft not asked): cold, warm, loaded
    (v)   TIEAUDIT_NO_TABLE=1 tieaudit check ADAPTER ...        (i) with peft run instead of the shipped peft table:
                                                                cold, warm (what a shape the table lacks costs)

(i) is confirmed by the shipped peft table (the report's evidence.peft.by is "recorded"; checked).

What is measured and the targets: benchmarks/README.md, "Adapter check". The tables go to stdout and to the
"adapter" block of the README; raw runs to WORKDIR/adapter-results.json. With --profile (or when the warm speed
target is missed) (i) is also profiled in-process.

Usage: .venv/bin/python benchmarks/bench_adapter.py [--workdir DIR] [--quick] [--no-readme] [--profile]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import builders as b
import common as c

BLOCK = "adapter"
PROBE_SEED = 0  # the reference's input ids: the same generator and seed as tieaudit --deep's probes
PROBE_TOKENS = 32
VERDICT_REL = 1e-3  # the merge "changes the outputs" when max |Δ logits| > 1e-3 x max |logits|
WARM_SPEEDUP = 15.0  # (ii) warm / (i) warm
COLD_SPEEDUP = 8.0  # (ii) cold / (i) cold
LOAD_FACTOR = 1.5  # (i) with one core busy / (i) quiet
MATCH_FACTOR = 1.5  # --deep's measured logit diff "matches" (ii) within this factor (it runs float32, (ii) bf16)
STATES = {"cold": "cold", "warm": "warm", "load": "warm, 1 core busy"}

# What a user runs to find out whether merging the adapter keeps its outputs: the documented peft flow, in the
# checkpoint's own dtype. Prints one JSON line: the logit difference, the verdict, phase timings.
REFERENCE_SCRIPT = """\
import json, sys, tempfile, time
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, scratch = sys.argv[1], sys.argv[2], sys.argv[3]
seed, tokens, rel = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
phases = {}
t = time.perf_counter()
def phase(name):
    global t
    now = time.perf_counter()
    phases[name] = round(now - t, 3)
    t = now
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)  # config.json: dtype bfloat16
phase("load base")
peft_model = PeftModel.from_pretrained(model, adapter)
peft_model.eval()
phase("attach adapter")
vocab = model.get_input_embeddings().weight.shape[0]
ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(seed))
with torch.no_grad():
    before = peft_model(input_ids=ids).logits.float()
phase("logits (adapter)")
merged = peft_model.merge_and_unload()
phase("merge_and_unload")
with tempfile.TemporaryDirectory(dir=scratch, prefix="reference-merged-") as tmp:
    merged.save_pretrained(tmp)
    phase("save_pretrained")
    tied = json.load(open(tmp + "/config.json")).get("tie_word_embeddings")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16)
    phase("from_pretrained (merged)")
    with torch.no_grad():
        after = reloaded(input_ids=ids).logits.float()
    phase("logits (merged)")
diff = float((before - after).abs().max())
scale = float(before.abs().max())
top1 = float((before.argmax(-1) == after.argmax(-1)).float().mean())
print(json.dumps({"max_abs_logit_diff": diff, "logit_scale": scale, "changes": diff > rel * scale,
                  "top1_agreement": top1, "config_tied_after_merge": tied, "phases": phases}))
"""

# `tieaudit.audit(adapter, base=base)` in-process under cProfile, with Checkpoint.read_float32 and read_rows wrapped
# to count the tensor bytes really read from each file (compared with the report's stats). Prints one JSON line.
DIAG_SCRIPT = """\
import collections, cProfile, json, pstats, sys, time
from pathlib import Path
import tieaudit
adapter, base, top = sys.argv[1], sys.argv[2], int(sys.argv[3])
reads, calls = collections.Counter(), collections.Counter()
try:
    from tieaudit.checkpoint.layout import Checkpoint
    def counted(original):
        def counting(self, name, start, stop, *more, **named):
            key = Path(str(self.root)).name + ": " + name
            reads[key] += (stop - start) * self.row_bytes(name)
            calls[key] += 1
            return original(self, name, start, stop, *more, **named)
        return counting
    Checkpoint.read_float32 = counted(Checkpoint.read_float32)  # numpy rows (the low-rank forecast)
    Checkpoint.read_rows = counted(Checkpoint.read_rows)  # torch rows (streamed comparisons)
except (ImportError, AttributeError):
    reads = None
profile = cProfile.Profile()
start = time.perf_counter()
profile.enable()
report = tieaudit.audit(adapter, base=base)
profile.disable()
wall = time.perf_counter() - start
rows = []
for (file, line, func), (_, ncalls, tottime, cumtime, _) in pstats.Stats(profile).stats.items():
    where = file.split("/tieaudit/", 1)[1] if "/tieaudit/" in file else Path(file).name
    own = "/tieaudit/" in file and "/site-packages/" not in file
    rows.append({"where": f"{where}:{line}({func})", "own": own, "ncalls": ncalls, "tottime": tottime,
                 "cumtime": cumtime})
by_cum = sorted((r for r in rows if r["own"]), key=lambda r: -r["cumtime"])[:top]
by_tot = sorted(rows, key=lambda r: -r["tottime"])[:top]
print(json.dumps({"wall": wall, "stats_tensor_bytes": report.stats.tensor_bytes_read,
                  "reads": None if reads is None else [[k, v, calls[k]] for k, v in reads.most_common()],
                  "by_cumtime": by_cum, "by_tottime": by_tot}))
"""
DIAG_TOP = 12
SCRIPTS = {REFERENCE_SCRIPT: "REFERENCE_SCRIPT"}


@dataclass
class Result(c.Runs):
    """One measured command in one state, and what it concluded."""

    key: str  # "i", "ii", "iii", "iv", "v"
    state: str  # "cold", "warm", "load"
    label: str
    argv: list[str]
    runs: list[c.Run]
    changes: bool | None = None  # the verdict: merging changes the outputs
    logit_diff: float | None = None  # measured max |Δ logits| after merge -> save -> reload (ii, iii)
    logit_scale: float | None = None
    top1: float | None = None
    codes: list[str] = field(default_factory=list)
    tensor_bytes: int | None = None
    forecast: list[dict[str, Any]] = field(default_factory=list)  # comparisons of stage merge-reload
    phases: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    peft_by: list[str] = field(default_factory=list)  # how peft confirmed the findings (evidence.peft.by)

    @property
    def verdict(self) -> str:
        if self.changes is None:
            return "no verdict"
        if self.key == "ii":
            return "merge changes outputs" if self.changes else "merge keeps outputs"
        return ", ".join(self.codes) or "clean"


def measure(argv: list[str], state: str, repeats: int, scratch: Path, label: str, files: list[Path]) -> list[c.Run]:
    """cold: `files` evicted and an empty tie-map cache before each run; warm: after a warm-up run; load: the warm
    runs again with the CPU burner on, without a warm-up (the quiet warm row just before left everything warm)."""
    if state == "cold":
        return c.measure(argv, repeats, scratch, f"{label} (cold)", cold=files)
    with c.cpu_burner() if state == "load" else nullcontext():
        return c.measure(argv, repeats, scratch, f"{label} ({STATES[state]})", warmup=state == "warm")


def bench_tieaudit(
    key: str,
    state: str,
    adapter: Path,
    base: Path,
    repeats: int,
    scratch: Path,
    deep: bool = False,
    peft_check: bool = True,
    peft_run: bool = False,
) -> Result:
    flags = (["--deep"] if deep else []) + ([] if peft_check else ["--no-peft-check"])
    prefix = ["env", "TIEAUDIT_NO_TABLE=1"] if peft_run else []
    argv = [*prefix, c.tieaudit_exe(), "check", str(adapter), "--base", str(base), *flags, "-f", "json"]
    label = f"`{'TIEAUDIT_NO_TABLE=1 ' if peft_run else ''}tieaudit check ADAPTER --base BASE "
    label += f"{' '.join([*flags, '-f', 'json'])}`"
    runs = measure(argv, state, repeats, scratch, f"({key}) tieaudit check", [base, adapter])
    res = Result(key, state, label, argv, runs)
    reports = [c.last_json(r.stdout) for r in runs]
    for run, report in zip(runs, reports, strict=True):
        if report is None:
            res.problems.append(f"exit {run.exit}, no JSON report: {run.stderr.strip()[-300:]}")
    good = [r for r in reports if r is not None]
    if not good:
        return res
    report = good[-1]
    res.codes = sorted({f["code"] for f in report["findings"]})
    res.peft_by = sorted({str(((f.get("evidence") or {}).get("peft") or {}).get("by")) for f in report["findings"]})
    res.changes = "TIE102" in res.codes
    res.tensor_bytes = report["stats"]["tensor_bytes_read"]
    if any(r["stats"]["tensor_bytes_read"] != res.tensor_bytes for r in good):
        res.problems.append("tensor_bytes_read differs between runs")
    if any(sorted({f["code"] for f in r["findings"]}) != res.codes for r in good):
        res.problems.append("findings differ between runs")
    res.forecast = [x for x in report["comparisons"] if x["stage"] == "merge-reload"]
    measured = [x for x in report["comparisons"] if x["stage"] == "measured-merge-reload"]
    if measured:
        res.logit_diff, res.top1 = measured[-1]["max_abs_logit_diff"], measured[-1]["top1_agreement"]
        for f in report["findings"]:
            meas = f.get("evidence", {}).get("measured")
            if isinstance(meas, dict) and meas.get("logit_scale") is not None:
                res.logit_scale = meas["logit_scale"]
    elif deep:
        res.problems.append("--deep report has no measured-merge-reload comparison")
    return res


def bench_reference(state: str, adapter: Path, base: Path, repeats: int, scratch: Path) -> Result:
    argv = [sys.executable, "-c", REFERENCE_SCRIPT, str(base), str(adapter), str(scratch)]
    argv += [str(PROBE_SEED), str(PROBE_TOKENS), str(VERDICT_REL)]
    label = "transformers + peft: load, `PeftModel`, logits, `merge_and_unload`, save, reload, logits (bf16)"
    runs = measure(argv, state, repeats, scratch, "(ii) reference", [base, adapter])
    res = Result("ii", state, label, argv, runs)
    for run in runs:
        if run.exit != 0:
            res.problems.append(f"exit {run.exit}: {run.stderr.strip()[-300:]}")
    good = [o for o in (c.last_json(r.stdout) for r in runs if r.exit == 0) if o is not None]
    if not good:
        return res
    out = good[-1]
    res.changes = bool(out["changes"])
    res.logit_diff, res.logit_scale = float(out["max_abs_logit_diff"]), float(out["logit_scale"])
    res.top1 = float(out["top1_agreement"])
    res.phases = {k: statistics.median(float(o["phases"][k]) for o in good) for k in out["phases"]}
    if any(o["max_abs_logit_diff"] != out["max_abs_logit_diff"] for o in good):
        res.problems.append("logit difference differs between runs")
    return res


def diagnose(adapter: Path, base: Path) -> dict[str, Any] | None:
    """Profile (i) in-process and count the tensor bytes it really reads (DIAG_SCRIPT); None on failure."""
    c.log("[profile] tieaudit.audit(adapter, base=base) under cProfile")
    proc = subprocess.run(
        [sys.executable, "-c", DIAG_SCRIPT, str(adapter), str(base), str(DIAG_TOP)],
        capture_output=True,
        text=True,
        env={**os.environ, **c.CHILD_ENV},
        check=False,
        timeout=c.SUBPROCESS_TIMEOUT,
    )
    data = c.last_json(proc.stdout) if proc.returncode == 0 else None
    if data is None:
        c.log(f"[profile] failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return data


def diagnosis_text(diag: dict[str, Any]) -> str:
    """Markdown: bytes really read per file versus the report's stats, and the top costs."""
    out = [f"(i) profiled in-process (`cProfile`): {diag['wall']:.1f} s under the profiler."]
    reads = diag.get("reads")
    if reads is not None:
        total = sum(n for _, n, _ in reads)
        out.append(
            f"Tensor bytes really read (`Checkpoint.read_float32` and `read_rows`): {c.fmt_bytes(total)}; the "
            f"report's `stats.tensor_bytes_read`: {c.fmt_bytes(diag['stats_tensor_bytes'])}."
        )
        out.append(
            c.table(["checkpoint: tensor", "bytes read", "reads"], ([k, c.fmt_bytes(n), m] for k, n, m in reads), "lrr")
        )
    by_cum = (
        [f"`{r['where']}`", r["ncalls"], f"{r['cumtime']:.2f}", f"{r['tottime']:.2f}"] for r in diag["by_cumtime"]
    )
    out.append("Top tieaudit functions by cumulative time:")
    out.append(c.table(["function", "calls", "cumulative s", "own s"], by_cum, "lrrr"))
    by_own = ([f"`{r['where']}`", r["ncalls"], f"{r['tottime']:.2f}"] for r in diag["by_tottime"])
    out.append("Top functions by own time (all code):")
    out.append(c.table(["function", "calls", "own s"], by_own, "lrr"))
    return "\n\n".join(out)


def find(results: Sequence[Result], key: str, state: str) -> Result:
    return next(r for r in results if r.key == key and r.state == state)


def target_checks(results: Sequence[Result]) -> list[c.Check]:
    fast, ref = find(results, "i", "warm"), find(results, "ii", "warm")
    same = fast.changes is not None and fast.changes == ref.changes
    checks: list[c.Check] = [
        (
            same,
            f"(i) has the same verdict as (ii): TIE102 {'present' if fast.changes else 'absent'} in (i), (ii) says "
            f"the merge {'changes' if ref.changes else 'keeps'} the outputs (max |Δ logits| "
            f"{c.fmt(ref.logit_diff, '.4g')} vs {VERDICT_REL:g} × max |logits| {c.fmt(ref.logit_scale, '.4g')})",
        ),
    ]
    # the speed targets, for the default check (i) and for the forecast alone (iv: `--no-peft-check`)
    for key in ("i", "iv"):
        checks += speed_checks(results, key)
    checks.append(
        (
            all(r.peft_by == ["recorded"] for r in results if r.key == "i"),
            "(i) was confirmed by the shipped peft table (evidence.peft.by: "
            + ", ".join(sorted({b for r in results if r.key == "i" for b in r.peft_by}))
            + ")",
        )
    )
    worst = max((r for r in results if r.key == "i"), key=lambda r: r.peak_rss)
    rss = f"{worst.peak_rss / c.MIB:,.0f} MiB ({worst.state})"
    checks.append((worst.peak_rss < c.RSS_TARGET, f"(i) peak RSS under {c.RSS_TARGET / c.GIB:.1f} GiB: worst {rss}"))
    checks += [(False, f"({r.key}, {r.state}) ran cleanly: " + "; ".join(r.problems)) for r in results if r.problems]
    return checks


def speed_checks(results: Sequence[Result], key: str) -> list[c.Check]:
    """(ii) / ``key`` warm and cold, and ``key`` with 1 core busy against quiet."""
    ref, ref_cold = find(results, "ii", "warm"), find(results, "ii", "cold")
    warm, cold, loaded = (find(results, key, state) for state in ("warm", "cold", "load"))
    return [
        c.ratio_check(
            ref.wall >= WARM_SPEEDUP * warm.wall, f"warm: (ii) / ({key})", ref.wall, warm.wall, f"≥ {WARM_SPEEDUP:g}×"
        ),
        c.ratio_check(
            ref_cold.wall >= COLD_SPEEDUP * cold.wall,
            f"cold: (ii) / ({key})",
            ref_cold.wall,
            cold.wall,
            f"≥ {COLD_SPEEDUP:g}×",
        ),
        c.ratio_check(
            loaded.wall <= LOAD_FACTOR * warm.wall,
            f"({key}) warm with 1 core busy / quiet",
            loaded.wall,
            warm.wall,
            f"≤ {LOAD_FACTOR:g}×",
        ),
    ]


def informational(results: Sequence[Result]) -> list[c.Check]:
    """Reported with PASS/FAIL but not targets: --deep against the reference, the reference under load."""
    deep, ref = find(results, "iii", "warm"), find(results, "ii", "warm")
    if deep.logit_diff is None or ref.logit_diff is None:
        ok, text = False, "no measured logit difference to compare"
    else:
        ratio = deep.logit_diff / ref.logit_diff if ref.logit_diff else float("inf")
        ok = deep.changes == ref.changes and 1 / MATCH_FACTOR <= ratio <= MATCH_FACTOR
        text = (
            f"max |Δ logits| {deep.logit_diff:.4g} vs {ref.logit_diff:.4g} (ratio {ratio:.2f}, tolerance "
            f"×{MATCH_FACTOR}; --deep runs float32 on 2 × 16 tokens, the reference bf16 on 1 × 32)"
        )
    loaded = find(results, "ii", "load")
    run_warm, run_cold = find(results, "v", "warm"), find(results, "v", "cold")
    return [
        (ok, f"(iii) measured merge -> reload matches (ii): {text}"),
        (
            run_warm.codes == find(results, "i", "warm").codes and run_warm.peft_by == ["run"],
            f"(v) peft run gives (i)'s findings ({', '.join(run_warm.codes)}); warm {run_warm.wall:.2f} s, cold "
            f"{run_cold.wall:.2f} s against the reference's {ref.wall:.2f} s warm",
        ),
        c.ratio_check(
            loaded.wall <= LOAD_FACTOR * ref.wall,
            "(ii) warm with 1 core busy / quiet",
            loaded.wall,
            ref.wall,
            f"none; (i) has ≤ {LOAD_FACTOR:g}×",
        ),
    ]


def results_table(results: Sequence[Result]) -> str:
    def cells(r: Result) -> list[object]:
        measured = "—" if r.logit_diff is None else f"{r.logit_diff:.4g}"
        if r.logit_diff is not None and r.logit_scale is not None:
            measured += f" (max |logits| {r.logit_scale:.3g})"
        verdict = r.verdict + ("" if not r.problems else " ✗")
        rss, tensors = f"{r.peak_rss / c.MIB:,.0f}", c.fmt_bytes(r.tensor_bytes)
        return [f"({r.key})", r.label, STATES[r.state], r.wall_cell, rss, r.exit, tensors, verdict, measured]

    columns = ["", "command", "state", "wall s (min–max)", "peak RSS MiB", "exit", "tensor bytes read (report)"]
    return c.table([*columns, "verdict", "merge max |Δ logits| (measured)"], map(cells, results), "lllrrrrlr")


def forecast_table(fast: Result) -> str:
    def cells(x: dict[str, Any]) -> list[object]:
        numbers = [c.fmt(x[k], ".4g") for k in ("max_abs_diff", "rel_diff", "max_abs_logit_diff")]
        return [f"`{x['tensor']}`", *numbers, c.fmt(x["top1_agreement"], ".0%")]

    columns = ["tensor", "forecast max |Δ weight|", "relative", "probe max |Δ logits|", "probe top-1 agreement"]
    return c.table(columns, map(cells, fast.forecast), "lrrrr")


def report(
    results: Sequence[Result],
    info: dict[str, str],
    contents: dict[str, Any],
    repeats: int,
    elapsed: float,
    diag: dict[str, Any] | None,
) -> str:
    fast, ref = find(results, "i", "warm"), find(results, "ii", "warm")
    others = ", ".join(f"`{k}`" for k in contents["other"]) or "none"
    notes = [
        f"adapter: {contents['tensors']} tensors ({contents['lora_factors']} LoRA factors; also {others}), "
        f"{contents['bytes'] / c.MIB:,.0f} MiB",
        *[n for n in (c.cold_note(results),) if n],
    ]
    protocol = c.protocol(repeats, cold=True) + "; 1 core busy: the warm rows again, without warm-up"
    commands = dict.fromkeys(f"- ({r.key}) `{c.shell(r.argv, SCRIPTS)}`" for r in results)
    parts = [
        c.machine_block(info, protocol, elapsed) + "".join(f"\n- {n}" for n in notes),
        results_table(results),
        "Reference phases (warm, median): " + (", ".join(f"{k} {v:.1f} s" for k, v in ref.phases.items()) or "—"),
        "TIE102 forecast by (i) (warm):\n\n" + forecast_table(fast),
        "Targets:\n\n" + c.check_lines(target_checks(results)),
        "Also checked (not targets):\n\n" + c.check_lines(informational(results)),
        "Command lines:\n\n" + "\n".join(commands),
    ]
    if diag:
        parts.append("#### Where (i) spends its time\n\n" + diagnosis_text(diag))
    return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    args = c.parse_args(__doc__, argv, profile="profile (i) in-process even when it meets the speed target")
    started = time.perf_counter()
    base = b.ensure_base(args.workdir)
    adapter = b.ensure_adapter(args.workdir, base)
    contents = b.adapter_contents(adapter)
    n = args.repeats
    with c.session(args.workdir, "scratch-adapter-") as scratch:
        results = [
            bench_tieaudit("i", "cold", adapter, base, n, scratch),
            bench_tieaudit("i", "warm", adapter, base, n, scratch),
            bench_tieaudit("i", "load", adapter, base, n, scratch),
            bench_reference("cold", adapter, base, n, scratch),
            bench_reference("warm", adapter, base, n, scratch),
            bench_reference("load", adapter, base, n, scratch),
            bench_tieaudit("iii", "warm", adapter, base, n, scratch, deep=True),
            bench_tieaudit("iv", "cold", adapter, base, n, scratch, peft_check=False),
            bench_tieaudit("iv", "warm", adapter, base, n, scratch, peft_check=False),
            bench_tieaudit("iv", "load", adapter, base, n, scratch, peft_check=False),
            bench_tieaudit("v", "cold", adapter, base, n, scratch, peft_run=True),
            bench_tieaudit("v", "warm", adapter, base, n, scratch, peft_run=True),
        ]
        print(results_table(results), forecast_table(find(results, "i", "warm")), sep="\n\n")
        print(c.cold_note(results) or "")
        fast, ref = find(results, "i", "warm"), find(results, "ii", "warm")
        diag = diagnose(adapter, base) if args.profile or ref.wall < WARM_SPEEDUP * fast.wall else None
    info = c.machine_info()
    if diag is not None:
        print("\n" + diagnosis_text(diag))
    path = args.workdir / "adapter-results.json"
    c.write_raw(path, info, args.repeats, adapter=contents, results=results, profile=diag)
    if not args.no_readme:
        c.write_generated(BLOCK, report(results, info, contents, args.repeats, time.perf_counter() - started, diag))
    return c.finish(target_checks(results), informational(results))


if __name__ == "__main__":
    sys.exit(main())
