"""`tieaudit merge`: merge a LoRA adapter into its base so that the merged model computes what the adapter did.

1. Read the adapter against the base: every adapter tensor must belong to a module of the base and fit its shape
   (`merge_plan.adapter_edits`); the base's own tying must be sound.
2. For every tied group of the base that the adapter touches, decide from the adapter's own tensors whether the
   unmerged adapter gives every member the same weight (`merge_plan.runtime_equal`): then the group stays tied,
   else it is untied (config edits from the fix planner, checked with transformers).
3. Stream the merged model into a staging directory next to the destination, tensor by tensor and row chunk by
   row chunk: untouched tensors are copied file to file, edited ones computed in float32 from the base (read
   with ``pread``, never the whole model) and cast to the base's dtype. Each written chunk is compared with the
   run-time weight of every parameter that loads it: the report's ``merged`` comparisons.
4. Carry the base's other files (tokenizer, generation config; the adapter's tokenizer when it has one), write
   the index and ``config.json``, fsync, re-audit the staged model, and move it into place with one rename.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tieaudit.adapter.analysis import applied_edits, base_copy_mismatches, base_graph, same_bytes
from tieaudit.adapter.confirm import MIN_PROBES, gap, probe_inputs
from tieaudit.adapter.files import PREFIX, read_settings, resolve_base
from tieaudit.adapter.forecast import (
    MECHANISM_TEXT,
    DeltaRows,
    TensorReader,
    apply_tokens,
    load_tokens,
    peft_merge_structure,
    runtime_tokens,
)
from tieaudit.adapter.oracle import MAX_BYTES, OracleUnavailable, ask_peft, probe_checkpoint
from tieaudit.auditing import _gib, audit, severity
from tieaudit.checkpoint import open_checkpoint
from tieaudit.checkpoint.config import load_dtype
from tieaudit.checkpoint.hub import resolve
from tieaudit.checkpoint.pickled import torch_dtype
from tieaudit.errors import InputError, UsageError, WriteError
from tieaudit.model import Comparison, FileChange, MergeGroup, MergeRun, Progress, Report, Severity, Skipped
from tieaudit.repair.fix_plan import FixRefused, untie_config
from tieaudit.repair.jsonedit import dump_like, set_json_values
from tieaudit.repair.merge_plan import (
    MergeLayout,
    MergeRefused,
    OutTensor,
    Recipe,
    adapter_edits,
    base_values,
    broken_base,
    plan_merge,
    runtime_equal,
    tied_groups,
    unsupported_variant,
    wrapper_aliases,
)
from tieaudit.repair.oracle import LibraryOracle
from tieaudit.repair.staging import (
    check_output_dir,
    clean_stale_staging,
    commit_output_dir,
    current_umask,
    fsync_tree,
    staged,
    step,
    write_text,
)
from tieaudit.repair.tensor_files import Entry, write_safetensors
from tieaudit.ties.compare import LogitCache, StreamingDiff, probe_hidden_states, rows_per_chunk

if TYPE_CHECKING:
    import numpy as np
    import torch

    from tieaudit.adapter.files import AdapterSettings
    from tieaudit.adapter.forecast import TensorReader
    from tieaudit.adapter.oracle import OracleResult
    from tieaudit.checkpoint import Checkpoint
    from tieaudit.ties.compare import StreamingDiff


SUPPORTED = ("LORA",)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".npz")
TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "tokenizer.model",
        "spiece.model",
        "sentencepiece.bpe.model",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "chat_template.jinja",
        "chat_template.json",
    }
)
# the largest relative (Frobenius) difference that rounding a float32 merge to the stored dtype explains
ROUNDING = {"F64": 1e-6, "F32": 1e-6, "F16": 2.0**-10, "BF16": 2.0**-7}
_NOT_CARRIED = frozenset({"config.json", "adapter_config.json", "model.safetensors.index.json"})


def merge(
    adapter: str | os.PathLike[str],
    *,
    output_dir: str | os.PathLike[str],
    base: str | os.PathLike[str] | None = None,
    fail_on: str | Severity = Severity.WARNING,
    exit_zero: bool = False,
    probe_tokens: int = 64,
    progress: Progress | None = None,
    revision: str | None = None,
    peft_max_memory: float | None = None,
) -> Report:
    """Merge the LoRA adapter at ``adapter`` (a directory, or a Hub repo id in the local cache at ``revision``) into
    its base and write the merged model to ``output_dir``.

    Returns the audit report of the merged model; ``report.merge_run`` says what was decided and written, and
    ``report.comparisons`` (stage ``merged``) how far each written weight is from the one the unmerged adapter
    uses. Raises `TieauditError` subclasses (exit 2) for bad input or a failed write; nothing is written then.
    """

    started = time.perf_counter()
    fail_level = severity(fail_on)
    if probe_tokens < 0:
        raise UsageError(f"probe_tokens must be >= 0, got {probe_tokens}")

    display = resolve(adapter, revision).path
    with contextlib.ExitStack() as stack:
        ad = stack.enter_context(open_checkpoint(display))
        if ad.kind != "adapter" or ad.adapter_config is None:
            raise UsageError(f"{display} is not a PEFT adapter (no adapter_config.json); `tieaudit fix` repairs models")
        settings = read_settings(ad.adapter_config)
        if settings.peft_type not in SUPPORTED:
            raise InputError(
                f"adapter_config.json:/peft_type is {settings.peft_type}: tieaudit merge merges LoRA adapters only"
            )
        variant = unsupported_variant(ad.adapter_config.data)
        if variant:
            raise InputError(f"cannot merge {display}: tieaudit does not merge {variant}")
        adapter_dir = Path(display) if Path(display).is_dir() else Path(ad.root)
        base_path, how = resolve_base(None if base is None else os.fspath(base), settings, adapter_dir)
        if base_path is None:
            raise UsageError(f"cannot merge without the base: {how}")
        dest = check_output_dir(output_dir, [Path(ad.root), base_path], "the adapter and base directories")
        clean_stale_staging(dest)
        base_ckpt = stack.enter_context(open_checkpoint(base_path))
        if base_ckpt.kind != "model":
            raise InputError(f"base {base_path} is itself an adapter; pass the base model directory")
        if base_ckpt.config is None:
            raise InputError(f"base {base_path} has no config.json")
        if base_ckpt.index_file is None and len(base_ckpt.weight_files) > 1:
            raise InputError(f"base {base_path}: several weight files and no shard index")
        if progress:
            progress("reading the base's tie graph", 0, 0)
        # the adapter's base copies are compared with the base while transformers is imported for the tie graph
        copies = _BaseCopyCheck(ad, base_ckpt)
        try:
            job = _prepare(ad, base_ckpt, settings, copies)
        except MergeRefused as exc:
            raise InputError(f"cannot merge {display}: {exc}") from None
        finally:
            copies.thread.join()  # never leave it reading files the stack is about to close
        if progress:
            progress("asking peft how the adapter runs its tied layers", 0, 0)
        check = PeftCheck.ask(base_ckpt, Path(ad.root), job.verify, settings, probe_tokens, _gib(peft_max_memory))
        after, written, comparisons = _write(
            ad, base_ckpt, job, dest, fail_level, exit_zero, probe_tokens, progress, check
        )
        base_read = base_ckpt.stats.tensor_bytes
    run = MergeRun(
        adapter_path=display,
        base_path=os.fspath(base_path),
        written_to=os.fspath(output_dir),
        groups=job.groups,
        merged=job.layout.merged,
        replaced=job.layout.replaced,
        changes=tuple(job.changes),
        bytes_written=written,
        base_bytes_read=base_read,
        seconds=round(time.perf_counter() - started, 3),
        notes=job.notes,
        verified_by=check.verified_by,
    )
    target = replace(after.target, path=os.fspath(output_dir), base=os.fspath(base_path))
    return replace(after, target=target, comparisons=(*after.comparisons, *comparisons), merge_run=run)


@dataclass(frozen=True)
class _Job:
    """Everything decided before writing."""

    layout: MergeLayout
    config: Mapping[str, Any]  # config.json edits: JSON pointer -> new value
    groups: tuple[MergeGroup, ...]
    changes: list[FileChange]
    notes: tuple[str, ...]
    logit_params: frozenset[str]  # members of tie groups: their comparisons include probe logits
    verify: Mapping[str, str]  # members of the tied groups the adapter touches -> the base tensor each loads


def _prepare(ad: Checkpoint, base_ckpt: Checkpoint, settings: AdapterSettings, copies: _BaseCopyCheck) -> _Job:

    skipped: list[Skipped] = []
    graph, _ = base_graph(base_ckpt, skipped)
    if graph.declared is None:
        why = skipped[0].reason if skipped else "unknown model class"
        raise MergeRefused(f"the base's declared ties are unknown ({why}): tieaudit merges only ties it can check")
    broken = broken_base(graph)
    if broken:
        raise MergeRefused(f"{broken}: the base's own tying is broken; run `tieaudit check` on it and fix it first")
    values = base_values(graph, base_ckpt.tensors)
    edits = adapter_edits(ad.tensors, settings, values, graph.declared.transposed)
    # peft loads every saved `base_layer` copy over the base's weight: each must be the base's, tied or not
    stored = {param: info.name for param, info in values.items()}
    mismatches = base_copy_mismatches(ad, base_ckpt, stored, edits, set(), copies.proven_equal())
    if mismatches:
        m = mismatches[0]
        raise MergeRefused(f"{m.detail} (max |diff| {m.max_abs_diff:.3g}): the adapter was trained on another base")
    same = _AdapterTensorsEqual(ad)
    for alias, key in wrapper_aliases(ad.tensors, edits).items():
        if not same(alias, key, False):
            raise MergeRefused(f"the adapter holds two different trained copies of one layer: {alias} and {key}")
    applied, ignored = applied_edits(graph, edits, settings)
    applied = {k: v for k, v in applied.items() if v.changes_weight}
    notes = [f"adapter weights for {name} are not merged: {why} (peft ignores them too)" for name, why in ignored]

    transposed = graph.declared.transposed
    keep: dict[str, bool] = {}
    groups: list[MergeGroup] = []
    pointers: set[str] = set()
    for source, members, _ in tied_groups(graph):
        group_edits = {m: applied[m] for m in members if m in applied}
        if not group_edits:
            continue
        tokens = runtime_tokens(members, group_edits, settings)
        equal = runtime_equal(members, group_edits, tokens, transposed, same)
        keep[source] = equal
        if equal:
            why = "the adapter gives every member the same weight: one stored tensor, the shared edit applied once"
        else:
            edited = ", ".join(m for m in members if m in group_edits)
            why = f"the adapter edits {edited} differently from the rest of the group: each stored, tie flag false"
            pointers.update(p.flag.pointer for p in graph.pairs if p.source == source and p.flag is not None)
        structure = peft_merge_structure(members, group_edits, settings)
        problem = "; ".join(MECHANISM_TEXT[m] for m in structure.mechanisms) or None
        groups.append(MergeGroup(source, members, "tied" if equal else "untied", why, structure.mechanisms, problem))

    untied_active = None
    config: dict[str, Any] = {}
    config_old: dict[str, Any] = {}
    if pointers:
        assert base_ckpt.config is not None
        try:
            oracle = LibraryOracle(base_ckpt, load_dtype(base_ckpt.config))
            uc = untie_config(graph, base_ckpt.config, sorted(pointers), oracle)
        except FixRefused as exc:
            raise MergeRefused(f"the adapter unties a tied pair, but {exc}") from None
        untied_active, config, config_old = uc.active, dict(uc.changes), dict(uc.old)
        notes.extend(uc.notes)
    layout = plan_merge(
        graph,
        base_ckpt.tensors,
        list(base_ckpt.weight_files),
        base_ckpt.index_file,
        applied,
        settings,
        keep,
        untied_active,
    )
    changes = _changes(layout, config, config_old)
    in_groups = frozenset(m for g in graph.groups for m in g.members)
    # peft checks every member of every declared group, tied in the base or not, edited by the adapter as tieaudit
    # reads it or not: what tieaudit's own reading misses is what the check is for
    verify = {m: values[m].name for g in graph.groups for m in g.members if m in values and len(values[m].shape) == 2}
    return _Job(layout, config, tuple(groups), changes, tuple(notes), in_groups, verify)


def _changes(layout: MergeLayout, config: Mapping[str, Any], config_old: Mapping[str, Any]) -> list[FileChange]:
    out: list[FileChange] = []
    for rel, tensors in layout.files.items():
        for t in tensors:
            if isinstance(t.data, str) and t.data == t.name:
                continue
            detail = _recipe_detail(t.data) if isinstance(t.data, Recipe) else f"copy of {t.data}"
            out.append(
                FileChange("store-tensor", rel, t.name, tuple(t.info.shape), t.info.dtype, t.info.nbytes, detail=detail)
            )
    for name in layout.dropped:
        out.append(FileChange("drop-tensor", "", name, detail="tied: transformers fills it from its source on load"))
    for pointer, value in config.items():
        out.append(FileChange("set-config", "config.json", pointer=pointer, old=config_old.get(pointer), new=value))
    return out


def _recipe_detail(r: Recipe) -> str:
    def one(m: str) -> str:
        e = r.edits.get(m)
        tokens = " + trainable tokens" if r.tokens.get(m) else ""
        if e is None:
            return "base values" + tokens
        if e.full_copy:
            return f"trained copy {e.full_copy}"
        if e.lora:
            return f"base + LoRA (r={e.lora.r}, scaling {e.lora.scaling:.4g}){tokens}"
        return "base" + tokens

    if len(r.loads_as) == 1:
        return "merged: " + one(r.stored)
    return "merged, tied: " + "; ".join(f"{m} uses {one(m)}" for m in r.loads_as)


class _BaseCopyCheck:
    """Compares, on a background thread, each `base_layer.weight` copy in the adapter with the base tensor of the same
    name, byte for byte (the copies are embedding-sized: reading them overlaps with importing transformers)."""

    def __init__(self, ad: Checkpoint, base_ckpt: Checkpoint) -> None:

        self.ad, self.base = ad, base_ckpt
        self.pairs = [
            (key, key[len(PREFIX) :].replace(".base_layer.weight", ".weight"))
            for key in ad.tensors
            if key.startswith(PREFIX) and key.endswith(".base_layer.weight")
        ]
        self.pairs = [(key, name) for key, name in self.pairs if name in base_ckpt.tensors]
        self.equal: set[str] = set()
        self.read = 0
        self.thread = threading.Thread(target=self._run, name="tieaudit-base-copies", daemon=True)
        self.thread.start()

    def _run(self) -> None:

        for key, name in self.pairs:
            try:
                equal, read = same_bytes(self.ad, key, self.base, name)
            except (OSError, InputError):
                return  # the main thread's own comparison will report it
            self.read += read
            if equal:
                self.equal.add(key)

    def proven_equal(self) -> frozenset[str]:
        """Wait for the comparisons and account for what they read."""
        self.thread.join()
        self.ad.stats.tensor_bytes += self.read
        self.base.stats.tensor_bytes += self.read
        self.read = 0
        return frozenset(self.equal)


class _AdapterTensorsEqual:
    """Bitwise equality of two adapter tensors (the second optionally transposed), read in row chunks."""

    def __init__(self, ad: Checkpoint) -> None:
        self.ad = ad

    def __call__(self, a: str, b: str, transposed: bool) -> bool:
        import torch

        ia, ib = self.ad.tensors[a], self.ad.tensors[b]
        if ia.dtype != ib.dtype:
            return False
        if transposed:
            if len(ia.shape) != 2 or tuple(ia.shape) != tuple(reversed(ib.shape)):
                return False
            rows_b = self.ad.read_rows(b, 0, ib.shape[0])  # LoRA factors: [r, n] or [n, r], small
            return bool(torch.equal(self.ad.read_rows(a, 0, ia.shape[0]), rows_b.T))
        if tuple(ia.shape) != tuple(ib.shape):
            return False
        return all(
            torch.equal(chunk, self.ad.read_rows(b, start, start + len(chunk))) for start, chunk in self.ad.iter_rows(a)
        )


# -- the check against peft ----------------------------------------------------------------------------------

# how far the written tied weights may be from peft's run-time ones, relative to their scale: float32 arithmetic in
# another order, or the rounding of a float32 merge to the stored dtype
PEFT_TOLERANCE = {"F64": 1e-4, "F32": 1e-4, "F16": 2.0**-8, "BF16": 2.0**-6}


@dataclass(frozen=True)
class PeftCheck:
    """What peft itself computes for the tied layers the adapter touches (`tieaudit.adapter.oracle`), asked before
    anything is written; `verify` holds the staged merged model to it before the commit."""

    oracle: OracleResult | None
    ids: tuple[int, ...]
    h: np.ndarray
    dtypes: Mapping[str, str]  # member -> the stored dtype it is written in

    @classmethod
    def ask(
        cls,
        base_ckpt: Checkpoint,
        adapter_dir: Path,
        values: Mapping[str, str],
        settings: AdapterSettings,
        probes: int,
        max_bytes: int | None = None,
    ) -> PeftCheck:
        import numpy as np

        dtypes = {m: base_ckpt.tensors[d].dtype for m, d in values.items()}
        if not values:
            return cls(None, (), np.zeros((0, 0), np.float32), dtypes)
        shape = base_ckpt.tensors[next(iter(values.values()))].shape
        vocab, hidden = int(shape[0]), int(shape[1])
        ids, h = probe_inputs(vocab, hidden, max(probes, MIN_PROBES), settings)
        try:
            oracle = ask_peft(base_ckpt, adapter_dir, values, ids, h, max_bytes=max_bytes or MAX_BYTES)
        except OracleUnavailable as exc:
            raise WriteError(
                f"cannot verify the merge against peft ({exc}); nothing was written: keep the adapter unmerged "
                "(PeftModel.from_pretrained) or merge it with peft and audit the result"
            ) from None
        return cls(oracle, tuple(ids), h, dtypes)

    @property
    def verified_by(self) -> str | None:
        return f"peft {self.oracle.peft_version}" if self.oracle is not None else None

    def verify(self, staged: Path) -> list[Comparison]:
        """The staged model's tied weights, loaded as transformers loads them, against peft's run-time ones; raises
        WriteError (nothing is committed) when one is further than the dtype's rounding explains."""
        import numpy as np

        if self.oracle is None:
            return []
        with open_checkpoint(staged) as written:
            loaded = probe_checkpoint(written, list(self.oracle.runtime), self.ids, self.h)
        out = []
        for m, want in self.oracle.runtime.items():
            got = loaded[m]
            if got is None:
                raise WriteError(
                    f"merge refused: {m} would be missing from the merged model (transformers initialises it "
                    "randomly), while the adapter uses it; nothing was written"
                )
            tol = PEFT_TOLERANCE.get(self.dtypes[m], 1e-4)
            g = gap(want, got)
            logit_scale, logit_gap, row_gap = g.logit_scale or 1.0, g.max_abs_logit_diff, g.rows_max_abs_diff
            row_scale = (float(np.abs(want.rows).max()) or 1.0) if want.rows.size else 1.0
            bias_gap = 0.0
            if want.bias is not None:
                other = got.bias if got.bias is not None else np.zeros_like(want.bias)
                bias_gap = float(np.abs(other - want.bias).max()) / (float(np.abs(want.bias).max()) or 1.0)
            if logit_gap > tol * logit_scale or row_gap > tol * row_scale or bias_gap > tol:
                raise WriteError(
                    f"merge refused: the merged {m} does not reproduce the adapter as peft "
                    f"{self.oracle.peft_version} runs it (probe logits max |Δ| {logit_gap:.3g}, "
                    f"{logit_gap / logit_scale:.2g} of their scale; rows max |Δ| {row_gap:.3g}; beyond "
                    f"{self.dtypes[m]} rounding); nothing was written: keep the adapter unmerged "
                    "(PeftModel.from_pretrained)"
                )
            out.append(Comparison("peft", m, m, m, row_gap, logit_gap / logit_scale, logit_gap, g.top1_agreement))
        return out


