"""Benchmark `tieaudit check` at scale: the largest embedding, the largest shard layout, N checkpoints of one run.

Generated once under WORKDIR/scale (cached, rebuilt when this generator changes):

    gemma2-2b     Gemma-2 2B shape, full-size embedding and head, 2 of the 26 decoder layers, random bf16:
                  tied-clean (head not stored) and diverged (head = embedding + noise); tieaudit first audit
                  (--no-cache) and warm, and AutoModelForCausalLM.from_pretrained, in the same run
    llama31-405b  the Llama-3.1-405B shard layout as sparse files (191 shards, real headers, holes for data):
                  untied-clean and head-missing; tieaudit cold (pages evicted, empty tie-map cache) and warm,
                  run with an atexit hook that reports the process's /proc/self/io
    run           run/checkpoint-100 ... run/checkpoint-2000, hard links to builders.py's tied-clean: one process
                  (`tieaudit check RUN`) against a loop of 20 processes, first audit and warm

What is measured and the targets: benchmarks/README.md, "Scale". Tables go to stdout and to the "scale" block of the
README; raw runs to WORKDIR/scale/results.json.

Usage: .venv/bin/python benchmarks/bench_scale.py [--workdir DIR] [--quick] [--no-readme]
"""

from __future__ import annotations

import copy
import json
import math
import os
import shlex
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import builders as b
import common as c

BLOCK = "scale"
GENERATOR_VERSION = 1  # bump when the generated files change, to invalidate the cached ones
WALL_TARGET_405B = 2.0  # seconds, `tieaudit check` on the 405B layout, cold
INDEX = "model.safetensors.index.json"
IO_MARK = "BENCH_IO "
SLOW_RUN = 5.0  # seconds: a command whose first measured run takes longer is measured twice, not 3 times

# Gemma-2 2B (google/gemma-2-2b config.json); only GEMMA_LAYERS of its 26 decoder layers are generated
GEMMA2_2B: dict[str, Any] = {
    "vocab_size": 256000,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
}
GEMMA_LAYERS = 2
GEMMA_VARIANTS: tuple[b.Variant, ...] = (
    b.Variant("tied-clean", True, "absent", 0, (), True, True, False),
    b.Variant("diverged", True, "perturbed", 1, ("TIE001",), False, False, True),
)

# meta-llama/Llama-3.1-405B's config.json values, with the transformers 4 key names its Hub file uses
LLAMA31_405B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 16384,
    "initializer_range": 0.02,
    "intermediate_size": 53248,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 128,
    "num_hidden_layers": 126,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
}
LLAMA_SHARDS = 191
BF16_BYTES = 2

STEPS = tuple(range(100, 2001, 100))  # run/checkpoint-100 ... run/checkpoint-2000

# `tieaudit check ...` with an exit hook that prints the process's own I/O counters (/proc/self/io) to stderr
IO_SCRIPT = f"""\
import atexit, json, sys
def _io():
    with open("/proc/self/io") as fh:
        io = dict(line.split(": ", 1) for line in fh.read().splitlines())
    sys.stderr.write({IO_MARK!r} + json.dumps({{k: int(io[k]) for k in ("rchar", "read_bytes")}}) + "\\n")
atexit.register(_io)
sys.argv[0] = "tieaudit"
from tieaudit.cli.app import main
main()
"""

# what a user runs without batch support: one tieaudit process per checkpoint (exit codes go to stderr)
LOOP_SCRIPT = 'exe=$1; flags=$2; shift 2; for d in "$@"; do "$exe" check "$d" -f json $flags; echo "exit=$?" >&2; done'
SCRIPTS = {
    IO_SCRIPT: "IO_SCRIPT: atexit hook printing /proc/self/io, then tieaudit.cli.app.main()",
    b.LOAD_SCRIPT: "LOAD_SCRIPT: from_pretrained(sys.argv[1])",
}
AUDIT_LABEL = {
    "first": "first (`--no-cache`)",
    "cold": "cold (empty cache, pages evicted)",
    "warm": "warm (cache filled)",
    "": "—",
}
LIMIT_PROBLEMS = ("peak RSS", "wall", "header-only")  # problems reported by their own target checks


