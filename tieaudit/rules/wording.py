"""Numbers as the rule messages write them."""

from __future__ import annotations

import math


def num(x: float | None) -> str:
    """Three significant digits; "inf" and "n/a" spelled out."""
    if x is None:
        return "n/a"
    return "inf" if math.isinf(x) else f"{x:.3g}"


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"
