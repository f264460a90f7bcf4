"""The report's analytics describe the matches eval scores: its point / box pairings are the
metrics' own (pointing.closest_offsets, boxes.match_boxes), so per-example sums of the report's
pairs reproduce score_points / score_boxes, and its distance histogram reproduces
aggregate_pointing. Random scenes with several objects, misses, extras and mixed labels."""

import json
import math

import numpy as np
import pytest

from raytrain import predict
from raytrain.eval.metrics import boxes, pointing
from raytrain.eval.report import analysis, read
from raytrain.formats.annotations import Box, Mask, Point, box_iou, objects_to_json

W, H = 160, 120


def _scene(rng, n_gt, n_pred, labels=("cat",)):
    """GT boxes and predictions: some near a GT (jittered), some anywhere, labels drawn from
    ``labels`` (so some overlapping pairs are label-incompatible for the metric)."""
    def box(label):
        x, y = rng.uniform(0, W - 30), rng.uniform(0, H - 30)
        return Box(x, y, x + rng.uniform(8, 30), y + rng.uniform(8, 30), label)

    gt = [box(rng.choice(labels)) for _ in range(n_gt)]
    pred = []
    for k in range(n_pred):
        if gt and k < len(gt) and rng.random() < 0.8:
            g = gt[k]
            d = rng.normal(0, 4, 2)
            pred.append(Box(g.x1 + d[0], g.y1 + d[1], g.x2 + d[0], g.y2 + d[1], rng.choice(labels)))
        else:
            pred.append(box(rng.choice(labels)))
    return gt, pred


def _dicts(objs):
    return read.objects(objects_to_json(objs))


def test_point_pairs_reproduce_score_points():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(200):
        gt = [Point(*rng.uniform(0, [W, H])) for _ in range(rng.integers(1, 5))]
        pred = [Point(*rng.uniform(0, [W, H])) for _ in range(rng.integers(1, 6))]
        s = pointing.score_points(pred, gt, W, H)
        off = np.asarray(analysis.point_offsets(_dicts(gt), _dicts(pred)))
        assert off.shape == (len(gt), 2)  # one pair per GT point, as the metric measures
        assert np.abs(off[:, 0]).mean() == pytest.approx(s["ae_x"], abs=1e-9)
        assert (off[:, 1] ** 2).mean() == pytest.approx(s["se_y"], abs=1e-9)
        assert np.hypot(off[:, 0], off[:, 1]).mean() == pytest.approx(s["distance"], abs=1e-9)
        checked += 1
    assert checked == 200


def test_box_pairs_reproduce_score_boxes():
    rng = np.random.default_rng(1)
    seen_label_mismatch = False
    for _ in range(300):
        gt, pred = _scene(rng, int(rng.integers(0, 5)), int(rng.integers(0, 6)), labels=("cat", "dog"))
        s = boxes.score_boxes(pred, gt)
        pairs = analysis.box_pairs(_dicts(gt), _dicts(pred))
        ious = [iou for *_, iou in pairs]
        assert sum(i >= 0.5 for i in ious) == s["tp"]
        assert sum(ious) == pytest.approx(s["iou_sum"], abs=1e-9)  # pairs left out have IoU 0
        assert all(i > 0 for i in ious) and len(pairs) <= min(len(gt), len(pred))
        seen_label_mismatch |= any(box_iou(g, p) > 0 and g.label != p.label for g in gt for p in pred)
    assert seen_label_mismatch  # the scenes exercise the metric's label rule


def test_box_pairs_follow_the_metrics_label_rule():
    """A 'dog' prediction on a 'cat' GT box never matches in eval, so it is no bias sample."""
    gt = [Box(10, 10, 40, 40, "cat")]
    assert analysis.box_pairs(_dicts(gt), _dicts([Box(12, 10, 42, 40, "dog")])) == []
    (dx, dy, iou), = analysis.box_pairs(_dicts(gt), _dicts([Box(12, 10, 42, 40, "cat")]))
    assert (dx, dy) == (2.0, 0.0) and iou == pytest.approx(28 * 30 / (32 * 30))
    assert boxes.score_boxes([Box(12, 10, 42, 40, "dog")], gt)["tp"] == 0


def _rows(rng, n):
    """Prediction rows as eval writes them (score from predict.score_example)."""
    rows = []
    for k in range(n):
        gt = [Point(*rng.uniform(0, [W, H]), "cat") for _ in range(rng.integers(1, 3))]
        pred = None if k % 7 == 0 else [Point(*rng.uniform(0, [W, H]), "cat")]
        score = predict.score_example("point", pred, objects_to_json(gt), W, H)
        rows.append({"id": str(k), "task": "point", "query": "cat", "text": "",
                     "objects": json.loads(objects_to_json(pred or [])), "errors": [], "score": score})
    return rows


def test_distance_histogram_equals_aggregate_pointing():
    rows = _rows(np.random.default_rng(2), 60)
    exs, missing = analysis.examples(rows, None)
    assert missing == 0
    d = analysis.distance(exs)
    agg = pointing.aggregate_pointing(r["score"] for r in rows)
    assert d["px"]["n"] == agg["n_valid"] == 60 - len(range(0, 60, 7))
    assert d["px"]["mean"] == pytest.approx(agg["mean_distance"], rel=1e-12)
    assert d["px"]["median"] == pytest.approx(agg["median_distance"], rel=1e-12)
    assert d["px"]["std"] == pytest.approx(agg["std_distance"], rel=1e-12)
    assert d["norm"]["mean"] == pytest.approx(agg["mean_norm_distance"], rel=1e-12)
    assert d["success_frac"] == pointing.DEFAULT_SUCCESS_FRAC


