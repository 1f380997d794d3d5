"""Benchmark `tieaudit merge` against peft's merge_and_unload + save_pretrained on the Llama-3.2-1B-shaped base.

builders.py's tied base (`tied-clean`) and its real peft LoRA on q_proj / v_proj / embed_tokens, warm, in one run:

    tieaudit   tieaudit merge ADAPTER --base BASE --output-dir OUT -f json
    peft       from_pretrained(BASE, bf16), PeftModel.from_pretrained(ADAPTER), merge_and_unload(), save_pretrained()

then both outputs are loaded in float32 and their logits compared with the unmerged adapter's. What is measured and
the targets: benchmarks/README.md, "Merge"; the tables go to stdout and to the "merge" block of the README.

Usage: .venv/bin/python benchmarks/bench_merge.py [--workdir DIR] [--quick] [--no-readme]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import builders as b
import common as c

BLOCK = "merge"

PEFT_MERGE = """\
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.bfloat16)
model = PeftModel.from_pretrained(base, sys.argv[1])
model.merge_and_unload().save_pretrained(sys.argv[3])
"""

# float32 logits of the unmerged adapter and of each merged directory on the same ids (each model loaded alone)
VERIFY = """\
import gc, json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
ids = torch.arange(0, 128256, 128256 // 32)[None, :32]
def logits(model):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()
base = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32)
ref = logits(PeftModel.from_pretrained(base, sys.argv[1]).eval())
del base; gc.collect()
out = {"logit_scale": ref.abs().max().item()}
for name, path in zip(sys.argv[3::2], sys.argv[4::2]):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    got = logits(model)
    model.tie_weights()
    again = logits(model)
    out[name] = {"max_abs_logit_diff": (got - ref).abs().max().item(),
                 "after_tie_weights": (again - ref).abs().max().item(),
                 "top1_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                 "tie_word_embeddings": bool(model.config.tie_word_embeddings)}
    del model; gc.collect()
print(json.dumps(out))
"""


@dataclass
class Row(c.Runs):
    key: str  # "tieaudit" or "peft"
    command: str
    argv: list[str]
    runs: list[c.Run]
    bytes_out: int


def measure(key: str, command: str, argv: list[str], out: Path, scratch: Path, repeats: int, keep: Path) -> Row:
    """Warm, each run into a fresh OUT; the last output is kept at `keep` for verification."""
    runs = c.measure(argv, repeats, scratch, key, before=lambda: shutil.rmtree(out, ignore_errors=True))
    if any(r.exit != 0 for r in runs):
        raise RuntimeError(f"{command} failed (exit {runs[-1].exit}): {runs[-1].stderr[-2000:]}")
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    shutil.rmtree(keep, ignore_errors=True)
    out.rename(keep)
    return Row(key, command, argv, runs, size)


def verify(adapter: Path, base: Path, outputs: dict[str, Path]) -> dict[str, Any]:
    argv = [sys.executable, "-c", VERIFY, str(adapter), str(base)]
    for name, path in outputs.items():
        argv += [name, str(path)]
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **c.CHILD_ENV}, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"verification failed: {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def results_table(rows: Sequence[Row], logits: dict[str, Any]) -> str:
    def cells(r: Row) -> list[object]:
        x = logits[r.key]
        diff = f"max abs {x['max_abs_logit_diff']:.3g} (after `tie_weights()`: {x['after_tie_weights']:.3g})"
        rss, size = f"{r.peak_rss / c.MIB:,.0f} MiB", f"{r.bytes_out / c.MIB:,.0f} MiB"
        tied = str(x["tie_word_embeddings"]).lower()
        return [r.command, f"{r.wall_cell} s", rss, size, f"{diff}, top-1 {x['top1_agreement']:.3f}", tied]

    columns = ["command", "wall (min–max)", "peak RSS", "output size", "logits vs the unmerged adapter (float32)"]
    return c.table([*columns, "tied flag after"], map(cells, rows), "lrrrll")


def target_checks(rows: Sequence[Row], base_bytes: int) -> list[c.Check]:
    tie, peft = rows
    rss = f"{tie.peak_rss / c.MIB:,.0f} MiB"
    return [
        (tie.peak_rss < base_bytes, f"peak RSS below the size of the base ({base_bytes / c.MIB:,.0f} MiB): {rss}"),
        c.ratio_check(tie.wall <= peft.wall, "wall time no worse than peft's", tie.wall, peft.wall, "≤ 1×"),
    ]


def merge_facts(doc: dict[str, Any]) -> list[str]:
    """What tieaudit decided and measured, from its JSON output."""
    run = doc["merge_run"]
    group = run["groups"][0] if run["groups"] else {}
    worst = max((x for x in doc["comparisons"] if x["stage"] == "merged"), key=lambda x: x["max_abs_diff"])
    return [
        f"tieaudit's decision: the pair is **{group.get('result', '?')}** ({group.get('why', '')}); peft: "
        f"{group.get('peft_problem') or 'merges this group correctly'}",
        f"tieaudit's own check of every written weight against the adapter's run-time weight: worst max |Δ| "
        f"{worst['max_abs_diff']:.3g} ({worst['tensor']}); {len(run['merged'])} LoRA weights merged; it read "
        f"{run['base_bytes_read'] / c.MIB:,.0f} MiB of the base and wrote {run['bytes_written'] / c.MIB:,.0f} MiB",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = c.parse_args(__doc__, argv)
    started = time.perf_counter()
    base = b.ensure_base(args.workdir)
    adapter = b.ensure_adapter(args.workdir, base)
    exe = c.tieaudit_exe()
    with c.session(args.workdir, "scratch-merge-") as scratch:
        out = scratch / "out"
        kept = {"tieaudit": scratch / "merged-tieaudit", "peft": scratch / "merged-peft"}
        argv = [exe, "merge", str(adapter), "--base", str(base), "--output-dir", str(out), "-f", "json"]
        command = "`tieaudit merge ADAPTER --base BASE --output-dir OUT`"
        tie = measure("tieaudit", command, argv, out, scratch, args.repeats, kept["tieaudit"])
        argv = [sys.executable, "-c", PEFT_MERGE, str(adapter), str(base), str(out)]
        command = "peft `merge_and_unload()` + `save_pretrained()`"
        peft = measure("peft", command, argv, out, scratch, args.repeats, kept["peft"])
        logits = verify(adapter, base, kept)
    rows = [tie, peft]
    base_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    facts = [f"logit scale of the unmerged adapter on the probe ids: {logits['logit_scale']:.3g}"]
    facts += merge_facts(json.loads(tie.runs[-1].stdout))
    info = c.machine_info()
    print(results_table(rows, logits), "\n".join(f"- {f}" for f in facts), sep="\n\n")
    c.write_raw(args.workdir / "merge-results.json", info, args.repeats, rows=rows, logits=logits)
    if not args.no_readme:
        parts = [
            c.machine_block(info, c.protocol(args.repeats), time.perf_counter() - started),
            results_table(rows, logits),
            "\n".join(f"- {f}" for f in facts),
            "Target checks:\n\n" + c.check_lines(target_checks(rows, base_bytes)),
            "Command lines:\n\n" + "\n".join(f"- `{c.shell(r.argv, {PEFT_MERGE: 'PEFT_MERGE'})}`" for r in rows),
        ]
        c.write_generated(BLOCK, "\n\n".join(parts))
    return c.finish(target_checks(rows, base_bytes))


if __name__ == "__main__":
    raise SystemExit(main())
