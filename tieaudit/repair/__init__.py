"""Repairs: fix planning (pure), atomic writing, and the `fix` orchestration."""

from __future__ import annotations

from tieaudit.repair.fixing import fix

__all__ = ["fix"]
