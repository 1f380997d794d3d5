"""Assertions shared by the repair tests."""

from __future__ import annotations

from collections.abc import Iterable

from tieaudit.model import Finding, Severity


def ignores_flag(finding: Finding) -> bool:
    """A TIE005 about readers that decide the tie whatever the flag says (vLLM's Gemma2 always ties its head): no
    config edit can satisfy them, so a repair or a merge that unties such a model keeps it, by design."""
    readers = finding.evidence.get("readers") if finding.code == "TIE005" else None
    return isinstance(readers, list) and bool(readers) and all(r["ignores_flag"] for r in readers)


def alarms_beyond_flag_ignoring_readers(findings: Iterable[Finding]) -> list[Finding]:
    """Findings at warning or above, except those of ``ignores_flag``."""
    return [f for f in findings if f.severity is not Severity.INFO and not ignores_flag(f)]