# -- writing -----------------------------------------------------------------------------------------------


def _write(
    ad: Checkpoint,
    base_ckpt: Checkpoint,
    job: _Job,
    dest: Path,
    fail_level: Severity,
    exit_zero: bool,
    probes: int,
    progress: Progress | None,
    check: PeftCheck,
) -> tuple[Report, int, list[Comparison]]:

    comparisons: list[Comparison] = []
    failed = "cannot write the merged model ({}): {}; nothing was written"
    with staged(dest, lambda exc: failed.format(exc.filename or dest, exc.strerror or exc)) as stage:
        written = _carry_files(Path(base_ckpt.root), Path(ad.root), stage.path, base_ckpt)
        step("staged")
        adapter_rows = TensorReader(ad)
        total = sum(t.info.nbytes for v in job.layout.files.values() for t in v)
        done = 0
        for rel, tensors in job.layout.files.items():
            entries: list[Entry] = []
            for t in tensors:
                if isinstance(t.data, Recipe):
                    producer = _Producer(t, base_ckpt, adapter_rows, probes if t.data.stored in job.logit_params else 0)
                    entries.append((t.name, t.info, producer))
                else:
                    entries.append((t.name, t.info, t.data))
            if progress:
                progress(f"writing {rel}", done, total)
            written += write_safetensors(base_ckpt, entries, stage.path / rel, {"format": "pt"})
            done += sum(t.info.nbytes for t in tensors)
            for _, _, data in entries:
                if isinstance(data, _Producer):
                    comparisons.extend(data.checked_comparisons())
        step("weights")
        if job.layout.index_file is not None:
            written += write_text(stage.path / job.layout.index_file, _index_text(base_ckpt, job.layout))
        step("index")
        written += write_text(stage.path / "config.json", _config_text(base_ckpt, job.config))
        step("config")
        fsync_tree(stage.path)
        if progress:
            progress("checking the written tied weights against peft", 0, 0)
        comparisons.extend(check.verify(stage.path))
        step("peft-checked")
        if progress:
            progress("re-auditing the merged model", 0, 0)
        after = audit(stage.path, fail_on=fail_level, exit_zero=exit_zero)
        errors = [f for f in after.findings if f.severity is Severity.ERROR]
        if errors:
            first = errors[0]
            raise WriteError(f"internal check failed: the merged model would have {first.code} ({first.message})")
        step("verified")
        os.chmod(stage.path, 0o777 & ~current_umask())
        commit_output_dir(stage.path, dest)
        stage.committed = True
        return after, written, comparisons


