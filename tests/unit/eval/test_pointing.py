"""Pointing metrics (seed report 000, section 5.1): hand-computed cases and aggregation."""

import json
import math

import numpy as np
import pytest

from raytrain.eval.metrics.pointing import (
    AGGREGATE_KEYS,
    SAMPLE_KEYS,
    aggregate_pointing,
    centre_point,
    score_points,
)
from raytrain.formats.annotations import Point


def P(x, y):
    return Point(x=float(x), y=float(y))


# ---------------------------------------------------------------- score_points


def test_single_point_3_4_5():
    # diag of 300x400 is 500; error (3, 4) -> distance 5
    s = score_points([P(13, 24)], [P(10, 20)], width=300, height=400)
    assert s == {
        "valid": 1,
        "distance": 5.0,
        "norm_distance": 0.01,
        "se_x": 9.0,
        "se_y": 16.0,
        "ae_x": 3.0,
        "ae_y": 4.0,
        "success": 1,
    }


def test_each_gt_matched_to_its_closest_prediction():
    gt = [P(0, 0), P(100, 0)]
    # (50, 50) is a distractor closer to neither; (0, 10) -> gt0 at 10, (103, 4) -> gt1 at 5
    pred = [P(50, 50), P(103, 4), P(0, 10)]
    s = score_points(pred, gt, width=300, height=400)
    assert s["distance"] == pytest.approx(7.5)
    assert s["norm_distance"] == pytest.approx(7.5 / 500)
    assert s["se_x"] == pytest.approx((0 + 9) / 2)
    assert s["se_y"] == pytest.approx((100 + 16) / 2)
    assert s["ae_x"] == pytest.approx((0 + 3) / 2)
    assert s["ae_y"] == pytest.approx((10 + 4) / 2)


def test_axis_errors_come_from_the_euclidean_closest_point_not_per_axis_minima():
    # (1, 10) is closer in x but (6, 0) is closer overall (6 < sqrt(101))
    s = score_points([P(1, 10), P(6, 0)], [P(0, 0)], width=100, height=100)
    assert s["distance"] == pytest.approx(6.0)
    assert (s["ae_x"], s["ae_y"], s["se_x"], s["se_y"]) == pytest.approx((6.0, 0.0, 36.0, 0.0))


def test_several_gt_points_may_share_one_prediction_and_extra_predictions_are_free():
    gt = [P(0, 0), P(0, 6)]
    assert score_points([P(0, 3)], gt, 10, 10)["distance"] == pytest.approx(3.0)
    # a far-away extra prediction does not change anything (seed metric is GT -> closest pred)
    assert score_points([P(0, 3), P(1000, 1000)], gt, 10, 10)["distance"] == pytest.approx(3.0)


def test_normalised_by_image_diagonal():
    s1 = score_points([P(3, 4)], [P(0, 0)], width=30, height=40)  # diag 50
    s2 = score_points([P(3, 4)], [P(0, 0)], width=3000, height=4000)  # diag 5000
    assert s1["norm_distance"] == pytest.approx(0.1)
    assert s2["norm_distance"] == pytest.approx(0.001)
    assert (s1["success"], s2["success"]) == (0, 1)


@pytest.mark.parametrize(
    "pred, frac, expected",
    [
        ((15, 20), 0.05, 0),  # distance 25 = exactly 5 % of diag 500: strict "<" fails
        ((15, 19.99), 0.05, 1),  # just under
        ((15, 20.01), 0.05, 0),  # just over
        ((15, 20), 0.0501, 1),  # custom threshold
        ((0, 0), 0.0, 0),  # zero threshold: even a perfect hit is not "< 0"
    ],
)
def test_success_threshold_edges(pred, frac, expected):
    s = score_points([P(*pred)], [P(0, 0)], width=300, height=400, success_frac=frac)
    assert s["success"] == expected


def test_invalid_prediction_is_all_none():
    s = score_points(None, [P(1, 2)], 10, 10)
    assert s["valid"] == 0
    assert set(s) == set(SAMPLE_KEYS)
    assert all(s[k] is None for k in SAMPLE_KEYS if k != "valid")


def test_parsed_but_empty_prediction_is_a_valid_failure():
    s = score_points([], [P(1, 2)], 10, 10)
    assert (s["valid"], s["success"], s["distance"], s["norm_distance"]) == (1, 0, None, None)


def test_empty_gt_succeeds_only_when_nothing_is_predicted():
    assert score_points([], [], 10, 10)["success"] == 1
    assert score_points([P(1, 1)], [], 10, 10)["success"] == 0
    assert score_points([P(1, 1)], [], 10, 10)["distance"] is None


def test_zero_size_image_gives_no_normalised_distance():
    s = score_points([P(3, 4)], [P(0, 0)], 0, 0)
    assert s["distance"] == pytest.approx(5.0)
    assert s["norm_distance"] is None and s["success"] is None