@dataclass(frozen=True)
class Expect:
    """What one tieaudit command must produce."""

    exit: int
    codes: tuple[str, ...] = ()  # finding codes of every report
    header_only: bool = True  # no tensor bytes read
    reports: int = 1
    rss_limit: int | None = None
    wall_limit: float | None = None


@dataclass
class Row(c.Runs):
    """A results row; `audit` is "first" (--no-cache), "cold", "warm" or "" (not tieaudit)."""

    variant: str
    command: str
    audit: str
    argv: list[str]
    runs: list[c.Run]
    verdict: str = ""
    problems: list[str] = field(default_factory=list)
    processes: int = 1
    exits: list[int] = field(default_factory=list)
    tensor_bytes: int | None = None
    header_bytes: int | None = None
    rchar: int | None = None
    read_bytes: int | None = None
    report_seconds: list[float | None] = field(default_factory=list)  # the reports' stats.seconds

    @property
    def ok(self) -> bool:
        return not self.problems


# --------------------------------------------------------------------------------------------------
# Generated data (cached)
# --------------------------------------------------------------------------------------------------


def _normal(spec: dict[str, Any]) -> Any:
    return json.loads(json.dumps(spec))


def _complete(directory: Path, spec: dict[str, Any]) -> bool:
    """Whether `directory` holds a finished build of `spec` (every file it recorded, at its recorded size)."""
    try:
        marker = json.loads((directory / b.MARKER).read_text())
        if marker.get("spec") != _normal(spec):
            return False
        return all((directory / name).stat().st_size == size for name, size in marker["files"].items())
    except (OSError, ValueError, KeyError, AttributeError):
        return False


def _mark_complete(directory: Path, spec: dict[str, Any]) -> None:
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file() and p.name != b.MARKER}
    (directory / b.MARKER).write_text(json.dumps({"spec": _normal(spec), "files": files}, indent=2))


def _gemma_spec(v: b.Variant) -> dict[str, Any]:
    return {"generator": GENERATOR_VERSION, "seed": b.SEED, "config": GEMMA2_2B, "layers": GEMMA_LAYERS, "head": v.head}


def build_gemma(root: Path) -> list[str]:
    """The Gemma-2 2B-shaped checkpoints: names and shapes from Gemma2ForCausalLM on the meta device, each tensor
    seeded (N(0, 0.02) bf16 matrices, ones for the norms), saved with safetensors.torch.save_file."""
    todo = [v for v in GEMMA_VARIANTS if not _complete(root / v.name, _gemma_spec(v))]
    if not todo:
        return []
    import torch
    from safetensors.torch import save_file
    from transformers import Gemma2Config, Gemma2ForCausalLM

    bf16 = torch.bfloat16
    config = Gemma2Config(
        **GEMMA2_2B,
        num_hidden_layers=GEMMA_LAYERS,
        tie_word_embeddings=True,
        dtype="bfloat16",
        architectures=["Gemma2ForCausalLM"],
    )
    with torch.device("meta"):
        meta = Gemma2ForCausalLM(config)
    shapes = {name: tuple(t.shape) for name, t in meta.state_dict().items() if name != b.HEAD}
    del meta
    if b.EMBED not in shapes:
        raise RuntimeError(f"{b.EMBED} is not in the Gemma2ForCausalLM state dict; transformers renamed it?")
    base = {name: b.random_tensor(shape, b.SEED + i, bf16) for i, (name, shape) in enumerate(shapes.items())}
    built = []
    for v in todo:
        started = time.perf_counter()
        directory = root / v.name
        b.fresh_dir(directory)
        config.save_pretrained(directory)
        tensors = dict(base)
        if v.head == "perturbed":
            embed = base[b.EMBED]
            tensors[b.HEAD] = embed + b.random_tensor(tuple(embed.shape), b.SEED - 1, bf16, std=b.HEAD_NOISE_STD)
        partial = directory / (b.WEIGHTS + ".partial")
        save_file(tensors, str(partial), metadata={"format": "pt"})
        os.replace(partial, directory / b.WEIGHTS)
        del tensors
        _mark_complete(directory, _gemma_spec(v))
        size = (directory / b.WEIGHTS).stat().st_size
        c.log(f"[build] gemma2-2b/{v.name}: {size / c.MIB:,.0f} MiB in {time.perf_counter() - started:.1f} s")
        built.append(f"gemma2-2b/{v.name}")
    return built


