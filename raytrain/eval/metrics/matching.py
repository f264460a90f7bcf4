"""One-to-one matching that maximises the number of hits (TPs), used by the P/R metrics.

Minimum-total-cost assignment alone can trade a TP away: two GT objects with candidate
IoUs {0.9, 0.3} / {0.5, 0.5} give a larger total IoU for 0.9 + 0.3 (one pair above 0.5)
than for 0.5 + 0.5 (two pairs). Recall would then be understated. The weight here is
lexicographic: a hit is worth more than any sum of closeness terms.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def max_hit_assignment(hit: np.ndarray, closeness: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hit pairs ``(rows, cols)`` of a one-to-one assignment with the most hits.

    ``hit``: bool ``(R, C)``, which pairs may match (e.g. ``IoU >= t``, ``distance < r``).
    ``closeness``: float ``(R, C)`` in ``[0, 1]``, used only to choose among assignments
    with equally many hits (higher is better: IoU, ``1 - distance / r``). Returns only the
    assigned pairs that are hits, as two int arrays of equal length (each row and each
    column at most once), by ``scipy.optimize.linear_sum_assignment``.
    """
    hit = np.asarray(hit, dtype=bool)
    empty = np.zeros(0, dtype=np.intp)
    if hit.size == 0 or not hit.any():
        return empty, empty
    close = np.clip(np.nan_to_num(np.asarray(closeness, dtype=np.float64)), 0.0, 1.0)
    # sum of closeness over at most min(R, C) pairs is <= min(R, C) < one hit's weight
    weight = hit * (float(min(hit.shape)) + 1.0) + np.where(hit, close, 0.0)
    rows, cols = linear_sum_assignment(weight, maximize=True)
    keep = hit[rows, cols]
    return rows[keep], cols[keep]
