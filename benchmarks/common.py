"""What every benchmark script shares: options, the measured subprocess, cold/warm/loaded runs, the machine
block, markdown tables, target checks, raw JSON and the generated blocks of benchmarks/README.md.

Scripts import this module (and builders.py for the generated checkpoints), never each other.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
README = BENCH_DIR / "README.md"
DEFAULT_WORKDIR = BENCH_DIR / "work"
MIB = 2**20
GIB = 2**30
RSS_TARGET = int(1.5 * GIB)  # peak RSS of `tieaudit check` stays under 1.5 GiB
SUBPROCESS_TIMEOUT = 900  # seconds, per measured command
CACHE_ENV = "TIEAUDIT_CACHE_DIR"
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"}
BURNER = "while True: pass"

# Runs one command and records its wall time and peak RSS. A fresh wrapper per measurement keeps
# RUSAGE_CHILDREN (a maximum over every child ever waited for) scoped to exactly one child.
WRAPPER = """\
import json, resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.call(sys.argv[2:])
wall = time.perf_counter() - start
peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
with open(sys.argv[1], "w") as fh:
    json.dump({"exit": code, "wall": wall, "peak_kib": peak_kib}, fh)
"""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(doc: str | None, argv: Sequence[str] | None, **flags: str) -> argparse.Namespace:
    """--workdir (resolved and created), --quick, --no-readme, plus one store_true option per `flags` entry
    (name -> help); `repeats` is 1 with --quick, else 3."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="where the checkpoints are generated")
    parser.add_argument("--quick", action="store_true", help="1 measured run per command instead of 3")
    parser.add_argument("--no-readme", action="store_true", help="print the results without updating README.md")
    for name, text in flags.items():
        parser.add_argument(f"--{name}", action="store_true", help=text)
    args = parser.parse_args(argv)
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.repeats = 1 if args.quick else 3
    return args


def tieaudit_exe() -> str:
    candidate = Path(sys.executable).parent / "tieaudit"
    found = str(candidate) if candidate.exists() else shutil.which("tieaudit")
    if found is None:
        raise SystemExit("tieaudit is not installed in this environment (pip install -e .)")
    return found


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One measured execution of a command."""

    wall: float  # seconds, child only (the wrapper's own start-up is excluded)
    peak_rss: int  # bytes
    exit: int
    stdout: str = field(repr=False)
    stderr: str = field(repr=False)
    resident: int | None = None  # cold runs: bytes of the evicted files still in the page cache at the start


class Runs:
    """Median wall time and peak RSS over `self.runs`, for the rows of every script."""

    runs: list[Run]

    @property
    def wall(self) -> float:
        return statistics.median(r.wall for r in self.runs)

    @property
    def peak_rss(self) -> int:
        return int(statistics.median(r.peak_rss for r in self.runs))

    @property
    def exit(self) -> int:
        return self.runs[-1].exit

    @property
    def wall_cell(self) -> str:
        """ "median (min–max)", or the one value."""
        walls = [r.wall for r in self.runs]
        spread = f" ({min(walls):.2f}–{max(walls):.2f})" if len(walls) > 1 else ""
        return f"{self.wall:.2f}{spread}"


@contextmanager
def session(workdir: Path, prefix: str) -> Iterator[Path]:
    """A scratch directory under `workdir` for one benchmark run, removed afterwards, with a fresh tie-map cache in
    it that every child inherits (the warm runs' cache: their warm-up run fills it)."""
    saved = {k: os.environ.get(k) for k in (CACHE_ENV, "TIEAUDIT_NO_CACHE")}
    with tempfile.TemporaryDirectory(dir=workdir, prefix=prefix) as tmp:
        os.environ[CACHE_ENV] = str(Path(tmp) / "tiemap-cache")
        os.environ.pop("TIEAUDIT_NO_CACHE", None)
        try:
            yield Path(tmp)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def run_measured(argv: Sequence[str], scratch: Path, env: Mapping[str, str] | None = None) -> Run:
    """Run `argv` through the rusage wrapper: wall time, peak RSS, exit code and output of the child."""
    result = scratch / "rusage.json"
    result.unlink(missing_ok=True)
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, str(result), *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **CHILD_ENV, **(env or {})},
        check=False,
        timeout=SUBPROCESS_TIMEOUT,
    )
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"measurement wrapper failed ({proc.returncode}) for {argv}: {proc.stderr[-2000:]}")
    data = json.loads(result.read_text())
    return Run(data["wall"], data["peak_kib"] * 1024, data["exit"], proc.stdout, proc.stderr)