def _llama_spec(variant: str) -> dict[str, Any]:
    return {"generator": GENERATOR_VERSION, "config": LLAMA31_405B, "shards": LLAMA_SHARDS, "variant": variant}


def llama_layout() -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of LlamaForCausalLM(Llama-3.1-405B config), in state-dict order."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_dict(copy.deepcopy(LLAMA31_405B))  # transformers edits the rope_scaling dict in place
    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    return [(name, tuple(t.shape)) for name, t in meta.state_dict().items()]


def pack(sizes: Sequence[int], shards: int) -> list[int]:
    """Shard number (0-based) of each tensor: contiguous groups in order, filled greedily from the last tensor under
    the smallest size limit that gives at most `shards` groups, so the last shard holds lm_head.weight together with
    the final norm and the last layer's tensors (a forward fill would leave lm_head alone in a shard of its own)."""

    def split(limit: int) -> list[int]:
        out, shard, used = [], 0, 0
        for size in reversed(sizes):
            if used and used + size > limit:
                shard, used = shard + 1, 0
            out.append(shard)
            used += size
        return [out[-1] - s for s in reversed(out)]

    lo, hi = max(sizes), sum(sizes)
    while lo < hi:
        mid = (lo + hi) // 2
        if split(mid)[-1] + 1 <= shards:
            hi = mid
        else:
            lo = mid + 1
    result = split(lo)
    if result[-1] + 1 != shards:
        raise RuntimeError(f"cannot pack {len(sizes)} tensors into exactly {shards} shards (got {result[-1] + 1})")
    return result


