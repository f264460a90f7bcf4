"""Pointing P/R/F1: hand cases, brute force over assignments, Molmo's mask rule, aggregation."""

import itertools
import json
import math

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from raytrain.eval.metrics.matching import max_hit_assignment
from raytrain.eval.metrics.point_prf import AGGREGATE_KEYS, SAMPLE_KEYS, aggregate_points_prf, score_points_prf
from raytrain.formats.annotations import Point

W, H = 300, 400  # diagonal 500 px -> default threshold 0.05 * 500 = 25 px


def P(x, y):
    return Point(float(x), float(y))


def test_hand_cases():
    gt = [P(100, 100), P(200, 200)]
    s = score_points_prf([P(110, 100), P(290, 390), P(0, 0)], gt, W, H)
    assert set(s) == set(SAMPLE_KEYS)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 2, 1)
    assert s["precision"] == pytest.approx(1 / 3) and s["recall"] == pytest.approx(1 / 2)
    assert s["f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    # strict threshold: exactly 25 px away does not match, 24.9 does
    assert score_points_prf([P(125, 100)], [P(100, 100)], W, H)["tp"] == 0
    assert score_points_prf([P(124.9, 100)], [P(100, 100)], W, H)["tp"] == 1
    assert score_points_prf([P(125, 100)], [P(100, 100)], W, H, threshold_frac=0.06)["tp"] == 1
    # one prediction cannot serve two GT points (pointing.score_points would let it)
    s = score_points_prf([P(150, 150)], [P(140, 150), P(160, 150)], W, H)
    assert (s["tp"], s["fn"]) == (1, 1)


def test_max_hits_beats_min_distance():
    # Threshold 25 px. a-G0 = 1, a-G1 = 20, b-G0 = 24, b-G1 = 26. Minimum total distance
    # takes a-G0 + b-G1 (27 px, 1 TP); the optimum is a-G1 + b-G0 (44 px, 2 TPs).
    gt = [P(100, 100), P(121, 100)]
    x = 341 / 42  # b solves |b - G0| = 24, |b - G1| = 26
    pred = [P(101, 100), P(100 + x, 100 + math.sqrt(576 - x * x))]
    d = np.array([[math.dist((p.x, p.y), (g.x, g.y)) for g in gt] for p in pred])
    assert d == pytest.approx(np.array([[1, 20], [24, 26]]))
    r, c = linear_sum_assignment(d)
    assert sum(d[r, c] < 25) == 1  # the naive assignment loses a TP
    assert score_points_prf(pred, gt, W, H)["tp"] == 2


def brute_force_tp(pred, gt, thr):
    """Most pairs closer than thr over every one-to-one assignment."""
    n, m = len(pred), len(gt)
    k = min(n, m)
    best = 0
    for perm in itertools.permutations(range(max(n, m)), k):
        pairs = zip(range(k), perm) if n <= m else zip(perm, range(k))
        best = max(best, sum(math.dist((pred[i].x, pred[i].y), (gt[j].x, gt[j].y)) < thr for i, j in pairs))
    return best


def test_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(150):
        # clustered points so that many pairs compete for matches
        c = rng.uniform(50, 250, 2)
        gt = [P(*(c + rng.normal(0, 25, 2))) for _ in range(rng.integers(0, 6))]
        pred = [P(*(c + rng.normal(0, 25, 2))) for _ in range(rng.integers(0, 6))]
        s = score_points_prf(pred, gt, W, H)
        if not gt:
            continue
        tp = brute_force_tp(pred, gt, 25.0)
        assert (s["tp"], s["fp"], s["fn"]) == (tp, len(pred) - tp, len(gt) - tp)


def test_max_hit_assignment_is_one_to_one():
    rng = np.random.default_rng(1)
    hit = rng.random((5, 7)) < 0.5
    rows, cols = max_hit_assignment(hit, rng.random((5, 7)))
    assert len(set(rows)) == len(rows) and len(set(cols)) == len(cols)
    assert hit[rows, cols].all()
    r0, c0 = max_hit_assignment(np.zeros((0, 3), bool), np.zeros((0, 3)))
    assert len(r0) == len(c0) == 0


def molmo_reference(pred, gt, masks):
    """Molmo PointingEval per-sample precision/recall for a parsed, non-empty answer."""
    d = np.array([[math.dist((p.x, p.y), (g.x, g.y)) for g in gt] for p in pred])
    rows, cols = linear_sum_assignment(d)
    cnt = 0
    for i, j in zip(rows, cols):
        x, y = round(pred[i].x), round(pred[i].y)
        h, w = masks[j].shape
        cnt += bool(0 <= x < w and 0 <= y < h and masks[j][y, x])
    return cnt / len(pred), cnt / len(gt)


def test_mask_mode_equals_molmo_rule():
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0:H, 0:W]
    for _ in range(60):
        gt = [P(*rng.uniform(20, 280, 2)) for _ in range(rng.integers(1, 5))]
        masks = [((xx - g.x) ** 2 + (yy - g.y) ** 2) < rng.uniform(5, 40) ** 2 for g in gt]
        pred = [P(*rng.uniform(-5, 305, 2)) for _ in range(rng.integers(1, 5))]
        pred += [P(g.x + rng.normal(0, 8), g.y + rng.normal(0, 8)) for g in gt[:2]]
        s = score_points_prf(pred, gt, W, H, gt_masks=masks)
        p, r = molmo_reference(pred, gt, masks)
        assert (s["precision"], s["recall"]) == (pytest.approx(p), pytest.approx(r))
    # Python's round is half-to-even: 8.5 -> 8, 9.6 -> 10
    m = np.zeros((20, 20), bool)
    m[10, 8] = True
    assert score_points_prf([P(8.5, 9.6)], [P(8, 10)], 20, 20, gt_masks=[m])["tp"] == 1
    with pytest.raises(ValueError, match="masks"):
        score_points_prf([P(1, 1)], [P(1, 1)], 20, 20, gt_masks=[])