class _Producer:
    """The rows of one merged tensor, in order and in the base's dtype, compared on the way with the run-time
    weight of every parameter that loads it."""

    def __init__(self, out: OutTensor, base_ckpt: Checkpoint, adapter: TensorReader, probes: int) -> None:
        assert isinstance(out.data, Recipe)
        self.out = out
        self.recipe = out.data
        self.base = base_ckpt
        self.adapter = adapter
        self.probes = probes if len(out.info.shape) == 2 else 0
        self.accs: dict[str, StreamingDiff] = {}

    def __call__(self) -> Iterator[torch.Tensor]:
        import torch

        r = self.recipe
        shape = tuple(self.out.info.shape)
        dtype = torch_dtype(self.out.info.dtype)
        w0 = TensorReader(self.base).rows(r.w0)
        deltas = {
            m: DeltaRows(e.lora, self.adapter, transposed=m in r.transposed)
            for m, e in r.edits.items()
            if e.lora is not None and not e.full_copy
        }
        copies = {m: self.adapter.rows(e.full_copy) for m, e in r.edits.items() if e.full_copy}
        tokens = {m: load_tokens(r.tokens.get(m), self.adapter) for m in r.loads_as}
        hidden = shape[1] if len(shape) == 2 else None
        self.accs = {m: StreamingDiff(self.probes, hidden) for m in r.loads_as}
        h = probe_hidden_states(self.probes, hidden) if self.probes and hidden else None
        rows = shape[0] if shape else 1
        step = rows_per_chunk(shape)
        shared_w = sum(1 for m in r.loads_as if m not in copies) > 1  # several members start from the same rows
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            w = w0(start, stop)
            runtime: dict[str, torch.Tensor] = {}
            for m in r.loads_as:
                if m in copies:
                    runtime[m] = copies[m](start, stop)
                elif m in deltas:  # W0 + delta in one fused pass, into a copy when other members need W0
                    # a LoRA layer wraps the token adapter: its delta is added to the token-replaced rows too
                    replaced = apply_tokens(w.clone() if shared_w else w, start, stop, tokens[m])
                    runtime[m] = deltas[m](start, stop, replaced)
                else:
                    runtime[m] = w if tokens[m] is None else apply_tokens(w.clone(), start, stop, tokens[m])
            stored = runtime[r.stored].to(dtype)
            back = stored.to(torch.float32)
            logits = LogitCache(h) if h is not None else None
            for m in r.loads_as:
                self.accs[m].update(start, back, runtime[m], logits)
            yield stored
            del w, runtime, back

    def checked_comparisons(self) -> list[Comparison]:
        """The measured comparisons; raises WriteError when a written weight is further from the adapter's
        run-time weight than rounding to the stored dtype explains (a tied group whose members were not equal)."""
        out = self.comparisons()
        bound = ROUNDING.get(self.out.info.dtype, 0.0)
        for c in out:
            if c.rel_diff is None or not c.rel_diff <= bound:
                gap = "an unmeasurable distance" if c.rel_diff is None else f"{c.rel_diff:.3g} (relative)"
                raise WriteError(
                    f"internal check failed: the merged {self.out.name} is {gap} away from {c.tensor} as the "
                    f"adapter uses it, beyond {self.out.info.dtype} rounding; nothing was written"
                )
        return out

    def comparisons(self) -> list[Comparison]:
        out = []
        for m, acc in self.accs.items():
            d = acc.result()
            out.append(
                Comparison(
                    "merged",
                    self.recipe.group or m,
                    m,
                    m,
                    d.max_abs_diff,
                    d.rel_diff,
                    d.max_abs_logit_diff,
                    d.top1_agreement,
                    d.bitwise_equal,
                )
            )
        return out


