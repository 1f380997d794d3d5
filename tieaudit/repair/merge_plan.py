"""Merge planning: what the merged model stores, how each stored tensor is made, and the config edits. Pure.

The merged model must compute what the unmerged PeftModel computes. For every weight the adapter edits, the
stored value is its run-time value (LoRA: ``W0 + delta``; modules_to_save: the trained copy; trainable tokens:
``W0`` with the trained rows). A tied group of the base that the adapter touches stays tied when the adapter
keeps its members equal at run time (the caller measures that): one stored tensor, the flag untouched, the shared
delta applied once. Otherwise it is untied: every member stored with its own run-time value, and the governing
flag false wherever readers look (the caller plans those edits with the fix planner's oracle).

Adapter keys are accounted for one by one: a key that names a module the base does not have, a layer kind tieaudit
does not merge exactly (DoRA, LoRA bias), or shapes that do not fit the base refuse the merge (``MergeRefused``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from tieaudit.adapter.files import (
    MTS_COPY,
    MTS_ORIGINAL,
    PREFIX,
    AdapterSettings,
    LoraPart,
    ModuleEdit,
    edit_keys,
    fit_problems,
    module_edits,
)
from tieaudit.adapter.forecast import TokenEdit, runtime_tokens
from tieaudit.checkpoint.types import TensorInfo
from tieaudit.model import TieStatus
from tieaudit.ties.graph import TieGraph

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"

_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")
_BASE_COPY = ".base_layer.weight"
_WRAPPER_PARTS = (MTS_COPY, MTS_ORIGINAL)  # a modules_to_save wrapper's copy and original, by peft's internal names
_TOKENS = ".token_adapter.trainable_tokens_delta"


class MergeRefused(Exception):
    """The adapter cannot be merged exactly onto this base; the message says why (exit 2)."""


@dataclass(frozen=True)
class Recipe:
    """How one stored tensor of the merged model is computed.

    ``loads_as`` are the in-memory parameters that load these values: the stored one first, then the tied targets
    that transformers fills from it. Each member's run-time value uses its own edit (``edits``) on the base values
    ``w0`` (an on-disk name of the base), then the trainable tokens it uses at run time (``tokens``: a tied head
    uses the embedding's when peft ties them, see `forecast.runtime_tokens`).
    """

    w0: str
    loads_as: tuple[str, ...]
    edits: Mapping[str, ModuleEdit]
    tokens: Mapping[str, TokenEdit | None] = field(default_factory=dict)  # member -> trainable tokens it uses
    transposed: frozenset[str] = frozenset()  # members stored [in, out] (Conv1D): their LoRA delta is transposed
    group: str | None = None  # the tied group's source, for the report

    @property
    def stored(self) -> str:
        return self.loads_as[0]


@dataclass(frozen=True)
class OutTensor:
    name: str  # on-disk name in the merged model
    info: TensorInfo  # dtype and shape written (the base's); ``file`` is the output file
    data: str | Recipe  # a base tensor copied as is, or computed


@dataclass(frozen=True)
class MergeLayout:
    """The merged model's weight files."""

    files: Mapping[str, tuple[OutTensor, ...]]  # output weight file -> its tensors, in the base's order
    index_file: str | None  # the shard index to write (None: a single file)
    merged: tuple[str, ...]  # in-memory names that receive a LoRA delta
    replaced: tuple[str, ...]  # in-memory names replaced by trained copies or token rows
    dropped: tuple[str, ...]  # on-disk names of the base not stored in the merged model (tied targets)


# -- reading the adapter against the base -----------------------------------------------------------------

# adapter_config.json fields that switch on a LoRA variant (peft 0.21's `is_lora_variant` fields, QALoRA, layer
# replication, parameter targets): the merged weight is no longer W0 + B @ A * scaling, or peft cannot merge it
VARIANTS = {
    "use_dora": "DoRA (use_dora): its weight-norm rescaling is not modelled",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens): the delta applies only after the invocation tokens",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "use_qalora": "QALoRA (use_qalora)",
    "layer_replication": "layer replication (layer_replication): the adapted model has more layers than the base",
    "target_parameters": "LoRA on parameters (target_parameters)",
}


