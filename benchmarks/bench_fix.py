"""Benchmark `tieaudit fix --untie` on the Llama-3.2-1B-shaped checkpoint against copying the same bytes.

The checkpoint is bench_check.py's `tied-clean` weights (bf16, 2.47 GB, no lm_head.weight) with
`tie_word_embeddings: false`: the classic TIE002 save whose head would load randomly initialised. The fix
stores a copy of the embedding (525 MB) as lm_head.weight. Two layouts:

    single   model.safetensors (the fix rewrites the file: a single-file checkpoint has no index to extend)
    sharded  the same tensors in 3 shards + model.safetensors.index.json (the fix adds one shard)

For each layout: `fix --untie --output-dir` (a complete copy) and `fix --untie --in-place -y` (on a fresh
hard-linked copy each run, so the cached source is never modified), beside `cp -r` of the checkpoint in
the same run. Every fixed result is re-audited by tieaudit itself (it exits 0 only when the fix held) and,
once per layout, loaded with transformers to confirm lm_head equals the embedding.

Usage: .venv/bin/python benchmarks/bench_fix.py [--workdir DIR] [--quick] [--no-readme]
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_check as bc

SECTION = "## Fix"
SHARD_BYTES = 1_000_000_000
EMBED_BYTES = 128256 * 2048 * 2

VERIFY = """\
import json, sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
e, h = m.get_input_embeddings().weight, m.get_output_embeddings().weight
m.tie_weights()
print(json.dumps({"equal": bool(torch.equal(e, h)), "separate": e.data_ptr() != h.data_ptr(),
                  "after_tie_weights_equal": bool(torch.equal(m.get_input_embeddings().weight,
                                                             m.get_output_embeddings().weight))}))
