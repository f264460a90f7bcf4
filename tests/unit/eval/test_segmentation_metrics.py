"""Segmentation metrics on hand-made masks: big_vision's miou / boxacc vs overall IoU."""

import json

import numpy as np
import pytest

from raytrain.eval.metrics.segmentation import aggregate_segmentation, mask_iou, score_segmentation
from raytrain.formats.annotations import Box


def rect(h, w, y1, x1, y2, x2):
    m = np.zeros((h, w), bool)
    m[y1:y2, x1:x2] = True
    return m


def test_mask_iou_by_hand():
    gt = rect(10, 10, 0, 0, 4, 5)  # 20 px
    pred = rect(10, 10, 2, 0, 6, 5)  # 20 px, overlap rows 2..3 -> 10 px
    assert mask_iou(pred, gt) == (pytest.approx(10 / 30), 10, 30)
    assert mask_iou(gt, gt)[0] == 1.0
    assert mask_iou(np.zeros((3, 3), bool), rect(3, 3, 0, 0, 1, 1))[0] == 0.0
    assert mask_iou(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == (1.0, 0, 0)
    with pytest.raises(ValueError, match="shapes differ"):
        mask_iou(np.zeros((3, 4), bool), np.zeros((4, 3), bool))


def test_score_sample():
    gt = rect(10, 10, 0, 0, 4, 5)
    s = score_segmentation(rect(10, 10, 2, 0, 6, 5), gt, Box(0, 2, 5, 6), Box(0, 0, 5, 4))
    assert s["valid"] == 1 and s["gt_area"] == 20
    assert (s["intersection"], s["union"]) == (10, 30)
    assert s["box_iou"] == pytest.approx(1 / 3)
    assert (s["box_hit_50"], s["box_hit_75"]) == (0, 0)
    # box threshold is inclusive (big_vision: iou_thresh <= box_iou): IoU exactly 0.5 hits
    s = score_segmentation(gt, gt, Box(0, 0, 10, 5), Box(0, 0, 10, 10))
    assert s["box_iou"] == 0.5 and (s["box_hit_50"], s["box_hit_75"]) == (1, 0)
    # without a GT box, box metrics are not evaluated
    s = score_segmentation(gt, gt)
    assert s["box_iou"] is None and s["box_hit_50"] is None
    # custom thresholds name their own columns
    assert "box_hit_90" in score_segmentation(gt, gt, Box(0, 0, 5, 4), Box(0, 0, 5, 4), box_ious=(0.9,))


def test_invalid_prediction_counts_zero():
    gt = rect(10, 10, 0, 0, 4, 5)
    s = score_segmentation(None, gt, Box(0, 0, 5, 4), Box(0, 0, 5, 4))  # the box is ignored: invalid
    assert (s["valid"], s["mask_iou"], s["intersection"], s["union"]) == (0, 0.0, 0, 20)
    assert (s["box_iou"], s["box_hit_50"]) == (0.0, 0)


def test_mean_of_ious_vs_overall_iou():
    # A small object predicted perfectly, a large one predicted half: the per-sample mean
    # (big_vision's miou) weighs them equally, overall IoU weighs them by pixels.
    small = rect(100, 100, 0, 0, 2, 2)  # 4 px
    large = rect(100, 100, 0, 0, 50, 80)  # 4000 px
    half = rect(100, 100, 0, 0, 25, 80)  # 2000 px inside large
    samples = [
        score_segmentation(small, small, Box(0, 0, 2, 2), Box(0, 0, 2, 2)),
        score_segmentation(half, large, Box(0, 0, 80, 25), Box(0, 0, 80, 50)),
        score_segmentation(None, small, None, Box(0, 0, 2, 2)),
    ]
    a = aggregate_segmentation(samples)
    assert a["miou"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert a["overall_iou"] == pytest.approx((4 + 2000) / (4 + 4000 + 4))
    assert a["box_acc_50"] == pytest.approx(2 / 3)  # box IoU 1.0, 0.5 (inclusive), 0
    assert a["box_acc_75"] == pytest.approx(1 / 3)
    assert a["mean_box_iou"] == pytest.approx(0.5)
    assert (a["n"], a["n_valid"], a["invalid"]) == (3, 2, 1)
    assert [k for k in a if k.startswith("box_acc")] == ["box_acc_50", "box_acc_75"]


def test_aggregate_never_raises():
    a = aggregate_segmentation([])
    assert a["miou"] is None and a["overall_iou"] is None and a["n"] == 0
    # a None column comes back as NaN from Arrow; junk rows are tolerated
    rows = [
        {
            "valid": 1,
            "mask_iou": 0.5,
            "intersection": 5,
            "union": 10,
            "box_iou": float("nan"),
            "box_hit_50": float("nan"),
        },
        {},
    ]
    a = aggregate_segmentation(rows)
    assert a["miou"] == pytest.approx(0.25) and a["box_acc_50"] is None
    json.dumps(a, allow_nan=False)