def test_matches_brute_force_on_random_sets():
    rng = np.random.default_rng(0)
    for _ in range(50):
        w, h = rng.integers(10, 2000, size=2)
        gt = [P(*xy) for xy in rng.uniform(0, [w, h], size=(rng.integers(1, 6), 2))]
        pred = [P(*xy) for xy in rng.uniform(0, [w, h], size=(rng.integers(1, 6), 2))]
        best = [min(pred, key=lambda p: math.hypot(p.x - g.x, p.y - g.y)) for g in gt]
        d = [math.hypot(p.x - g.x, p.y - g.y) for p, g in zip(best, gt)]
        dx = [p.x - g.x for p, g in zip(best, gt)]
        dy = [p.y - g.y for p, g in zip(best, gt)]
        s = score_points(pred, gt, int(w), int(h))
        assert s["distance"] == pytest.approx(sum(d) / len(d))
        assert s["norm_distance"] == pytest.approx(sum(d) / len(d) / math.hypot(w, h))
        assert s["se_x"] == pytest.approx(sum(v * v for v in dx) / len(dx))
        assert s["se_y"] == pytest.approx(sum(v * v for v in dy) / len(dy))
        assert s["ae_x"] == pytest.approx(sum(abs(v) for v in dx) / len(dx))
        assert s["ae_y"] == pytest.approx(sum(abs(v) for v in dy) / len(dy))
        # plain Python types: cheap to ship from Ray workers, JSON-able
        assert all(type(v) in (int, float) for v in s.values())


def test_centre_point_baseline():
    c = centre_point(640, 480)
    assert (c.x, c.y) == (320.0, 240.0)
    s = score_points([c], [P(320, 240 + 40)], 640, 480)  # diag 800, 40 px off = 5 %
    assert s["norm_distance"] == pytest.approx(0.05) and s["success"] == 0


# ---------------------------------------------------------------- aggregate_pointing


def _valid(distance, success, norm=None, se=(0.0, 0.0), ae=(0.0, 0.0)):
    return {
        "valid": 1,
        "distance": distance,
        "norm_distance": distance / 100 if norm is None else norm,
        "se_x": se[0],
        "se_y": se[1],
        "ae_x": ae[0],
        "ae_y": ae[1],
        "success": success,
    }


def test_aggregate_hand_computed_with_an_invalid_sample():
    samples = [
        _valid(3.0, 1, se=(1.0, 4.0), ae=(1.0, 2.0)),
        _valid(5.0, 1, se=(9.0, 16.0), ae=(3.0, 4.0)),
        _valid(10.0, 0, se=(36.0, 64.0), ae=(6.0, 8.0)),
        score_points(None, [P(0, 0)], 10, 10),
    ]
    a = aggregate_pointing(samples)
    assert list(a) == list(AGGREGATE_KEYS)
    assert (a["n"], a["n_valid"], a["valid_rate"]) == (4, 3, 0.75)
    assert a["mean_distance"] == pytest.approx(6.0)
    assert a["median_distance"] == pytest.approx(5.0)
    assert a["std_distance"] == pytest.approx(math.sqrt((9 + 1 + 16) / 3))  # population std
    assert a["mean_norm_distance"] == pytest.approx(0.06)
    assert a["median_norm_distance"] == pytest.approx(0.05)
    assert (a["mse_x"], a["mse_y"]) == pytest.approx((46 / 3, 84 / 3))
    assert (a["mae_x"], a["mae_y"]) == pytest.approx((10 / 3, 14 / 3))
    assert a["success_rate"] == pytest.approx(2 / 3)  # seed: over valid predictions only
    assert a["success_rate_all"] == pytest.approx(2 / 4)  # invalid counted as failures
    json.dumps(a, allow_nan=False)


def test_aggregate_end_to_end_from_score_points():
    gt = [P(0, 0)]
    samples = [
        score_points([P(3, 4)], gt, 300, 400),  # d 5, success
        score_points([P(30, 40)], gt, 300, 400),  # d 50, fail
        score_points([], gt, 300, 400),  # parsed, nothing predicted: fail, no distance
        score_points(None, gt, 300, 400),  # invalid
    ]
    a = aggregate_pointing(samples)
    assert (a["n"], a["n_valid"]) == (4, 3)
    assert a["mean_distance"] == pytest.approx(27.5)
    assert a["success_rate"] == pytest.approx(1 / 3)
    assert a["success_rate_all"] == pytest.approx(1 / 4)


def test_aggregate_empty_and_all_invalid_are_json_safe():
    empty = aggregate_pointing([])
    assert list(empty) == list(AGGREGATE_KEYS)
    assert (empty["n"], empty["n_valid"]) == (0, 0)
    assert all(empty[k] is None for k in AGGREGATE_KEYS if k not in ("n", "n_valid"))
    json.dumps(empty, allow_nan=False)

    bad = aggregate_pointing(score_points(None, [P(0, 0)], 10, 10) for _ in range(3))
    assert (bad["n"], bad["n_valid"], bad["valid_rate"], bad["success_rate_all"]) == (3, 0, 0.0, 0.0)
    assert bad["success_rate"] is None and bad["mean_distance"] is None
    json.dumps(bad, allow_nan=False)


def test_aggregate_accepts_nan_and_numpy_scalars_from_a_dataframe_round_trip():
    # Ray Data batches go through pandas / Arrow: None -> NaN, ints -> numpy ints
    samples = [
        {k: (np.float64(v) if isinstance(v, float) else np.int64(v)) for k, v in _valid(4.0, 1).items()},
        {"valid": np.int64(0), **{k: float("nan") for k in SAMPLE_KEYS if k != "valid"}},
        {**_valid(8.0, 0), "valid": 1.0, "se_x": float("nan")},
    ]
    a = aggregate_pointing(samples)
    assert (a["n"], a["n_valid"]) == (3, 2)
    assert a["mean_distance"] == pytest.approx(6.0)
    assert a["success_rate"] == pytest.approx(0.5)
    assert a["mse_x"] == pytest.approx(0.0)  # NaN skipped, not propagated
    json.dumps(a, allow_nan=False)
    assert all(type(v) in (int, float, type(None)) for v in a.values())