def unsupported_variant(config: Mapping[str, object]) -> str | None:
    """Why tieaudit does not merge this adapter's LoRA variant (None: plain LoRA)."""
    for key, what in VARIANTS.items():
        if config.get(key):
            return what
    if config.get("init_lora_weights") == "mica":
        return "MiCA (init_lora_weights: mica)"
    return None


def adapter_edits(
    adapter_tensors: Mapping[str, TensorInfo],
    settings: AdapterSettings,
    base_params: Mapping[str, TensorInfo],
    transposed: frozenset[str],
) -> dict[str, ModuleEdit]:
    """Every edit the adapter file makes, by in-memory parameter name; refuses what cannot be merged exactly.

    ``base_params`` maps the base's in-memory parameter names to the stored tensor holding their values (see
    `base_values`).
    """
    if settings.use_dora or any(k.endswith(".lora_magnitude_vector") for k in adapter_tensors):
        raise MergeRefused(f"tieaudit does not merge {VARIANTS['use_dora']}")
    if any(k.endswith(".lora_B.bias") for k in adapter_tensors):
        raise MergeRefused("LoRA bias terms (lora_bias) are not merged by tieaudit")
    params: set[str] = set()
    copies: dict[str, str] = {}  # in-memory param -> adapter key of a modules_to_save copy that is not a `.weight`
    for key in adapter_tensors:
        if not key.startswith(PREFIX):
            raise MergeRefused(f"adapter tensor {key!r} is not a peft key (no {PREFIX!r} prefix)")
        rest = key[len(PREFIX) :]
        module = _module_of(rest)
        if module is not None:
            params.add(f"{module}.weight")
            continue
        params.add(rest)
        if not rest.endswith(".weight"):
            copies[rest] = key
    missing = sorted(p for p in params if p not in base_params)
    if missing:
        raise MergeRefused(
            f"the adapter edits {missing[0].removesuffix('.weight')}, which the base does not have "
            f"({len(missing)} such module{'s' if len(missing) > 1 else ''}): is this the base it was trained on?"
        )
    edits = module_edits(dict(adapter_tensors), settings, sorted(params))
    for param, key in copies.items():
        module = param.rpartition(".")[0]
        edits[param] = ModuleEdit(param, module, full_copy=key)
    for key in _unused_keys(adapter_tensors, edits):
        raise MergeRefused(f"adapter tensor {key!r} is not a LoRA, modules_to_save or trainable-token tensor")
    for param, edit in edits.items():
        _check_fit(param, edit, adapter_tensors, base_params[param], param in transposed)
    return edits


def _module_of(rest: str) -> str | None:
    """The module a LoRA / base-copy / token key belongs to (None: a modules_to_save copy of a parameter)."""
    for suffix in (*_LORA_SUFFIXES, _BASE_COPY, _TOKENS, *_WRAPPER_PARTS):
        if rest.endswith(suffix):
            return rest[: -len(suffix)]
    return None


def _unused_keys(adapter_tensors: Mapping[str, TensorInfo], edits: Mapping[str, ModuleEdit]) -> list[str]:
    used = edit_keys(edits.values()) | set(wrapper_aliases(adapter_tensors, edits))
    return sorted(k for k in adapter_tensors if k not in used)


def wrapper_aliases(adapter_tensors: Mapping[str, TensorInfo], edits: Mapping[str, ModuleEdit]) -> dict[str, str]:
    """`X.modules_to_save.weight` keys saved beside the `X.weight` copy that the edit uses: alias -> the copy's key.
    peft loads both into the same trained copy, so the merge requires them equal (checked by the caller)."""
    out = {}
    for e in edits.values():
        alias = f"{PREFIX}{e.module}{MTS_COPY}"
        if e.full_copy is not None and e.full_copy != alias and alias in adapter_tensors:
            out[alias] = e.full_copy
    return out


def _check_fit(param: str, edit: ModuleEdit, tensors: Mapping[str, TensorInfo], base: TensorInfo, trans: bool) -> None:
    problems = fit_problems(edit, tensors, tuple(base.shape), trans, f"the base's {param}")
    if problems:
        raise MergeRefused("; ".join(problems))


# whether two adapter tensors are equal; with the flag, the second compared transposed (a [r, n] vs a [n, r])
TensorsEqual = Callable[[str, str, bool], bool]