def files_under(paths: Iterable[Path]) -> list[Path]:
    """Every regular file in `paths` (directories walked), each once."""
    out: dict[Path, None] = {}
    for path in paths:
        for p in [path] if path.is_file() else sorted(path.rglob("*")):
            if p.is_file():
                out[p.resolve()] = None
    return list(out)


def evict(paths: Iterable[Path]) -> list[Path]:
    """Drop the page-cache pages of every file in `paths` (POSIX_FADV_DONTNEED: no root needed; dirty or mapped
    pages stay, `resident` tells). Returns the files."""
    files = files_under(paths)
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return files


def resident(files: Sequence[Path]) -> int | None:
    """Bytes of `files` in the page cache (util-linux `fincore`), None when it cannot tell."""
    if not files or shutil.which("fincore") is None:
        return None
    proc = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *map(str, files)],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        return sum(int(x) for x in proc.stdout.split()) if proc.returncode == 0 else None
    except ValueError:
        return None


@contextmanager
def cpu_burner() -> Iterator[None]:
    """One process spinning `while True: pass` for the duration (one of the cores busy)."""
    proc = subprocess.Popen([sys.executable, "-c", BURNER])
    time.sleep(0.3)  # let it start spinning
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def measure(
    argv: Sequence[str],
    repeats: int,
    scratch: Path,
    label: str,
    *,
    warmup: bool = True,
    cold: Sequence[Path] | None = None,
    slow: float | None = None,
    before: Callable[[], object] | None = None,
) -> list[Run]:
    """`repeats` measured runs of `argv`.

    warm (`cold` None): one warm-up run first (discarded; it fills the tie-map cache of the session and the page
    cache), unless `warmup` is False because an earlier row just did. cold (`cold` = the checkpoint directories
    involved): before each run the pages of every file under them are evicted and the child gets a new, empty
    `TIEAUDIT_CACHE_DIR`; no warm-up. `slow`: stop after 2 runs when the first took longer than that. `before` runs
    before every run (the warm-up's too), e.g. to remove an output directory."""
    if cold is None and warmup:
        if before is not None:
            before()
        run_measured(argv, scratch)
    runs: list[Run] = []
    while len(runs) < repeats and not (slow is not None and len(runs) == 2 and runs[0].wall > slow):
        env = None
        left = None
        if before is not None:
            before()
        if cold is not None:
            env = {CACHE_ENV: tempfile.mkdtemp(dir=scratch, prefix="cold-cache-")}
            left = resident(evict(cold))
        run = dataclasses.replace(run_measured(argv, scratch, env), resident=left)
        runs.append(run)
        log(
            f"[bench] {label}: run {len(runs)}/{repeats}: {run.wall:.2f} s, "
            f"{run.peak_rss / MIB:,.0f} MiB, exit {run.exit}"
        )
    return runs


def cold_note(rows: Iterable[Any]) -> str | None:
    """One line on how cold the cold runs were: what the eviction left in the page cache (None: no cold runs)."""
    left = [r.resident for row in rows for r in row.runs if r.resident is not None]
    if not left:
        return None
    most = max(left)
    shown = f"{most:,} bytes" if most < MIB else f"{most / MIB:,.1f} MiB"
    return f"cold runs: at most {shown} of the evicted checkpoint files were still in the page cache at the start"


def last_json(stdout: str) -> dict[str, Any] | None:
    """The JSON object printed on `stdout` (the whole output, else its last line), or None."""
    for text in (stdout, (stdout.strip().splitlines() or [""])[-1]):
        try:
            data = json.loads(text)
        except ValueError:
            continue
        return data if isinstance(data, dict) else None
    return None


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    def first(path: str, key: str) -> str:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return "unknown"

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    mem_kib = first("/proc/meminfo", "MemTotal").split()[0]
    git = ["git", "-C", str(REPO)]
    try:
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        status = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
        readme = str(README.relative_to(REPO))
        dirty = [line for line in status.stdout.splitlines() if line[3:] != readme]  # our own output does not count
        sha = commit.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    damon = any(s.read_text().strip() == "on" for s in Path("/sys/kernel/mm/damon/admin/kdamonds").glob("*/state"))
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "damon": "on" if damon else "off",
        "cpu": first("/proc/cpuinfo", "model name"),
        "nproc": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()),
        "ram": f"{int(mem_kib) / 2**20:.1f} GiB" if mem_kib.isdigit() else "unknown",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        **{dist: version(dist) for dist in ("torch", "transformers", "peft", "safetensors", "tieaudit")},
        "commit": sha,
        "loadavg": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def machine_block(info: Mapping[str, str], protocol: str, elapsed: float) -> str:
    """The bullet list that opens every generated block: date, machine, versions, how the runs were made."""
    damon = (
        "\n- page cache: DAMON proactive reclaim (kdamond) is on, so cold file pages are evicted between runs "
        "and a warm run can still read part of its files from disk"
        if info["damon"] == "on"
        else ""
    )
    return (
        f"- date: {info['date']}\n"
        f"- CPU: {info['cpu']}, {info['nproc']} cores available, no GPU\n"
        f"- RAM: {info['ram']}; OS: {info['os']}\n"
        f"- python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, peft {info['peft']}, "
        f"safetensors {info['safetensors']}, tieaudit {info['tieaudit']} (commit {info['commit']})\n"
        f"- {protocol}; whole benchmark {elapsed / 60:.1f} min\n"
        f"- load average at the end (1, 5, 15 min): {info['loadavg']}{damon}"
    )