def safetensors_header(entries: Sequence[tuple[str, tuple[int, ...]]]) -> tuple[bytes, int]:
    """The bytes safetensors writes before the data (8-byte little-endian length, JSON padded with spaces to a
    multiple of 8) for BF16 tensors laid out by name, as safetensors orders them; and the data length."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in sorted(entries):
        nbytes = math.prod(shape) * BF16_BYTES
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offset


def write_sparse_shard(path: Path, entries: Sequence[tuple[str, tuple[int, ...]]]) -> None:
    """A safetensors file whose header is real and whose data region is a hole (reads as zeros, takes no disk)."""
    header, data = safetensors_header(entries)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as fh:
        fh.write(header)
    os.truncate(partial, len(header) + data)
    os.replace(partial, path)


def build_llama405(root: Path) -> list[str]:
    """`untied-clean` (every tensor) and `head-missing` (lm_head.weight in neither its shard nor the index); the
    shards and config.json the two share are hard links."""
    variants = ("untied-clean", "head-missing")
    if all(_complete(root / v, _llama_spec(v)) for v in variants):
        return []
    started = time.perf_counter()
    layout = llama_layout()
    names = [name for name, _ in layout]
    if b.HEAD not in names or b.EMBED not in names:
        raise RuntimeError("LlamaForCausalLM's state dict has no lm_head.weight / model.embed_tokens.weight")
    shard_of = pack([math.prod(shape) * BF16_BYTES for _, shape in layout], LLAMA_SHARDS)
    files = [f"model-{i + 1:05d}-of-{LLAMA_SHARDS:05d}.safetensors" for i in range(LLAMA_SHARDS)]
    head_shard = shard_of[names.index(b.HEAD)]
    if sum(1 for s in shard_of if s == head_shard) < 2:
        raise RuntimeError("lm_head.weight would be alone in its shard: head-missing would leave an empty shard")
    clean, missing = root / variants[0], root / variants[1]
    for variant, directory in ((variants[0], clean), (variants[1], missing)):
        b.fresh_dir(directory)
        kept = [(n, s, k) for (n, s), k in zip(layout, shard_of, strict=True) if directory == clean or n != b.HEAD]
        if directory == clean:
            (directory / b.CONFIG).write_text(json.dumps(LLAMA31_405B, indent=2) + "\n")
        else:
            b.link_or_copy(clean / b.CONFIG, directory / b.CONFIG)
        for k, file in enumerate(files):
            if directory == missing and k != head_shard:
                b.link_or_copy(clean / file, missing / file)
            else:
                write_sparse_shard(directory / file, [(n, s) for n, s, shard in kept if shard == k])
        index = {
            "metadata": {"total_size": sum(math.prod(s) * BF16_BYTES for _, s, _ in kept)},
            "weight_map": {n: files[k] for n, _, k in sorted(kept)},
        }
        (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        _mark_complete(directory, _llama_spec(variant))
    took = time.perf_counter() - started
    c.log(f"[build] llama31-405b: {len(layout)} tensors in {LLAMA_SHARDS} sparse shards, 2 variants, in {took:.1f} s")
    return [f"llama31-405b/{v}" for v in variants]


def build_run(root: Path, source: Path) -> list[str]:
    """run/checkpoint-<step>: config.json and model.safetensors hard-linked to `source` (copied if linking fails)."""
    built = []
    wanted = (b.CONFIG, b.WEIGHTS)
    for step in STEPS:
        directory = root / f"checkpoint-{step}"
        ok = directory.is_dir() and sorted(p.name for p in directory.iterdir()) == sorted(wanted)
        if ok and all(_same_file(directory / n, source / n) for n in wanted):
            continue
        b.fresh_dir(directory)
        for name in wanted:
            b.link_or_copy(source / name, directory / name)
        built.append(f"run/{directory.name}")
    return built


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def disk_usage(path: Path) -> tuple[int, int]:
    """(apparent size: sum of file sizes, real disk usage in bytes from `du`), hard links counted once."""
    seen: set[int] = set()
    apparent = 0
    for p in path.rglob("*"):
        st = p.stat()
        if p.is_file() and st.st_ino not in seen:
            seen.add(st.st_ino)
            apparent += st.st_size
    out = subprocess.run(["du", "-s", "--block-size=1", str(path)], capture_output=True, text=True, check=True)
    return apparent, int(out.stdout.split()[0])


# --------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------


def _documents(text: str) -> list[dict[str, Any]]:
    """Every JSON document on stdout (one for a single process, several for a loop of processes)."""
    decoder = json.JSONDecoder()
    docs: list[dict[str, Any]] = []
    at = 0
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at >= len(text):
            return docs
        doc, at = decoder.raw_decode(text, at)
        docs.append(doc)


def audit_row(
    variant: str,
    command: str,
    argv: list[str],
    audit: str,
    expect: Expect,
    repeats: int,
    scratch: Path,
    *,
    processes: int = 1,
    warmup: bool = False,
    cold: Sequence[Path] | None = None,
) -> Row:
    """Measure a tieaudit command and check every run's reports, exit codes and limits against `expect`. Rows
    without a wall-time target stop after 2 runs when the first took over SLOW_RUN seconds."""
    slow = None if expect.wall_limit is not None else SLOW_RUN
    runs = c.measure(argv, repeats, scratch, f"{variant} {command} ({audit})", warmup=warmup, cold=cold, slow=slow)
    row = Row(variant, command, audit, argv, runs, processes=processes)
    reports: list[dict[str, Any]] = []
    for run in runs:
        try:
            docs = _documents(run.stdout)
        except ValueError:
            row.problems.append(f"exit {run.exit}, unparsable JSON: {run.stderr.strip()[-300:]}")
            continue
        reports = [r for doc in docs for r in doc.get("reports", [doc])]
        errors = [e for doc in docs for e in doc.get("errors", [])]
        exits = [int(x[5:]) for x in run.stderr.splitlines() if x.startswith("exit=")] if processes > 1 else [run.exit]
        row.exits = exits
        if errors:
            row.problems.append(f"{len(errors)} targets not audited: {errors[0]['message']}")
        if len(reports) != expect.reports:
            row.problems.append(f"{len(reports)} reports, expected {expect.reports}")
        if len(exits) != processes or set(exits) != {expect.exit}:
            row.problems.append(f"exit {sorted(set(exits))} ({len(exits)} processes), expected {expect.exit}")
        for report in reports:
            got = sorted({f["code"] for f in report["findings"]})
            if got != sorted(expect.codes):
                row.problems.append(f"findings {got or 'none'}, expected {list(expect.codes) or 'none'}")
                break
        for line in run.stderr.splitlines():
            if line.startswith(IO_MARK):
                io = json.loads(line[len(IO_MARK) :])
                row.rchar, row.read_bytes = io["rchar"], io["read_bytes"]
    if not reports:
        row.verdict = "no report"
        row.problems = sorted(set(row.problems)) or ["no report"]
        return row
    row.tensor_bytes = sum(r["stats"]["tensor_bytes_read"] for r in reports)
    row.header_bytes = sum(r["stats"]["header_bytes_read"] for r in reports)
    row.report_seconds = [r["stats"].get("seconds") for r in reports]
    codes = sorted({f"{f['code']} ({f['severity']})" for r in reports for f in r["findings"]})
    verdict = ", ".join(codes) if codes else "clean"
    row.verdict = f"{len(reports)} reports, {'each ' if codes else 'all '}{verdict}" if len(reports) > 1 else verdict
    if expect.header_only and row.tensor_bytes != 0:
        row.problems.append(f"header-only verdict read {row.tensor_bytes:,} tensor bytes, expected 0")
    if expect.rss_limit is not None and row.peak_rss > expect.rss_limit:
        row.problems.append(f"peak RSS {row.peak_rss / c.MIB:,.0f} MiB > {expect.rss_limit / c.MIB:,.0f} MiB")
    if expect.wall_limit is not None and row.wall > expect.wall_limit:
        row.problems.append(f"wall {row.wall:.2f} s > {expect.wall_limit:.0f} s")
    row.problems = list(dict.fromkeys(row.problems))
    return row


def check_argv(directory: Path) -> list[str]:
    return [c.tieaudit_exe(), "check", str(directory), "-f", "json"]


def _first_and_warm(
    variant: str, command: str, argv: list[str], expect: Expect, repeats: int, scratch: Path
) -> list[Row]:
    """The warm audit first (its warm-up run fills the tie-map cache and the page cache), then the first audit
    (--no-cache; no warm-up of its own); returned first audit first."""
    warm = audit_row(variant, command, argv, "warm", expect, repeats, scratch, warmup=True)
    first = audit_row(variant, command, [*argv, "--no-cache"], "first", expect, repeats, scratch)
    return [first, warm]


def bench_gemma(root: Path, repeats: int, scratch: Path) -> list[Row]:
    rows: list[Row] = []
    for v in GEMMA_VARIANTS:
        directory = root / v.name
        expect = Expect(v.expect_exit, v.expect_codes, v.header_only, rss_limit=c.RSS_TARGET)
        rows += _first_and_warm(v.name, "`tieaudit check DIR -f json`", check_argv(directory), expect, repeats, scratch)
        # the load runs without a warm-up: the tieaudit rows just read the same directory
        argv = [sys.executable, "-c", b.LOAD_SCRIPT, str(directory)]
        runs = c.measure(argv, repeats, scratch, f"{v.name} transformers", warmup=False, slow=SLOW_RUN)
        load = Row(v.name, "`AutoModelForCausalLM.from_pretrained(DIR)`", "", argv, runs)
        load.verdict, load.problems = b.load_verdict(runs[-1], v)
        rows.append(load)
    return rows


def bench_llama405(root: Path, repeats: int, scratch: Path) -> list[Row]:
    """Cold (the wall-time target) and warm, each variant; the process's /proc/self/io through IO_SCRIPT."""
    rows: list[Row] = []
    for name, expect in (
        ("untied-clean", Expect(0, rss_limit=c.RSS_TARGET)),
        ("head-missing", Expect(1, ("TIE002",), rss_limit=c.RSS_TARGET)),
    ):
        directory = root / name
        argv = [sys.executable, "-c", IO_SCRIPT, *check_argv(directory)[1:]]
        command = "`tieaudit check DIR -f json`"
        cold = replace(expect, wall_limit=WALL_TARGET_405B)
        rows.append(audit_row(name, command, argv, "cold", cold, repeats, scratch, cold=[directory]))
        rows.append(audit_row(name, command, argv, "warm", expect, repeats, scratch, warmup=True))
    return rows


