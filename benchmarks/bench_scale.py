"""Benchmark `tieaudit check` at scale: the largest embedding, the largest shard layout, N checkpoints of one run.

Three sections, all under WORKDIR/scale (generated once, cached, rebuilt when this generator changes):

    gemma2-2b     Gemma-2 2B shape (vocab 256000 x hidden 2304, tied), full-size embedding and head but 2 of
                  the 26 decoder layers, random bf16 weights written with safetensors:
                      tied-clean   lm_head.weight not stored                 -> exit 0, header only
                      diverged     lm_head.weight = embedding + N(0, 0.002)  -> TIE001, exit 1, RSS <= 1.5 GiB
                  `tieaudit check DIR -f json` and `AutoModelForCausalLM.from_pretrained(DIR)` in the same run.
    llama31-405b  the Llama-3.1-405B shard layout as sparse files: 191 shards with real safetensors headers
                  (names and shapes from LlamaForCausalLM on the meta device) and holes for the data, ~811 GB
                  apparent, the index and the model's config.json:
                      untied-clean  every tensor stored                       -> exit 0, header only
                      head-missing  lm_head.weight in neither header nor index -> TIE002, exit 1
                  targets: <= 10 s, <= 1.5 GiB peak RSS, 0 tensor bytes read; the process's /proc/self/io too.
    run           a trainer's output directory, run/checkpoint-100 ... run/checkpoint-2000, whose files are
                  hard links to bench_check.py's Llama-3.2-1B-shaped tied-clean checkpoint: one process
                  (`tieaudit check RUN`) against a loop of 20 processes (`tieaudit check CKPT` each).

Every tieaudit command is measured twice: as a first audit (`--no-cache`: it imports transformers and builds the
model on the meta device) and as a repeat audit (the tie-map cache is warm: the warm-up run fills it). Every child
runs with TIEAUDIT_CACHE_DIR set to a fresh temporary directory made for this run. Runs go through bench_check.py's
rusage wrapper (wall time and the child's peak RSS). Per directory: one warm-up run (the repeat audit's), then the
median of 3 measured runs per command (1 with --quick; 2 when a run takes over 5 s, except the rows with a
wall-time target); the 20-process loop with --no-cache costs minutes, so it runs once, after the one-process rows
that read the same files. Whole run: about 6 minutes with the data cached. The tables go to stdout and to the
"## Scale" section of benchmarks/README.md; raw runs to WORKDIR/scale/results.json.

Usage: .venv/bin/python benchmarks/bench_scale.py [--workdir DIR] [--quick] [--no-readme]
"""

from __future__ import annotations

import copy
import json
import math
import os
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_check as bc

SECTION = "## Scale"
GENERATOR_VERSION = 1  # bump when the generated files change, to invalidate the cached ones
GIB = 2**30
RSS_TARGET = int(1.5 * GIB)  # peak RSS of `tieaudit check` at most 1.5 GiB (diverged Gemma, 405B layout)
WALL_TARGET_405B = 10.0  # seconds, `tieaudit check` on the 405B layout
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
GEMMA_REAL_LAYERS = 26
GEMMA_LAYERS = 2
GEMMA_VARIANTS: tuple[bc.Variant, ...] = (
    bc.Variant("tied-clean", True, "absent", 0, (), True, True, False),
    bc.Variant("diverged", True, "perturbed", 1, ("TIE001",), False, False, True),
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
class ScaleRow(bc.Row):
    """A results row; `audit` is "first" (--no-cache), "repeat" (cache warm) or "" (not tieaudit)."""

    audit: str = ""
    processes: int = 1
    exits: list[int] = field(default_factory=list)
    rchar: int | None = None
    read_bytes: int | None = None
    report_seconds: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Generated data (cached)
# --------------------------------------------------------------------------------------------------


def _normal(spec: dict[str, Any]) -> Any:
    return json.loads(json.dumps(spec))


def _complete(directory: Path, spec: dict[str, Any]) -> bool:
    """Whether `directory` holds a finished build of `spec` (every file it recorded, at its recorded size)."""
    try:
        marker = json.loads((directory / bc.MARKER).read_text())
        if marker.get("spec") != _normal(spec):
            return False
        return all((directory / name).stat().st_size == size for name, size in marker["files"].items())
    except (OSError, ValueError, KeyError, AttributeError):
        return False


def _mark_complete(directory: Path, spec: dict[str, Any]) -> None:
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file() and p.name != bc.MARKER}
    (directory / bc.MARKER).write_text(json.dumps({"spec": _normal(spec), "files": files}, indent=2))