def runtime_equal(
    members: tuple[str, ...],
    edits: Mapping[str, ModuleEdit],
    tokens: Mapping[str, TokenEdit | None],
    transposed: frozenset[str],
    same: TensorsEqual,
) -> bool:
    """Whether the unmerged adapter provably gives every member of a tied group the same weight, from the
    adapter's own tensors: the same trainable tokens on every member (``tokens``, as peft wires them at run time),
    and no member edited otherwise, the same trained copy on each (tied modules_to_save), or LoRA factors that make
    the same delta (ensure_weight_tying saves the head's factors as the embedding's, transposed). Anything else is
    treated as different and the group is untied, which also reproduces the adapter exactly (a zero delta on one
    side only costs the tie)."""

    def same_tokens(a: TokenEdit | None, b: TokenEdit | None) -> bool:
        if a is None or b is None:
            return a is None and b is None
        return tuple(a[0]) == tuple(b[0]) and (a[1] == b[1] or same(a[1], b[1], False))

    if not all(same_tokens(tokens.get(m), tokens.get(members[0])) for m in members[1:]):
        return False
    core = [e if e is not None and (e.lora or e.full_copy) else None for e in (edits.get(m) for m in members)]
    if all(e is None for e in core):
        return True
    if any(e is None for e in core):
        return False
    ref, ref_member = core[0], members[0]
    assert ref is not None
    for e, m in zip(core[1:], members[1:], strict=True):
        assert e is not None
        if ref.full_copy and e.full_copy:
            if ref.full_copy != e.full_copy and not same(ref.full_copy, e.full_copy, False):
                return False
        elif ref.lora and e.lora and not ref.full_copy and not e.full_copy:
            if not _same_delta(ref.lora, ref_member in transposed, e.lora, m in transposed, same):
                return False
        else:
            return False
    return True


def _same_delta(x: LoraPart, x_t: bool, y: LoraPart, y_t: bool, same: TensorsEqual) -> bool:
    """LoRA deltas, each shaped like its weight: (B @ A).T * s for an embedding or a Conv1D weight, B @ A * s for a
    Linear. Same orientation: the same factors; opposite: each factor is the other's transposed counterpart."""
    if x.scaling != y.scaling or x.r != y.r:
        return False
    x_flip = x.kind == "embedding" or x_t
    y_flip = y.kind == "embedding" or y_t
    if x_flip == y_flip:
        return same(x.a, y.a, False) and same(x.b, y.b, False)
    return same(x.a, y.b, True) and same(x.b, y.a, True)


def base_values(graph: TieGraph, base_tensors: Mapping[str, TensorInfo]) -> dict[str, TensorInfo]:
    """Every parameter of the base by in-memory name, with the stored tensor it loads from (a tied target that
    is not stored loads its group's stored tensor)."""
    out = {mem: base_tensors[disk] for mem, disk in graph.disk_names.items()}
    for _, members, data in tied_groups(graph):
        for m in members:
            out.setdefault(m, base_tensors[data])
    return out


def tied_groups(graph: TieGraph) -> list[tuple[str, tuple[str, ...], str]]:
    """The base's tied groups as (source, members, on-disk name of the stored data)."""
    out = []
    for g in graph.groups:
        if not g.tied_by_config:
            continue
        data = next((graph.disk_names[m] for m in g.members if m in graph.disk_names), None)
        if data is not None:
            out.append((g.source, g.members, data))
    return out


def broken_base(graph: TieGraph) -> str | None:
    """Why the base's own tying is broken (the merge would inherit it), or None."""
    for g in graph.groups:
        if g.status in (TieStatus.DIVERGED, TieStatus.MISSING):
            return f"{g.source} / {', '.join(g.targets)} is {g.status.value} in the base"
    return None


# -- the plan ----------------------------------------------------------------------------------------------


