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


def format_rows(rows: Sequence[dict], keys: Sequence[str] | None = None) -> str:
    """Align a list of records as text, one line per record (e.g. a grid's cells), columns in
    ``keys`` order (default: every key, in order of first appearance). Strings left-aligned,
    numbers right-aligned as ``format_value`` writes them."""
    if keys is None:
        keys = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[format_value(r.get(k)) for k in keys] for r in rows]
    widths = [max([len(str(k))] + [len(c[i]) for c in cells]) for i, k in enumerate(keys)]
    left = [all(isinstance(r.get(k), str) or r.get(k) is None for r in rows) for k in keys]

    def line(vals: list[str]) -> str:
        return "  ".join(v.ljust(w) if lf else v.rjust(w) for v, w, lf in zip(vals, widths, left)).rstrip()

    return "\n".join([line([str(k) for k in keys]), line(["-" * w for w in widths]), *(line(c) for c in cells)])