def protocol(repeats: int, cold: bool = False) -> str:
    runs = f"median of {repeats} measured runs" if repeats > 1 else "1 measured run (--quick)"
    text = f"warm: 1 warm-up run + {runs} per command"
    return text + (f"; cold: {runs}, no warm-up" if cold else "")


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n:,}" if n < MIB else f"{n:,} ({n / MIB:,.0f} MiB)"


def fmt(x: float | None, spec: str = ".3g") -> str:
    return "—" if x is None else format(x, spec)


def table(columns: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> str:
    """A markdown table; `align` has one letter a column, "l" or "r" (default "l"); "|" in cells is escaped."""

    def cells(values: Sequence[object]) -> str:
        return "| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |"

    rule = "|" + "|".join("--:" if a == "r" else "---" for a in align.ljust(len(columns), "l")) + "|"
    return "\n".join([cells(columns), rule, *(cells(r) for r in rows)])


Check = tuple[bool, str]


def check_lines(checks: Iterable[Check]) -> str:
    return "\n".join(f"- {'PASS' if ok else 'FAIL'}: {text}" for ok, text in checks)


def ratio_check(ok_if: bool, what: str, num: float, den: float, target: str) -> Check:
    """ "`what`: 1.23 s vs 4.56 s, 3.7× (target `target`)"."""
    ratio = num / den if den > 0 else float("inf")
    return ok_if, f"{what}: {num:.2f} s vs {den:.2f} s, {ratio:.1f}× (target {target})"


def shell(argv: Sequence[str], scripts: Mapping[str, str] | None = None) -> str:
    """A readable command line: inline scripts by name (`scripts`: text -> name), paths relative to the repository,
    a scratch directory shown as SCRATCH."""
    parts = []
    for arg in argv:
        if scripts and arg in scripts:
            parts.append(f'"<{scripts[arg]}>"')
            continue
        path = Path(arg)
        if path.is_absolute() and path.is_relative_to(REPO):
            arg = str(path.relative_to(REPO))
        parts.append(re.sub(r"[^ ]*/scratch-[^/ ]*", "SCRATCH", arg) if "/scratch-" in arg else arg)
    return " ".join(parts)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Run):
        data = dataclasses.asdict(obj)
        data["stdout"], data["stderr"] = obj.stdout[-4000:], obj.stderr[-4000:]
        return data
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_raw(path: Path, info: Mapping[str, str], repeats: int, **data: Any) -> None:
    """Raw per-run numbers (rows are dataclasses; stdout/stderr cut to their last 4000 characters)."""
    path.write_text(json.dumps({"machine": info, "repeats": repeats, **data}, indent=2, default=_jsonable))
    log(f"[report] raw runs in {path}")


def begin_marker(name: str) -> str:
    return f"<!-- BEGIN GENERATED {name}: written by the script; edit the script, not this block -->"


def end_marker(name: str) -> str:
    return f"<!-- END GENERATED {name} -->"


def write_generated(name: str, body: str) -> None:
    """Replace the block between the `name` markers of benchmarks/README.md (appended under "## name" when the
    README has no such block)."""
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    block = f"{begin_marker(name)}\n\n{body.strip()}\n\n{end_marker(name)}"
    pattern = re.compile(rf"<!-- BEGIN GENERATED {re.escape(name)}:.*?{re.escape(end_marker(name))}", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + f"\n\n## {name}\n\n{block}\n"
        log(f"[report] README.md had no {name!r} block: appended one")
    README.write_text(text)
    log(f"[report] wrote the {name!r} block of {README.relative_to(REPO)}")


def finish(checks: Sequence[Check], informational: Sequence[Check] = ()) -> int:
    """Print the target checks (and the informational ones); the exit code: 1 when a target failed."""
    for ok, text in checks:
        print(f"{'PASS' if ok else 'FAIL'}: {text}")
    for ok, text in informational:
        print(f"{'PASS' if ok else 'FAIL'} (not a target): {text}")
    return 0 if all(ok for ok, _ in checks) else 1
