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

Nothing here builds a model: the base and adapter tensors are read in row chunks. Groups of LoRA deltas and
trainable tokens are compared from the factors (`tieaudit.adapter.lowrank`, numpy only); a group with a full copy is
streamed through torch.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tieaudit.adapter.files import AdapterSettings, LoraPart, ModuleEdit
from tieaudit.checkpoint.arrays import Scratch
from tieaudit.threads import reader_thread, size_torch
from tieaudit.ties.compare import (
    LogitCache,
    StreamingDiff,
    TensorDiff,
    probe_hidden_states,
    probe_states,
    rows_per_chunk,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

    from tieaudit.checkpoint import Checkpoint

RowReader = Callable[[int, int], "torch.Tensor"]
REL_TOL = 1e-5  # relative Frobenius difference above which two float32 weights are "different"

MECH_SHARED = "shared-parameter-merge"
MECH_DOUBLE = "double-merge-of-tied-factors"
MECH_SUM = "both-deltas-merged-into-one-weight"
MECH_DROPPED = "dropped-by-save-untied-config"
# what each mechanism does, in the words of TIE102 and of `tieaudit merge`
MECHANISM_TEXT = {
    MECH_SHARED: "PEFT merges the LoRA delta in place into the one weight the tied layers share, so the layer "
    "that was not adapted changes too",
    MECH_DOUBLE: "the tied LoRA factors (ensure_weight_tying) are merged once per tied layer into the one shared "
    "weight: the delta is added twice (W0 + 2ΔE)",
    MECH_SUM: "both layers' deltas are merged into the one shared weight (W0 + ΔE + ΔL), which neither layer used",
    MECH_DROPPED: "after the merge the config is untied but a layer still shares memory with another: "
    "save_pretrained drops it and it loads randomly initialised",
}


class TensorReader:
    """Reads rows of a stored tensor by name (a Checkpoint has `read_rows`)."""

    def __init__(self, ckpt: object) -> None:
        self._ckpt = ckpt

    def rows(self, name: str) -> RowReader:
        import torch

        size_torch(torch)

        read = self._ckpt.read_rows  # type: ignore[attr-defined]

        def reader(a: int, b: int) -> torch.Tensor:
            out: torch.Tensor = read(name, a, b).to(torch.float32)
            return out

        return reader

    def full(self, name: str) -> torch.Tensor:
        """The whole tensor (small ones only: LoRA factors, trainable-token rows)."""
        nrows: int = self._ckpt.tensors[name].shape[0]  # type: ignore[attr-defined]
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


@dataclass(frozen=True)
class GroupInput:
    """One tied group of the base that an adapter edits: what `forecast_group` needs besides the two checkpoints."""

    source: str
    members: tuple[str, ...]
    shape: tuple[int, int]
    w0_name: str  # the stored base tensor the members start from
    edits: dict[str, ModuleEdit]
    settings: AdapterSettings
    probes: int  # seeded probe states for the logit comparisons (0: weights only)
    probe_rows: list[int]  # embedding rows compared as outputs
    embed_scale: float = 1.0  # the embedding's output scale (Gemma: sqrt(hidden_size))
    transposed: frozenset[str] = frozenset()  # members stored transposed (Conv1D)


METHODS = ("auto", "lowrank", "stream")


def forecast_group(
    group: GroupInput,
    base: Checkpoint,
    adapter: Checkpoint,
    method: str = "auto",
    tee: Callable[[int, np.ndarray], None] | None = None,
) -> GroupForecast:
    """Run-time and merge-reload weights of one tied group, compared.

    ``method``: "lowrank" computes every comparison from the LoRA factors and one pass over W0 (numpy, see
    `tieaudit.adapter.lowrank`); "stream" materialises every weight chunk by chunk (torch; the reference the low-rank
    path is tested against); "auto" takes "lowrank" unless a member is a full `modules_to_save` copy, which only
    streaming can compare. ``tee(start_row, stored bytes)`` sees the base rows the low-rank path reads (once each),
    so a check of the same rows needs no second read."""
    if method not in METHODS:
        raise ValueError(f"unknown forecast method {method!r} (expected one of {', '.join(METHODS)})")
    source, members, shape, edits, settings = group.source, group.members, group.shape, group.edits, group.settings
    w0_name, probe_rows, embed_scale = group.w0_name, group.probe_rows, group.embed_scale
    structure = peft_merge_structure(members, edits, settings)
    has_copy = any(e.full_copy for e in edits.values())
    if method == "lowrank" and has_copy:
        raise ValueError("the low-rank forecast cannot compare full modules_to_save copies")
    inner = _Group(source, members, shape, edits, settings, structure, group.probes, probe_rows, group.transposed)
    if method == "stream" or has_copy:
        adapter_diffs, merge_diffs, rows_worst = _stream_group(
            inner, TensorReader(base).rows(w0_name), TensorReader(adapter)
        )
    else:
        adapter_diffs, merge_diffs, rows_worst = _lowrank_group(inner, base, w0_name, adapter, tee)
    per_member = {}
    for m in members:
        if m not in merge_diffs:
            per_member[m] = MemberForecast(m, edits.get(m), None, dropped=True)
            continue
        rows_diff = rows_worst[m] * embed_scale if probe_rows else None
        per_member[m] = MemberForecast(m, edits.get(m), merge_diffs[m], embedding_rows_diff=rows_diff)
    return GroupForecast(source, members, adapter_diffs, per_member, not structure.untied_after, structure.mechanisms)


GroupDiffs = tuple[dict[str, TensorDiff], dict[str, TensorDiff], dict[str, float]]


@dataclass(frozen=True)
class _Group:
    """What both forecast paths need of one tied group."""

    source: str
    members: tuple[str, ...]
    shape: tuple[int, int]
    edits: dict[str, ModuleEdit]
    settings: AdapterSettings
    structure: MergeStructure
    probes: int
    probe_rows: list[int]
    transposed: frozenset[str]


def _lowrank_group(
    g: _Group, base: Checkpoint, w0_name: str, adapter: Checkpoint, tee: Callable[[int, np.ndarray], None] | None
) -> GroupDiffs:
    """The comparisons of `_stream_group`, from the factors (no full copy in the group)."""
    source, members, shape, edits, transposed = g.source, g.members, g.shape, g.edits, g.transposed
    import numpy as np

    from tieaudit.adapter.lowrank import (  # lazy: the rules import this module at start-up
        Factor,
        LowRankWeight,
        compare_lowrank,
    )

    def full(key: str) -> np.ndarray:
        return adapter.read_float32(key, 0, adapter.row_count(key))

    factors: list[Factor] = []
    uses: dict[str, int] = {}  # member -> its delta in factors
    for m, e in edits.items():
        if e.lora is None:
            continue
        a, b = full(e.lora.a), full(e.lora.b)
        left, right = (a.T, b.T) if e.lora.kind == "embedding" or m in transposed else (b, a)
        f = Factor(np.ascontiguousarray(left), np.ascontiguousarray(right * np.float32(e.lora.scaling)))
        # factors tied by ensure_weight_tying are one delta: equal weights must come out bitwise equal
        same = [k for k, g in enumerate(factors) if np.array_equal(g.left, f.left) and np.array_equal(g.right, f.right)]
        uses[m] = same[0] if same else len(factors)
        if not same:
            factors.append(f)
    member_tokens = runtime_tokens(members, edits, g.settings)
    loaded: dict[str, dict[int, np.ndarray]] = {}  # adapter key -> row -> values, each read once
    for tok in member_tokens.values():
        if tok is not None and tok[1] not in loaded:
            values = full(tok[1])
            loaded[tok[1]] = {int(t): values[i] for i, t in enumerate(tok[0])}

    def with_deltas(rows: dict[int, np.ndarray], coeffs: tuple[float, ...]) -> dict[int, np.ndarray]:
        # a LoRA layer wraps the token adapter: it adds its delta to the token-replaced rows too
        return {
            r: v + sum((c * (factors[k].left[r] @ factors[k].right) for k, c in enumerate(coeffs) if c), np.float32(0))
            for r, v in rows.items()
        }

    runtime = {}
    for m in members:
        coeffs = tuple(1.0 if uses.get(m) == k else 0.0 for k in range(len(factors)))
        tok = member_tokens[m]
        runtime[m] = LowRankWeight(coeffs, with_deltas(loaded[tok[1]], coeffs) if tok is not None else {})
    merged_rows: dict[int, np.ndarray] = {}
    for rows in loaded.values():  # every wrapped layer writes its rows into the one shared weight
        merged_rows.update(rows)
    merged_coeffs = tuple(float(list(uses.values()).count(k)) for k in range(len(factors)))
    # peft's merge writes the token rows into the shared weight, then adds each LoRA delta to all of it
    merged = LowRankWeight(merged_coeffs, with_deltas(merged_rows, merged_coeffs))
    targets = [t for t in members if t != source]
    merge_members = [m for m in members if g.structure.reload[m] is not None]
    pairs = [(runtime[source], runtime[t]) for t in targets] + [(merged, runtime[m]) for m in merge_members]
    h = probe_states(g.probes, shape[1]) if g.probes > 0 else None
    # with read-ahead, compare_lowrank holds one chunk while the next is read: two buffers, taken in turn
    ring = [Scratch(), Scratch()]
    reads = itertools.count()

    def w0(a: int, b: int) -> np.ndarray:
        return base.read_float32(w0_name, a, b, tee, ring[next(reads) % 2])

    with reader_thread() as ahead:
        results = compare_lowrank(w0, shape, factors, pairs, h=h, probe_rows=g.probe_rows, read_ahead=ahead)
    adapter_diffs = {t: results[k].diff for k, t in enumerate(targets)}
    merge_results = dict(zip(merge_members, results[len(targets) :], strict=True))
    return (
        adapter_diffs,
        {m: r.diff for m, r in merge_results.items()},
        {m: r.probe_rows_max for m, r in merge_results.items()},
    )


def _stream_group(g: _Group, w0: RowReader, adapter: TensorReader) -> GroupDiffs:
    """Every weight of the group materialised a row chunk at a time (torch), and compared."""
    source, members, shape, edits, transposed = g.source, g.members, g.shape, g.edits, g.transposed
    settings, structure, probes, probe_rows = g.settings, g.structure, g.probes, g.probe_rows
    vocab, hidden = shape
    deltas = {
        m: DeltaRows(e.lora, adapter, transposed=m in transposed)
        for m, e in edits.items()
        if e.lora and not e.full_copy
    }
    copies = {m: adapter.rows(e.full_copy) for m, e in edits.items() if e.full_copy}
    member_tokens = runtime_tokens(members, edits, settings)
    loaded: dict[str, TokenRows | None] = {}  # adapter key -> rows, each read once
    for tok in member_tokens.values():
        if tok is not None and tok[1] not in loaded:
            loaded[tok[1]] = load_tokens(tok, adapter)
    tokens = {m: loaded[tok[1]] if tok is not None else None for m, tok in member_tokens.items()}

    def with_tokens(rows: torch.Tensor, a: int, b: int, m: str | None = None) -> torch.Tensor:
        # m None: the shared weight after peft's merge, into which every wrapped layer writes its rows
        for t in [tokens[m]] if m is not None else loaded.values():
            apply_tokens(rows, a, b, t)
        return rows

    reload = structure.reload
    # one pass over the rows: W0 and each delta are read once per chunk, and the probe logits of every
    # distinct tensor are computed once per chunk, whatever the number of comparisons that use it
    targets = [t for t in members if t != source]
    adapter_acc = {t: StreamingDiff(probes, hidden) for t in targets}
    merge_acc = {m: StreamingDiff(probes, hidden) for m in members if reload[m] is not None}
    rows_worst = dict.fromkeys(merge_acc, 0.0)
    h = probe_hidden_states(probes, hidden) if probes > 0 else None
    step = rows_per_chunk(shape)
    for start in range(0, vocab, step):
        stop = min(vocab, start + step)
        w = w0(start, stop)
        d = {m: delta(start, stop) for m, delta in deltas.items()}
        held = {m: copies[m](start, stop) for m in copies}
        # a LoRA layer wraps the token adapter: its delta is added to the token-replaced rows too
        rt = {m: held[m] if m in held else with_tokens(w.clone(), start, stop, m) + d.get(m, 0.0) for m in members}
        # peft's merge writes the token rows into the shared weight, then adds each LoRA delta to all of it
        merged_rows = with_tokens(w.clone(), start, stop)
        for value in d.values():
            merged_rows = merged_rows + value
        logits = LogitCache(h) if h is not None else None
        for t in targets:
            adapter_acc[t].update(start, rt[source], rt[t], logits)
        for m, acc in merge_acc.items():
            src = reload[m]
            after = merged_rows if src == "shared" else held[str(src)]
            acc.update(start, after, rt[m], logits)
            for row in probe_rows:
                if start <= row < stop:
                    gap = float((after[row - start] - rt[m][row - start]).abs().max())
                    rows_worst[m] = max(rows_worst[m], gap)
        del w, d, held, rt, merged_rows, logits
    return (
        {t: acc.result() for t, acc in adapter_acc.items()},
        {m: acc.result() for m, acc in merge_acc.items()},
        rows_worst,
    )


@dataclass(frozen=True)
class MergeStructure:
    """What PEFT's merge_and_unload -> save_pretrained -> from_pretrained does to a tied group, from the edits
    alone: which weight each member reloads with ("shared": the one merged shared weight; a member name: that
    member's trained copy; None: dropped by the save, random init), whether PEFT unties the config, and why the
    result differs from the adapter (mechanisms)."""

    reload: dict[str, str | None]
    untied_after: bool
    mechanisms: tuple[str, ...]


def peft_merge_structure(
    members: tuple[str, ...], edits: dict[str, ModuleEdit], settings: AdapterSettings
) -> MergeStructure:
    copies = {m for m, e in edits.items() if e.full_copy}
    lora = {m for m, e in edits.items() if e.lora and not e.full_copy}
    # storage classes after merge_and_unload: every layer still on the shared Parameter, and each copy
    # (with ensure_weight_tying peft keeps the copies tied to each other: one storage)
    classes: dict[str, list[str]] = {}
    for m in members:
        # a copy peft wraps (modules_to_save) is its own storage after the merge; a plain weight the file holds for a
        # layer peft does not wrap was loaded into the base's parameter, and stays in its storage
        wrapped = m in copies and edits[m].named_in_config
        cls = ("copy" if settings.ensure_weight_tying else f"copy:{m}") if wrapped else "shared"
        classes.setdefault(cls, []).append(m)
    untied_after = len(classes) > 1  # PEFT's post-merge check: the data pointers differ
    reload: dict[str, str | None] = {}
    if not untied_after:
        kept = members[0]
        for m in members:
            reload[m] = kept if kept in copies else "shared"
    else:
        for names in classes.values():
            # save_pretrained keeps one name per storage (transformers' remove_tied_weights_from_state_dict: the
            # group's source when it shares it, else the last declared target in sorted order); the config is
            # untied, so the others load random
            kept = members[0] if members[0] in names else sorted(names)[-1]
            for m in names:
                reload[m] = (m if m in copies else "shared") if m == kept else None
    mechanisms = []
    lora_members = [m for m in members if m in lora]
    if lora_members and not untied_after:
        if len(lora_members) > 1 and settings.ensure_weight_tying:
            mechanisms.append(MECH_DOUBLE)
        elif len(lora_members) < len(members):
            mechanisms.append(MECH_SHARED)
        else:
            mechanisms.append(MECH_SUM)
    if any(v is None for v in reload.values()):
        mechanisms.append(MECH_DROPPED)
    return MergeStructure(reload, untied_after, tuple(mechanisms))


class DeltaRows:
    """Rows of a LoRA delta, shaped like the stored weight: ``delta(start, stop)``, or ``delta(start, stop, w)`` for
    ``w + delta`` computed in one fused pass (``w``, float32 rows start..stop of the weight, is consumed).

    Embedding (A [r, vocab], B [hidden, r]) and a Linear stored [in, out] (transformers' Conv1D, where peft
    forces fan_in_fan_out): delta = (B @ A).T * s, so rows a..b are A[:, a:b].T @ B.T * s. A plain Linear
    (A [r, in], B [out, r]): delta = B @ A * s, rows a..b are B[a:b] @ A * s.
    """

    def __init__(self, lora: LoraPart, adapter: TensorReader, *, transposed: bool = False) -> None:
        self.flip = lora.kind == "embedding" or transposed
        a, b = adapter.full(lora.a), adapter.full(lora.b)
        # (left rows, right) so that rows start..stop of the delta are left[start:stop] @ right * s
        self.left, self.right = (a.T, b.T) if self.flip else (b, a)
        self.s = lora.scaling

    def __call__(self, start: int, stop: int, w: torch.Tensor | None = None) -> torch.Tensor:
        left = self.left[start:stop]
        if w is None:
            return (left @ self.right) * self.s
        return w.addmm_(left, self.right, alpha=self.s)


TokenRows = tuple[list[int], "torch.Tensor"]  # trainable-token indices and their trained rows
TokenEdit = tuple[tuple[int, ...], str]  # trainable-token indices and the adapter key of their rows


def runtime_tokens(
    members: tuple[str, ...], edits: Mapping[str, ModuleEdit], settings: AdapterSettings
) -> dict[str, TokenEdit | None]:
    """The trainable tokens each member of a tied group uses at run time, as peft 0.21 wires them.

    Each layer named in ``trainable_token_indices`` gets its own rows. On a tied base, peft ties the other members
    (the head) to the input embedding's token adapter when the embedding has one and either
    ``ensure_weight_tying`` is set or every listed tied layer names the same indices: the head then uses the
    embedding's rows (``members[0]`` is the group's source, the input embedding)."""
    own = {m: edits[m].tokens if m in edits else None for m in members}
    source = own[members[0]]
    if source is None:
        return own
    mismatch = any(t is not None and tuple(t[0]) != tuple(source[0]) for t in (own[m] for m in members[1:]))
    if settings.ensure_weight_tying or not mismatch:
        for m in members[1:]:
            own[m] = source
    return own


def load_tokens(tokens: TokenEdit | None, adapter: TensorReader) -> TokenRows | None:
    if tokens is None:
        return None
    return list(tokens[0]), adapter.full(tokens[1])


def apply_tokens(rows: torch.Tensor, start: int, stop: int, tokens: TokenRows | None) -> torch.Tensor:
    """Replace (in place) the rows of ``rows`` (rows start..stop of a weight) that trainable tokens own."""
    if tokens is None:
        return rows
    for i, t in enumerate(tokens[0]):
        if start <= t < stop:
            rows[t - start] = tokens[1][i]
    return rows
