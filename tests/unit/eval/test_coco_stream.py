"""The streaming COCO accumulator equals pycocotools' COCOeval over the same images, ground truth and
detections given as files, whatever the chunking: random scenes with several categories, crowded
images, empty images, tied and missing scores, boxes of every COCO size bucket."""

import contextlib
import io
import random

import numpy as np
import pytest

from raytrain.eval.metrics.coco import STAT_KEYS, coco_detection_metrics
from raytrain.eval.metrics.coco_stream import CocoAccumulator
from raytrain.formats.annotations import Box


def _scene(rng: random.Random, n_images: int, labels=("cat", "dog", "boat"), ties: bool = False):
    images = []
    for i in range(n_images):
        w, h = rng.choice([(64, 64), (320, 240), (640, 480)])
        gts, preds = [], []
        for _ in range(rng.choice([0, 1, 1, 2, 5])):
            bw, bh = rng.uniform(2, w / 2), rng.uniform(2, h / 2)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            gts.append(Box(x, y, x + bw, y + bh, rng.choice(labels)))
        for g in gts:
            if rng.random() < 0.8:  # a jittered detection of it
                j = rng.uniform(-0.3, 0.3) * (g.x2 - g.x1)
                lab = g.label if rng.random() < 0.9 else rng.choice(labels + ("zebra",))
                preds.append((Box(g.x1 + j, g.y1 + j, g.x2 + j, g.y2 + j, lab), None))
        for _ in range(rng.choice([0, 0, 1, 3])):  # false positives
            x, y = rng.uniform(0, w - 10), rng.uniform(0, h - 10)
            preds.append((Box(x, y, x + rng.uniform(2, 60), y + rng.uniform(2, 60), rng.choice(labels)), None))
        scored = []
        for b, _ in preds:
            s = round(rng.random(), 1) if ties else rng.random()
            scored.append((b, None if rng.random() < 0.05 else s))
        images.append((w, h, gts, scored))
    return images


def _pycocotools_on_files(gt_json: dict, results: list[dict]) -> list[float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = gt_json
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return list(ev.stats)


@pytest.mark.parametrize("seed,chunk,ties", [(0, 1, False), (1, 3, True), (2, 7, False), (3, 1000, True), (4, 2, True)])
def test_streaming_equals_cocoeval_on_the_written_files(seed, chunk, ties):
    rng = random.Random(seed)
    images, anns, results = [], [], []
    acc = CocoAccumulator(chunk_images=chunk, on_image=images.append, on_annotation=anns.append, on_result=results.append)
    for w, h, gts, preds in _scene(rng, 40, ties=ties):
        acc.add_image(w, h, gts, preds, extra={"file_name": "x"})
    got = acc.result()
    want = _pycocotools_on_files({"images": images, "annotations": anns, "categories": acc.categories_json()}, results)
    for k, v in zip(STAT_KEYS, want):
        assert (got[k] is None and v == -1) or got[k] == pytest.approx(v, abs=1e-12), k
    assert got["n_pred"] == len(results) and got["n_gt"] == len(anns) and got["n_images"] == 40
    assert got["n_pred_missing_score"] == sum(1 for *_, preds in _scene(random.Random(seed), 40, ties=ties) for _, s in preds if s is None)
    assert got["n_pred_unknown_label"] >= 0
    assert all(isinstance(r["image_id"], int) and isinstance(r["category_id"], int) and len(r["bbox"]) == 4 for r in results)


def test_streaming_equals_the_in_memory_metrics_when_scores_are_given():
    rng = random.Random(9)
    scene = _scene(rng, 25)
    acc = CocoAccumulator(chunk_images=4)
    flat_images, gts, preds = [], [], []
    for i, (w, h, g, p) in enumerate(scene):
        acc.add_image(w, h, g, [(b, s if s is not None else 0.0) for b, s in p])
        flat_images.append({"id": i, "width": w, "height": h})
        gts += [(i, b) for b in g]
        preds += [(i, b, s if s is not None else 0.0) for b, s in p]
    got = acc.result()
    labels = sorted({b.label.strip().casefold() for _, b in gts})
    want = coco_detection_metrics(flat_images, gts, [p for p in preds if p[1].label in labels], categories=None)
    for k in STAT_KEYS:
        assert (got[k] is None and want[k] is None) or got[k] == pytest.approx(want[k], abs=1e-12), k
    assert {k: v for k, v in got["ap_per_category"].items() if k in want["ap_per_category"]} == pytest.approx(want["ap_per_category"])


def test_no_detections_and_no_ground_truth():
    acc = CocoAccumulator()
    acc.add_image(10, 10, [], [])
    out = acc.result()
    assert out["map"] is None and out["n_images"] == 1
    acc = CocoAccumulator()
    acc.add_image(100, 100, [Box(0, 0, 50, 50, "a")], [])
    out = acc.result()
    assert out["map"] == 0.0 and out["mar_100"] == 0.0
    acc = CocoAccumulator()
    acc.add_image(100, 100, [Box(0, 0, 50, 50, "a")], [(Box(0, 0, 50, 50, "a"), 0.9), (Box(float("nan"), 0, 1, 1, "a"), None)])
    out = acc.result()
    assert out["map"] == pytest.approx(1.0) and out["n_pred_invalid_box"] == 1 and out["n_pred_missing_score"] == 1
    assert np.isfinite(out["map_50"])
