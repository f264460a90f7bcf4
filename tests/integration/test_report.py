"""The run report on a small real dataset (synthetic shards) with fabricated predictions whose
errors are known: every prediction sits +3 px right of its ground truth. Checks the pixels of
the overlays, the numbers behind the histograms, the curves, and the HTML that ties them."""

import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raytrain import predict
from raytrain.data import shards
from raytrain.eval import batch
from raytrain.eval import report as rp
from raytrain.eval.metrics.table import format_value
from raytrain.formats.annotations import Box, Point, objects_from_json, objects_to_json

pytestmark = pytest.mark.integration

DX = 3.0  # every fabricated prediction: ground truth shifted +3 source pixels in x
SIZE = 64


def _row(rid, task, query, w, h, targets, pred, text="", errors=()):
    """A predictions row as predict.score_rows builds it (JSON strings inside)."""
    score = predict.score_example(task, pred if pred else None, targets, w, h)
    return {"id": rid, "task": task, "query": query, "text": text or f"fake {query}",
            "objects": objects_to_json(pred or []), "errors": json.dumps([list(e) for e in errors]), "score": json.dumps(score)}


def _shift(o):
    if isinstance(o, Point):
        return Point(o.x + DX, o.y, o.label)
    return Box(o.x1 + DX, o.y1, o.x2 + DX, o.y2, o.label)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder (history, metrics, predictions) over 16 synthetic test images."""
    root = tmp_path_factory.mktemp("report")
    data = str(root / "data")
    shards.prepare_synthetic(data, n=16, seed=3, image_size=SIZE, shapes_per_image=2, splits={"test": 1.0})
    table = shards.read_split(data, "test")
    rows, untrained, centre = [], [], []
    special = {"invalid": None, "dup_point": None, "dup_box": None}
    for rid, w, h, objs_json in zip(*(table.column(c).to_pylist() for c in ("id", "width", "height", "objects"))):
        objs = objects_from_json(objs_json)
        for task, kind in (("point", Point), ("detect", Box)):
            for label in sorted({o.label for o in objs if o.label}):  # captions have no label
                gt = [o for o in objs if o.label == label and isinstance(o, kind)]
                targets = objects_to_json(gt)
                pred = [_shift(o) for o in gt]
                errors = []
                if task == "point" and special["invalid"] is None:
                    special["invalid"] = (rid, label)
                    pred, errors = [], [("garbage", "xyz")]
                elif task == "point" and special["dup_point"] is None:
                    special["dup_point"] = (rid, label)  # the same point twice, then cut off
                    pred, errors = pred + pred, [("truncated_object", "<loc0012>")]
                elif task == "detect" and special["dup_box"] is None:
                    special["dup_box"] = (rid, label)
                    pred = pred + pred
                rows.append(_row(rid, task, label, w, h, targets, pred, errors=errors))
                untrained.append(_row(rid, task, label, w, h, targets, [], text="junk", errors=[("garbage", "junk")]))
                c = Point(w / 2, h / 2, label) if task == "point" else Box(w / 4, h / 4, 3 * w / 4, 3 * h / 4, label)
                centre.append(_row(rid, task, label, w, h, targets, [c]))
    run_dir = root / "runs" / "tiny"
    (run_dir / "eval").mkdir(parents=True)
    batch.write_predictions(rows, str(run_dir / "eval" / "predictions_test.jsonl"))
    metrics = {"trained": batch.aggregate(rows), "untrained": batch.aggregate(untrained), "centre_baseline": batch.aggregate(centre),
               "run": {"name": "tiny", "checkpoint": "/nowhere/checkpoint_1", "final_step": 200, "data": data, "split": "test"}}
    (run_dir / "eval" / "metrics.json").write_text(json.dumps(metrics))
    # 20 reports to step 200, then a restart from the step-100 checkpoint that logs 110..200 again
    hist = [{"step": s, "loss": 5 * math.exp(-s / 60) + 1, "ce": 5 * math.exp(-s / 60) + 0.9, "lr": 1e-3 * (1 - s / 250),
             "grad_norm": 1.0, "samples_per_s": 100.0 + s % 7, "resumed_from": -1} for s in range(10, 201, 10)]
    hist += [{"step": s, "loss": 5 * math.exp(-s / 60) + 1.1, "ce": 5 * math.exp(-s / 60) + 1.0, "lr": 1e-3 * (1 - s / 250),
              "grad_norm": 0.9, "samples_per_s": 90.0, "resumed_from": 100, **({"checkpoint": "/x"} if s == 200 else {})}
             for s in range(110, 201, 10)]
    (run_dir / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hist))
    out = root / "out"
    index = rp.build_report(str(run_dir), data, out, split="test", max_overlays=12)
    rep = json.loads((out / "report.json").read_text())
    images = {rid: Image.open(io.BytesIO(b)).convert("RGB") for rid, b in zip(table.column("id").to_pylist(), table.column("image").to_pylist())}
    return {"index": index, "out": out, "rep": rep, "metrics": metrics, "rows": rows, "special": special, "images": images}


def _png(out: Path, name: str) -> np.ndarray:
    return np.asarray(Image.open(out / name).convert("RGB"))


def _near(arr: np.ndarray, colour, x: float, y: float, r: float) -> int:
    """Pixels of exactly ``colour`` within ``r`` PNG pixels of (x, y) (pixel centres)."""
    ys, xs = np.nonzero((arr == np.asarray(colour, np.uint8)).all(-1))
    return int((np.hypot(xs + 0.5 - x, ys + 0.5 - y) <= r).sum())


def test_report_pages_and_notes(run):
    rep, out = run["rep"], run["out"]
    assert run["index"] == out / "index.html"
    assert [n for n in rep["notes"] if "failed" in n] == []
    assert set(rep["tasks"]) == {"point", "detect"}
    assert {"curves.png", "errors.png", "bias_points.png", "bias_boxes.png", "distance.png"} <= set(rep["images"])
    html_text = run["index"].read_text()
    srcs = re.findall(r'<img[^>]*src="([^"]+)"', html_text)
    # the page shows exactly the images the report lists, each exists, none left unlisted on disk
    assert set(srcs) == set(rep["images"])
    assert all((out / s).is_file() for s in srcs)
    assert {p.relative_to(out).as_posix() for p in out.rglob("*.png")} == set(rep["images"])
    assert not re.search(r'(src|href)="(https?:)?//', html_text)  # self-contained: nothing external
    for s in srcs:
        with Image.open(out / s) as im:
            assert im.width >= 300 and im.height >= 200


def test_metrics_table_values_in_html(run):
    html_text = run["index"].read_text()
    m = run["metrics"]
    for col in ("trained", "untrained", "centre_baseline"):
        assert f"<th>{col}</th>" in html_text
    for v in (m["trained"]["mean_distance"], m["centre_baseline"]["mean_distance"], m["trained"]["success_rate"],
              m["trained"]["boxes"]["f1"], m["centre_baseline"]["boxes"]["mean_iou"]):
        assert f'<td class="num">{format_value(v)}</td>' in html_text
    assert m["trained"]["mean_distance"] == pytest.approx(DX)  # the fixture is what it claims


def test_bias_and_distance_numbers(run):
    b = run["rep"]["bias"]
    pts, boxes = b["points"], b["box_centres"]
    n_point_rows = sum(r["task"] == "point" for r in run["rows"])
    assert pts["n"] == n_point_rows - 1  # every GT point but the invalid example's (one point per label here)
    assert pts["dx_px"]["mean"] == pytest.approx(DX) and pts["dy_px"]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert pts["dx_norm"]["mean"] == pytest.approx(DX / SIZE) and pts["dy_norm"]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert boxes["dx_px"]["mean"] == pytest.approx(DX) and boxes["dy_px"]["std"] == pytest.approx(0.0, abs=1e-9)
    assert boxes["n"] == sum(r["task"] == "detect" for r in run["rows"])
    # the histogram holds every value, in the bin that contains +3
    h = pts["dx_px"]
    assert sum(h["counts"]) == pts["n"] and h["n_outside"] == 0
    k = int(np.argmax(h["counts"]))
    assert h["edges"][k] <= DX <= h["edges"][k + 1] and h["counts"][k] == pts["n"]
    d = run["rep"]["distance"]["px"]
    assert d["n"] == n_point_rows - 1 and d["mean"] == pytest.approx(DX)


def test_error_analytics(run):
    e = run["rep"]["errors"]
    assert e["reasons"] == {"garbage": 1, "truncated_object": 1}
    assert e["truncations"] == {"truncated_object": 1, "outputs": 1}
    assert e["duplicates"] == {"objects": 2, "outputs": 2}  # one repeated point, one repeated box
    assert e["outputs"]["no_object_parsed"] == 1
    pe = run["rep"]["parse_errors"]
    assert pe["trained"] == e["reasons"] and pe["untrained"] == {"garbage": len(run["rows"])}


def test_curves_mark_the_restart(run):
    c = run["rep"]["curves"]
    assert c["rows"] == 30
    assert c["restarts"] == [{"row": 20, "step": 110.0, "resumed_from": 100}]
    assert len(c["series"]["loss"]) == 30 and {"ce", "lr", "grad_norm", "samples_per_s"} <= set(c["series"])
    img = np.asarray(Image.open(run["out"] / "curves.png").convert("L"), dtype=np.float64)
    assert img.shape[1] >= 800 and img.var() > 200  # not blank
    assert (img < 128).mean() > 0.01  # lines, text and axes drawn


def test_point_overlay_pixels(run):
    rep, out = run["rep"], run["out"]
    recs = [r for r in rep["overlays"] if r["task"] == "point" and len(r["pred"]) == 1 and len(r["gt"]) == 1]
    assert recs and {"best", "median", "worst"} <= {r["category"] for r in rep["overlays"] if r["task"] == "point"}
    r = recs[0]
    sx, sy = r["scale"]
    assert sx == sy == rp.OVERLAY_SIDE / SIZE
    arr = _png(out, r["file"])
    assert arr.shape[1] == rp.OVERLAY_SIDE and arr.shape[0] > rp.OVERLAY_SIDE  # image plus caption band
    gx, gy = r["gt"][0]["x"] * sx, r["gt"][0]["y"] * sy
    px, py = r["pred"][0]["x"] * sx, r["pred"][0]["y"] * sy
    assert px - gx == pytest.approx(DX * sx)
    assert _near(arr, rp.GT_COLOUR, gx, gy, 9) > 30  # blue circle around the GT point
    assert _near(arr, rp.PRED_COLOUR, px, py, 4) > 10  # red cross on the predicted point
    assert _near(arr, rp.PRED_COLOUR, gx, gy, 4) == 0  # ... not on the GT point, 18 px away
    assert _near(arr, rp.GT_COLOUR, px, py, 3) == 0
    # the picture underneath is this example's source image, upscaled with nearest neighbour
    src = np.asarray(run["images"][r["id"]])
    assert (arr[2, 2] == src[0, 0]).all() and (arr[rp.OVERLAY_SIDE - 3, rp.OVERLAY_SIDE - 3] == src[-1, -1]).all()


def test_box_overlay_pixels(run):
    rep, out = run["rep"], run["out"]
    recs = [r for r in rep["overlays"] if r["task"] == "detect" and len(r["pred"]) == 1 and len(r["gt"]) == 1]
    assert recs
    r = recs[0]
    sx, sy = r["scale"]
    arr = _png(out, r["file"])
    g, p = r["gt"][0], r["pred"][0]
    ymid = (g["y1"] + g["y2"]) / 2 * sy  # labels sit above / below the boxes, edges are clear here
    assert _near(arr, rp.GT_COLOUR, g["x1"] * sx, ymid, 2.5) >= 2  # GT left edge
    assert _near(arr, rp.GT_COLOUR, g["x2"] * sx, ymid, 2.5) >= 2  # GT right edge
    assert _near(arr, rp.PRED_COLOUR, p["x1"] * sx, ymid, 2.5) >= 2  # prediction's left edge, 18 px right
    assert _near(arr, rp.PRED_COLOUR, g["x1"] * sx, ymid, 2.5) == 0


def test_missing_pieces_give_notes_not_crashes(tmp_path):
    """No history, no metrics, no boxes task, every output unparsable, a mask task with one
    drawable and one unknown mask encoding: the page still renders, with notes."""
    data = str(tmp_path / "data")
    img = Image.new("RGB", (50, 40), (120, 120, 120))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    gt_objs = [{"type": "point", "x": 10.0, "y": 20.0, "label": "dot"},
               {"type": "mask", "polygon": [[20, 5], [45, 5], [45, 35], [20, 35]], "label": "blob"}]
    shards.write_shards([{"id": "a", "image": buf.getvalue(), "width": 50, "height": 40, "split": "test", "objects": json.dumps(gt_objs)}], data)
    run_dir = tmp_path / "run"
    (run_dir / "eval").mkdir(parents=True)
    preds = [
        {"id": "a", "task": "point", "query": "dot", "text": "??", "objects": [], "errors": [["garbage", "??"]], "score": {"valid": 0}},
        {"id": "a", "task": "segment", "query": "blob", "text": "<seg>", "errors": [], "score": {"valid": 1, "mask_iou": 0.5},
         "objects": [{"type": "mask", "x1": 5, "y1": 5, "x2": 15, "y2": 15, "mask": [[1, 1], [1, 1]], "label": "blob"},
                     {"type": "mask", "encoding": "unknown", "label": "blob"}]},
        {"id": "missing", "task": "point", "query": "dot", "text": "", "objects": [], "errors": [["empty_output", ""]], "score": {"valid": 0}},
    ]
    (run_dir / "eval" / "predictions_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preds) + "not json\n")
    out = tmp_path / "out"
    index = rp.build_report(str(run_dir), data, out)
    rep = json.loads((out / "report.json").read_text())
    notes = " | ".join(rep["notes"])
    for expect in ("metrics.json", "history", "'detect'", "mask object", "ids not in", "unreadable line"):
        assert expect in notes, expect
    assert "failed" not in notes
    assert rep["bias"]["points"] == {"n": 0} and rep["curves"]["restarts"] == []
    assert rep["errors"]["reasons"] == {"garbage": 1, "empty_output": 1}
    html_text = index.read_text()
    assert "No training history" in html_text and "No matched points" in html_text
    assert set(re.findall(r'<img[^>]*src="([^"]+)"', html_text)) == set(rep["images"])
    # the unparsable point example: GT circle only; the segment example: both masks' outlines
    point = next(r for r in rep["overlays"] if r["task"] == "point")
    arr = _png(out, point["file"])
    s = point["scale"][0]
    assert _near(arr, rp.GT_COLOUR, 10 * s, 20 * s, 9) > 20 and not (arr == rp.PRED_COLOUR).all(-1).any()
    seg = next(r for r in rep["overlays"] if r["task"] == "segment")
    arr = _png(out, seg["file"])
    s = seg["scale"][0]
    assert _near(arr, rp.GT_COLOUR, 20 * s, 20 * s, 3) > 0  # the polygon's left edge
    assert _near(arr, rp.PRED_COLOUR, 5 * s, 10 * s, 3) > 0  # the predicted mask's box / outline
    inside = arr[int(10 * s), int(10 * s)].astype(int)  # tinted towards red, not the grey source
    assert inside[0] > inside[2] + 30

    # every output unparsable: overlays of the ground truth, no bias, a note
    (run_dir / "eval" / "predictions_test.jsonl").write_text(json.dumps(preds[0]) + "\n")
    rp.build_report(str(run_dir), data, tmp_path / "out2")
    rep2 = json.loads((tmp_path / "out2" / "report.json").read_text())
    assert any("No output of the trained model parsed" in n for n in rep2["notes"])
    assert [r["file"] for r in rep2["overlays"]] == ["overlays/point_best_00.png"]
    assert rep2["distance"]["px"] == {"n": 0} and "distance.png" not in rep2["images"]

    # shards missing, then everything missing: still a page, with notes
    rp.build_report(str(run_dir), str(tmp_path / "no-data"), tmp_path / "out3")
    rep3 = json.loads((tmp_path / "out3" / "report.json").read_text())
    assert any("No shards for split 'test'" in n for n in rep3["notes"]) and rep3["overlays"] == []
    empty = rp.build_report(str(tmp_path / "nothing"), None, tmp_path / "out4")
    rep4 = json.loads((tmp_path / "out4" / "report.json").read_text())
    assert empty.is_file() and rep4["images"] == [] and len(rep4["notes"]) >= 3
    assert not [n for n in rep2["notes"] + rep3["notes"] + rep4["notes"] if "failed" in n]


def test_report_reads_run_and_shards_from_s3(s3_bucket, s3_opts, tmp_path):
    data = f"{s3_bucket}/data"
    shards.prepare_synthetic(data, n=4, seed=1, image_size=SIZE, splits={"test": 1.0}, opts=s3_opts)
    table = shards.read_split(data, "test", s3_opts)
    rows = []
    for rid, objs_json in zip(table.column("id").to_pylist(), table.column("objects").to_pylist()):
        gt = [o for o in objects_from_json(objs_json) if isinstance(o, Point)]
        rows.append(_row(rid, "point", gt[0].label, SIZE, SIZE, objects_to_json(gt), [_shift(o) for o in gt]))
    run_uri = f"{s3_bucket}/runs/s3run"
    batch.write_predictions(rows, f"{run_uri}/eval/predictions_test.jsonl", s3_opts)
    index = rp.build_report(run_uri, data, tmp_path / "out", opts=s3_opts, max_overlays=3)
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["bias"]["points"]["dx_px"]["mean"] == pytest.approx(DX)
    assert len(rep["overlays"]) == 3 and all((tmp_path / "out" / r["file"]).is_file() for r in rep["overlays"])
    assert "s3run" in index.read_text()
