"""Fix planning: from the tie graph and the findings to a list of changes. Pure: no I/O here.

What transformers would do with a candidate config (which pairs it ties, which other settings change when a
flag is rewritten) and whether two stored tensors are equal are asked of an injected :class:`Oracle`, so
the planner never guesses library behaviour and never reads files itself.

`--untie` makes every broken tied pair untied: both tensors stored (the stored target where it exists,
otherwise a copy of what the tied model used) and the governing flag false everywhere readers look.
`--retie` makes pairs tied: the flag true and one stored tensor; dropping a stored target that differs
from its source discards data and needs `unsafe` plus a named winner (`sources`).
Both strategies also write the effective flag where config readers disagree (TIE005) and regenerate a shard
index that disagrees with the shards.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from tieaudit.checkpoint.config import get_pointer, literal
from tieaudit.checkpoint.types import ConfigFile, IndexMismatch, TensorInfo
from tieaudit.model import Applicability, Finding, TieStatus
from tieaudit.repair.jsonedit import set_pointer
from tieaudit.rules import get_rule
from tieaudit.rules.registry import Repair
from tieaudit.ties.graph import PairState, TieGraph, head_was_source
from tieaudit.ties.readers import flag_copies

MODES = ("untie", "retie")


class FixRefused(Exception):
    """The planned config edit cannot be made without changing the model's computation."""