def plan_merge(
    graph: TieGraph,
    base_tensors: Mapping[str, TensorInfo],
    base_files: list[str],
    base_index: str | None,
    edits: Mapping[str, ModuleEdit],
    settings: AdapterSettings,
    keep_tied: Mapping[str, bool],
    untied_active: Mapping[str, str] | None,
) -> MergeLayout:
    """Lay out the merged model's tensors.

    ``keep_tied`` says, for each tied group the adapter touches (by source), whether it stays tied; ``untied_active``
    is the {target: source} map transformers ties after the config edits (None: no edit).
    """
    declared = graph.declared
    transposed = declared.transposed if declared else frozenset()
    disk = graph.disk_names
    rename_to_disk = declared.to_disk if declared else (lambda n: n)
    out_name = {rel: _output_file(rel) for rel in base_files}
    recipes: dict[str, Recipe] = {}  # on-disk output name -> recipe
    added: dict[str, tuple[str, TensorInfo, str | Recipe]] = {}  # new on-disk name -> (base file, info, data)
    dropped: set[str] = set()
    handled: set[str] = set()

    for source, members, data in tied_groups(graph):
        handled.update(members)
        group_edits = {m: edits[m] for m in members if m in edits}
        touched = bool(group_edits)
        group_tokens = runtime_tokens(members, group_edits, settings)
        # a group stays tied when the adapter keeps its members equal and no untie of a shared flag reaches it
        still_tied = untied_active is None or all(t in untied_active for t in members[1:])
        if untied_active is not None and not still_tied and any(t in untied_active for t in members[1:]):
            kept = [t for t in members[1:] if t in untied_active]
            raise MergeRefused(
                f"untying {source}'s group leaves {', '.join(kept)} tied to it (the config ties them regardless): "
                "the merged model cannot store them separately"
            )
        if touched and keep_tied.get(source, True) and still_tied:
            stored = next(m for m in members if disk.get(m) == data)
            order = (stored, *(m for m in members if m != stored))
            recipes[data] = Recipe(data, order, group_edits, group_tokens, transposed, source)
            dropped.update(disk[m] for m in members if m in disk and disk[m] != data)
            continue
        if not touched and still_tied:
            continue  # untouched and still tied: stored as the base stores it
        for m in members:
            edited = m in edits or group_tokens[m] is not None
            own = {m: edits[m]} if m in edits else {}
            recipe = Recipe(data, (m,), own, {m: group_tokens[m]}, transposed, source)
            if m in disk:
                if edited:
                    recipes[disk[m]] = recipe
            else:  # absent in the base: stored now, next to the group's data (a plain copy when not edited)
                info = base_tensors[data]
                added[rename_to_disk(m)] = (info.file, info, recipe if edited else data)

    merged: list[str] = []
    replaced: list[str] = []
    for param, edit in edits.items():
        (merged if edit.lora else replaced).append(param)
        if param not in handled:  # a weight outside every tied group: merged on its own
            name = disk[param]
            recipes[name] = Recipe(name, (param,), {param: edit}, {param: edit.tokens}, transposed)

    files: dict[str, list[OutTensor]] = {}
    for rel in base_files:
        entries = files.setdefault(out_name[rel], [])
        for info in _stored_in(base_tensors, rel):
            if info.name in dropped:
                continue
            out_info = TensorInfo(info.name, out_name[rel], info.dtype, tuple(info.shape), info.nbytes)
            found = recipes.get(info.name)
            entries.append(OutTensor(info.name, out_info, found if found is not None else info.name))
    for name, (rel, info, data_from) in added.items():
        out_info = TensorInfo(name, out_name[rel], info.dtype, tuple(info.shape), info.nbytes)
        files[out_name[rel]].append(OutTensor(name, out_info, data_from))
    return MergeLayout(
        {rel: tuple(entries) for rel, entries in files.items()},
        None if base_index is None else SAFETENSORS_INDEX,
        tuple(sorted(merged)),
        tuple(sorted(replaced)),
        tuple(sorted(dropped)),
    )


def _stored_in(tensors: Mapping[str, TensorInfo], rel: str) -> Iterable[TensorInfo]:
    return [i for i in tensors.values() if i.file == rel]


def _output_file(rel: str) -> str:
    """The merged model's file for a base weight file: safetensors names kept, ``.bin`` names converted as
    ``save_pretrained`` names safetensors shards."""
    if rel.endswith(".safetensors"):
        return rel
    name = rel.rsplit("/", 1)[-1]
    if name == "pytorch_model.bin":
        return SAFETENSORS_SINGLE
    if name.startswith("pytorch_model-") and name.endswith(".bin"):
        return "model-" + name[len("pytorch_model-") : -len(".bin")] + ".safetensors"
    return name.removesuffix(".bin") + ".safetensors"