"""


@dataclass
class Row:
    layout: str
    command: str
    wall: float
    peak_rss: int
    exit: int
    bytes_written: int | None
    note: str = ""


def ensure_sources(workdir: Path) -> dict[str, Path]:
    """The TIE002 checkpoint in both layouts (built from bench_check's tied-clean weights, cached)."""
    bc.build_checkpoints(workdir)
    clean = workdir / "tied-clean"
    single = workdir / "fix-single"
    sharded = workdir / "fix-sharded"
    if not (single / bc.MARKER).exists():
        shutil.rmtree(single, ignore_errors=True)
        single.mkdir(parents=True)
        bc._link_or_copy(clean / bc.WEIGHTS, single / bc.WEIGHTS)
        _untied_config(clean, single)
        (single / bc.MARKER).write_text("{}")
    if not (sharded / bc.MARKER).exists():
        shutil.rmtree(sharded, ignore_errors=True)
        sharded.mkdir(parents=True)
        _shard(clean / bc.WEIGHTS, sharded)
        _untied_config(clean, sharded)
        (sharded / bc.MARKER).write_text("{}")
    return {"single": single, "sharded": sharded}


def _untied_config(src: Path, dest: Path) -> None:
    data = json.loads((src / bc.CONFIG).read_text())
    data["tie_word_embeddings"] = False
    (dest / bc.CONFIG).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (dest / "tokenizer_config.json").write_text('{"model_max_length": 131072}\n')


def _shard(weights: Path, dest: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    started = time.perf_counter()
    with safe_open(str(weights), "pt") as fh:
        names = sorted(fh.keys())
        groups: list[list[str]] = [[]]
        size = 0
        for name in names:
            nbytes = fh.get_slice(name).get_shape()
            n = 2
            for d in nbytes:
                n *= d
            if groups[-1] and size + n > SHARD_BYTES:
                groups.append([])
                size = 0
            groups[-1].append(name)
            size += n
        weight_map, total = {}, 0
        for i, group in enumerate(groups, 1):
            file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            tensors = {n: fh.get_tensor(n) for n in group}
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            save_file(tensors, str(dest / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(group, file))
            del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    bc._log(f"[build] sharded copy: {len(groups)} shards in {time.perf_counter() - started:.1f} s")


def fresh_copy(src: Path, dest: Path) -> Path:
    """A hard-linked copy: in-place fixes replace files, never write into the linked ones."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for p in src.iterdir():
        if p.name != bc.MARKER:
            os.link(p, dest / p.name)
    return dest


def _json_out(run: bc.Run) -> dict[str, Any]:
    try:
        return json.loads(run.stdout)
    except json.JSONDecodeError:
        return {}


def bench_layout(layout: str, src: Path, scratch: Path, repeats: int) -> list[Row]:
    exe = bc.tieaudit_exe()
    rows: list[Row] = []
    size = sum(p.stat().st_size for p in src.iterdir() if p.is_file())

    def timed(label: str, make_argv, cleanup) -> tuple[list[bc.Run], list[dict[str, Any]]]:
        runs, docs = [], []
        for i in range(repeats + 1):  # the first run warms the page cache and is discarded
            argv = make_argv()
            run = bc.run_measured(argv, scratch)
            doc = _json_out(run)
            cleanup()
            if i:
                runs.append(run)
                docs.append(doc)
                bc._log(
                    f"[bench] {layout} {label}: {run.wall:.2f} s, {run.peak_rss / bc.MIB:,.0f} MiB, exit {run.exit}"
                )
        return runs, docs

    out = scratch / "out"
    inplace = scratch / "inplace"

    def rm_out() -> None:
        shutil.rmtree(out, ignore_errors=True)

    runs, _ = timed("cp -r", lambda: ["cp", "-r", str(src), str(out)], rm_out)
    rows.append(Row(layout, "cp -r PATH OUT", _med(runs), _rss(runs), runs[-1].exit, size, "the same bytes"))
    runs, _ = timed("cp -r + sync", lambda: ["sh", "-c", f"cp -r '{src}' '{out}' && sync -f '{out}'"], rm_out)
    rows.append(
        Row(layout, "cp -r PATH OUT && sync", _med(runs), _rss(runs), runs[-1].exit, size, "durable, as fix is")
    )

    runs, docs = timed(
        "fix --output-dir", lambda: [exe, "fix", str(src), "--untie", "--output-dir", str(out), "-f", "json"], rm_out
    )
    rows.append(_fix_row(layout, "tieaudit fix PATH --untie --output-dir OUT", runs, docs))

    def in_place_argv() -> list[str]:
        fresh_copy(src, inplace)
        return [exe, "fix", str(inplace), "--untie", "--in-place", "-y", "-f", "json"]

    runs, docs = timed("fix --in-place", in_place_argv, lambda: None)
    rows.append(_fix_row(layout, "tieaudit fix PATH --untie --in-place -y", runs, docs))
    verify = subprocess.run(
        [sys.executable, "-c", VERIFY, str(inplace)], capture_output=True, text=True, env={**os.environ, **bc.CHILD_ENV}
    )
    check = subprocess.run([exe, "check", str(inplace), "-q"], capture_output=True, text=True)
    rows[
        -1
    ].note += f"; transformers: {verify.stdout.strip() or verify.stderr[-300:]}; re-check exit {check.returncode}"
    shutil.rmtree(inplace, ignore_errors=True)
    return rows


def _fix_row(layout: str, command: str, runs: list[bc.Run], docs: list[dict[str, Any]]) -> Row:
    run = docs[-1].get("fix_run") or {}
    fixed = f"fixed {run.get('fixed')} of {run.get('total')}" if run else "no fix_run in the output"
    return Row(layout, command, _med(runs), _rss(runs), runs[-1].exit, run.get("bytes_written"), fixed)


def _med(runs: Sequence[bc.Run]) -> float:
    return statistics.median(r.wall for r in runs)


def _rss(runs: Sequence[bc.Run]) -> int:
    return int(statistics.median(r.peak_rss for r in runs))


def render_section(rows: Sequence[Row], info: dict[str, str], repeats: int) -> str:
    lines = [
        SECTION,
        "",
        "`tieaudit fix --untie` on the Llama-3.2-1B-shaped TIE002 checkpoint (`tie_word_embeddings: false`, no",
        "`lm_head.weight`), single file and sharded (3 shards of ≤ 1 GB), beside `cp -r` of the same checkpoint",
        "(with and without `sync`: `fix` fsyncs everything it writes before the atomic switch), in",
        f"the same run (median of {repeats} after one warm-up run; page cache warm). Produced by",
        "`.venv/bin/python benchmarks/bench_fix.py`.",
        "",
        "| layout | command | wall | peak RSS | bytes written | exit | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        written = "—" if r.bytes_written is None else f"{r.bytes_written / bc.MIB:,.0f} MiB"
        lines.append(
            f"| {r.layout} | `{r.command}` | {r.wall:.2f} s | {r.peak_rss / bc.MIB:,.0f} MiB | {written} | "
            f"{r.exit} | {r.note} |"
        )
    emb = EMBED_BYTES / bc.MIB
    lines += [
        "",
        "`bytes written` counts the bytes tieaudit generated (new and rewritten files, index, config); with",
        "`--output-dir` the other files are copied on top of that (like `cp`).",
        "",
        f"One embedding matrix is {emb:,.0f} MiB. The sharded in-place fix writes that tensor in a new shard plus",
        "the index and links every other file; the single-file fix rewrites `model.safetensors` (streamed with",
        "`copy_file_range`, never materialised), so it costs about one copy of the checkpoint.",
        "",
        *bc.machine_sentence(info),
        "",
    ]
    return "\n".join(lines)


def write_readme(section: str) -> None:
    """Replace the "## Fix" section of benchmarks/README.md (up to the next "## " heading) or append it."""
    bc.replace_readme_section(SECTION, section)


def main(argv: Sequence[str] | None = None) -> int:
    args = bc.parse_args(__doc__, argv)
    repeats = 1 if args.quick else 3
    sources = ensure_sources(args.workdir)
    scratch = args.workdir / "scratch-fix"
    scratch.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    for layout, src in sources.items():
        rows.extend(bench_layout(layout, src, scratch, repeats))
    section = render_section(rows, bc.machine_info(), repeats)
    print(section)
    if not args.no_readme:
        write_readme(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
