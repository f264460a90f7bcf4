"""Pointing precision / recall / F1 with one-to-one (Hungarian) matching, in SOURCE pixels.

Complements ``pointing.py`` (closest-point distances, where several GT points may share
one prediction and extra predictions cost nothing): here every predicted point is used
at most once, so pointing at 3 of 5 objects, or at 8 when there are 5, is penalised.

Reference: Molmo's ``PointingEval`` (allenai/molmo, ``olmo/eval/evaluators.py``) matches
predicted to GT points by ``linear_sum_assignment`` on Euclidean distance, then counts a
matched pair as correct when the predicted point, rounded to the nearest pixel, lies in
the matched GT object's MASK; it averages per-sample P/R/F1 over samples. It has no
distance threshold. ``score_points_prf`` does that exactly when given ``gt_masks``.
Without masks (PixMo-Points' public points, our own datasets) a pair is correct when its
distance is below ``threshold_frac`` times the image diagonal (default 0.05, the same
"close enough" as ``pointing.score_points``' ``success_frac``).

``score_points_prf`` runs per sample on Ray Data workers and returns a flat dict of plain
numbers; ``aggregate_points_prf`` runs on the driver and reports both micro (summed counts,
the headline) and macro (mean of per-sample values, Molmo's way) averages.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from raytrain.eval.metrics.matching import max_hit_assignment
from raytrain.formats.annotations import Point
from raytrain.eval.metrics.values import finite

SAMPLE_KEYS = ("valid", "tp", "fp", "fn", "n_gt", "n_pred", "precision", "recall", "f1")
AGGREGATE_KEYS = (
    "n",
    "n_valid",
    "valid_rate",
    "tp",
    "fp",
    "fn",
    "precision",
    "recall",
    "f1",
    "macro_precision",
    "macro_recall",
    "macro_f1",
)


def _in_mask(x: float, y: float, mask: np.ndarray) -> bool:
    """Molmo's point-in-region test: round to the nearest pixel (Python ``round``), in bounds, mask set."""
    h, w = mask.shape
    if not (math.isfinite(x) and math.isfinite(y)):
        return False
    xi, yi = round(x), round(y)
    return 0 <= xi < w and 0 <= yi < h and bool(mask[yi, xi])


def _f1(p: float, r: float) -> float:
    # Molmo adds 1e-10 to the denominator; exact here (differs by < 1e-9).
    return 2 * p * r / (p + r) if p > 0 and r > 0 else 0.0


