"""Plain-text metrics table printed at the end of an eval job.

Rows are metric names, columns are runs (``trained``, ``untrained``, ``centre_baseline``...)::

    metric         trained  centre_baseline
    -------------  -------  ---------------
    n                  100              100
    mean_distance    22.31            141.4
    success_rate    0.9011                -
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence


def format_value(v: Any) -> str:
    """One cell: ints in full, other numbers to 4 significant digits, ``None`` as "-"."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, numbers.Integral):  # int, numpy integers
        return str(int(v))
    if isinstance(v, numbers.Real):  # float, numpy floats
        f = float(v)
        if math.isnan(f):
            return "nan"
        return f"{f:.4g}"
    return str(v)


def format_table(columns: dict[str, dict], keys: Sequence[str] | None = None) -> str:
    """Align ``{column_name: {metric: value}}`` as text, one row per metric.

    ``keys`` picks and orders the rows; by default every metric in any column, in order
    of first appearance. A metric missing from a column shows as "-". Metric names are
    left-aligned, values right-aligned. No trailing newline.
    """
    if keys is None:
        keys = list(dict.fromkeys(k for col in columns.values() for k in col))
    header = ["metric", *columns]
    rows = [[str(k), *(format_value(col.get(k)) for col in columns.values())] for k in keys]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:]))
        return "  ".join([first, *rest]).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])