def test_empty_and_invalid_conventions():
    assert score_points_prf([], [], W, H)["f1"] == 1.0  # correctly pointing at nothing
    s = score_points_prf([P(1, 1)], [], W, H)
    assert (s["f1"], s["fp"]) == (0.0, 1)
    s = score_points_prf([], [P(1, 1)], W, H)
    assert (s["valid"], s["f1"], s["fn"]) == (1, 0.0, 1)
    s = score_points_prf(None, [P(1, 1), P(2, 2)], W, H)
    assert (s["valid"], s["tp"], s["fp"], s["fn"], s["f1"]) == (0, 0, 0, 2, 0.0)
    assert score_points_prf(None, [], W, H)["f1"] == 0.0
    s = score_points_prf([P(float("nan"), 1)], [P(1, 1)], W, H)  # never raises on junk coordinates
    assert s["tp"] == 0


def test_aggregate_micro_and_macro():
    samples = [
        score_points_prf([P(10, 10), P(100, 100)], [P(10, 10)], W, H),  # tp1 fp1 fn0: P .5 R 1
        score_points_prf([P(10, 10)], [P(10, 10), P(200, 200), P(250, 50)], W, H),  # tp1 fn2: P 1 R 1/3
        score_points_prf(None, [P(10, 10)], W, H),  # invalid: fn1
        score_points_prf([], [], W, H),  # P = R = F1 = 1, no counts
    ]
    a = aggregate_points_prf(samples)
    assert set(a) == set(AGGREGATE_KEYS)
    assert (a["n"], a["n_valid"], a["tp"], a["fp"], a["fn"]) == (4, 3, 2, 1, 3)
    assert a["precision"] == pytest.approx(2 / 3) and a["recall"] == pytest.approx(2 / 5)
    assert a["f1"] == pytest.approx(4 / (4 + 1 + 3))
    assert a["macro_precision"] == pytest.approx((0.5 + 1 + 0 + 1) / 4)
    assert a["macro_recall"] == pytest.approx((1 + 1 / 3 + 0 + 1) / 4)
    # NaN (a None column after Arrow) and empty input never raise; result is JSON-safe
    json.dumps(aggregate_points_prf(samples + [{"tp": float("nan")}, {}]), allow_nan=False)
    e = aggregate_points_prf([])
    assert e["n"] == 0 and e["precision"] is None and e["macro_f1"] is None
