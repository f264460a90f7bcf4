"""Box metrics: hand cases, pycocotools IoU, brute-force matching and micro P/R/F1."""

import itertools
import json

import numpy as np
import pytest

from raytrain.eval.metrics.boxes import (
    AGGREGATE_KEYS,
    aggregate_boxes,
    centred_mean_box,
    iou_matrix,
    score_boxes,
)
from raytrain.formats.annotations import Box, box_iou


def B(x1, y1, x2, y2, label=""):
    return Box(x1=float(x1), y1=float(y1), x2=float(x2), y2=float(y2), label=label)


# ---------------------------------------------------------------- score_boxes, by hand


def test_perfect_and_partial_overlap():
    gt = [B(0, 0, 10, 10)]
    assert score_boxes([B(0, 0, 10, 10)], gt) == {
        "valid": 1, "tp": 1, "fp": 0, "fn": 0, "iou_sum": 1.0, "n_gt": 1, "n_pred": 1,
    }
    # shifted by half a width: intersection 50, union 150 -> IoU 1/3 < 0.5
    s = score_boxes([B(5, 0, 15, 10)], gt)
    assert (s["tp"], s["fp"], s["fn"]) == (0, 1, 1)
    assert s["iou_sum"] == pytest.approx(1 / 3)  # assigned pair counts for mean IoU even below threshold
    assert score_boxes([B(5, 0, 15, 10)], gt, iou_threshold=0.3)["tp"] == 1


def test_threshold_is_inclusive():
    # intersection 50, union 100 -> IoU exactly 0.5
    s = score_boxes([B(0, 0, 10, 5)], [B(0, 0, 10, 10)], iou_threshold=0.5)
    assert s["iou_sum"] == 0.5 and s["tp"] == 1


def test_matching_is_one_to_one():
    gt = [B(0, 0, 10, 10)]
    s = score_boxes([B(0, 0, 10, 10), B(0, 0, 10, 10), B(1, 1, 10, 10)], gt)
    assert (s["tp"], s["fp"], s["fn"], s["n_pred"]) == (1, 2, 0, 3)
    s = score_boxes([B(0, 0, 10, 10)], [B(0, 0, 10, 10), B(0, 0, 10, 10)])
    assert (s["tp"], s["fp"], s["fn"], s["iou_sum"]) == (1, 0, 1, 1.0)


def test_matching_maximises_true_positives_before_total_iou():
    # 1-D intervals (height 10): IoU(A,P)=.875, IoU(B,Q)=3/7, IoU(A,Q)=.625, IoU(B,P)=.5.
    # Max total IoU pairs A-P, B-Q (1.30, one TP); A-Q, B-P has 1.125 but two TPs.
    A, Bb = B(3, 0, 11, 10), B(6, 0, 11, 10)
    P, Q = B(3, 0, 10, 10), B(4, 0, 9, 10)
    s = score_boxes([P, Q], [A, Bb])
    assert (s["tp"], s["fp"], s["fn"]) == (2, 0, 0)
    assert s["iou_sum"] == pytest.approx(0.625 + 0.5)


def test_labels_must_match_when_both_are_given():
    box = (0, 0, 10, 10)
    assert score_boxes([B(*box, "dog")], [B(*box, "cat")])["tp"] == 0
    assert score_boxes([B(*box, "dog")], [B(*box, "cat")])["iou_sum"] == 0.0
    assert score_boxes([B(*box, " Cat")], [B(*box, "cat")])["tp"] == 1  # case/space-insensitive
    assert score_boxes([B(*box)], [B(*box, "cat")])["tp"] == 1  # unlabeled prediction
    assert score_boxes([B(*box, "cat")], [B(*box)])["tp"] == 1  # unlabeled GT
    # the label decides which of two identical boxes a prediction takes
    s = score_boxes([B(*box, "cat"), B(20, 20, 30, 30, "dog")], [B(*box, "dog"), B(*box, "cat")])
    assert (s["tp"], s["fp"], s["fn"]) == (1, 1, 1)


def test_invalid_and_empty():
    gt = [B(0, 0, 1, 1), B(2, 2, 3, 3)]
    assert score_boxes(None, gt) == {
        "valid": 0, "tp": 0, "fp": 0, "fn": 2, "iou_sum": 0.0, "n_gt": 2, "n_pred": 0,
    }
    s = score_boxes([], gt)
    assert (s["valid"], s["tp"], s["fp"], s["fn"]) == (1, 0, 0, 2)
    s = score_boxes(gt, [])
    assert (s["valid"], s["tp"], s["fp"], s["fn"]) == (1, 0, 2, 0)
    assert all(type(v) in (int, float) for v in s.values())


# ---------------------------------------------------------------- independent references


def _random_boxes(rng, n, near=None):
    """n random boxes in a 100x100 image; if ``near`` is given, jitter those instead (overlaps)."""
    if near is not None and len(near) and rng.random() < 0.8:
        base = np.array([[b.x1, b.y1, b.x2, b.y2] for b in near])
        xyxy = base[rng.integers(0, len(base), n)] + rng.normal(0, 3, size=(n, 4))
    else:
        xy = rng.uniform(0, 80, size=(n, 2))
        xyxy = np.concatenate([xy, xy + rng.uniform(2, 30, size=(n, 2))], axis=1)
    xyxy[:, 2:] = np.maximum(xyxy[:, 2:], xyxy[:, :2] + 0.5)  # keep x2 > x1, y2 > y1
    return [B(*r) for r in xyxy]