def bench_run(root: Path, repeats: int, scratch: Path) -> list[Row]:
    n = len(STEPS)
    variant = f"{n} checkpoints"
    expect = Expect(0, reports=n)
    argv = [*check_argv(root), "--timings"]  # the reports' stats.seconds: where the first audit's time goes
    rows = _first_and_warm(variant, "`tieaudit check RUN -f json --timings`", argv, expect, repeats, scratch)
    checkpoints = [str(root / f"checkpoint-{step}") for step in STEPS]
    loop = {
        a: ["sh", "-c", LOOP_SCRIPT, "sh", c.tieaudit_exe(), flags, *checkpoints]
        for a, flags in (("first", "--no-cache"), ("warm", ""))
    }
    command = f"{n} × `tieaudit check CKPT -f json`"
    # no warm-up: the rows above read the same files and filled the tie-map cache; a first-audit loop pays n
    # transformers imports (minutes), so it runs once
    first = audit_row(variant, command, loop["first"], "first", expect, 1, scratch, processes=n)
    warm = audit_row(variant, command, loop["warm"], "warm", expect, repeats, scratch, processes=n)
    return [*rows, first, warm]


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------


def _exit(row: Row) -> str:
    if row.processes > 1:
        return ", ".join(f"{code} ×{row.exits.count(code)}" for code in sorted(set(row.exits))) or "?"
    return str(row.exit)


