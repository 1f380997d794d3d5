"""The files a fix writes: which weight files are rewritten or new, the final tensor map, and the new
``config.json`` and shard index text. Decided from the checkpoint and the plan, before anything is written."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tieaudit.repair.fix_plan import FixPlan
from tieaudit.repair.jsonedit import dump_like, set_json_values
from tieaudit.repair.tensor_files import Entry, write_bin, write_safetensors

if TYPE_CHECKING:
    from tieaudit.checkpoint import Checkpoint


@dataclass
class WeightOutput:
    """The weight files of the fixed checkpoint: what is rewritten, what is new, and the final tensor map."""

    rewritten: dict[str, list[Entry]] = field(default_factory=dict)  # file -> entries
    new_files: dict[str, list[Entry]] = field(default_factory=dict)
    final: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # tensor -> (file, nbytes, elements)

    @property
    def files_written(self) -> list[str]:
        return [*self.new_files, *self.rewritten]


def layout_weights(ckpt: Checkpoint, plan: FixPlan) -> WeightOutput:
    """Decide which weight files a plan rewrites or adds. Entries are (name, info of the data, data_from)."""
    out = WeightOutput()
    dropped = {d.name for d in plan.drops}
    replaced = {s.name: s for s in plan.stores if s.replace}
    added = [s for s in plan.stores if not s.replace]
    touched = {ckpt.tensors[n].file for n in dropped | set(replaced) if n in ckpt.tensors}
    single = len(ckpt.weight_files) == 1 and ckpt.index_file is None
    if added:
        if single:
            touched.add(ckpt.weight_files[0])
        else:
            ext = ".bin" if ckpt.weight_files[0].endswith(".bin") else ".safetensors"
            stem = "pytorch_model" if ext == ".bin" else "model"
            out.new_files[_free_name(ckpt.root, f"{stem}-tieaudit", ext)] = [
                (s.name, s.info, s.data_from) for s in added
            ]
    for rel in sorted(touched):
        entries: list[Entry] = []
        for info in ckpt.file_tensors(rel):
            if info.name in dropped:
                continue
            if info.name in replaced:
                s = replaced[info.name]
                entries.append((info.name, s.info, s.data_from))
            else:
                entries.append((info.name, info, info.name))
        if single and added:
            entries.extend((s.name, s.info, s.data_from) for s in added)
        out.rewritten[rel] = entries
    for name, info in ckpt.tensors.items():
        if name not in dropped:
            out.final[name] = (info.file, info.nbytes, math.prod(info.shape))
    for rel, entries in [*out.rewritten.items(), *out.new_files.items()]:
        for name, info, _ in entries:
            out.final[name] = (rel, info.nbytes, math.prod(info.shape))
    return out


def _free_name(root: Path, stem: str, ext: str) -> str:
    candidate, n = f"{stem}{ext}", 1
    while os.path.lexists(root / candidate):
        n += 1
        candidate = f"{stem}-{n}{ext}"
    return candidate


def new_config_text(ckpt: Checkpoint, plan: FixPlan) -> tuple[str, str] | None:
    """(old, new) text of config.json, or None when the plan leaves it alone."""
    if not plan.config or ckpt.config is None:
        return None
    old = _read_text(ckpt.root / ckpt.config.rel)
    return old, set_json_values(old, plan.config)


def new_index_text(ckpt: Checkpoint, plan: FixPlan, weights: WeightOutput) -> tuple[str, str] | None:
    """(old, new) text of the shard index, or None when it needs no change."""
    if ckpt.index_file is None:
        return None
    if not (weights.files_written or plan.rebuild_index or plan.drops):
        return None
    old = _read_text(ckpt.root / ckpt.index_file)
    data: dict[str, Any] = json.loads(old)
    old_map = data.get("weight_map", {})
    new_map = {name: file for name, (file, _, _) in weights.final.items()}
    if list(old_map) == sorted(old_map):
        new_map = dict(sorted(new_map.items()))
    data["weight_map"] = new_map
    meta = data.get("metadata")
    if isinstance(meta, dict) and "total_size" in meta:
        meta["total_size"] = sum(n for _, n, _ in weights.final.values())
    if isinstance(meta, dict) and "total_parameters" in meta:
        meta["total_parameters"] = sum(n for _, _, n in weights.final.values())
    new = dump_like(old, data)
    return (old, new) if new != old else None


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8").removeprefix("\ufeff")


def write_weight_files(ckpt: Checkpoint, weights: WeightOutput, staging: Path) -> int:
    """Write the rewritten and new weight files into ``staging``; return the bytes written."""
    total = 0
    for rel, entries in [*weights.new_files.items(), *weights.rewritten.items()]:
        dest = staging / rel
        if rel.endswith(".bin"):
            total += write_bin(ckpt, rel, entries, dest)
        else:
            meta = ckpt.file_metadata(rel) if rel in ckpt.weight_files else {"format": "pt"}
            total += write_safetensors(ckpt, entries, dest, meta)
    return total