def score_points_prf(
    pred: Sequence[Point] | None,
    gt: Sequence[Point],
    width: int,
    height: int,
    threshold_frac: float = 0.05,
    gt_masks: Sequence[np.ndarray] | None = None,
) -> dict:
    """Score one sample's predicted points against its GT points, one-to-one.

    Distance mode (``gt_masks=None``): a predicted and a GT point may match when their
    Euclidean distance is strictly below ``threshold_frac * sqrt(width**2 + height**2)``
    pixels. The assignment maximises the number of such matches first, then their
    closeness (``matching.max_hit_assignment``), so it is optimal in TP count; plain
    minimum-total-distance matching can trade a TP away.

    Mask mode (``gt_masks[i]``: bool ``(height, width)`` mask of GT point ``i``'s object):
    Molmo's rule exactly, minimum-total-distance assignment, then a pair is a TP when the
    rounded predicted point lies in the matched GT mask.

    Returns ``valid`` (0/1), ``tp``, ``fp = n_pred - tp``, ``fn = n_gt - tp``, ``n_gt``,
    ``n_pred`` and per-sample ``precision = tp/n_pred``, ``recall = tp/n_gt``, ``f1``.
    Per-sample conventions follow Molmo: no GT points gives P = R = F1 = 1 if the
    prediction is empty too, else 0; GT points with an empty prediction give 0.
    ``pred=None`` (unparsable output) gives ``valid=0``, ``fn=n_gt``, P = R = F1 = 0
    (Molmo would give 1 when the GT is empty; an unparsable answer is not "no points" here).
    Labels are ignored.
    """
    n_gt = len(gt)
    if gt_masks is not None and len(gt_masks) != n_gt:
        raise ValueError(f"gt_masks has {len(gt_masks)} masks for {n_gt} GT points")
    if pred is None:
        return {
            "valid": 0,
            "tp": 0,
            "fp": 0,
            "fn": n_gt,
            "n_gt": n_gt,
            "n_pred": 0,
            "precision": 0.0,
            "recall": 0.0,
            "f1": 0.0,
        }
    n_pred = len(pred)
    if n_gt == 0:
        ok = float(n_pred == 0)
        return {
            "valid": 1,
            "tp": 0,
            "fp": n_pred,
            "fn": 0,
            "n_gt": 0,
            "n_pred": n_pred,
            "precision": ok,
            "recall": ok,
            "f1": ok,
        }

    tp = 0
    if n_pred:
        g = np.array([(p.x, p.y) for p in gt], dtype=np.float64)  # (G, 2)
        q = np.array([(p.x, p.y) for p in pred], dtype=np.float64)  # (P, 2)
        dist = np.sqrt(((q[:, None, :] - g[None, :, :]) ** 2).sum(-1))  # (P, G), pixels
        dist = np.where(np.isfinite(dist), dist, np.inf)
        if gt_masks is not None:
            # Molmo: minimum total distance; a non-finite prediction can't be in any mask
            rows, cols = linear_sum_assignment(np.where(np.isinf(dist), 1e18, dist))
            tp = sum(_in_mask(q[i, 0], q[i, 1], np.asarray(gt_masks[j])) for i, j in zip(rows, cols))
        else:
            thr = threshold_frac * math.hypot(width, height)
            hit = dist < thr
            rows, _ = max_hit_assignment(hit, 1.0 - dist / thr if thr > 0 else hit)
            tp = len(rows)
    p, r = tp / n_pred if n_pred else 0.0, tp / n_gt
    tp = int(tp)
    return {
        "valid": 1,
        "tp": tp,
        "fp": n_pred - tp,
        "fn": n_gt - tp,
        "n_gt": n_gt,
        "n_pred": n_pred,
        "precision": p,
        "recall": r,
        "f1": _f1(p, r),
    }



def aggregate_points_prf(samples: Iterable[dict]) -> dict:
    """Micro and macro P/R/F1 over per-sample ``score_points_prf`` dicts. Never raises.

    Micro (headline): ``precision = TP/(TP+FP)``, ``recall = TP/(TP+FN)``,
    ``f1 = 2TP/(2TP+FP+FN)`` over summed counts; invalid samples add their GT points to
    FN. Samples with neither GT nor predicted points add nothing to micro counts.
    Macro (Molmo's reported numbers): mean of per-sample precision / recall / f1 over ALL
    samples, invalid ones counting 0. A ratio with a zero denominator is ``None``.
    """
    n = n_valid = 0
    tp = fp = fn = 0.0
    macro = {"precision": [], "recall": [], "f1": []}
    for s in samples:
        n += 1
        s = s or {}
        n_valid += int(finite(s.get("valid")) == 1.0)
        tp += finite(s.get("tp")) or 0.0
        fp += finite(s.get("fp")) or 0.0
        fn += finite(s.get("fn")) or 0.0
        for k, col in macro.items():
            col.append(finite(s.get(k)) or 0.0)

    def ratio(a: float, b: float) -> float | None:
        return a / b if b > 0 else None

    return {
        "n": n,
        "n_valid": n_valid,
        "valid_rate": ratio(n_valid, n),
        "tp": int(tp),
        "fp": int(fp),
        "fn": int(fn),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "macro_precision": float(np.mean(macro["precision"])) if n else None,
        "macro_recall": float(np.mean(macro["recall"])) if n else None,
        "macro_f1": float(np.mean(macro["f1"])) if n else None,
    }
