"""The streaming aggregator (eval/aggregate.py) gives, row by row, what each metric module computes
over the whole list: pointing, boxes, point P/R/F1 (Hungarian), calibration (ECE + reliability
bins), COCO through pycocotools with the per-object confidences; captions say clearly when METEOR
cannot run (no Java) instead of a silent None."""

import json
import random

import numpy as np
import pytest

from raytrain import predict
from raytrain.eval.aggregate import JAVA_MISSING, Aggregator, aggregate
from raytrain.eval.metrics import boxes as box_metrics
from raytrain.eval.metrics import pointing as point_metrics
from raytrain.eval.metrics.calibration import correct_predictions, expected_calibration_error, reliability_bins
from raytrain.eval.metrics.coco import coco_detection_metrics
from raytrain.eval.metrics.point_prf import aggregate_points_prf, score_points_prf
from raytrain.formats.annotations import Box, Caption, Point, objects_to_json


def _rows(n: int = 40, seed: int = 0) -> list[dict]:
    """Prediction rows as the predict path writes them: random answers with confidences, some
    empty (invalid), some with two objects, against one or two targets."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        task = "point" if i % 2 else "detect"
        label = rng.choice(["red circle", "blue square"])
        w, h = rng.choice([(64, 64), (120, 80)])
        if task == "point":
            gt = [Point(rng.uniform(0, w), rng.uniform(0, h), label) for _ in range(rng.choice([1, 2]))]
            pred = [Point(g.x + rng.gauss(0, 4), g.y + rng.gauss(0, 4), label) for g in gt[: rng.choice([0, 1, 2])]]
        else:
            gt = []
            for _ in range(rng.choice([1, 2])):
                x, y = rng.uniform(0, w - 20), rng.uniform(0, h - 20)
                gt.append(Box(x, y, x + rng.uniform(5, 20), y + rng.uniform(5, 20), label))
            pred = [Box(g.x1 + rng.uniform(-3, 3), g.y1, g.x2, g.y2 + rng.uniform(-3, 3), label) for g in gt[: rng.choice([0, 1, 2])]]
        conf = [rng.random() for _ in pred]
        batch = {"id": np.array([f"img{i // 2}"], dtype=object), "task": np.array([task], dtype=object),
                 "query": np.array([label], dtype=object), "targets": np.array([objects_to_json(gt)], dtype=object),
                 "width": np.array([w]), "height": np.array([h])}
        out = predict.score_rows(batch, [predict.Prediction("t", pred, conf, [])])
        rows.append({k: out[k][0] for k in out})
    return rows


def test_every_block_equals_its_metric_module():
    rows = _rows()
    got = aggregate(rows)
    point = [json.loads(r["score"]) for r in rows if r["task"] == "point"]
    box = [json.loads(r["score"]) for r in rows if r["task"] == "detect"]
    assert {k: got[k] for k in point_metrics.AGGREGATE_KEYS} == point_metrics.aggregate_pointing(point)
    assert got["boxes"] == box_metrics.aggregate_boxes(box)

    prf, confs, correct, images, gts, preds = [], [], [], [], [], []
    for k, r in enumerate(rows):
        objs = json.loads(r["objects"])
        gt_objs = json.loads(r["targets"])
        w, h = r["width"], r["height"]
        if r["task"] == "point":
            p = [Point(o["x"], o["y"], o["label"]) for o in objs]
            g = [Point(o["x"], o["y"], o["label"]) for o in gt_objs]
            prf.append(score_points_prf(p if objs else None, g, w, h))
        else:
            p = [Box(o["x1"], o["y1"], o["x2"], o["y2"], o["label"]) for o in objs]
            g = [Box(o["x1"], o["y1"], o["x2"], o["y2"], o["label"]) for o in gt_objs]
            images.append({"id": k, "width": w, "height": h})
            gts += [(k, b) for b in g]
            preds += [(k, b, o["score"]) for b, o in zip(p, objs)]
        s = [o["score"] for o in objs]
        correct += correct_predictions(p, g, w, h, s)
        confs += s
    assert got["point_prf"] == aggregate_points_prf(prf)
    assert got["calibration"]["ece"] == pytest.approx(expected_calibration_error(confs, correct))
    want_bins = reliability_bins(confs, correct)
    assert len(got["calibration"]["bins"]) == len(want_bins) == 10
    for a, b in zip(got["calibration"]["bins"], want_bins):
        assert a["count"] == b["count"] and (a["lo"], a["hi"]) == (b["lo"], b["hi"])
        for k in ("confidence", "accuracy"):
            assert (a[k] is None and b[k] is None) or a[k] == pytest.approx(b[k], abs=1e-12)
    assert got["calibration"]["n"] == len(confs) > 10
    want = coco_detection_metrics(images, gts, preds)
    for key in ("map", "map_50", "map_75", "mar_1", "mar_10", "mar_100"):
        assert got["coco"][key] == pytest.approx(want[key], abs=1e-12), key
    assert got["valid_rate_by_task"]["point"] == sum(bool(json.loads(r["objects"])) for r in rows if r["task"] == "point") / 20
    assert got["examples"] == 40


def test_rows_read_back_from_jsonl_score_the_same():
    """Rows with JSON columns nested (predictions JSONL, the streamed parts) give the same metrics."""
    from raytrain.eval import batch as eval_batch

    rows = _rows(seed=3)
    back = [json.loads(eval_batch.row_json({k: [v] for k, v in r.items()}, 0)) for r in rows]
    assert isinstance(back[0]["objects"], list)
    assert aggregate(back) == aggregate(rows)


def _caption_rows():
    rows = []
    for i, (hyp, refs) in enumerate([("a red circle", ["a red circle", "red circle"]), ("a blue square", ["a green square"])]):
        batch = {"id": np.array([f"c{i}"], dtype=object), "task": np.array(["caption"], dtype=object),
                 "query": np.array([""], dtype=object), "targets": np.array([objects_to_json([Caption(r) for r in refs])], dtype=object),
                 "width": np.array([64]), "height": np.array([64])}
        out = predict.score_rows(batch, [predict.Prediction(hyp, [Caption(hyp)], [None], [])])
        rows.append({k: out[k][0] for k in out})
    return rows


def test_without_java_meteor_is_reported_missing_not_silently_none(monkeypatch, tmp_path, capsys):
    from raytrain import config as config_mod
    from raytrain.launch import eval as launch_eval

    monkeypatch.setenv("PATH", str(tmp_path))  # no java on it
    got = aggregate(_caption_rows())
    cap = got["captions"]
    assert cap["meteor"] is None and cap["meteor_note"] == JAVA_MISSING and got["warnings"] == [JAVA_MISSING]
    assert cap["bleu_1"] > 0 and cap["valid_rate"] == 1.0
    launch_eval.print_tables(config_mod.load(None, ["data.tasks=[caption]"]), {"trained": got})
    out = capsys.readouterr().out
    assert "WARNING: METEOR not computed: no `java` on PATH" in out and "BLEU-1" in out


@pytest.mark.skipif(__import__("shutil").which("java") is None, reason="needs a Java runtime")
def test_with_java_meteor_is_a_number():
    cap = aggregate(_caption_rows())["captions"]
    assert isinstance(cap["meteor"], float) and 0.0 < cap["meteor"] <= 1.0 and "meteor_note" not in cap


def test_sample_columns_keep_late_keys():
    agg = Aggregator()
    agg.samples["x"] = s = __import__("raytrain.eval.aggregate", fromlist=["_Samples"])._Samples()
    s.add({"a": 1})
    s.add({"a": 2, "b": None})
    s.add({"b": 3.5})
    got = list(s)
    assert np.isnan(got[0]["b"]) and got[1]["a"] == 2 and np.isnan(got[2]["a"]) and got[2]["b"] == 3.5


def test_image_level_presence_counts_negatives_like_sklearn():
    """Seed 004: radiographs without a fracture are negatives; whether an answer names an object is
    scored per example beside the box metrics (accuracy / precision / recall / F1 / specificity),
    equal to scikit-learn's on the same present / answered labels."""
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

    rng = random.Random(3)
    rows, truth, said = [], [], []
    for i in range(60):
        present, answers = rng.random() < 0.6, rng.random() < 0.55
        gt = [Box(10, 10, 30, 30, "Fracture")] if present else []
        pred = [Box(12, 11, 31, 29, "Fracture")] if answers else []
        batch = {"id": np.array([f"r{i}"], dtype=object), "task": np.array(["detect"], dtype=object),
                 "query": np.array(["Fracture"], dtype=object), "targets": np.array([objects_to_json(gt)], dtype=object),
                 "width": np.array([64]), "height": np.array([64])}
        out = predict.score_rows(batch, [predict.Prediction("Normal" if not pred else "t", pred, [0.9] * len(pred), [])])
        rows.append({k: out[k][0] for k in out})
        truth.append(present)
        said.append(answers)
    got = aggregate(rows)["image_level"]
    assert (got["n"], got["positives"], got["negatives"]) == (60, sum(truth), 60 - sum(truth))
    assert got["accuracy"] == pytest.approx(accuracy_score(truth, said))
    assert got["precision"] == pytest.approx(precision_score(truth, said))
    assert got["recall"] == pytest.approx(recall_score(truth, said))
    assert got["f1"] == pytest.approx(f1_score(truth, said))
    assert got["specificity"] == pytest.approx(recall_score(truth, said, pos_label=False))
    assert "image_level" not in aggregate(_rows())  # no negatives in the split: not reported
