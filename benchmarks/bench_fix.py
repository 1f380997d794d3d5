"""Benchmark `tieaudit fix --untie` on the Llama-3.2-1B-shaped checkpoint against copying the same bytes.

The checkpoint is builders.py's `tied-clean` weights with `tie_word_embeddings: false` (TIE002: the head would load
randomly initialised), in two layouts, `single` (model.safetensors) and `sharded` (3 shards + index), cached under
the work directory. For each: `cp -r`, `cp -r && sync`, `fix --untie --output-dir` and `fix --untie --in-place -y`
(on a fresh hard-linked copy each run), warm; the in-place result is re-audited and loaded with transformers. What is
measured: benchmarks/README.md, "Fix"; the tables go to stdout and to the "fix" block of the README.

Usage: .venv/bin/python benchmarks/bench_fix.py [--workdir DIR] [--quick] [--no-readme]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import builders as b
import common as c

BLOCK = "fix"
SHARD_BYTES = 1_000_000_000

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
class Row(c.Runs):
    layout: str
    command: str
    runs: list[c.Run]
    bytes_written: int | None
    note: str = ""
    problems: list[str] = field(default_factory=list)


def ensure_sources(workdir: Path) -> dict[str, Path]:
    """The TIE002 checkpoint in both layouts (built from tied-clean's weights, cached)."""
    clean = b.ensure_base(workdir)
    layouts = {"single": workdir / "fix-single", "sharded": workdir / "fix-sharded"}
    for layout, directory in layouts.items():
        if (directory / b.MARKER).exists():
            continue
        b.fresh_dir(directory)
        if layout == "single":
            b.link_or_copy(clean / b.WEIGHTS, directory / b.WEIGHTS)
        else:
            _shard(clean / b.WEIGHTS, directory)
        config = json.loads((clean / b.CONFIG).read_text())
        config["tie_word_embeddings"] = False
        (directory / b.CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (directory / "tokenizer_config.json").write_text('{"model_max_length": 131072}\n')
        (directory / b.MARKER).write_text("{}")
    return layouts


def _shard(weights: Path, dest: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    started = time.perf_counter()
    with safe_open(str(weights), "pt") as fh:
        groups: list[list[str]] = [[]]
        size = 0
        for name in sorted(fh.keys()):
            n = 2
            for d in fh.get_slice(name).get_shape():
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
    c.log(f"[build] sharded copy: {len(groups)} shards in {time.perf_counter() - started:.1f} s")


def fresh_copy(src: Path, dest: Path) -> Path:
    """A hard-linked copy: in-place fixes replace files, never write into the linked ones."""
    b.fresh_dir(dest)
    for p in src.iterdir():
        if p.name != b.MARKER:
            os.link(p, dest / p.name)
    return dest


def bench_layout(layout: str, src: Path, scratch: Path, repeats: int) -> list[Row]:
    """Warm, per command: OUT removed before each run, the in-place fix on a fresh hard-linked copy each run."""
    exe = c.tieaudit_exe()
    size = sum(p.stat().st_size for p in src.iterdir() if p.is_file())
    out, inplace = scratch / "out", scratch / "inplace"
    rows: list[Row] = []

    def add(command: str, argv: list[str], written: int | None = None, note: str = "", fresh: bool = False) -> Row:
        before = (lambda: fresh_copy(src, inplace)) if fresh else (lambda: shutil.rmtree(out, ignore_errors=True))
        runs = c.measure(argv, repeats, scratch, f"{layout} {command}", before=before)
        row = Row(layout, command, runs, written, note)
        if command.startswith("tieaudit"):
            fix = (c.last_json(runs[-1].stdout) or {}).get("fix_run") or {}
            row.bytes_written, row.note = fix.get("bytes_written"), f"fixed {fix.get('fixed')} of {fix.get('total')}"
            if fix.get("fixed") != 1 or fix.get("total") != 1 or {r.exit for r in runs} != {0}:
                row.problems.append(f"exit {sorted({r.exit for r in runs})}, {row.note}, expected exit 0, fixed 1 of 1")
        rows.append(row)
        return row

    add("cp -r PATH OUT", ["cp", "-r", str(src), str(out)], size, "the same bytes")
    add("cp -r PATH OUT && sync", ["sh", "-c", f"cp -r '{src}' '{out}' && sync -f '{out}'"], size, "durable, as fix is")
    add(
        "tieaudit fix PATH --untie --output-dir OUT",
        [exe, "fix", str(src), "--untie", "--output-dir", str(out), "-f", "json"],
    )
    argv = [exe, "fix", str(inplace), "--untie", "--in-place", "-y", "-f", "json"]
    row = add("tieaudit fix PATH --untie --in-place -y", argv, fresh=True)
    env = {**os.environ, **c.CHILD_ENV}
    proc = subprocess.run([sys.executable, "-c", VERIFY, str(inplace)], capture_output=True, text=True, env=env)
    check = subprocess.run([exe, "check", str(inplace), "-q"], capture_output=True, text=True, env=env)
    loaded = c.last_json(proc.stdout) or {}
    shown = json.dumps(loaded) if loaded else proc.stderr[-300:]
    row.note += f"; transformers: {shown}; re-check exit {check.returncode}"
    if not (loaded.get("equal") and loaded.get("separate")) or check.returncode != 0:
        row.problems.append("the fixed checkpoint does not load with lm_head == embedding, or its re-check failed")
    shutil.rmtree(inplace, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return rows


def results_table(rows: Sequence[Row]) -> str:
    def cells(r: Row) -> list[object]:
        written = "—" if r.bytes_written is None else f"{r.bytes_written / c.MIB:,.0f} MiB"
        rss = f"{r.peak_rss / c.MIB:,.0f} MiB"
        return [r.layout, f"`{r.command}`", f"{r.wall_cell} s", rss, written, r.exit, r.note]

    columns = ["layout", "command", "wall (min–max)", "peak RSS", "bytes written", "exit", "notes"]
    return c.table(columns, map(cells, rows), "llrrrrl")


def source_check(layout: str, src: Path) -> c.Check:
    """The premise: tieaudit finds the TIE002 the fix is for (exit 1)."""
    proc = subprocess.run([c.tieaudit_exe(), "check", str(src), "-f", "json"], capture_output=True, text=True)
    codes = sorted({f["code"] for f in (c.last_json(proc.stdout) or {}).get("findings", [])})
    ok = proc.returncode == 1 and "TIE002" in codes
    return (
        ok,
        f"{layout}: the source audits as TIE002 before the fix: exit {proc.returncode}, findings {codes or 'none'}",
    )


def target_checks(rows: Sequence[Row], premises: Sequence[c.Check]) -> list[c.Check]:
    return [*premises] + [
        (not r.problems, f"{r.layout}: `{r.command}` " + ("; ".join(r.problems) or "fixed 1 of 1, and the fix held"))
        for r in rows
        if r.command.startswith("tieaudit")
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = c.parse_args(__doc__, argv)
    started = time.perf_counter()
    sources = ensure_sources(args.workdir)
    with c.session(args.workdir, "scratch-fix-") as scratch:
        premises = [source_check(layout, src) for layout, src in sources.items()]
        rows = [row for layout, src in sources.items() for row in bench_layout(layout, src, scratch, args.repeats)]
    info = c.machine_info()
    checks = target_checks(rows, premises)
    print(results_table(rows))
    c.write_raw(args.workdir / "fix-results.json", info, args.repeats, rows=rows)
    if not args.no_readme:
        machine = c.machine_block(info, c.protocol(args.repeats), time.perf_counter() - started)
        c.write_generated(BLOCK, f"{machine}\n\n{results_table(rows)}\n\nTarget checks:\n\n{c.check_lines(checks)}")
    return c.finish(checks)


if __name__ == "__main__":
    raise SystemExit(main())
