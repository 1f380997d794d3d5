"""Effective weights of a tied group under an adapter, and the forecast of PEFT's merge.

For each tied group of the base that the adapter touches, every member's weight is computed in row
chunks, in float32, two ways:

- run time: as the unmerged PeftModel uses it (LoRA: W0 + delta; modules_to_save: the trained copy;
  trainable tokens: W0 with the trained rows, applied to the tied head too, as peft does);
- merge -> save -> reload: PEFT's `merge_and_unload` adds every LoRA delta in place into the one
  Parameter the tied layers share (so a delta on one side lands on both, and tied LoRA factors land
  twice), replaces modules_to_save layers by their copies, unties the config when the input and output
  embeddings no longer share memory; `save_pretrained` keeps one tensor per storage, and transformers
  ties the pair again on load when the config says so.

Nothing here builds a model: the base and adapter tensors are read through row readers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tieaudit.adapters import AdapterSettings, ModuleEdit
from tieaudit.compare import TensorDiff, diff_tensors

if TYPE_CHECKING:
    import torch

RowReader = Callable[[int, int], "torch.Tensor"]
REL_TOL = 1e-5  # relative Frobenius difference above which two float32 weights are "different"

MECH_SHARED = "shared-parameter-merge"
MECH_DOUBLE = "double-merge-of-tied-factors"
MECH_SUM = "both-deltas-merged-into-one-weight"
MECH_DROPPED = "dropped-by-save-untied-config"


class TensorReader:
    """Reads rows of a stored tensor by name (a Checkpoint has `read_rows`)."""

    def __init__(self, ckpt: object) -> None:
        self._ckpt = ckpt

    def rows(self, name: str) -> RowReader:
        import torch

        read = self._ckpt.read_rows  # type: ignore[attr-defined]

        def reader(a: int, b: int) -> torch.Tensor:
            out: torch.Tensor = read(name, a, b).to(torch.float32)
            return out

        return reader

    def full(self, name: str, nrows: int) -> torch.Tensor:
        return self.rows(name)(0, nrows)


@dataclass(frozen=True)
class MemberForecast:
    name: str
    edit: ModuleEdit | None
    merge_diff: TensorDiff | None  # merge -> reload versus run time (None: dropped, random init)
    dropped: bool = False
    embedding_rows_diff: float | None = None  # max |Δ| of probe-token rows (times the embedding scale)


@dataclass(frozen=True)
class GroupForecast:
    source: str
    members: tuple[str, ...]
    adapter_diffs: dict[str, TensorDiff]  # target -> run-time source versus run-time target
    members_forecast: dict[str, MemberForecast]
    config_tied_after_merge: bool
    mechanisms: tuple[str, ...]

    def runtime_untied(self) -> list[str]:
        return [t for t, d in self.adapter_diffs.items() if differs(d)]

    def corrupted(self) -> list[str]:
        return [m for m, f in self.members_forecast.items() if f.dropped or (f.merge_diff and differs(f.merge_diff))]


def differs(d: TensorDiff) -> bool:
    return not d.bitwise_equal and (d.rel_diff is None or d.rel_diff > REL_TOL or d.rel_diff != d.rel_diff)


def forecast_group(
    source: str,
    members: tuple[str, ...],
    shape: tuple[int, int],
    w0: RowReader,
    edits: dict[str, ModuleEdit],
    adapter: TensorReader,
    settings: AdapterSettings,
    *,
    probes: int,
    probe_rows: list[int],
    embed_scale: float = 1.0,
) -> GroupForecast:
    """Run-time and merge-reload weights of one tied group, compared chunk by chunk."""

    vocab, hidden = shape
    deltas = {m: _delta_reader(e, adapter) for m, e in edits.items() if e.lora and not e.full_copy}
    copies = {m: adapter.rows(e.full_copy) for m, e in edits.items() if e.full_copy}
    token_edit = next((e for e in edits.values() if e.tokens), None)
    tokens = None
    if token_edit is not None and token_edit.tokens is not None:
        idx, key = token_edit.tokens
        tokens = (list(idx), adapter.full(key, len(idx)))

    def with_tokens(rows: torch.Tensor, a: int, b: int) -> torch.Tensor:
        if tokens is None:
            return rows
        for i, t in enumerate(tokens[0]):
            if a <= t < b:
                rows[t - a] = tokens[1][i]
        return rows

    def runtime(m: str) -> RowReader:
        if m in copies:
            return copies[m]
        delta = deltas.get(m)

        def read(a: int, b: int) -> torch.Tensor:
            w = w0(a, b)
            if delta is not None:
                w = w + delta(a, b)
            return with_tokens(w, a, b)

        return read

    def shared(a: int, b: int) -> torch.Tensor:
        w = w0(a, b)
        for delta in deltas.values():
            w = w + delta(a, b)
        return with_tokens(w, a, b)

    # storage classes after merge_and_unload: every layer still on the shared Parameter, and each copy
    # (with ensure_weight_tying peft keeps the copies tied to each other: one storage)
    classes: dict[str, list[str]] = {}
    for m in members:
        cls = ("copy" if settings.ensure_weight_tying else f"copy:{m}") if m in copies else "shared"
        classes.setdefault(cls, []).append(m)
    untied_after = len(classes) > 1  # PEFT's post-merge check: the data pointers differ
    reload: dict[str, RowReader | None] = {}
    if not untied_after:
        kept = members[0]
        value = copies.get(kept, shared)
        for m in members:
            reload[m] = value
    else:
        for names in classes.values():
            # save_pretrained keeps one name per storage; the config is untied, so the others load random
            for i, m in enumerate(names):
                reload[m] = (copies.get(m, shared)) if i == 0 else None

    mechanisms = []
    lora_members = [m for m in members if m in deltas]
    if lora_members and not untied_after:
        if len(lora_members) > 1 and settings.ensure_weight_tying:
            mechanisms.append(MECH_DOUBLE)
        elif len(lora_members) < len(members):
            mechanisms.append(MECH_SHARED)
        else:
            mechanisms.append(MECH_SUM)
    if any(v is None for v in reload.values()):
        mechanisms.append(MECH_DROPPED)

    adapter_diffs = {t: diff_tensors(runtime(source), runtime(t), shape, probes=probes) for t in members if t != source}
    per_member = {}
    for m in members:
        r = reload[m]
        if r is None:
            per_member[m] = MemberForecast(m, edits.get(m), None, dropped=True)
            continue
        d = diff_tensors(r, runtime(m), shape, probes=probes)
        rows_diff = _rows_diff(r, runtime(m), probe_rows) * embed_scale if probe_rows else None
        per_member[m] = MemberForecast(m, edits.get(m), d, embedding_rows_diff=rows_diff)
    del vocab, hidden
    return GroupForecast(source, members, adapter_diffs, per_member, not untied_after, tuple(mechanisms))


def _rows_diff(a: RowReader, b: RowReader, rows: list[int]) -> float:
    worst = 0.0
    for t in rows:
        worst = max(worst, float((a(t, t + 1) - b(t, t + 1)).abs().max()))
    return worst


def _delta_reader(edit: ModuleEdit, adapter: TensorReader) -> RowReader:
    """Rows of the LoRA delta, shaped like the weight ([vocab, hidden] for both layer kinds)."""

    lora = edit.lora
    assert lora is not None
    a_info_rows = _nrows(adapter, lora.a)
    b_info_rows = _nrows(adapter, lora.b)
    a = adapter.full(lora.a, a_info_rows)
    b = adapter.full(lora.b, b_info_rows)
    s = lora.scaling
    if lora.kind == "embedding":
        # A [r, vocab], B [hidden, r]: delta = (B @ A).T * s, rows a..b = A[:, a:b].T @ B.T
        def embed_rows(start: int, stop: int) -> torch.Tensor:
            return (a[:, start:stop].T @ b.T) * s

        return embed_rows

    # Linear: A [r, in], B [out, r]: delta = B @ A * s
    def linear_rows(start: int, stop: int) -> torch.Tensor:
        return (b[start:stop] @ a) * s

    return linear_rows


def _nrows(adapter: TensorReader, name: str) -> int:
    tensors = adapter._ckpt.tensors  # type: ignore[attr-defined]
    shape: tuple[int, ...] = tensors[name].shape
    return shape[0]