def results_table(rows: Sequence[Row], io: bool = False) -> str:
    def cells(r: Row) -> list[object]:
        verdict = r.verdict + ("" if r.ok else " ✗ (" + "; ".join(r.problems) + ")")
        out = [r.variant, r.command, AUDIT_LABEL[r.audit], r.wall_cell, f"{r.peak_rss / c.MIB:,.0f}"]
        out += [c.fmt_bytes(r.tensor_bytes), c.fmt_bytes(r.header_bytes)]
        out += [c.fmt_bytes(r.rchar), c.fmt_bytes(r.read_bytes)] if io else []
        return [*out, _exit(r), verdict]

    columns = ["variant", "command", "audit", "wall s (min–max)", "peak RSS MiB", "tensor bytes read"]
    columns += ["header bytes read", *(["rchar", "read_bytes"] if io else []), "exit", "verdict"]
    return c.table(columns, map(cells, rows), "lllrrrr" + "rr" * io + "rl")


def _find(rows: Sequence[Row], variant: str, audit: str, processes: int = 1) -> Row:
    return next(r for r in rows if r.variant == variant and r.audit == audit and r.processes == processes)


def _verdict_check(what: str, r: Row) -> c.Check:
    problems = [p for p in r.problems if not p.startswith(LIMIT_PROBLEMS)]
    return not problems, f"{what}: {r.verdict}, exit {_exit(r)}" + (f" ({'; '.join(problems)})" if problems else "")