def _fresh_dir(directory: Path) -> None:
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)


def _gemma_spec(v: bc.Variant) -> dict[str, Any]:
    return {
        "generator": GENERATOR_VERSION,
        "seed": bc.SEED,
        "config": GEMMA2_2B,
        "layers": GEMMA_LAYERS,
        "head": v.head,
    }


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
    shapes = {name: tuple(t.shape) for name, t in meta.state_dict().items() if name != bc.HEAD}
    del meta
    if bc.EMBED not in shapes:
        raise RuntimeError(f"{bc.EMBED} is not in the Gemma2ForCausalLM state dict; transformers renamed it?")
    started = time.perf_counter()
    base = {name: bc._random_tensor(shape, bc.SEED + i, bf16) for i, (name, shape) in enumerate(shapes.items())}
    total = sum(t.numel() * t.element_size() for t in base.values())
    bc._log(
        f"[build] gemma2-2b: {len(base)} tensors, {total / bc.MIB:,.0f} MiB, in {time.perf_counter() - started:.1f} s"
    )
    built = []
    for v in todo:
        started = time.perf_counter()
        directory = root / v.name
        _fresh_dir(directory)
        config.save_pretrained(directory)
        tensors = dict(base)
        if v.head == "perturbed":
            embed = base[bc.EMBED]
            tensors[bc.HEAD] = embed + bc._random_tensor(tuple(embed.shape), bc.SEED - 1, bf16, std=bc.HEAD_NOISE_STD)
        partial = directory / (bc.WEIGHTS + ".partial")
        save_file(tensors, str(partial), metadata={"format": "pt"})
        os.replace(partial, directory / bc.WEIGHTS)
        del tensors
        _mark_complete(directory, _gemma_spec(v))
        size = (directory / bc.WEIGHTS).stat().st_size
        bc._log(f"[build] gemma2-2b/{v.name}: {size / bc.MIB:,.0f} MiB in {time.perf_counter() - started:.1f} s")
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
    todo = [v for v in variants if not _complete(root / v, _llama_spec(v))]
    if not todo:
        return []
    started = time.perf_counter()
    layout = llama_layout()
    names = [name for name, _ in layout]
    if bc.HEAD not in names or bc.EMBED not in names:
        raise RuntimeError("LlamaForCausalLM's state dict has no lm_head.weight / model.embed_tokens.weight")
    shard_of = pack([math.prod(shape) * BF16_BYTES for _, shape in layout], LLAMA_SHARDS)
    files = [f"model-{i + 1:05d}-of-{LLAMA_SHARDS:05d}.safetensors" for i in range(LLAMA_SHARDS)]
    head_shard = shard_of[names.index(bc.HEAD)]
    if sum(1 for s in shard_of if s == head_shard) < 2:
        raise RuntimeError("lm_head.weight would be alone in its shard: head-missing would leave an empty shard")
    clean, missing = root / variants[0], root / variants[1]
    for directory in (clean, missing):
        _fresh_dir(directory)
    for variant, directory in ((variants[0], clean), (variants[1], missing)):
        kept = [(n, s, k) for (n, s), k in zip(layout, shard_of, strict=True) if variant == variants[0] or n != bc.HEAD]
        if directory == clean:
            (directory / bc.CONFIG).write_text(json.dumps(LLAMA31_405B, indent=2) + "\n")
        else:
            bc._link_or_copy(clean / bc.CONFIG, directory / bc.CONFIG)
        for k, file in enumerate(files):
            if directory == missing and k != head_shard:
                bc._link_or_copy(clean / file, missing / file)
            else:
                write_sparse_shard(directory / file, [(n, s) for n, s, shard in kept if shard == k])
        index = {
            "metadata": {"total_size": sum(math.prod(s) * BF16_BYTES for _, s, _ in kept)},
            "weight_map": {n: files[k] for n, _, k in sorted(kept)},
        }
        (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        _mark_complete(directory, _llama_spec(variant))
    bc._log(
        f"[build] llama31-405b: {len(layout)} tensors in {LLAMA_SHARDS} sparse shards, 2 variants, "
        f"in {time.perf_counter() - started:.1f} s"
    )
    return [f"llama31-405b/{v}" for v in variants]


def build_run(root: Path, source: Path) -> list[str]:
    """run/checkpoint-<step>: config.json and model.safetensors hard-linked to `source` (copied if linking fails)."""
    built = []
    for step in STEPS:
        directory = root / f"checkpoint-{step}"
        wanted = (bc.CONFIG, bc.WEIGHTS)
        ok = directory.is_dir() and sorted(p.name for p in directory.iterdir()) == sorted(wanted)
        ok = ok and all(_same_file(directory / n, source / n) for n in wanted)
        if ok:
            continue
        _fresh_dir(directory)
        for name in wanted:
            bc._link_or_copy(source / name, directory / name)
        built.append(directory.name)
    if built:
        bc._log(f"[build] run: {len(built)} checkpoint directories linked to {source.name}")
    return [f"run/{name}" for name in built]


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


def measure(
    argv: Sequence[str], repeats: int, scratch: Path, label: str, *, warmup: bool, adaptive: bool = True
) -> list[bc.Run]:
    """bench_check's protocol (`bc.measure`: one warm-up run, then `repeats` measured runs) with two savings that
    keep the whole benchmark near 6 minutes: the warm-up is skipped when an earlier row already read the same
    files (`warmup=False`), and, when `adaptive`, a command whose first measured run takes over SLOW_RUN seconds
    is run twice (rows with a wall-time target always get all `repeats`)."""
    if warmup:
        bc.run_measured(argv, scratch)
    runs: list[bc.Run] = []
    while len(runs) < repeats and not (adaptive and len(runs) == 2 and runs[0].wall > SLOW_RUN):
        run = bc.run_measured(argv, scratch)
        runs.append(run)
        bc._log(
            f"[bench] {label}: run {len(runs)}: {run.wall:.2f} s, {run.peak_rss / bc.MIB:,.0f} MiB, exit {run.exit}"
        )
    return runs


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
) -> ScaleRow:
    """Measure a tieaudit command and check every run's reports, exit codes and limits against `expect`."""
    label = f"{variant} {command} ({audit})"
    runs = measure(argv, repeats, scratch, label, warmup=warmup, adaptive=expect.wall_limit is None)
    row = ScaleRow(variant, command, argv, runs, verdict="", ok=True, audit=audit, processes=processes)
    reports: list[dict[str, Any]] = []
    for run in runs:
        try:
            docs = _documents(run.stdout)
        except ValueError:
            row.problems.append(f"exit {run.exit}, unparsable JSON: {run.stderr.strip()[-300:]}")
            continue
        reports = [r for doc in docs for r in doc.get("reports", [doc])]
        errors = [e for doc in docs for e in doc.get("errors", [])]
        if processes > 1:
            exits = [int(line[5:]) for line in run.stderr.splitlines() if line.startswith("exit=")]
        else:
            exits = [run.exit]
        row.exits = exits
        if errors:
            row.problems.append(f"{len(errors)} targets not audited: {errors[0]['message']}")
        if len(reports) != expect.reports:
            row.problems.append(f"{len(reports)} reports, expected {expect.reports}")
        if len(exits) != processes or set(exits) != {expect.exit}:
            row.problems.append(f"exit {sorted(set(exits))} ({len(exits)} processes), expected {expect.exit}")
        for report in reports:
            got = tuple(sorted({f["code"] for f in report["findings"]}))
            if got != tuple(sorted(expect.codes)):
                row.problems.append(f"findings {list(got) or 'none'}, expected {list(expect.codes) or 'none'}")
                break
        for line in run.stderr.splitlines():
            if line.startswith(IO_MARK):
                io = json.loads(line[len(IO_MARK) :])
                row.rchar, row.read_bytes = io["rchar"], io["read_bytes"]
    if not reports:
        row.ok = False
        row.verdict = "no report"
        row.problems = sorted(set(row.problems))
        return row
    row.tensor_bytes = sum(r["stats"]["tensor_bytes_read"] for r in reports)
    row.header_bytes = sum(r["stats"]["header_bytes_read"] for r in reports)
    row.report_seconds = [r["stats"]["seconds"] for r in reports]
    codes = sorted({f"{f['code']} ({f['severity']})" for r in reports for f in r["findings"]})
    verdict = ", ".join(codes) if codes else "clean"
    row.verdict = f"{len(reports)} reports, {'each ' if codes else 'all '}{verdict}" if len(reports) > 1 else verdict
    if expect.header_only and row.tensor_bytes != 0:
        row.problems.append(f"header-only verdict read {row.tensor_bytes:,} tensor bytes, expected 0")
    if expect.rss_limit is not None and row.peak_rss > expect.rss_limit:
        row.problems.append(f"peak RSS {row.peak_rss / bc.MIB:,.0f} MiB > {expect.rss_limit / bc.MIB:,.0f} MiB")
    if expect.wall_limit is not None and row.wall > expect.wall_limit:
        row.problems.append(f"wall {row.wall:.2f} s > {expect.wall_limit:.0f} s")
    row.problems = list(dict.fromkeys(row.problems))
    row.ok = not row.problems
    return row