def _coco_iou(gt, pred):
    """(len(gt), len(pred)) IoU computed by pycocotools on xywh boxes."""
    mask_utils = pytest.importorskip("pycocotools.mask")  # dev extra
    xywh = lambda bs: [[b.x1, b.y1, b.x2 - b.x1, b.y2 - b.y1] for b in bs]  # noqa: E731
    return np.asarray(mask_utils.iou(xywh(gt), xywh(pred), [0] * len(pred))).reshape(len(gt), len(pred))


def _brute_force(iou, thr):
    """Best one-to-one matching by enumerating all permutations: (max TP, then max total IoU)."""
    g, p = iou.shape
    best = (0, 0.0)
    for perm in itertools.permutations(range(max(g, p))):
        pairs = [(i, j) for i, j in enumerate(perm) if i < g and j < p]  # drop padding
        cand = (sum(int(iou[i, j] >= thr) for i, j in pairs), sum(float(iou[i, j]) for i, j in pairs))
        if cand[0] > best[0] or (cand[0] == best[0] and cand[1] > best[1] + 1e-12):
            best = cand
    return best


def test_box_iou_matches_pycocotools():
    rng = np.random.default_rng(1)
    gt = _random_boxes(rng, 30)
    pred = _random_boxes(rng, 30, near=gt)
    ours = np.array([[box_iou(g, p) for p in pred] for g in gt])
    np.testing.assert_allclose(ours, _coco_iou(gt, pred), atol=1e-9)
    np.testing.assert_allclose(iou_matrix(gt, pred), ours)
    assert (ours > 0.5).any()  # the random boxes do exercise real overlaps


def test_matching_and_micro_prf_match_brute_force_over_permutations():
    rng = np.random.default_rng(2)
    samples, tot = [], {"tp": 0, "fp": 0, "fn": 0, "iou": 0.0, "gt": 0}
    for _ in range(150):
        thr = float(rng.choice([0.3, 0.5, 0.7]))
        gt = _random_boxes(rng, int(rng.integers(0, 5)))
        pred = _random_boxes(rng, int(rng.integers(0, 5)), near=gt)
        tp, iou_sum = _brute_force(_coco_iou(gt, pred), thr) if gt and pred else (0, 0.0)
        s = score_boxes(pred, gt, iou_threshold=thr)
        assert s["tp"] == tp
        assert s["iou_sum"] == pytest.approx(iou_sum, abs=1e-9)
        assert (s["fp"], s["fn"]) == (len(pred) - tp, len(gt) - tp)
        samples.append(s)
        tot["tp"] += tp
        tot["fp"] += len(pred) - tp
        tot["fn"] += len(gt) - tp
        tot["iou"] += iou_sum
        tot["gt"] += len(gt)
    assert tot["tp"] > 20 and tot["fp"] > 20  # non-trivial mix
    a = aggregate_boxes(samples)
    p = tot["tp"] / (tot["tp"] + tot["fp"])
    r = tot["tp"] / (tot["tp"] + tot["fn"])
    assert a["precision"] == pytest.approx(p)
    assert a["recall"] == pytest.approx(r)
    assert a["f1"] == pytest.approx(2 * p * r / (p + r))
    assert a["mean_iou"] == pytest.approx(tot["iou"] / tot["gt"])


# ---------------------------------------------------------------- aggregate_boxes


def test_aggregate_hand_computed_with_invalid_sample():
    samples = [
        {"valid": 1, "tp": 2, "fp": 1, "fn": 0, "iou_sum": 1.6, "n_gt": 2, "n_pred": 3},
        score_boxes(None, [B(0, 0, 1, 1)] * 3),
    ]
    a = aggregate_boxes(samples)
    assert list(a) == list(AGGREGATE_KEYS)
    assert (a["n"], a["n_valid"], a["valid_rate"]) == (2, 1, 0.5)
    assert a["precision"] == pytest.approx(2 / 3)
    assert a["recall"] == pytest.approx(2 / 5)
    assert a["f1"] == pytest.approx(0.5)  # 2*2 / (2*2 + 1 + 3)
    assert a["mean_iou"] == pytest.approx(1.6 / 5)
    json.dumps(a, allow_nan=False)


def test_aggregate_empty_all_invalid_and_nan():
    empty = aggregate_boxes([])
    assert empty == {
        "n": 0, "n_valid": 0, "valid_rate": None, "precision": None, "recall": None, "f1": None, "mean_iou": None,
    }
    bad = aggregate_boxes([score_boxes(None, [B(0, 0, 1, 1)]), score_boxes(None, [])])
    assert bad == {
        "n": 2, "n_valid": 0, "valid_rate": 0.0, "precision": None, "recall": 0.0, "f1": 0.0, "mean_iou": 0.0,
    }
    # numpy scalars and NaN (pandas round trip) do not poison the sums
    odd = [{**score_boxes([B(0, 0, 1, 1)], [B(0, 0, 1, 1)]), "tp": np.int64(1), "iou_sum": np.float64(1.0)},
           {"valid": 0, "tp": float("nan"), "fp": float("nan"), "fn": 1, "iou_sum": float("nan"), "n_gt": 1}]
    a = aggregate_boxes(odd)
    assert (a["precision"], a["recall"], a["mean_iou"]) == (1.0, 0.5, 0.5)
    for out in (empty, bad, a):
        json.dumps(out, allow_nan=False)


def test_centred_mean_box():
    b = centred_mean_box([(0.2, 0.4), (0.4, 0.2)], width=200, height=100)
    assert (b.x1, b.y1, b.x2, b.y2) == pytest.approx((70, 35, 130, 65))
    b = centred_mean_box(iter([(1.0, 1.0)]), width=64, height=48)  # full-image box, generator input
    assert (b.x1, b.y1, b.x2, b.y2) == pytest.approx((0, 0, 64, 48))
    with pytest.raises(ValueError):
        centred_mean_box([], 10, 10)
