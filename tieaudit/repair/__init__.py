"""Repairs: fix and merge planning (pure), atomic writing, and the `fix` and `merge` orchestration."""

from __future__ import annotations

from tieaudit.repair.fixing import fix
from tieaudit.repair.merging import merge

__all__ = ["fix", "merge"]
