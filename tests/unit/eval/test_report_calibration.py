"""The report's reliability diagram and headline numbers (COCO mAP / AP50 / AP75 / mAR, point
P/R/F1, ECE) from a hand-built eval/metrics.json in a run folder, made with the real
calibration, COCO and point-P/R/F1 functions. No predictions, shards or history: those parts
of the page are notes."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from raytrain.eval.metrics import calibration as decoding
from raytrain.eval.metrics.coco import coco_detection_metrics
from raytrain.eval.metrics.point_prf import aggregate_points_prf, score_points_prf
from raytrain.eval.metrics.table import format_value
from raytrain.eval.report import build_report, figures
from raytrain.formats.annotations import Box, Point

# three occupied confidence bins: (confidence, predictions, correct) -> accuracy 0.2, 0.5, 0.8
CELLS = ((0.25, 10, 2), (0.55, 4, 2), (0.85, 20, 16))


def _calibration(cells=CELLS):
    conf = [c for c, n, _ in cells for _ in range(n)]
    correct = [k < ok for _, n, ok in cells for k in range(n)]
    return {"ece": decoding.expected_calibration_error(conf, correct), "bins": decoding.reliability_bins(conf, correct)}


def _run(tmp_path, metrics, name="run"):
    run = tmp_path / name
    (run / "eval").mkdir(parents=True, exist_ok=True)
    (run / "eval" / "metrics.json").write_text(json.dumps(metrics))
    return run


def _build(run, out):
    index = build_report(str(run), None, out)
    return index.read_text(), json.loads((out / "report.json").read_text())


def _mask(arr, rgb):
    return (arr == np.asarray(rgb, np.uint8)).all(-1)


def test_reliability_diagram_drawn_from_metrics_calibration(tmp_path):
    cal = _calibration()
    assert cal["ece"] == pytest.approx(0.05)  # |acc - conf| = 0.05 in every bin
    run = _run(tmp_path, {"trained": {"n": 34, "calibration": cal}, "untrained": {"n": 34}})
    html_text, rep = _build(run, tmp_path / "out")

    assert "calibration.png" in rep["images"] and (tmp_path / "out" / "calibration.png").is_file()
    assert [n for n in rep["notes"] if "failed" in n or "calibration" in n] == []
    got = rep["calibration"]["trained"]
    assert got["ece"] == pytest.approx(0.05) and got["n"] == 34 and len(got["bins"]) == 10
    assert [(b["count"], b["accuracy"]) for b in got["bins"] if b["count"]] == [(10, 0.2), (4, 0.5), (20, 0.8)]
    assert list(rep["calibration"]) == ["trained"]  # the untrained column has no calibration block

    assert "<h2>Calibration</h2>" in html_text and 'src="calibration.png"' in html_text
    assert f'<td class="num">{format_value(cal["ece"])}</td>' in html_text
    assert re.search(r"<td>ECE[^<]*</td><td class=\"num\">0\.05</td><td class=\"num\">-</td>", html_text)

    arr = np.asarray(Image.open(tmp_path / "out" / "calibration.png").convert("RGB"))
    assert arr.shape[0] >= 200 and arr.shape[1] >= 300
    # accuracy bars: measured upward from their common baseline (the legend's patch is not on it),
    # three bars left to right, heights in the ratio of the bins' accuracies 0.2 : 0.5 : 0.8
    acc = _mask(arr, figures.CAL_ACCURACY_COLOUR)
    base = np.nonzero(acc.any(1))[0].max()
    heights = np.zeros(arr.shape[1], int)
    for x in np.nonzero(acc[base])[0]:
        col = acc[: base + 1, x][::-1]
        heights[x] = np.argmin(col) if not col.all() else len(col)
    xs = np.nonzero(heights)[0]
    runs = np.split(xs, np.nonzero(np.diff(xs) > 1)[0] + 1)
    assert len(runs) == 3
    h = [float(np.median(heights[r])) for r in runs]
    assert h[1] / h[0] == pytest.approx(2.5, rel=0.06) and h[2] / h[0] == pytest.approx(4.0, rel=0.06)
    widths = [len(r) for r in runs]
    assert max(widths) - min(widths) <= 2  # each bar spans one 0.1-wide bin
    assert runs[1][0] - runs[0][0] == pytest.approx(runs[2][0] - runs[1][0], abs=2)  # bins 2 -> 5 -> 8: equal steps

    # the diagonal: a long falling line in image coordinates (y grows downwards)
    ys, xs = np.nonzero(_mask(arr, figures.CAL_DIAGONAL_COLOUR))
    assert len(xs) > 150 and np.corrcoef(xs, ys)[0, 1] < -0.95
    # confidence markers and the counts panel are drawn
    assert _mask(arr, figures.CAL_CONFIDENCE_COLOUR).sum() > 20
    assert _mask(arr, figures.CAL_COUNT_COLOUR).sum() > 200


def test_without_calibration_nothing_changes_and_a_stale_diagram_goes(tmp_path):
    out = tmp_path / "out"
    run = _run(tmp_path, {"trained": {"n": 3, "calibration": _calibration()}})
    _build(run, out)
    assert (out / "calibration.png").is_file()
    run = _run(tmp_path, {"trained": {"n": 3, "mean_distance": 1.5}})  # the same run, re-evaluated without it
    html_text, rep = _build(run, out)
    assert not (out / "calibration.png").exists() and "calibration.png" not in rep["images"]
    assert rep["calibration"] == {} and rep["summary"] == []
    assert "Calibration" not in html_text and "<h3>summary</h3>" not in html_text and "ECE" not in html_text


def test_malformed_calibration_is_a_note(tmp_path):
    run = _run(tmp_path, {"trained": {"calibration": {"ece": "high", "bins": "many"}},
                          "untrained": {"calibration": {"ece": 0.1, "bins": [{"lo": 0.5, "hi": 0.1, "count": 3}, "x"]}},
                          "centre_baseline": {"calibration": [1, 2]}})
    html_text, rep = _build(run, tmp_path / "out")
    notes = " | ".join(rep["notes"])
    assert "failed" not in notes
    assert "trained.calibration has neither bins nor an ECE" in notes
    assert "2 calibration bin(s) of untrained" in notes and "centre_baseline.calibration is not an object" in notes
    assert rep["calibration"] == {"untrained": {"ece": 0.1, "bins": [], "n": 0}}
    assert "calibration.png" not in rep["images"]  # nothing to draw: no bins
    assert "<h2>Calibration</h2>" in html_text  # the ECE is still shown


def _summary_rows(html_text):
    table = re.search(r"<h3>summary</h3><table>(.*?)</table>", html_text).group(1)
    rows = {}
    for tr in re.findall(r"<tr>(.*?)</tr>", table)[1:]:
        cells = re.findall(r"<td[^>]*>(.*?)</td>", tr)
        rows[cells[0]] = cells[1:]
    header = re.findall(r"<th>(.*?)</th>", table)
    return header, rows


def test_summary_table_shows_coco_point_prf_and_ece(tmp_path):
    # real COCO numbers for one column (coco.py's key names), the names for another
    images = [{"id": "a", "width": 100, "height": 80}, {"id": "b", "width": 100, "height": 80}]
    gts = [("a", Box(10, 10, 50, 50, "cat")), ("b", Box(20, 20, 60, 70, "cat"))]
    preds = [("a", Box(12, 10, 50, 52, "cat"), 0.9), ("b", Box(0, 0, 15, 15, "cat"), 0.8), ("b", Box(22, 20, 60, 66, "cat"), 0.3)]
    coco = coco_detection_metrics(images, gts, preds)
    assert coco["map"] is not None and 0 < coco["map"] < 1
    prf = aggregate_points_prf([score_points_prf([Point(10, 10), Point(90, 70)], [Point(11, 10)], 100, 80),
                                score_points_prf([Point(50, 40)], [Point(50, 41), Point(5, 5)], 100, 80)])
    assert (prf["precision"], prf["recall"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    trained = {"n": 2, "coco": {"mAP": 0.4321, "AP50": 0.8765, "AP75": 0.3456, "mAR": 0.5678},
               "point_prf": prf, "calibration": _calibration()}
    metrics = {"trained": trained, "untrained": {"n": 2, "coco": coco}, "centre_baseline": {"n": 2}}
    html_text, rep = _build(_run(tmp_path, metrics), tmp_path / "out")

    header, rows = _summary_rows(html_text)
    assert header == ["metric", "trained", "untrained", "centre_baseline"]
    f = format_value
    assert rows["COCO mAP @[.5:.95]"] == [f(0.4321), f(coco["map"]), "-"]
    assert rows["COCO AP50"] == [f(0.8765), f(coco["map_50"]), "-"]
    assert rows["COCO AP75"] == [f(0.3456), f(coco["map_75"]), "-"]
    assert rows["COCO mAR"] == [f(0.5678), f(coco["mar_100"]), "-"]
    assert rows["point precision (one-to-one)"] == [f(prf["precision"]), "-", "-"]
    assert rows["point recall (one-to-one)"] == [f(prf["recall"]), "-", "-"]
    assert rows["point F1 (one-to-one)"] == [f(prf["f1"]), "-", "-"]
    assert rows["ECE (expected calibration error)"] == [f(0.05), "-", "-"]
    assert [r["key"] for r in rep["summary"]] == ["mAP", "AP50", "AP75", "mAR", "precision", "recall", "f1", "ece"]
    assert rep["summary"][0]["values"] == {"trained": 0.4321, "untrained": coco["map"]}
