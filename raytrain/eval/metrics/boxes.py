"""Box grounding metrics: one-to-one matching per sample, micro P/R/F1 over the dataset.

``score_boxes`` runs per sample on Ray Data workers and returns a small flat dict of
ints / floats; ``aggregate_boxes`` runs on the driver. Boxes are in SOURCE-image pixels
(``raytrain.formats.annotations.Box``). The model outputs no confidence scores, so
there is no ranking and no AP here: a prediction is either matched or not.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from raytrain.formats.annotations import Box, box_iou
from raytrain.eval.metrics.values import finite

SAMPLE_KEYS = ("valid", "tp", "fp", "fn", "iou_sum", "n_gt", "n_pred")
AGGREGATE_KEYS = ("n", "n_valid", "valid_rate", "precision", "recall", "f1", "mean_iou")


def _labels_compatible(a: str, b: str) -> bool:
    """Labels must agree only when both boxes carry one (case- and space-insensitive)."""
    a, b = a.strip().casefold(), b.strip().casefold()
    return not a or not b or a == b


def iou_matrix(gt: Sequence[Box], pred: Sequence[Box]) -> np.ndarray:
    """(len(gt), len(pred)) IoU, 0 where labels are incompatible (such a pair never matches)."""
    m = np.zeros((len(gt), len(pred)), dtype=np.float64)
    for i, g in enumerate(gt):
        for j, p in enumerate(pred):
            if _labels_compatible(g.label, p.label):
                m[i, j] = box_iou(g, p)
    return m


def match_boxes(
    pred: Sequence[Box],
    gt: Sequence[Box],
    iou_threshold: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The one-to-one assignment ``score_boxes`` scores: ``(rows, cols, iou)`` where
    ``gt[rows[k]]`` is paired with ``pred[cols[k]]`` (min(G, P) pairs, hits and misses alike)
    and ``iou`` is the ``(G, P)`` matrix of ``iou_matrix``. Empty arrays when either side is.

    The objective is lexicographic: first the number of pairs with ``IoU >= iou_threshold``,
    then the total IoU (see ``score_boxes``)."""
    iou = iou_matrix(gt, pred)
    if not len(gt) or not len(pred):
        empty = np.zeros(0, dtype=np.intp)
        return empty, empty, iou
    hit = iou >= iou_threshold
    # A TP weighs more than any total IoU (at most min(n_gt, n_pred)), so TPs come first.
    weight = hit * float(min(len(gt), len(pred)) + 1) + iou
    rows, cols = linear_sum_assignment(weight, maximize=True)
    return rows, cols, iou


def score_boxes(
    pred: Sequence[Box] | None,
    gt: Sequence[Box],
    iou_threshold: float = 0.5,
) -> dict:
    """Score one sample's predicted boxes against its GT boxes.

    Matching is one-to-one (each GT box and each prediction used at most once) and
    optimal, by ``scipy.optimize.linear_sum_assignment``. The objective is
    lexicographic: first the number of pairs with ``IoU >= iou_threshold`` (the TPs),
    then the total IoU. Maximising total IoU alone can cost TPs (0.9 + 0.3 beats
    0.5 + 0.5 but has one TP instead of two), which would understate recall.

    A pair can only match when the labels agree or either label is empty (compared
    after ``strip().casefold()``); an incompatible pair counts as IoU 0.

    Returns ``valid`` (0/1), ``tp``, ``fp = n_pred - tp``, ``fn = n_gt - tp``,
    ``iou_sum`` (sum over GT boxes of the IoU with its assigned prediction, whether
    or not it passes the threshold; 0 when unassigned), ``n_gt``, ``n_pred``.
    ``pred=None`` (unparsable output) gives ``valid=0``, ``fp=0``, ``fn=n_gt``.
    """
    n_gt = len(gt)
    if pred is None:
        return {"valid": 0, "tp": 0, "fp": 0, "fn": n_gt, "iou_sum": 0.0, "n_gt": n_gt, "n_pred": 0}
    n_pred = len(pred)
    tp = 0
    iou_sum = 0.0
    if n_gt and n_pred:
        rows, cols, iou = match_boxes(pred, gt, iou_threshold)
        tp = int((iou[rows, cols] >= iou_threshold).sum())
        iou_sum = float(iou[rows, cols].sum())
    return {
        "valid": 1,
        "tp": tp,
        "fp": n_pred - tp,
        "fn": n_gt - tp,
        "iou_sum": iou_sum,
        "n_gt": n_gt,
        "n_pred": n_pred,
    }



def _num(v: Any) -> float:
    """A per-sample count; undefined (None, NaN, junk) counts as 0."""
    return finite(v) or 0.0


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def aggregate_boxes(samples: Iterable[dict]) -> dict:
    """Micro-averaged P/R/F1 and mean IoU over all per-sample dicts. Never raises.

    ``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)``,
    ``f1 = 2 TP / (2 TP + FP + FN)``; invalid samples add their GT boxes to FN.
    ``mean_iou`` = total ``iou_sum`` / total GT boxes (invalid samples contribute 0).
    A ratio with a zero denominator is ``None`` (JSON-safe with ``allow_nan=False``).
    """
    n = n_valid = 0
    tp = fp = fn = iou_sum = n_gt = 0.0
    for s in samples:
        n += 1
        if not s:
            continue
        n_valid += int(_num(s.get("valid")) == 1.0)
        tp += _num(s.get("tp"))
        fp += _num(s.get("fp"))
        fn += _num(s.get("fn"))
        iou_sum += _num(s.get("iou_sum"))
        n_gt += _num(s.get("n_gt"))
    return {
        "n": n,
        "n_valid": n_valid,
        "valid_rate": _ratio(n_valid, n),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "mean_iou": _ratio(iou_sum, n_gt),
    }


def centred_mean_box(train_boxes_norm: Iterable[tuple[float, float]], width: int, height: int) -> Box:
    """Blind baseline: a box centred in the image, sized by the mean training GT box.

    ``train_boxes_norm`` yields ``(w, h)`` of each training GT box divided by its image's
    width / height. Raises ``ValueError`` if it is empty (the baseline is undefined).
    """
    wh = np.asarray(list(train_boxes_norm), dtype=np.float64).reshape(-1, 2)
    if len(wh) == 0:
        raise ValueError("centred_mean_box needs at least one training box")
    mw, mh = wh.mean(axis=0)
    bw, bh = float(mw) * width, float(mh) * height
    cx, cy = width / 2.0, height / 2.0
    return Box(x1=cx - bw / 2, y1=cy - bh / 2, x2=cx + bw / 2, y2=cy + bh / 2)
