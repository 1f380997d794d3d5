"""The data model of a tieaudit report: frozen dataclasses, no I/O.

Detection produces these; every renderer is a pure function of a `Report`.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1


# a progress callback: (what is being done, bytes done, bytes in all; 0: unknown), on stderr in the CLI
Progress = Callable[[str, int, int], None]


class Severity(str, enum.Enum):
    """Finding severity, ordered error > warning > info."""

    ERROR = "error"
    WARNING = "warning"
    INFO = "info"

    @property
    def rank(self) -> int:
        return {"info": 0, "warning": 1, "error": 2}[self.value]


class TieStatus(str, enum.Enum):
    """What a loader makes of a tie group, as transformers would load it."""

    TIED = "tied"  # loads as one shared tensor
    UNTIED = "untied"  # not tied by the flag, every tensor stored: loads as separate tensors
    DIVERGED = "diverged"  # the flag ties it, but stored tensors differ (values, shape or dtype)
    MISSING = "missing"  # a tensor the load needs is absent: random initialisation


class _Word(str, enum.Enum):
    """An enum whose members are the words the reports print (and compare equal to them)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class Applicability(_Word):
    """How far a fix can be trusted (as ruff's): it keeps the model's computation, it may not, or it is by hand."""

    SAFE = "safe"
    UNSAFE = "unsafe"  # discards or guesses data: needs --unsafe-fixes
    MANUAL = "manual"  # nothing tieaudit can write


class FixStatus(_Word):
    """What `tieaudit fix` did about one finding."""

    FIXED = "fixed"
    WOULD_FIX = "would-fix"  # a preview (--dry-run/--diff) that would fix it
    NOT_FIXED = "not-fixed"  # this fix does not address it
    REMAINS = "remains"  # addressed, but the re-audit still finds it


@dataclass(frozen=True)
class Location:
    """Where a finding points: a file, a tensor and/or a config key (JSON pointer) with its line."""

    file: str | None = None
    tensor: str | None = None
    config_key: str | None = None
    line: int | None = None


@dataclass(frozen=True)
class FixHint:
    applicability: Applicability
    command: str | None = None
    description: str | None = None


@dataclass(frozen=True)
class Finding:
    code: str
    name: str
    severity: Severity
    message: str
    location: Location = field(default_factory=Location)
    evidence: Mapping[str, Any] = field(default_factory=dict)
    fix: FixHint | None = None

    @property
    def fingerprint(self) -> str:
        """Stable across runs and machines: the rule and where it points, not the numbers."""
        key = "|".join(
            str(part) for part in (self.code, self.location.file, self.location.tensor, self.location.config_key)
        )
        return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TieGroup:
    """One source tensor and the tensors tied (or meant to be tied) to it. Names are in-memory names."""

    source: str
    targets: tuple[str, ...]
    declared: bool  # declared by the model class (False: only observed in the files)
    governing_flag: str | None  # e.g. "config.json:/tie_word_embeddings"
    flag_value: bool | None  # the value transformers uses (None when no flag governs)
    tied_by_config: bool  # transformers would tie this group when loading
    stored: Mapping[str, str | None]  # in-memory name -> file holding it (None: absent)
    disk_names: Mapping[str, str]  # in-memory name -> on-disk name (when they differ, e.g. legacy names)
    status: TieStatus
    observed: tuple[str, ...] = ()  # how the files show the tie: "shared-storage", "safetensors-metadata", ...

    @property
    def members(self) -> tuple[str, ...]:
        return (self.source, *self.targets)


@dataclass(frozen=True)
class Comparison:
    """A measured difference between two tensors of a tie group (weights in float32)."""

    stage: str  # "on-disk" | "adapter" | "merge-reload" | "merged" | "peft" (a merge's tied weights vs peft's own)
    source: str
    target: str
    tensor: str | None
    max_abs_diff: float | None
    rel_diff: float | None
    max_abs_logit_diff: float | None = None
    top1_agreement: float | None = None
    bitwise_equal: bool | None = None
    embedding_rows_max_abs_diff: float | None = None  # probe-token rows as the embedding outputs them


@dataclass(frozen=True)
class Skipped:
    check: str
    reason: str


@dataclass(frozen=True)
class HubRef:
    """The Hub repo a target was resolved from, offline, in the local Hugging Face cache."""

    repo_id: str
    revision: str  # as asked: a branch, tag or commit ("main" by default)
    commit: str  # the cached snapshot's commit hash

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}"


@dataclass(frozen=True)
class Target:
    path: str  # the directory read (for a Hub repo id: its snapshot in the local cache)
    kind: str  # "model" | "adapter"
    base: str | None
    layout: str
    files: tuple[str, ...]
    architecture: str | None = None
    repo: HubRef | None = None

    @property
    def name(self) -> str:
        """What the user asked for: the path, or the repo id and revision."""
        return str(self.repo) if self.repo is not None else self.path


@dataclass(frozen=True)
class Stats:
    header_bytes_read: int = 0
    tensor_bytes_read: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class FileChange:
    """One change `tieaudit fix` makes (or would make) to a checkpoint directory."""

    kind: str  # "store-tensor" | "drop-tensor" | "set-config" | "rewrite-index" | "rewrite-file" | "new-file"
    file: str  # path relative to the checkpoint root
    tensor: str | None = None  # on-disk tensor name
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    nbytes: int | None = None
    pointer: str | None = None  # JSON pointer, for set-config
    old: Any = None  # previous config value (None: absent)
    new: Any = None
    detail: str = ""  # why, in words