def target_checks(rows: dict[str, list[Row]]) -> list[c.Check]:
    checks: list[c.Check] = []
    rss = f"{c.RSS_TARGET / c.MIB:,.0f} MiB"
    for r in rows["gemma"]:
        if not r.audit:
            detail = "as expected" if r.ok else "; ".join(r.problems)
            checks.append((r.ok, f"Gemma-2 2B {r.variant}: transformers loads it {r.verdict}: {detail}"))
            continue
        what = f"Gemma-2 2B {r.variant}, {r.audit} audit"
        checks.append(_verdict_check(what, r))
        if r.variant == "diverged":
            checks.append((r.peak_rss <= c.RSS_TARGET, f"{what}: peak RSS {r.peak_rss / c.MIB:,.0f} MiB ≤ {rss}"))
        else:
            checks.append(
                (r.tensor_bytes == 0, f"{what}: header only, tensor bytes read = {c.fmt_bytes(r.tensor_bytes)}")
            )
    for r in rows["llama"]:
        what = f"Llama-3.1-405B {r.variant}, {r.audit}"
        if r.audit == "cold":
            checks.append((r.wall <= WALL_TARGET_405B, f"{what}: wall {r.wall:.2f} s ≤ {WALL_TARGET_405B:.0f} s"))
        checks.append((r.peak_rss <= c.RSS_TARGET, f"{what}: peak RSS {r.peak_rss / c.MIB:,.0f} MiB ≤ {rss}"))
        checks.append((r.tensor_bytes == 0, f"{what}: header only, tensor bytes read = {c.fmt_bytes(r.tensor_bytes)}"))
        checks.append(_verdict_check(what, r))
    for r in rows["run"]:
        how = "one process" if r.processes == 1 else f"{r.processes} processes"
        checks.append(_verdict_check(f"{r.variant}, {how}, {r.audit} audit", r))
    return checks


def _command_line(argv: Sequence[str]) -> str:
    shown = [shlex.quote(a) if a in (LOOP_SCRIPT, "") else a for a in argv]
    checkpoints = [i for i, a in enumerate(argv) if Path(a).name.startswith("checkpoint-")]
    if len(checkpoints) > 2:
        shown[checkpoints[1] : checkpoints[-1]] = ["…"]
    return c.shell(shown, SCRIPTS)