def test_rows_with_json_string_fields_read_like_decoded_ones():
    """Ray Data blocks carry objects / errors / score as JSON strings; the file has them decoded."""
    rows = _rows(np.random.default_rng(3), 10)
    as_strings = [dict(r, objects=json.dumps(r["objects"]), errors=json.dumps([["garbage", "x"]]), score=json.dumps(r["score"]))
                  for r in rows]
    a, _ = analysis.examples(rows, None)
    b, _ = analysis.examples(as_strings, None)
    assert [(x.pred, x.score, x.quality) for x in a] == [(x.pred, x.score, x.quality) for x in b]
    assert all(x.errors == [("garbage", "x")] for x in b)
    assert analysis.examples([dict(rows[0], score="{not json")], None)[0][0].quality == -math.inf


def test_box_quality_is_the_per_sample_f1_of_aggregate_boxes():
    gt = [Box(0, 0, 10, 10), Box(20, 20, 30, 30)]
    s_one = boxes.score_boxes([Box(0, 0, 10, 10)], gt)  # TP 1, FN 1: F1 2/3, mean IoU 1/2
    s_two = boxes.score_boxes([Box(0, 0, 10, 10), Box(20, 20, 30, 30)], gt)
    q1, q2 = analysis.quality("detect", s_one), analysis.quality("detect", s_two)
    assert q1 == pytest.approx(2 / 3 + 1e-3 * 0.5) and q2 == pytest.approx(1 + 1e-3)
    assert analysis.quality("detect", boxes.score_boxes([], [])) == pytest.approx(1 + 1e-3)  # nothing to find
    assert analysis.quality("detect", boxes.score_boxes(None, gt)) == -math.inf


def test_targets_take_the_task_kind_from_the_registry():
    """Segment targets are the codec's mask_rle objects (kind "mask") and the report's lenient
    "mask" objects; point / detect keep their own kind; an unknown task keeps every kind."""
    m = np.zeros((H, W), bool)
    m[10:20, 30:50] = True
    objs = read.objects(objects_to_json([Mask.from_array(m, "cat"), Box(1, 2, 3, 4, "cat"), Point(5, 6, "cat"), Point(5, 6, "dog")])
                        [:-1] + ', {"type": "mask", "polygon": [[0, 0], [9, 0], [9, 9]], "label": "cat"}]')
    kinds = lambda task: [o["type"] for o in analysis.targets(task, "cat", objs)]
    assert kinds("segment") == ["mask", "mask"]
    assert kinds("detect") == ["box"] and kinds("point") == ["point"]
    assert kinds("no_such_task") == ["mask", "box", "point", "mask"]
    from raytrain.eval.report.draw import mask_array

    assert (mask_array(objs[0], W, H) == m).all()  # the RLE decodes to the source mask
    assert mask_array(objs[0], W + 1, H) is None  # a mask of another image size is not drawn


def test_segment_overlay_draws_the_codecs_rle_masks(tmp_path):
    """Segment GT in the shards and predictions as eval writes them are mask_rle objects: the
    overlay tints and outlines both (GT blue, prediction red), each where its mask is."""
    import io

    from PIL import Image

    from raytrain.data import shards
    from raytrain.eval.report import GT_COLOUR, PRED_COLOUR, build_report

    w, h = 40, 40
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (128, 128, 128)).save(buf, format="PNG")
    g = np.zeros((h, w), bool)
    g[5:20, 5:20] = True  # GT: top-left square
    p = np.zeros((h, w), bool)
    p[22:36, 22:36] = True  # prediction: bottom-right square, no overlap
    gt, pred = Mask.from_array(g, "blob"), Mask.from_array(p, "blob")
    data = str(tmp_path / "data")
    shards.write_shards([{"id": "a", "image": buf.getvalue(), "width": w, "height": h, "split": "test",
                          "objects": objects_to_json([gt])}], data)
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    score = predict.score_example("segment", [pred], objects_to_json([gt]), w, h)
    assert score["mask_iou"] == 0.0
    row = {"id": "a", "task": "segment", "query": "blob", "text": "<seg>", "errors": [], "score": score,
           "objects": json.loads(objects_to_json([pred]))}
    (run / "eval" / "predictions_test.jsonl").write_text(json.dumps(row) + "\n")
    build_report(str(run), data, tmp_path / "out")
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    (rec,) = rep["overlays"]
    assert rec["drawn"] == {"gt": [{"type": "mask", "pixels": int(g.sum())}], "pred": [{"type": "mask", "pixels": int(p.sum())}]}
    assert not [n for n in rep["notes"] if "mask" in n or "failed" in n]
    arr = np.asarray(Image.open(tmp_path / "out" / rec["file"]).convert("RGB")).astype(int)
    s = rec["scale"][0]
    at = lambda x, y: arr[int(y * s), int(x * s)]
    assert at(12.5, 12.5)[2] > at(12.5, 12.5)[0] + 30  # inside the GT mask: tinted blue
    assert at(29.5, 29.5)[0] > at(29.5, 29.5)[2] + 30  # inside the prediction: tinted red
    assert (at(2, 35) == 128).all()  # outside both: the source grey
    outline = lambda rgb: (arr == np.asarray(rgb)).all(-1)
    assert outline(GT_COLOUR)[: int(21 * s), : int(21 * s)].sum() > 100 and outline(GT_COLOUR)[int(21 * s):].sum() == 0
    assert outline(PRED_COLOUR)[int(21 * s):, int(21 * s):].sum() > 100 and outline(PRED_COLOUR)[: int(21 * s)].sum() == 0