def _carry_files(base_root: Path, adapter_root: Path, staging: Path, base_ckpt: Checkpoint) -> int:
    """Copy the base's top-level non-weight files (tokenizer, generation config, model card) into ``staging``;
    the adapter's tokenizer files replace the base's when the adapter has a tokenizer_config.json."""
    skip = {*base_ckpt.weight_files, *(f for f in (base_ckpt.index_file,) if f)}
    adapter_tokenizer = (adapter_root / "tokenizer_config.json").is_file()
    copied = 0
    for entry in sorted(os.scandir(base_root), key=lambda e: e.name):
        name = entry.name
        if name in skip or name in _NOT_CARRIED or name.startswith(".") or name.endswith(WEIGHT_SUFFIXES):
            continue
        if name.endswith(".index.json") or (adapter_tokenizer and name in TOKENIZER_FILES):
            continue
        if not entry.is_file():  # directories (e.g. original/ weights) and special files are not carried
            continue
        shutil.copyfile(entry.path, staging / name)
        copied += os.path.getsize(staging / name)
    if adapter_tokenizer:
        for name in sorted(TOKENIZER_FILES):
            src = adapter_root / name
            if src.is_file():
                shutil.copyfile(src, staging / name)
                copied += os.path.getsize(staging / name)
    return copied