def _check_argv(directory: Path, audit: str) -> list[str]:
    return [bc.tieaudit_exe(), "check", str(directory), "-f", "json", *(["--no-cache"] if audit == "first" else [])]


def _audit_pair(
    variant: str, command: str, argvs: dict[str, list[str]], expect: Expect, repeats: int, scratch: Path, **kw: Any
) -> list[ScaleRow]:
    """The repeat audit first (its warm-up run fills the tie-map cache and the page cache), then the first audit
    (no warm-up of its own: the files are in the page cache); returned in display order, first audit first."""
    repeat = audit_row(variant, command, argvs["repeat"], "repeat", expect, repeats, scratch, warmup=True, **kw)
    first = audit_row(variant, command, argvs["first"], "first", expect, repeats, scratch, **kw)
    return [first, repeat]


def load_row(v: bc.Variant, directory: Path, repeats: int, scratch: Path) -> ScaleRow:
    """bench_check's transformers row (LOAD_SCRIPT, same verdict rules), measured without a warm-up: the tieaudit
    rows just read the same directory."""
    argv = [sys.executable, "-c", bc.LOAD_SCRIPT, str(directory)]
    runs = measure(argv, repeats, scratch, f"{v.name} transformers", warmup=False)
    return bc.judge_load(ScaleRow(v.name, "`AutoModelForCausalLM.from_pretrained(DIR)`", argv, runs, "", True), v)


