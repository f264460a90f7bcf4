"""COCO mAP/mAR: equals pycocotools run from json files, and supervision's independent implementation."""

import contextlib
import io
import json

import numpy as np
import pytest

from raytrain.eval.metrics.coco import (
    STAT_KEYS,
    coco_categories,
    coco_detection_metrics,
    to_coco_results_json,
)
from raytrain.formats.annotations import Box

LABELS = ["cat", "dog", "car"]


def random_case(seed, n_images=8):
    """GT boxes of all COCO sizes; predictions = jittered GT (sometimes mislabelled) + clutter."""
    rng = np.random.default_rng(seed)
    images = [{"id": f"img-{i}", "width": 640, "height": 480} for i in range(n_images)]
    gts, preds = [], []

    def rand_box(lo, hi):
        w, h = rng.uniform(lo, hi), rng.uniform(lo, hi)
        x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
        return x, y, w, h

    for im in images:
        for _ in range(rng.integers(0, 7)):
            x, y, w, h = rand_box(6, 300)
            lab = LABELS[rng.integers(3)]
            gts.append((im["id"], Box(x, y, x + w, y + h, lab)))
            if rng.random() < 0.85:
                j = rng.normal(0, 0.08 * min(w, h), 4)
                plab = lab if rng.random() < 0.85 else LABELS[rng.integers(3)]
                preds.append((im["id"], Box(x + j[0], y + j[1], x + w + j[2], y + h + j[3], plab), float(rng.random())))
        for _ in range(rng.integers(0, 3)):
            x, y, w, h = rand_box(6, 300)
            preds.append((im["id"], Box(x, y, x + w, y + h, LABELS[rng.integers(3)]), float(rng.random())))
    return images, gts, preds


