"""The rule registry: every rule's code, name, default severity, explain text and check function."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from tieaudit.model import Finding, Severity

Check = Callable[..., Iterable[Finding]]


@dataclass(frozen=True)
class Rule:
    code: str
    name: str
    severity: Severity
    summary: str  # one line: when it fires
    explain: str  # long help for `tieaudit explain`
    check: Check
    family: str  # "checkpoint" or "adapter"


RULES: dict[str, Rule] = {}


def rule(code: str, name: str, severity: Severity, summary: str, explain: str, family: str) -> Callable[[Check], Check]:
    """Register a check function under a rule code (codes are never reused)."""

    def register(fn: Check) -> Check:
        if code in RULES:
            raise RuntimeError(f"rule code {code} registered twice")
        RULES[code] = Rule(code, name, severity, summary, explain.strip(), fn, family)
        return fn

    return register


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
    from tieaudit.rules import adapter, checkpoint  # noqa: F401
