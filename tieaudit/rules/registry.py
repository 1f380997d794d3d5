"""The rule registry: every rule's code, name, default severity, explain text and check function."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tieaudit.model import Finding, FixHint, Location, Severity


@dataclass(frozen=True)
class Violation:
    """What a rule's check yields: the registry stamps the rule's code, name and (unless overridden) severity on it,
    as ruff's violations carry their rule, so a rule's identity is written once, in its ``@rule``."""

    message: str
    location: Location
    evidence: Mapping[str, Any] = field(default_factory=dict)
    fix: FixHint | None = None
    severity: Severity | None = None  # None: the rule's severity; set where the consequence decides (TIE005)


def violation(
    message: str,
    location: Location,
    *,
    severity: Severity | None = None,
    fix: FixHint | None = None,
    evidence: Mapping[str, Any] | None = None,
    **more: Any,
) -> Violation:
    """A Violation whose evidence is ``evidence`` and the keyword arguments ``more``."""
    return Violation(message, location, {**(evidence or {}), **more}, fix, severity)


Check = Callable[..., Iterable[Finding]]
CheckBody = Callable[..., Iterable[Violation]]


class Repair(enum.Enum):
    """What `tieaudit fix` can do about a rule's findings."""

    PAIR = "pair"  # store, copy or drop tensors of the finding's (target, source) pair, or set its flag
    CONFIG = "config"  # rewrite config keys or the shard index
    MANUAL = "manual"  # nothing: the finding's fix hint says what to do by hand


@dataclass(frozen=True)
class Rule:
    code: str
    name: str
    severity: Severity
    summary: str  # one line: when it fires
    explain: str  # long help for `tieaudit explain`
    check: Check
    family: str  # "checkpoint" or "adapter"
    repair: Repair = Repair.MANUAL


RULES: dict[str, Rule] = {}


def rule(
    code: str, name: str, severity: Severity, summary: str, explain: str, family: str, repair: Repair = Repair.MANUAL
) -> Callable[[CheckBody], CheckBody]:
    """Register a check function under a rule code (codes are never reused). The registered check turns each
    ``Violation`` the function yields into a ``Finding`` of this rule."""

    def register(fn: CheckBody) -> CheckBody:
        if code in RULES:
            raise RuntimeError(f"rule code {code} registered twice")

        def check(ctx: Any) -> Iterator[Finding]:
            for v in fn(ctx):
                yield Finding(code, name, v.severity or severity, v.message, v.location, dict(v.evidence), v.fix)

        RULES[code] = Rule(code, name, severity, summary, explain.strip(), check, family, repair)
        return fn

    return register


def run(rules: Iterable[Rule], context: Any) -> list[Finding]:
    """Every finding of the rules that apply to ``context`` (the adapter rules to an adapter's, the checkpoint
    rules to a model's), worst first, then by code and tensor: the one order every report uses."""

    findings = [f for r in rules if r.family == context.family for f in r.check(context)]
    findings.sort(key=lambda f: (-f.severity.rank, f.code, f.location.tensor or ""))
    return findings


def all_rules() -> list[Rule]:
    _load()
    return sorted(RULES.values(), key=lambda r: r.code)


def get_rule(code_or_name: str) -> Rule | None:
    _load()
    key = code_or_name.strip()
    for r in RULES.values():
        if key.upper() == r.code or key.lower() == r.name:
            return r
    return None


def selected(select: Sequence[str] | None, ignore: Sequence[str] | None) -> list[Rule]:
    """Rules enabled by ruff-style --select/--ignore: exact codes, names or code prefixes ("TIE00", "TIE")."""
    rules = all_rules()
    if select:
        rules = [r for r in rules if any(_matches(r, s) for s in select)]
    if ignore:
        rules = [r for r in rules if not any(_matches(r, s) for s in ignore)]
    return rules


def unknown_selectors(selectors: Sequence[str]) -> list[str]:
    rules = all_rules()
    return [s for s in selectors if not any(_matches(r, s) for r in rules)]


def _matches(r: Rule, selector: str) -> bool:
    s = selector.strip()
    return r.code.startswith(s.upper()) or s.lower() == r.name or s.upper() == "ALL"


def _load() -> None:
    # importing the rule modules registers their rules
    from tieaudit.rules import adapter, checkpoint, gguf, llama2c, torch_ckpt  # noqa: F401  # lazy: a cycle (the rule modules import the registry)