def pycocotools_from_files(tmp_path, images, gts, preds, categories):
    """What a user would do by hand: write GT + results json, run COCOeval, read stats."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    cats, label_to_cat = coco_categories([b.label for _, b in gts], categories)
    ids = {im["id"]: i for i, im in enumerate(images, start=1)}
    gt_json = {
        "images": [{"id": ids[im["id"]], "width": im["width"], "height": im["height"]} for im in images],
        "categories": cats,
        "annotations": [
            {
                "id": k,
                "image_id": ids[i],
                "category_id": label_to_cat[b.label],
                "bbox": [b.x1, b.y1, b.width, b.height],
                "area": b.width * b.height,
                "iscrowd": 0,
            }
            for k, (i, b) in enumerate(gts, start=1)
        ],
    }
    (tmp_path / "gt.json").write_text(json.dumps(gt_json))
    res = to_coco_results_json([(ids[i], b, s) for i, b, s in preds], label_to_cat)
    (tmp_path / "res.json").write_text(json.dumps(res, allow_nan=False))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(tmp_path / "gt.json"))
        dt = gt.loadRes(str(tmp_path / "res.json"))
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def supervision_map(images, gts, preds, label_to_cat):
    sv = pytest.importorskip("supervision")
    from supervision.metrics import MeanAveragePrecision, MeanAverageRecall

    targets, detections = [], []
    for im in images:
        g = [b for i, b in gts if i == im["id"]]
        p = [(b, s) for i, b, s in preds if i == im["id"]]
        targets.append(
            sv.Detections(
                xyxy=np.array([[b.x1, b.y1, b.x2, b.y2] for b in g], dtype=np.float64).reshape(-1, 4),
                class_id=np.array([label_to_cat[b.label] for b in g], dtype=int),
            )
        )
        detections.append(
            sv.Detections(
                xyxy=np.array([[b.x1, b.y1, b.x2, b.y2] for b, _ in p], dtype=np.float64).reshape(-1, 4),
                class_id=np.array([label_to_cat[b.label] for b, _ in p], dtype=int),
                confidence=np.array([s for _, s in p], dtype=np.float64),
            )
        )
    m = MeanAveragePrecision().update(detections, targets).compute()
    r = MeanAverageRecall().update(detections, targets).compute()
    return {
        "map": m.map50_95,
        "map_50": m.map50,
        "map_75": m.map75,
        "map_small": m.small_objects.map50_95,
        "map_medium": m.medium_objects.map50_95,
        "map_large": m.large_objects.map50_95,
        "mar_1": r.mAR_at_1,
        "mar_10": r.mAR_at_10,
        "mar_100": r.mAR_at_100,
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_pycocotools_on_files_and_supervision(tmp_path, seed):
    images, gts, preds = random_case(seed)
    got = coco_detection_metrics(images, gts, preds)
    assert got["scores_constant"] is False
    assert 0.05 < got["map"] < 0.95  # a non-trivial case, so agreement means something

    stats = pycocotools_from_files(tmp_path, images, gts, preds, None)
    for k, v in zip(STAT_KEYS, stats):
        assert got[k] == (None if v == -1 else pytest.approx(v, abs=1e-12)), k

    _, label_to_cat = coco_categories([b.label for _, b in gts])
    ref = supervision_map(images, gts, preds, label_to_cat)
    for k, v in ref.items():
        # supervision reports 0 / -1 where COCO has nothing to evaluate
        if got[k] is None:
            assert v in (-1.0, 0.0), k
        else:
            assert got[k] == pytest.approx(v, abs=1e-6), k


def test_class_agnostic_matches_supervision_and_ignores_labels():
    images, gts, preds = random_case(3)
    got = coco_detection_metrics(images, gts, preds, class_agnostic=True)
    aware = coco_detection_metrics(images, gts, preds)
    # mislabelled but well-placed boxes count once labels are ignored
    assert got["map_50"] > aware["map_50"]
    assert list(got["ap_per_category"]) == ["object"]
    one = {lab: 1 for lab in LABELS}
    ref = supervision_map(images, gts, preds, one)
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, abs=1e-6), k


# ---------------------------------------------------------------- hand-checkable cases

IMAGES = [{"id": 7, "width": 200, "height": 200}, {"id": 9, "width": 200, "height": 200}]
GTS = [
    (7, Box(0, 0, 20, 20, "cat")),  # small (400 px^2)
    (7, Box(50, 50, 110, 110, "dog")),  # medium (3600)
    (9, Box(0, 0, 150, 150, "cat")),  # large (22500)
]


def test_perfect_predictions_score_one():
    preds = [(i, b, 0.5 + 0.1 * k) for k, (i, b) in enumerate(GTS)]
    r = coco_detection_metrics(IMAGES, GTS, preds)
    # every key, mar_1 included: maxDets=1 counts per image AND category (image 7 has a cat and a dog)
    for k in STAT_KEYS:
        assert r[k] == pytest.approx(1.0), k
    assert r["ap_per_category"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}
    assert (r["n_gt"], r["n_pred"], r["n_images"]) == (3, 3, 2)


def test_no_predictions_score_zero_and_no_gt_is_none():
    r = coco_detection_metrics(IMAGES, GTS, [])
    for k in STAT_KEYS:
        assert r[k] == 0.0, k
    assert r["scores_constant"] is False
    r = coco_detection_metrics(IMAGES, [], [(7, Box(0, 0, 5, 5, "cat"), 0.3)], categories=["cat"])
    assert all(r[k] is None for k in STAT_KEYS)


def test_ranking_matters_and_constant_scores_are_flagged():
    gts = [(7, Box(0, 0, 100, 100, "cat"))]
    hit, miss = Box(0, 0, 100, 100, "cat"), Box(120, 120, 190, 190, "cat")
    # the FP ranked above the TP: precision at recall 1 is 1/2 -> AP 0.5; below it -> 1.0
    assert coco_detection_metrics(IMAGES, gts, [(7, hit, 0.4), (7, miss, 0.9)])["map"] == pytest.approx(0.5)
    assert coco_detection_metrics(IMAGES, gts, [(7, hit, 0.9), (7, miss, 0.4)])["map"] == pytest.approx(1.0)
    # log-probs work: only the order counts
    assert coco_detection_metrics(IMAGES, gts, [(7, hit, -0.1), (7, miss, -7.0)])["map"] == pytest.approx(1.0)
    r = coco_detection_metrics(IMAGES, gts, [(7, miss, None), (7, hit, None)])
    assert r["scores_constant"] is True and r["n_pred_missing_score"] == 2
    assert r["map"] == pytest.approx(0.5)  # ties keep input order: the miss ranks first
    r = coco_detection_metrics(IMAGES, gts, [(7, hit, 1.0), (7, miss, 1.0)])
    assert r["scores_constant"] is True and r["n_pred_missing_score"] == 0
    # a missing score ranks below every real one
    r = coco_detection_metrics(IMAGES, gts, [(7, miss, None), (7, hit, -3.0)])
    assert r["scores_constant"] is False and r["map"] == pytest.approx(1.0)


def test_bad_predictions_are_counted_not_dropped():
    gts = [(7, Box(0, 0, 100, 100, "cat"))]
    hit = (7, Box(0, 0, 100, 100, "cat"), 0.5)
    inverted = (7, Box(90, 90, 10, 10, "cat"), 0.9)  # stays a false positive above the hit
    r = coco_detection_metrics(IMAGES, gts, [hit, inverted])
    assert r["n_pred_invalid_box"] == 1 and r["map"] == pytest.approx(0.5)
    unknown = (7, Box(0, 0, 100, 100, "zebra"), 0.9)  # no category: COCO never sees it
    r = coco_detection_metrics(IMAGES, gts, [hit, unknown])
    assert r["n_pred_unknown_label"] == 1 and r["map"] == pytest.approx(1.0)
    # labels compare after strip().casefold()
    r = coco_detection_metrics(IMAGES, gts, [(7, Box(0, 0, 100, 100, " CAT "), 0.5)])
    assert r["map"] == pytest.approx(1.0)
    # results json stays valid json with NaN coordinates / scores
    rows = to_coco_results_json([(7, Box(float("nan"), 0, 1, 1, "cat"), float("nan"))], {"cat": 1})
    assert rows == [{"image_id": 7, "category_id": 1, "bbox": [0.0, 0.0, 0.0, 0.0], "score": 1.0}]
    json.dumps(rows, allow_nan=False)


def test_caller_bugs_raise():
    with pytest.raises(ValueError, match="unknown image"):
        coco_detection_metrics(IMAGES, [(8, Box(0, 0, 1, 1, "cat"))], [])
    with pytest.raises(ValueError, match="not in categories"):
        coco_detection_metrics(IMAGES, GTS, [], categories=["cat"])
    with pytest.raises(ValueError, match="duplicate image"):
        coco_detection_metrics(IMAGES + IMAGES[:1], GTS, [])


def test_results_json_format_and_category_ids():
    cats, l2c = coco_categories(["dog", "cat", "Cat"], categories=None)
    assert cats == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}] and l2c == {"cat": 1, "dog": 2}
    cats, l2c = coco_categories(["dog"], categories=["Dog", "person"])
    assert cats == [{"id": 1, "name": "Dog"}, {"id": 2, "name": "person"}] and l2c == {"dog": 1, "person": 2}
    rows = to_coco_results_json([(3, Box(10, 20, 40, 80, "person"), 0.25)], l2c)
    assert rows == [{"image_id": 3, "category_id": 2, "bbox": [10.0, 20.0, 30.0, 60.0], "score": 0.25}]
    assert to_coco_results_json([(3, Box(10, 20, 40, 80, "x"), 0.25)], 1)[0]["category_id"] == 1