def _check_argvs(directory: Path) -> dict[str, list[str]]:
    argv = [bc.tieaudit_exe(), "check", str(directory), "-f", "json"]
    return {"first": [*argv, "--no-cache"], "repeat": argv}


def bench_gemma(root: Path, repeats: int, scratch: Path) -> list[ScaleRow]:
    rows: list[ScaleRow] = []
    for v in GEMMA_VARIANTS:
        directory = root / v.name
        expect = Expect(v.expect_exit, v.expect_codes, v.header_only, rss_limit=RSS_TARGET)
        rows += _audit_pair(v.name, "`tieaudit check DIR -f json`", _check_argvs(directory), expect, repeats, scratch)
        rows.append(load_row(v, directory, repeats, scratch))
    return rows


def bench_llama405(root: Path, repeats: int, scratch: Path) -> list[ScaleRow]:
    rows: list[ScaleRow] = []
    for name, expect in (
        ("untied-clean", Expect(0, rss_limit=RSS_TARGET, wall_limit=WALL_TARGET_405B)),
        ("head-missing", Expect(1, ("TIE002",), rss_limit=RSS_TARGET, wall_limit=WALL_TARGET_405B)),
    ):
        argvs = {k: [sys.executable, "-c", IO_SCRIPT, *v[1:]] for k, v in _check_argvs(root / name).items()}
        rows += _audit_pair(name, "`tieaudit check DIR -f json`", argvs, expect, repeats, scratch)
    return rows


def bench_run(root: Path, repeats: int, scratch: Path) -> list[ScaleRow]:
    n = len(STEPS)
    variant = f"{n} checkpoints"
    expect = Expect(0, reports=n)
    rows = _audit_pair(variant, "`tieaudit check RUN -f json`", _check_argvs(root), expect, repeats, scratch)
    checkpoints = [str(root / f"checkpoint-{step}") for step in STEPS]
    loop = {
        audit: ["sh", "-c", LOOP_SCRIPT, "sh", bc.tieaudit_exe(), flags, *checkpoints]
        for audit, flags in (("first", "--no-cache"), ("repeat", ""))
    }
    command = f"{n} × `tieaudit check CKPT -f json`"
    # no warm-up: the rows above read the same files and filled the tie-map cache; a first-audit loop pays n
    # transformers imports (minutes), so it runs once
    first = audit_row(variant, command, loop["first"], "first", expect, 1, scratch, processes=n)
    repeat = audit_row(variant, command, loop["repeat"], "repeat", expect, repeats, scratch, processes=n)
    return [*rows, first, repeat]


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------