class Oracle(Protocol):
    """What the planner asks of transformers and of the weight files."""

    def active_ties(self, config_data: dict[str, Any]) -> dict[str, str]:
        """The {target: source} map transformers ties when loading with this config."""
        ...

    def config_drift(self, old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
        """Settings other than the tie flags that transformers reads differently from ``new``:
        {JSON pointer: the value it read from ``old``}."""
        ...

    def pairs_equal(self, pair: PairState) -> bool:
        """Whether the pair's stored tensors are equal as transformers compares them when loading."""
        ...


@dataclass(frozen=True)
class FixRequest:
    mode: str  # "untie" | "retie"
    unsafe: bool = False
    sources: tuple[str, ...] = ()  # --source: which tensor wins when retying differing tensors


@dataclass(frozen=True)
class StoreTensor:
    """Write tensor ``name`` with the bytes of stored tensor ``data_from`` (both on-disk names)."""

    name: str
    member: str  # in-memory name
    data_from: str
    info: TensorInfo  # of data_from
    replace: bool  # ``name`` is already stored (with other bytes or shared storage) and is replaced
    why: str


@dataclass(frozen=True)
class DropTensor:
    name: str  # on-disk name
    member: str
    info: TensorInfo
    why: str


@dataclass(frozen=True)
class Outcome:
    action: str
    fixable: bool
    applicability: Applicability = Applicability.SAFE


@dataclass(frozen=True)
class FixPlan:
    request: FixRequest
    stores: tuple[StoreTensor, ...] = ()
    drops: tuple[DropTensor, ...] = ()
    config: Mapping[str, Any] = field(default_factory=dict)  # JSON pointer -> new value
    config_old: Mapping[str, Any] = field(default_factory=dict)  # JSON pointer -> previous raw value (None: absent)
    rebuild_index: bool = False
    outcomes: Mapping[str, Outcome] = field(default_factory=dict)  # finding fingerprint -> outcome
    notes: tuple[str, ...] = ()

    @property
    def changes_anything(self) -> bool:
        return bool(self.stores or self.drops or self.config or self.rebuild_index)


class _Planner:
    def __init__(
        self,
        graph: TieGraph,
        config: ConfigFile,
        index_mismatches: tuple[IndexMismatch, ...],
        request: FixRequest,
        oracle: Oracle,
    ) -> None:
        assert graph.declared is not None
        self.graph = graph
        self.declared = graph.declared
        self.config = config
        self.index_mismatches = index_mismatches
        self.request = request
        self.oracle = oracle
        self.pairs = [p for p in graph.pairs if p.declared]
        self.flags: dict[str, bool] = {}  # governing pointer -> new value
        self.blocked: dict[tuple[str, str], Blocked] = {}  # (target, source) -> why it cannot be fixed this way
        self.done: dict[tuple[str, str], Done] = {}  # (target, source) -> what the fix does
        self.stores: dict[str, StoreTensor] = {}
        self.drops: dict[str, DropTensor] = {}
        self.config_changes: dict[str, Any] = {}
        self.pointer_done: dict[str, str] = {}
        self.notes: list[str] = []
        self.equal_cache: dict[tuple[str, str], bool] = {}

    # -- names and data ------------------------------------------------------------------------

    def stored(self, member: str) -> TensorInfo | None:
        disk = self.graph.disk_names.get(member)
        return None if disk is None else _info_of(self.pairs, member)

    def disk_name(self, member: str) -> str:
        """The name to store ``member`` under, in the naming convention the checkpoint already uses."""
        if member in self.graph.disk_names:
            return self.graph.disk_names[member]
        renamed = any(disk != mem for mem, disk in self.graph.disk_names.items())
        return self.declared.to_disk(member) if renamed else member

    def equal(self, p: PairState) -> bool:
        key = (p.target, p.source)
        if key not in self.equal_cache:
            if p.diff is not None:
                self.equal_cache[key] = p.diff.bitwise_equal
            elif _shared(p):
                self.equal_cache[key] = True
            else:
                self.equal_cache[key] = self.oracle.pairs_equal(p)
        return self.equal_cache[key]

    def winner(self, p: PairState) -> str | None:
        """The member named by --source (with --unsafe-fixes), as an in-memory name."""
        if not self.request.unsafe:
            return None
        names = set(self.request.sources)
        hits = [m for m in (p.source, p.target) if m in names or self.graph.disk_names.get(m) in names]
        return hits[0] if len(hits) == 1 else None

    # -- flags ---------------------------------------------------------------------------------

    def governed(self, pointer: str) -> list[PairState]:
        return [p for p in self.pairs if p.flag is not None and p.flag.pointer == pointer]

    def candidate(self) -> dict[str, Any]:
        data = copy.deepcopy(self.config.data)
        for pointer, value in self.flag_writes().items():
            set_pointer(data, pointer, value)
        return data

    def flag_writes(self) -> dict[str, bool]:
        """Every config key to write for the chosen flag values: the governing key and every other reader's."""
        writes: dict[str, bool] = {}
        for pointer, value in self.flags.items():
            writes[pointer] = value
            for other in flag_copies(self.config.data, pointer):
                writes[other] = value
        return writes

    def choose_flags(self) -> dict[str, str]:
        mode = self.request.mode
        for p in self.pairs:
            if p.flag is None:
                continue
            if mode == "untie" and _diverged(p):
                self.flags[p.flag.pointer] = False
            if mode == "retie" and _untied_missing(p) and not p.flag.value:
                if not self.request.unsafe and head_was_source(p) is None:
                    guess = _GUESS.format(target=p.target, source=p.source)
                    self.blocked.setdefault((p.target, p.source), Blocked(guess, needs_unsafe=True))
                    continue
                self.flags[p.flag.pointer] = True
        active = dict(self.declared.active)
        for _ in range(len(self.flags) + 1):
            active = self.oracle.active_ties(self.candidate()) if self.flags else dict(self.declared.active)
            bad = {ptr: why for ptr in self.flags if (why := self.flag_problem(ptr, active))}
            if not bad:
                break
            for pointer, why in bad.items():
                del self.flags[pointer]
                for p in self.governed(pointer):
                    self.blocked.setdefault((p.target, p.source), Blocked(why))
        return active

    def flag_problem(self, pointer: str, active: Mapping[str, str]) -> str | None:
        value = self.flags[pointer]
        governed = self.governed(pointer)
        arch = self.declared.architecture
        if not value:
            forced = [p for p in governed if p.target in active]
            if forced:
                p = forced[0]
                self.notes.append(
                    f"{arch}: transformers {self.declared.transformers_version} ties {p.target} to {p.source} "
                    f"whatever config.json:{pointer} says (its config class forces the flag), so no file edit "
                    f"unties it; the stored tensors load untied only because they differ, and model.tie_weights() "
                    f"re-ties them"
                )
                return (
                    f"{arch}'s config class forces {pointer.rsplit('/', 1)[-1]}=true in transformers "
                    f"{self.declared.transformers_version}: no config edit unties it (model.tie_weights() re-ties "
                    "the stored tensors)"
                )
            return None
        for p in governed:
            if p.target not in active or p.tied_by_config:
                continue
            s, t = p.source_info, p.target_info
            if s is None or t is None:
                continue
            if s.shape != t.shape:
                return f"setting {pointer} to true would tie {p.target} {list(t.shape)} to {p.source} {list(s.shape)}"
            if not self.equal(p) and self.winner(p) is None:
                return (
                    f"setting {pointer} to true would tie {p.target} to {p.source}, which are stored with different "
                    f"values: retying discards one; pass --unsafe-fixes --source NAME to choose"
                )
        return None

    # -- tensors -------------------------------------------------------------------------------

    def store(self, member: str, data_member: str, why: str, replace: bool = False) -> None:
        name = self.disk_name(member)
        src = self.stored(data_member)
        assert src is not None
        self.stores[name] = StoreTensor(name, member, src.name, src, replace, why)

    def drop(self, member: str, why: str) -> None:
        info = self.stored(member)
        assert info is not None
        self.drops[info.name] = DropTensor(info.name, member, info, why)

    def group_data(self, p: PairState) -> str | None:
        """The stored member whose values the tied group loads with (None: nothing of it is stored)."""
        if p.source_info is not None:
            return p.source
        if p.target_info is not None:
            return p.target
        return p.covered_by

    def untie_members(self, active: Mapping[str, str]) -> None:
        for p in self.pairs:
            if p.target in active:
                continue
            key = (p.target, p.source)
            data = self.group_data(p)
            if p.source_info is None or p.target_info is None:
                if data is None or self.stored(data) is None:
                    self.blocked.setdefault(
                        key, Blocked("neither tensor is stored: the weights are not in these files")
                    )
                    continue
                if not self.request.unsafe and p.declared and head_was_source(p) is None:
                    self.blocked.setdefault(
                        key, Blocked(_GUESS.format(target=p.target, source=data), needs_unsafe=True)
                    )
                    continue
                for member, info in ((p.target, p.target_info), (p.source, p.source_info)):
                    if info is None and member not in {self.stores[n].member for n in self.stores}:
                        self.store(member, data, f"untied: store {member} as a copy of {data}, the tensor it loaded as")
                self.done.setdefault(key, Done(f"store the absent tensor of the pair as a copy of {data}"))
            elif self.request.mode == "untie" and _shared(p):
                self.store(
                    p.target,
                    p.source,
                    f"untied: give {p.target} its own storage (it shared {p.source}'s in the pickle, so a re-save "
                    "would drop it)",
                    replace=True,
                )
                self.done.setdefault(key, Done(f"store {p.target} as a separate copy"))

    def retie_members(self, active: Mapping[str, str]) -> None:
        for p in self.pairs:
            if p.target not in active or p.source_info is None or p.target_info is None:
                continue
            key = (p.target, p.source)
            if p.shape_mismatch or p.expected_mismatch:
                self.blocked.setdefault(key, Blocked("the tensors differ in shape; resize them (and vocab_size) first"))
                continue
            if _shared(p):
                continue  # one storage under two names: nothing to drop
            if self.equal(p):
                self.drop(p.target, f"retied: {p.target} is a bitwise-equal copy of {p.source}")
                self.done[key] = Done(f"drop the redundant copy {p.target}")
                continue
            win = self.winner(p)
            if win is None:
                self.blocked.setdefault(
                    key,
                    Blocked(
                        f"retying discards the stored {p.target} (it differs from {p.source}): pass --unsafe-fixes "
                        f"--source {p.source} (keep the embedding) or --source {p.target} (keep the head)",
                        needs_unsafe=True,
                    ),
                )
                continue
            if win == p.target:
                self.store(p.source, p.target, f"retied on {p.target}'s values (--source)", replace=True)
            self.drop(p.target, f"retied on {win}'s values (--source); the other tensor's values are discarded")
            self.done[key] = Done(
                f"keep {win}'s values as {p.source}, drop {p.target} (discards the other tensor)", True
            )

    # -- config readers and the index ------------------------------------------------------------

    def config_readers(self) -> None:
        writes = self.flag_writes()
        for pointer, value in writes.items():
            if get_pointer(self.config.data, pointer) != value:
                self.config_changes[pointer] = value
        for p in self.pairs:
            flag = p.flag
            if flag is None or flag.pointer in self.flags:
                continue
            if flag.raw is not None and flag.raw != flag.value:
                if self._loads_untied_despite_flag(flag.pointer):
                    self.pointer_done.setdefault(
                        flag.pointer,
                        f"left as is: any value misleads a reader ({self.declared.architecture} stores the tensors "
                        "separately, which raw-JSON readers only see from the false)",
                    )
                    continue
                self.config_changes[flag.pointer] = flag.value
            for other in flag_copies(self.config.data, flag.pointer):
                raw = get_pointer(self.config.data, other)
                if raw is not None and raw != flag.value:
                    self.config_changes[other] = flag.value
        if self.config_changes:
            self.pin_drift()

    def _loads_untied_despite_flag(self, pointer: str) -> bool:
        return any(p.both_stored and not self.equal(p) for p in self.governed(pointer))

    def pin_drift(self) -> None:
        """Keep every other setting transformers reads as it was (T5: `scale_decoder_outputs` follows the flag)."""
        for _ in range(3):
            new = copy.deepcopy(self.config.data)
            for pointer, value in self.config_changes.items():
                set_pointer(new, pointer, value)
            drift = self.oracle.config_drift(self.config.data, new)
            drift = {k: v for k, v in drift.items() if k not in self.config_changes}
            if not drift:
                return
            for pointer, old in drift.items():
                self.config_changes[pointer] = old
                self.notes.append(
                    f"config.json:{pointer} written as {literal(old)}: transformers derives it from the flag, and the "
                    "model must compute what it computed before"
                )
        raise FixRefused("the config edit changes other settings transformers reads, even after pinning them")


def plan_fix(
    graph: TieGraph,
    findings: Iterable[Finding],
    config: ConfigFile | None,
    index_mismatches: tuple[IndexMismatch, ...],
    request: FixRequest,
    oracle: Oracle,
) -> FixPlan:
    """Plan the changes that resolve ``findings`` with the strategy of ``request``."""
    findings = list(findings)
    if request.mode not in MODES:
        raise ValueError(f"unknown fix mode {request.mode!r}")
    if graph.declared is None or config is None:
        reason = (
            "no config.json" if config is None else "the model class's declared ties are unknown"
        ) + ": tieaudit repairs only ties it can check against the model class"
        return FixPlan(
            request, outcomes={f.fingerprint: Outcome(reason, False, Applicability.MANUAL) for f in findings}
        )
    planner = _Planner(graph, config, index_mismatches, request, oracle)
    active = planner.choose_flags()
    planner.untie_members(active)
    if request.mode == "retie":
        planner.retie_members(active)
    for pointer, value in planner.flags.items():
        for p in planner.governed(pointer):
            planner.done.setdefault(
                (p.target, p.source), Done(f"set {pointer} to {literal(value)} (and every other reader's copy of it)")
            )
    planner.config_readers()
    outcomes = {f.fingerprint: _outcome(f, planner, request) for f in findings}
    return FixPlan(
        request=request,
        stores=tuple(planner.stores.values()),
        drops=tuple(planner.drops.values()),
        config=dict(planner.config_changes),
        config_old={k: get_pointer(config.data, k) for k in planner.config_changes},
        rebuild_index=bool(index_mismatches),
        outcomes=outcomes,
        notes=tuple(dict.fromkeys(planner.notes)),
    )


@dataclass(frozen=True)
class UntieConfig:
    """The config edits that untie the pairs of some flags, and what transformers ties after them."""

    changes: Mapping[str, Any]  # JSON pointer -> new value (every reader's copy of each flag; pinned settings)
    old: Mapping[str, Any]  # JSON pointer -> previous raw value (None: absent)
    active: Mapping[str, str]  # {target: source} transformers still ties with the edited config
    notes: tuple[str, ...]


def untie_config(graph: TieGraph, config: ConfigFile, pointers: Iterable[str], oracle: Oracle) -> UntieConfig:
    """Set each governing flag of ``pointers`` to false wherever readers look, keeping every other setting
    transformers reads as it was. Raises FixRefused when no config edit unties them (a forced flag)."""
    planner = _Planner(graph, config, (), FixRequest("untie"), oracle)
    planner.flags = dict.fromkeys(pointers, False)
    active = oracle.active_ties(planner.candidate()) if planner.flags else dict(graph.declared.active)  # type: ignore[union-attr]
    for pointer in planner.flags:
        why = planner.flag_problem(pointer, active)
        if why:
            raise FixRefused(why)
    for pointer, value in planner.flag_writes().items():
        if get_pointer(config.data, pointer) != value:
            planner.config_changes[pointer] = value
    if planner.config_changes:
        planner.pin_drift()
    changes = dict(planner.config_changes)
    return UntieConfig(
        changes, {k: get_pointer(config.data, k) for k in changes}, active, tuple(dict.fromkeys(planner.notes))
    )


def _outcome(f: Finding, planner: _Planner, request: FixRequest) -> Outcome:
    """What this plan does about ``f``: decided by what the rule says fix can repair (`Rule.repair`) and by the
    finding's typed location and evidence, never by its code or wording."""

    rule = get_rule(f.code)
    repair = rule.repair if rule else Repair.MANUAL
    if repair is Repair.PAIR:
        key = (str(f.evidence.get("target")), str(f.evidence.get("source")))
        if key in planner.blocked:
            blocked = planner.blocked[key]
            return Outcome(
                blocked.reason, False, Applicability.UNSAFE if blocked.needs_unsafe else Applicability.MANUAL
            )
        if key in planner.done:
            done = planner.done[key]
            return Outcome(done.action, True, Applicability.UNSAFE if done.discards else Applicability.SAFE)
        if any((p.target, p.source) == key and p.status is TieStatus.TIED for p in planner.pairs):
            return Outcome("left as is: the pair is tied and loads correctly (--retie drops the copy)", False)
        other = "retie" if request.mode == "untie" else "untie"
        return Outcome(f"not resolved by --{request.mode} (try --{other})", False)
    if repair is Repair.CONFIG:
        pointer = f.location.config_key
        if "indexed_file" in f.evidence:
            return Outcome("regenerate the index from the shards", True)
        if pointer in planner.pointer_done:
            return Outcome(planner.pointer_done[pointer], False, Applicability.MANUAL)
        if pointer in planner.config_changes:
            return Outcome(f"write {literal(planner.config_changes[pointer])} at {pointer}", True)
        governing = f.evidence.get("governing_pointer")
        if isinstance(governing, str) and governing in planner.config_changes:
            return Outcome(f"write {literal(planner.config_changes[governing])} at {governing}", True)
        return Outcome("not resolved by this fix", False, Applicability.MANUAL)
    hint = f.fix.description if f.fix and f.fix.description else "tieaudit fix does not repair this finding"
    return Outcome(hint, False, Applicability.MANUAL)


def _diverged(p: PairState) -> bool:
    return (
        p.tied_by_config
        and p.status is TieStatus.DIVERGED
        and p.both_stored
        and not p.shape_mismatch
        and not p.expected_mismatch
    )


@dataclass(frozen=True)
class Done:
    """What the plan does for a pair; ``discards``: it throws stored values away (an unsafe retie)."""

    action: str
    discards: bool = False


@dataclass(frozen=True)
class Blocked:
    """Why a pair cannot be fixed by this request; ``needs_unsafe``: it can with --unsafe-fixes (the fix would
    discard or guess data)."""

    reason: str
    needs_unsafe: bool = False


_GUESS = (
    "nothing in the files shows that {target} held {source} when saved (it may have been trained separately): "
    "pass --unsafe-fixes to store {source} as {target} anyway, or re-save {target} from the model that has it"
)


def _untied_missing(p: PairState) -> bool:
    return not p.tied_by_config and p.status is TieStatus.MISSING and (p.source_info or p.target_info) is not None


def _shared(p: PairState) -> bool:
    s, t = p.source_info, p.target_info
    return bool(s and t and s.storage_id is not None and s.storage_id == t.storage_id)


def _info_of(pairs: Iterable[PairState], member: str) -> TensorInfo | None:
    for p in pairs:
        if p.source == member and p.source_info is not None:
            return p.source_info
        if p.target == member and p.target_info is not None:
            return p.target_info
    return None