def report(
    rows: dict[str, list[Row]], facts: dict[str, Any], info: dict[str, str], repeats: int, elapsed: float
) -> str:
    gemma, llama, run = rows["gemma"], rows["llama"], rows["run"]
    n = len(STEPS)
    batch = {a: _find(run, f"{n} checkpoints", a) for a in ("first", "warm")}
    loop = {a: _find(run, f"{n} checkpoints", a, n) for a in ("first", "warm")}
    protocol = (
        f"{c.protocol(repeats, cold=True)} (2 runs when one takes over {SLOW_RUN:.0f} s, except rows with a wall-time "
        f"target); first audits and the loads reuse the warm row's warm-up; the {n}-process first-audit loop runs once"
    )
    notes = [n for n in (c.cold_note(llama),) if n]
    generated = [
        f"Gemma-2 2B weights files: `tied-clean` {facts['gemma-bytes']['tied-clean'] / c.MIB:,.0f} MiB, `diverged` "
        f"{facts['gemma-bytes']['diverged'] / c.MIB:,.0f} MiB",
        f"405B layout: {facts['tensors']:,} tensors in shards of {facts['shard-min'] / 1e9:.1f}–"
        f"{facts['shard-max'] / 1e9:.1f} GB; apparent size {facts['apparent-clean'] / 1e9:,.1f} GB (`untied-clean`), "
        f"{facts['apparent-missing'] / 1e9:,.1f} GB (`head-missing`), {facts['apparent'] / 1e9:,.1f} GB for the two "
        f"(hard links counted once); on disk (`du`) {facts['du'] / c.MIB:,.1f} MiB",
    ]
    ratios = []
    for v in GEMMA_VARIANTS:
        load = next(r for r in gemma if r.variant == v.name and not r.audit)
        first, warm = _find(gemma, v.name, "first"), _find(gemma, v.name, "warm")
        ratios.append(
            f"- {v.name}: `from_pretrained` {load.wall:.2f} s, {load.peak_rss / c.MIB:,.0f} MiB; tieaudit first audit "
            f"{first.wall:.2f} s ({first.wall / load.wall:.2f}× the load's wall time), warm {warm.wall:.2f} s "
            f"({warm.wall / load.wall:.2f}×)"
        )
    cold = _find(llama, "untied-clean", "cold")
    seconds = [x for x in batch["first"].report_seconds if isinstance(x, (int, float))]
    batch_lines = [
        f"- first audit (`--no-cache`): {n} processes {loop['first'].wall:.1f} s ({loop['first'].wall / n:.2f} s per "
        f"checkpoint) vs one process {batch['first'].wall:.2f} s: **{loop['first'].wall / batch['first'].wall:.1f}×**",
        f"- warm: {n} processes {loop['warm'].wall:.2f} s ({loop['warm'].wall / n:.2f} s per checkpoint) vs one "
        f"process {batch['warm'].wall:.2f} s: **{loop['warm'].wall / batch['warm'].wall:.1f}×**",
        f"- inside the one-process first audit, the reports' own `stats.seconds`: {seconds[0]:.2f} s for the first "
        f"checkpoint, {sum(seconds[1:]):.3f} s for the other {n - 1} together"
        if len(seconds) == n
        else "- the reports carry no `stats.seconds`",
    ]
    commands = dict.fromkeys(f"- `{_command_line(r.argv)}`" for r in (*gemma[:3], *llama[:2], *run))
    return "\n\n".join(
        [
            c.machine_block(info, protocol, elapsed) + "".join(f"\n- {x}" for x in [*notes, *generated]),
            "#### Gemma-2 2B\n\n" + results_table(gemma) + "\n\n" + "\n".join(ratios),
            "#### Llama-3.1-405B layout\n\n" + results_table(llama, io=True),
            f"Out of {facts['apparent-clean'] / 1e9:,.0f} GB, the cold audit read {c.fmt_bytes(cold.header_bytes)} "
            "bytes of headers, index and config.",
            f"#### {n} checkpoints of one run\n\n" + results_table(run) + "\n\n" + "\n".join(batch_lines),
            "Target checks:\n\n" + c.check_lines(target_checks(rows)),
            f"Command lines (the variants differ only in the directory; the loop's middle {n - 2} directories elided):"
            "\n\n" + "\n".join(commands),
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = c.parse_args(__doc__, argv)
    root = args.workdir / "scale"
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    built = b.build_checkpoints(args.workdir)
    built += build_gemma(root / "gemma2-2b")
    built += build_llama405(root / "llama31-405b")
    built += build_run(root / "run", args.workdir / b.BASE)
    c.log(
        f"[build] {'built ' + ', '.join(built) if built else 'all data cached'} ({time.perf_counter() - started:.0f} s)"
    )
    llama = root / "llama31-405b"
    index = json.loads((llama / "untied-clean" / INDEX).read_text())
    shard_sizes = [p.stat().st_size for p in (llama / "untied-clean").glob("model-*.safetensors")]
    facts: dict[str, Any] = {
        "gemma-bytes": {v.name: (root / "gemma2-2b" / v.name / b.WEIGHTS).stat().st_size for v in GEMMA_VARIANTS},
        "apparent-clean": disk_usage(llama / "untied-clean")[0],
        "apparent-missing": disk_usage(llama / "head-missing")[0],
        "tensors": len(index["weight_map"]),
        "shard-min": min(shard_sizes),
        "shard-max": max(shard_sizes),
    }
    facts["apparent"], facts["du"] = disk_usage(llama)
    with c.session(root, "scratch-") as scratch:
        rows = {
            "gemma": bench_gemma(root / "gemma2-2b", args.repeats, scratch),
            "llama": bench_llama405(llama, args.repeats, scratch),
            "run": bench_run(root / "run", args.repeats, scratch),
        }
    info = c.machine_info()
    for title, key in (("Gemma-2 2B", "gemma"), ("Llama-3.1-405B", "llama"), ("run", "run")):
        print(f"\n{title}\n\n{results_table(rows[key], io=key == 'llama')}")
    print(c.cold_note(rows["llama"]) or "")
    c.write_raw(root / "results.json", info, args.repeats, facts=facts, rows=rows)
    if not args.no_readme:
        c.write_generated(BLOCK, report(rows, facts, info, args.repeats, time.perf_counter() - started))
    return c.finish(target_checks(rows))


if __name__ == "__main__":
    raise SystemExit(main())