AUDIT_LABEL = {"first": "first (`--no-cache`)", "repeat": "repeat (cache warm)", "": "—"}
LIMIT_PROBLEMS = ("peak RSS", "wall", "header-only")  # problems reported by their own target checks


def _exit(row: ScaleRow) -> str:
    if row.processes > 1:
        return ", ".join(f"{c} ×{row.exits.count(c)}" for c in sorted(set(row.exits))) or "?"
    return str(row.exit)


def results_table(rows: Sequence[ScaleRow], io: bool = False) -> str:
    head = "| variant | command | audit | wall s (min–max) | peak RSS MiB | tensor bytes read | header bytes read |"
    rule = "|---|---|---|--:|--:|--:|--:|"
    if io:
        head += " rchar | read_bytes |"
        rule += "--:|--:|"
    lines = [head + " exit | verdict |", rule + "--:|---|"]
    for r in rows:
        verdict = r.verdict + ("" if r.ok else " ✗ (" + "; ".join(r.problems) + ")")
        line = (
            f"| {r.variant} | {r.command} | {AUDIT_LABEL[r.audit]} | {bc._wall(r)} | {r.peak_rss / bc.MIB:,.0f} | "
            f"{bc._bytes(r.tensor_bytes)} | {bc._bytes(r.header_bytes)} |"
        )
        if io:
            line += f" {bc._bytes(r.rchar)} | {bc._bytes(r.read_bytes)} |"
        lines.append(line + f" {_exit(r)} | {verdict} |")
    return "\n".join(lines)


def _find(rows: Sequence[ScaleRow], variant: str, audit: str, processes: int = 1) -> ScaleRow:
    for r in rows:
        if r.variant == variant and r.audit == audit and r.processes == processes:
            return r
    raise KeyError((variant, audit, processes))


def _verdict_check(what: str, r: ScaleRow) -> tuple[bool, str]:
    problems = [p for p in r.problems if not p.startswith(LIMIT_PROBLEMS)]
    return not problems, f"{what}: {r.verdict}, exit {_exit(r)}" + (f" ({'; '.join(problems)})" if problems else "")


def target_checks(rows: dict[str, list[ScaleRow]]) -> list[tuple[bool, str]]:
    checks: list[tuple[bool, str]] = []
    rss = f"{RSS_TARGET / bc.MIB:,.0f} MiB"
    for r in rows["gemma"]:
        if not r.audit:
            detail = "as expected" if r.ok else "; ".join(r.problems)
            checks.append((r.ok, f"Gemma-2 2B {r.variant}: transformers loads it {r.verdict}: {detail}"))
            continue
        what = f"Gemma-2 2B {r.variant}, {r.audit} audit"
        checks.append(_verdict_check(what, r))
        if r.variant == "diverged":
            checks.append(
                (
                    r.peak_rss <= RSS_TARGET,
                    f"{what}: peak RSS {r.peak_rss / bc.MIB:,.0f} MiB ≤ {rss} while comparing two 256000 × 2304 "
                    f"tensors ({bc._bytes(r.tensor_bytes)} read)",
                )
            )
        else:
            checks.append(
                (r.tensor_bytes == 0, f"{what}: header only, tensor bytes read = {bc._bytes(r.tensor_bytes)}")
            )
    for r in rows["llama"]:
        what = f"Llama-3.1-405B {r.variant}, {r.audit} audit"
        checks.append((r.wall <= WALL_TARGET_405B, f"{what}: wall {r.wall:.2f} s ≤ {WALL_TARGET_405B:.0f} s"))
        checks.append((r.peak_rss <= RSS_TARGET, f"{what}: peak RSS {r.peak_rss / bc.MIB:,.0f} MiB ≤ {rss}"))
        checks.append((r.tensor_bytes == 0, f"{what}: tensor bytes read = {bc._bytes(r.tensor_bytes)}"))
        checks.append(_verdict_check(what, r))
    for r in rows["run"]:
        how = "one process" if r.processes == 1 else f"{r.processes} processes"
        checks.append(_verdict_check(f"{r.variant}, {how}, {r.audit} audit", r))
    return checks


