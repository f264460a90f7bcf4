"""Calibration of per-object confidences: which predictions are correct, reliability bins and the
expected calibration error (Guo et al. 2017). `raytrain eval` reports them beside the other metrics."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from raytrain.formats.annotations import Box, Obj, box_iou, score_order

def correct_predictions(
    pred: Sequence[Obj],
    gt: Sequence[Obj],
    width: float,
    height: float,
    scores: Sequence[float] | None = None,
    iou_threshold: float = 0.5,
    success_frac: float = 0.05,
) -> list[bool]:
    """Which predictions are correct, for calibration: greedy one-to-one matching in order of
    ``scores`` (best first; the given order when None), as COCO evaluation matches. A box is
    correct when it takes a not yet matched GT box with IoU >= ``iou_threshold`` (the highest
    such); a point when it takes a GT point closer than ``success_frac`` x image diagonal (the
    closest), the success radius of ``metrics.pointing``. Labels must agree when both are
    non-empty (case- and space-insensitive), as in ``metrics.boxes``."""
    order = score_order(scores) if scores is not None else list(range(len(pred)))
    radius = success_frac * math.hypot(width, height)
    used = [False] * len(gt)
    correct = [False] * len(pred)

    def same(a: str, b: str) -> bool:
        a, b = a.strip().casefold(), b.strip().casefold()
        return not a or not b or a == b

    for i in order:
        p, best, best_v = pred[i], None, None
        for j, g in enumerate(gt):
            if used[j] or not same(p.label, g.label) or type(p) is not type(g):
                continue
            if isinstance(p, Box):
                v = box_iou(p, g)
                ok = v >= iou_threshold
            else:
                v = -math.hypot(p.x - g.x, p.y - g.y)
                ok = -v < radius
            if ok and (best_v is None or v > best_v):
                best, best_v = j, v
        if best is not None:
            used[best] = True
            correct[i] = True
    return correct


def reliability_bins(confidences: Sequence[float], correct: Sequence[bool], n_bins: int = 10) -> list[dict]:
    """Equal-width confidence bins ``(k/n, (k+1)/n]`` (confidence 0 in the first): per bin
    ``count``, mean ``confidence`` and ``accuracy`` (None for an empty bin)."""
    c = np.asarray(confidences, dtype=np.float64).reshape(-1)
    y = np.asarray(correct, dtype=np.float64).reshape(-1)
    if c.shape != y.shape:
        raise ValueError(f"{c.size} confidences but {y.size} correctness values")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if not np.all(np.isfinite(c)) or np.any((c < 0) | (c > 1)):
        raise ValueError("confidences must be finite and in [0, 1]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, c, side="left") - 1, 0, n_bins - 1)
    out = []
    for k in range(n_bins):
        sel = idx == k
        n = int(sel.sum())
        out.append({
            "lo": float(edges[k]),
            "hi": float(edges[k + 1]),
            "count": n,
            "confidence": float(c[sel].mean()) if n else None,
            "accuracy": float(y[sel].mean()) if n else None,
        })
    return out


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], n_bins: int = 10) -> float | None:
    """Standard ECE (Guo et al. 2017): ``sum_b |B_b| / N * |accuracy(B_b) - confidence(B_b)|``
    over ``reliability_bins``; None when there are no predictions."""
    bins = reliability_bins(confidences, correct, n_bins)
    total = sum(b["count"] for b in bins)
    if total == 0:
        return None
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]))