def _index_text(base_ckpt: Checkpoint, layout: MergeLayout) -> str:

    weight_map = {t.name: rel for rel, tensors in layout.files.items() for t in tensors}
    total = sum(t.info.nbytes for tensors in layout.files.values() for t in tensors)
    meta: dict[str, Any] = {"total_size": total}
    old_text = None
    if base_ckpt.index_file is not None:
        old_text = (Path(base_ckpt.root) / base_ckpt.index_file).read_text(encoding="utf-8").removeprefix("\ufeff")
        old = json.loads(old_text)
        old_meta = old.get("metadata") if isinstance(old, dict) else None
        if isinstance(old_meta, dict) and "total_parameters" in old_meta:
            meta["total_parameters"] = sum(math.prod(t.info.shape) for ts in layout.files.values() for t in ts)
    data = {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}
    if old_text is not None and base_ckpt.index_file == layout.index_file:
        return dump_like(old_text, data)
    return json.dumps(data, indent=2) + "\n"


def _config_text(base_ckpt: Checkpoint, changes: Mapping[str, Any]) -> str:

    assert base_ckpt.config is not None
    text = (Path(base_ckpt.root) / base_ckpt.config.rel).read_text(encoding="utf-8").removeprefix("\ufeff")
    return set_json_values(text, dict(changes)) if changes else text
