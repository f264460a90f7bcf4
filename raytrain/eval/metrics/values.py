"""The one definition of a per-sample number, shared by every metric and the report.

Per-sample dicts travel through Ray Data / Arrow, where None becomes NaN, and through JSON; a value
is defined when it is a finite number."""

from __future__ import annotations

import math
from typing import Any


def finite(v: Any) -> float | None:
    """`v` as a float, or None if undefined (None, NaN, inf, missing, non-numeric)."""
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