@dataclass(frozen=True)
class FixOutcome:
    """What `tieaudit fix` did about one finding of the audit it started from."""

    code: str
    fingerprint: str
    tensor: str | None
    status: FixStatus
    action: str  # what the fix does, or why it cannot
    applicability: Applicability = Applicability.SAFE


@dataclass(frozen=True)
class FixRun:
    """A `tieaudit fix` run: the strategy, where it wrote, and every change."""

    mode: str  # "untie" | "retie"
    dry_run: bool
    source_path: str
    written_to: str | None  # None: nothing written (dry run, or nothing to change)
    changes: tuple[FileChange, ...]
    fixed: int
    total: int
    bytes_written: int = 0
    seconds: float = 0.0
    notes: tuple[str, ...] = ()
    diffs: tuple[str, ...] = ()  # unified diffs of the JSON files (--diff)


@dataclass(frozen=True)
class MergeGroup:
    """What `tieaudit merge` did with one tied group of the base that the adapter touches."""

    source: str
    members: tuple[str, ...]
    result: str  # "tied" (one stored tensor, flag true) | "untied" (every member stored, flag false)
    why: str
    # how PEFT's own merge_and_unload -> save_pretrained -> from_pretrained would break this group (the TIE102
    # mechanisms; empty when PEFT's merge is right), and the same in words
    peft_mechanisms: tuple[str, ...] = ()
    peft_problem: str | None = None


@dataclass(frozen=True)
class MergeRun:
    """A `tieaudit merge` run: inputs, decisions, and what was written."""

    adapter_path: str
    base_path: str
    written_to: str
    groups: tuple[MergeGroup, ...]
    merged: tuple[str, ...]  # in-memory names of the weights that received a LoRA delta
    replaced: tuple[str, ...]  # in-memory names replaced by a trained copy (modules_to_save) or trained token rows
    changes: tuple[FileChange, ...]
    bytes_written: int = 0
    base_bytes_read: int = 0  # tensor bytes read from the base (copies included)
    seconds: float = 0.0
    notes: tuple[str, ...] = ()
    verified_by: str | None = None  # the library the written tied weights were checked against ("peft 0.21.2")


@dataclass(frozen=True)
class RuleDoc:
    """A rule's documentation, as machine formats (SARIF) publish it beside the results."""

    code: str
    name: str
    severity: Severity
    summary: str
    explain: str


@dataclass(frozen=True)
class Report:
    tool_version: str
    target: Target
    groups: tuple[TieGroup, ...]
    comparisons: tuple[Comparison, ...]
    findings: tuple[Finding, ...]
    skipped: tuple[Skipped, ...]
    fail_on: Severity = Severity.WARNING
    exit_zero: bool = False
    stats: Stats = field(default_factory=Stats)
    fixes: tuple[FixOutcome, ...] = ()
    fix_run: FixRun | None = None
    merge_run: MergeRun | None = None

    def counts(self) -> dict[str, int]:
        return count_findings(self.findings)

    @property
    def exit_code(self) -> int:
        if self.fix_run is not None and self.fix_run.dry_run:
            # fix --dry-run/--diff: 1 when something would change
            return 1 if (self.fix_run.changes and not self.exit_zero) else 0
        return exit_code_for(self.findings, self.fail_on, self.exit_zero)


@dataclass(frozen=True)
class TargetError:
    """A target of a batch that could not be audited: the message and exit code it would have had alone."""

    path: str
    message: str
    exit_code: int  # 2 (unreadable, usage, internal) or 3 (nothing to audit)


# how bad each exit code is when a batch combines them: could-not-audit, then nothing-to-audit, then findings
EXIT_PRIORITY = {2: 3, 3: 2, 1: 1, 0: 0}


@dataclass(frozen=True)
class BatchReport:
    """`tieaudit check PATH PATH ...` (or a directory of `checkpoint-*`): one item per target, in order: its report,
    or why it could not be audited. The exit code is the worst of them."""

    tool_version: str
    items: tuple[Report | TargetError, ...]
    fail_on: Severity = Severity.WARNING

    @property
    def reports(self) -> tuple[Report, ...]:
        return tuple(i for i in self.items if isinstance(i, Report))

    @property
    def errors(self) -> tuple[TargetError, ...]:
        return tuple(i for i in self.items if isinstance(i, TargetError))

    def counts(self) -> dict[str, int]:
        return count_findings(f for r in self.reports for f in r.findings)

    @property
    def exit_code(self) -> int:
        return max((i.exit_code for i in self.items), key=lambda c: EXIT_PRIORITY.get(c, 3), default=0)


def count_findings(findings: Iterable[Finding]) -> dict[str, int]:
    counts = {s.value: 0 for s in Severity}
    for f in findings:
        counts[f.severity.value] += 1
    return counts


def exit_code_for(findings: Iterable[Finding], fail_on: Severity, exit_zero: bool = False) -> int:
    """The one place that maps findings to an exit code (0 clean, 1 findings at or above fail_on)."""
    failing = any(f.severity.rank >= fail_on.rank for f in findings)
    if failing and not exit_zero:
        return 1
    return 0