def _command_line(argv: Sequence[str]) -> str:
    shown: list[str] = []
    for arg in argv:
        if arg == IO_SCRIPT:
            shown.append('"<IO_SCRIPT: atexit hook printing /proc/self/io, then tieaudit.cli.app.main()>"')
        elif arg in (LOOP_SCRIPT, ""):
            shown.append(shlex.quote(arg))
        else:
            shown.append(arg)
    checkpoints = [i for i, a in enumerate(argv) if Path(a).name.startswith("checkpoint-")]
    if len(checkpoints) > 2:
        shown[checkpoints[1] : checkpoints[-1]] = ["…"]
    return bc._shell(shown)


def _protocol(repeats: int, elapsed: float) -> str:
    if repeats == 1:
        runs = "1 measured run per command (--quick)"
    else:
        runs = (
            f"median of {repeats} measured runs per command (2 when a run takes over {SLOW_RUN:.0f} s, except the "
            "405B rows, which have a wall-time target)"
        )
    return (
        f"- per directory one warm-up run (the repeat audit's, which also fills the tie-map cache), then {runs}; "
        f"the {len(STEPS)}-process `--no-cache` loop runs once; whole benchmark {elapsed / 60:.1f} min"
    )


def render_section(
    rows: dict[str, list[ScaleRow]], facts: dict[str, Any], info: dict[str, str], repeats: int, elapsed: float
) -> str:
    gemma, llama, run = rows["gemma"], rows["llama"], rows["run"]
    n = len(STEPS)
    batch = {a: _find(run, f"{n} checkpoints", a) for a in ("first", "repeat")}
    loop = {a: _find(run, f"{n} checkpoints", a, n) for a in ("first", "repeat")}
    machine = "\n".join(
        _protocol(repeats, elapsed) if line.startswith("- 1 warm-up run") else line
        for line in bc.machine_block(info, repeats, elapsed).splitlines()
    )
    ratios = []
    for v in GEMMA_VARIANTS:
        load = next(r for r in gemma if r.variant == v.name and not r.audit)
        first, repeat = _find(gemma, v.name, "first"), _find(gemma, v.name, "repeat")
        ratios.append(
            f"- {v.name}: `from_pretrained` {load.wall:.2f} s, {load.peak_rss / bc.MIB:,.0f} MiB; tieaudit first audit "
            f"{first.wall:.2f} s ({first.wall / load.wall:.2f}× the load's wall time), repeat audit "
            f"{repeat.wall:.2f} s ({repeat.wall / load.wall:.2f}×)"
        )
    commands: list[str] = []
    for r in (*gemma[:3], *llama[:2], *run):
        line = f"- `{_command_line(r.argv)}`"
        if line not in commands:
            commands.append(line)
    llama_first = _find(llama, "untied-clean", "first")
    lines = [
        SECTION,
        "",
        "`bench_scale.py` measures `tieaudit check` where loading the weights stops being an option: the largest",
        "embedding in common use, the largest public shard layout, and the N checkpoints of one training run.",
        "Produced by `.venv/bin/python benchmarks/bench_scale.py` (generated data cached under",
        "`benchmarks/work/scale/`). Each tieaudit command is measured twice: as a **first audit** (`--no-cache`:",
        "tieaudit imports transformers and builds the model on the meta device to learn its declared ties) and as a",
        "**repeat audit** (tie-map cache warm: the warm-up run filled it). Every child runs with `TIEAUDIT_CACHE_DIR`",
        "set to a fresh temporary directory made for this run (and `HF_HUB_OFFLINE=1`). Wall time and peak RSS come",
        "from bench_check's rusage wrapper; byte counts from the report's `stats` (summed over a batch's reports).",
        "",
        machine,
        "",
        "### Gemma-2 2B shape: the largest embedding",
        "",
        "A `Gemma2Config` saved by transformers with the real sizes (vocab 256000, hidden 2304, intermediate 9216,",
        "8 heads, 4 KV heads, head_dim 256, `tie_word_embeddings: true`, bf16) and the full-size embedding",
        f"(256000 × 2304, 1,125 MiB in bf16), but only {GEMMA_LAYERS} of the {GEMMA_REAL_LAYERS} decoder layers "
        f"(`num_hidden_layers: {GEMMA_LAYERS}`): the layers do",
        "not change what tieaudit reads (~150 header bytes a tensor; tensor data is read only for a tie group).",
        "Names and shapes from `Gemma2ForCausalLM` on the meta device, each tensor seeded random bf16 (N(0, 0.02),",
        "norms ones), written with `safetensors.torch.save_file`. `tied-clean` stores no `lm_head.weight`",
        f"({facts['gemma-bytes']['tied-clean'] / bc.MIB:,.0f} MiB); `diverged` stores it as embedding + N(0, 0.002) "
        f"({facts['gemma-bytes']['diverged'] / bc.MIB:,.0f} MiB),",
        "so tieaudit must compare two 1,125 MiB tensors: `tieaudit/ties/compare.py` streams row chunks of 32 MiB",
        "(float32),",
        "about 8 chunks of working set whatever the vocabulary size, which is what the 1.5 GiB bound checks.",
        "",
        results_table(gemma),
        "",
        "Against the transformers load (`AutoModelForCausalLM.from_pretrained(DIR)`, same run):",
        "",
        *ratios,
        "",
        "### Llama-3.1-405B shard layout, as sparse files",
        "",
        f"{LLAMA_SHARDS} shards `model-00001-of-00191.safetensors` … `model-00191-of-00191.safetensors` with real",
        "safetensors headers (8-byte little-endian length, JSON with dtype BF16, shape, data_offsets, `__metadata__:",
        '{"format": "pt"}`, padded with spaces to a multiple of 8) whose data regions are holes (header written, then',
        "`os.truncate` to the full size), `model.safetensors.index.json` (`metadata.total_size`, `weight_map`) and the",
        "model's `config.json` values (LlamaForCausalLM, hidden 16384, intermediate 53248, 126 layers, 128",
        "heads, 8 KV heads, vocab 128256, llama3 rope scaling, `tie_word_embeddings: false`, `torch_dtype: bfloat16`).",
        "Tensor names and shapes are `LlamaForCausalLM(config)`'s on the meta device, in state-dict order, packed",
        "into 191 contiguous shards filled greedily from the end, so the last shard holds `lm_head.weight` with the",
        f"final norms (shards of {facts['shard-min'] / 1e9:.1f}–{facts['shard-max'] / 1e9:.1f} GB). `untied-clean` "
        f"stores all {facts['tensors']:,} tensors;",
        "`head-missing` drops `lm_head.weight` from its shard's header and from the index (the other 190 shards and",
        "`config.json` are hard links to `untied-clean`'s).",
        f"Apparent size (sum of file sizes): {facts['apparent-clean'] / 1e9:,.1f} GB for `untied-clean`, "
        f"{facts['apparent-missing'] / 1e9:,.1f} GB for `head-missing`,",
        f"{facts['apparent'] / 1e9:,.1f} GB for the two together (hard links counted once); real disk usage (`du`): "
        f"{facts['du'] / bc.MIB:,.1f} MiB for the two.",
        f"No transformers/`from_pretrained` comparison is possible: it would read and hold "
        f"{facts['apparent-clean'] / 1e9:,.0f} GB of weights,",
        "about 34 times this machine's RAM (and these files hold no weights, only holes).",
        "`rchar` and `read_bytes` are the tieaudit process's own `/proc/self/io` counters, printed by an `atexit`",
        "hook: `rchar` counts every byte read() returned (the Python modules it imports included),",
        "`read_bytes` the bytes fetched from the block device (0 when the page cache already held them).",
        "",
        results_table(llama, io=True),
        "",
        f"Out of {facts['apparent-clean'] / 1e9:,.0f} GB, tieaudit read {bc._bytes(llama_first.header_bytes)} bytes "
        "of headers, index and config.",
        "",
        f"### {n} checkpoints of one run",
        "",
        f"A trainer-style directory `run/checkpoint-100` … `run/checkpoint-2000` ({n} checkpoints) whose",
        "`config.json` and `model.safetensors` are hard links to bench_check's Llama-3.2-1B-shaped `tied-clean`",
        "checkpoint. One process, `tieaudit check RUN -f json` (it expands the `checkpoint-*` folders and prints one",
        f"JSON document with {n} `reports` and a combined `summary`), against a shell loop of {n} processes,",
        "`tieaudit check CKPT -f json` each. The loops run without a warm-up of their own, after the one-process",
        "rows that read the same files and filled the tie-map cache; the `--no-cache` loop pays the transformers",
        f"import {n} times, so it runs once.",
        "",
        results_table(run),
        "",
        f"- first audit (`--no-cache`): {n} processes {loop['first'].wall:.1f} s "
        f"({loop['first'].wall / n:.2f} s per checkpoint) vs one process {batch['first'].wall:.2f} s: "
        f"**{loop['first'].wall / batch['first'].wall:.1f}×**",
        f"- repeat audit (cache warm): {n} processes {loop['repeat'].wall:.2f} s "
        f"({loop['repeat'].wall / n:.2f} s per checkpoint) vs one process {batch['repeat'].wall:.2f} s: "
        f"**{loop['repeat'].wall / batch['repeat'].wall:.1f}×**",
        f"- inside the one-process first audit, the reports' own `stats.seconds`: "
        f"{batch['first'].report_seconds[0]:.2f} s for the first checkpoint (transformers import and meta model), "
        f"{sum(batch['first'].report_seconds[1:]):.3f} s for the other {n - 1} together",
        "",
        "Target checks:",
        "",
        *(f"- {'PASS' if ok else 'FAIL'}: {text}" for ok, text in target_checks(rows)),
        "",
        "Command lines (the variants differ only in the directory; the loop's middle 18 directories elided):",
        "",
        *commands,
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = bc.parse_args(__doc__, argv)
    repeats = 1 if args.quick else 3
    workdir: Path = args.workdir.resolve()
    root = workdir / "scale"
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    built = bc.build_checkpoints(workdir)
    built += build_gemma(root / "gemma2-2b")
    built += build_llama405(root / "llama31-405b")
    built += build_run(root / "run", workdir / "tied-clean")
    took = time.perf_counter() - started
    bc._log(f"[build] {'built ' + ', '.join(built) if built else 'all data cached'} ({took:.0f} s)")
    llama = root / "llama31-405b"
    index = json.loads((llama / "untied-clean" / INDEX).read_text())
    shard_sizes = [p.stat().st_size for p in (llama / "untied-clean").glob("model-*.safetensors")]
    facts: dict[str, Any] = {
        "gemma-bytes": {v.name: (root / "gemma2-2b" / v.name / bc.WEIGHTS).stat().st_size for v in GEMMA_VARIANTS},
        "apparent-clean": disk_usage(llama / "untied-clean")[0],
        "apparent-missing": disk_usage(llama / "head-missing")[0],
        "tensors": len(index["weight_map"]),
        "shard-min": min(shard_sizes),
        "shard-max": max(shard_sizes),
    }
    facts["apparent"], facts["du"] = disk_usage(llama)

    os.environ.pop("TIEAUDIT_NO_CACHE", None)
    with (
        tempfile.TemporaryDirectory(prefix="tieaudit-cache-") as cache,
        tempfile.TemporaryDirectory(dir=root, prefix="scratch-") as tmp,
    ):
        os.environ["TIEAUDIT_CACHE_DIR"] = cache  # inherited by every child (run_measured copies os.environ)
        scratch = Path(tmp)
        rows = {
            "gemma": bench_gemma(root / "gemma2-2b", repeats, scratch),
            "llama": bench_llama405(llama, repeats, scratch),
            "run": bench_run(root / "run", repeats, scratch),
        }
        facts["cache-entries"] = len(list(Path(cache).glob("*.json")))
    del os.environ["TIEAUDIT_CACHE_DIR"]

    info = bc.machine_info()
    for title, key, io in (("Gemma-2 2B", "gemma", False), ("Llama-3.1-405B", "llama", True), ("run", "run", False)):
        print(f"\n{title}\n\n{results_table(rows[key], io)}")
    checks = target_checks(rows)
    print()
    for ok, text in checks:
        print(f"{'PASS' if ok else 'FAIL'}: {text}")
    raw = {
        "machine": info,
        "repeats": repeats,
        "facts": facts,
        "rows": {k: [bc._raw_row(r) for r in v] for k, v in rows.items()},
    }
    (root / "results.json").write_text(json.dumps(raw, indent=2))
    elapsed = time.perf_counter() - started
    if not args.no_readme:
        bc.replace_readme_section(SECTION, render_section(rows, facts, info, repeats, elapsed))
        bc._log(f"[report] wrote {bc.README.relative_to(bc.REPO)} ({SECTION})")
    bc._log(f"[done] {elapsed:.0f} s")
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
