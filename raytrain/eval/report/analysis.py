"""The report's numbers: pure functions of the predictions, ground truth, history and metrics.

Their results go into report.json as they are. Pairings and per-sample scores come from
``raytrain.eval.metrics`` (the functions eval scores with), so a bias or a ranking here
describes the same matches the metrics table counts.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from raytrain import tasks
from raytrain.eval.metrics import boxes, pointing
from raytrain.eval.metrics.values import finite
from raytrain.eval.report.read import Source, objects
from raytrain.formats.annotations import Box, Point, box_iou

DUPLICATE_IOU = 0.9  # two boxes of one output with IoU above this are one object twice
COLUMNS = ("trained", "untrained", "centre_baseline")  # metrics.json columns, in page order


def spec(task: str) -> tasks.TaskSpec | None:
    """The task's registry entry; None for a task the registry does not know (still reported)."""
    return tasks.TASKS.get(task)


def kind(task: str) -> str | None:
    s = spec(task)
    return s.kind if s else None


# ---------------------------------------------------------------------------------------------
# per example


@dataclass
class Example:
    id: str
    task: str
    query: str
    text: str
    pred: list[dict]
    errors: list[tuple[str, str]]
    score: dict
    gt: list[dict] | None  # None: the image is not in the shards
    width: int | None
    height: int | None
    quality: float  # higher is better; -inf for an output that did not parse


def targets(task: str, query: str, objs: list[dict]) -> list[dict]:
    """The example's targets as pipeline.examples_for builds them: the task's kind, label == query."""
    k = kind(task)
    return [o for o in objs if o["label"] == query and (k is None or o["type"] == k)]


def _box_f1_iou(score: dict) -> tuple[float, float | None]:
    """Per-sample F1 and mean IoU of a boxes score (boxes.aggregate_boxes over one sample);
    F1 of a sample with nothing to find and nothing found is 1."""
    agg = boxes.aggregate_boxes([score])
    f1 = agg["f1"] if agg["f1"] is not None else 1.0
    return f1, agg["mean_iou"]


def quality(task: str, score: dict) -> float:
    """One number per example to rank by, higher is better: -normalised distance for points,
    per-sample F1 (+ a little mean IoU to break ties) for boxes, mask IoU for masks."""
    if not isinstance(score, dict) or finite(score.get("valid")) != 1.0:
        return -math.inf
    family = spec(task).metrics if spec(task) else None
    if family == "pointing":
        nd = finite(score.get("norm_distance"))
        if nd is not None:
            return -nd
        return 0.0 if finite(score.get("success")) == 1.0 else -1e9  # nothing to point at / no point
    if family == "boxes":
        f1, miou = _box_f1_iou(score)
        return f1 + 1e-3 * (f1 if miou is None else miou)
    for key in ("mask_iou", "iou", "f1", "box_iou"):
        v = finite(score.get(key))
        if v is not None:
            return v
    return 0.0


def score_summary(ex: Example) -> str:
    """The example's per-sample score in a few words (overlay captions, the page)."""
    s = ex.score
    if finite(s.get("valid")) != 1.0:
        return "no object parsed"
    family = spec(ex.task).metrics if spec(ex.task) else None
    if family == "pointing":
        d, nd = finite(s.get("distance")), finite(s.get("norm_distance"))
        return "no point to measure" if d is None else f"distance {d:.2f} px" + (f" = {nd:.3f} diagonal" if nd is not None else "")
    if family == "boxes":
        _, miou = _box_f1_iou(s)
        tp, fp, fn = (int(finite(s.get(k)) or 0) for k in ("tp", "fp", "fn"))
        return f"TP {tp} FP {fp} FN {fn}" + (f"  IoU {miou:.2f}" if miou is not None else "")
    v = next((finite(s.get(k)) for k in ("mask_iou", "iou") if finite(s.get(k)) is not None), None)
    return f"IoU {v:.2f}" if v is not None else "valid"


def _errors(raw: Any) -> list[tuple[str, str]]:
    out = []
    for e in raw if isinstance(raw, list) else []:
        if isinstance(e, (list, tuple)) and e:
            out.append((str(e[0]), str(e[1]) if len(e) > 1 else ""))
        elif isinstance(e, dict):
            out.append((str(e.get("reason", "?")), str(e.get("text", ""))))
    return out


def _decoded(v: Any) -> Any:
    """A row field as written by ``batch.write_predictions`` (decoded), or still the JSON string
    a Ray Data block carries; undecodable text reads as None."""
    if isinstance(v, str):
        try:
            return json.loads(v)
        except ValueError:
            return None
    return v


def examples(rows: list[dict], gt: dict[str, Source] | None) -> tuple[list[Example], int]:
    """Prediction rows joined with their ground truth; also how many ids the shards lack."""
    out, missing = [], 0
    for r in rows:
        task, query, rid = str(r.get("task", "")), str(r.get("query", "")), str(r.get("id", ""))
        score = _decoded(r.get("score"))
        score = score if isinstance(score, dict) else {}
        src = gt.get(rid) if gt is not None else None
        if gt is not None and src is None:
            missing += 1
        out.append(Example(
            id=rid, task=task, query=query, text=str(r.get("text", "")),
            pred=objects(r.get("objects")), errors=_errors(_decoded(r.get("errors"))), score=score,
            gt=targets(task, query, src.objects) if src else None,
            width=src.width if src else None, height=src.height if src else None,
            quality=quality(task, score),
        ))
    return out, missing


# ---------------------------------------------------------------------------------------------
# pairs (the metrics' own matching)


def as_point(o: dict) -> Point:
    return Point(o["x"], o["y"], o["label"])


def as_box(o: dict) -> Box:
    return Box(o["x1"], o["y1"], o["x2"], o["y2"], o["label"])


def has_box(o: dict) -> bool:
    return all(finite(o.get(k)) is not None for k in ("x1", "y1", "x2", "y2"))


def point_offsets(gt: list[dict], pred: list[dict]) -> list[tuple[float, float]]:
    """(dx, dy) = pred - GT for each GT point and its closest predicted point, in source pixels:
    ``pointing.closest_offsets``, the pairing ``pointing.score_points`` measures."""
    g = [as_point(o) for o in gt if o["type"] == "point"]
    p = [as_point(o) for o in pred if o["type"] == "point"]
    return [(float(dx), float(dy)) for dx, dy in pointing.closest_offsets(p, g)]


def box_pairs(gt: list[dict], pred: list[dict]) -> list[tuple[float, float, float]]:
    """(dx, dy, IoU) of box centres, pred - GT, over the one-to-one assignment
    ``boxes.score_boxes`` scores (``boxes.match_boxes``: most IoU >= 0.5 pairs first, then
    total IoU). Pairs that do not overlap at all are left out: their offset measures a wrong
    object, not a bias (they add 0 to the metric's IoU sum, so the IoUs here still sum to it)."""
    g = [as_box(o) for o in gt if o["type"] == "box"]
    p = [as_box(o) for o in pred if o["type"] == "box"]
    rows, cols, iou = boxes.match_boxes(p, g)
    out = []
    for i, j in zip(rows, cols):
        if iou[i, j] > 0:
            gc, pc = g[i].center, p[j].center
            out.append((pc.x - gc.x, pc.y - gc.y, float(iou[i, j])))
    return out


def box_offsets(gt: list[dict], pred: list[dict]) -> list[tuple[float, float]]:
    return [(dx, dy) for dx, dy, _ in box_pairs(gt, pred)]


# ---------------------------------------------------------------------------------------------
# histograms, bias, distance


def hist(values: Sequence[float], unit: float, max_bins: int = 50) -> dict:
    """Summary and histogram of ``values``. The range spans the 0.5-99.5th percentiles and
    always includes 0 (so a bias reads against zero); values outside it are counted."""
    a = np.asarray(values, dtype=np.float64)
    if not len(a):
        return {"n": 0}
    lo, hi = (np.percentile(a, [0.5, 99.5]) if len(a) >= 200 else (a.min(), a.max()))
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo < 1e-12:
        lo, hi = lo - unit, hi + unit
    bins = min(max(round(2 * math.sqrt(len(a))), 10), max_bins)
    counts, edges = np.histogram(a, bins=bins, range=(lo, hi))
    return {
        "n": len(a),
        "mean": float(a.mean()),
        "median": float(np.median(a)),
        "std": float(a.std()),
        "min": float(a.min()),
        "max": float(a.max()),
        "n_outside": int(((a < lo) | (a > hi)).sum()),
        "edges": [float(e) for e in edges],
        "counts": [int(c) for c in counts],
    }


def bias(exs: list[Example], of_kind: str, offsets: Callable) -> dict:
    """pred - GT offsets of every matched pair of the tasks of ``of_kind``: pixels and
    fractions of the image width (dx) / height (dy)."""
    px, norm = [], []
    for ex in exs:
        if kind(ex.task) != of_kind or ex.gt is None or not ex.pred:
            continue
        for dx, dy in offsets(ex.gt, ex.pred):
            px.append((dx, dy))
            norm.append((dx / ex.width if ex.width else math.nan, dy / ex.height if ex.height else math.nan))
    if not px:
        return {"n": 0}
    p = np.asarray(px)
    q = np.asarray(norm)
    q = q[np.isfinite(q).all(axis=1)]
    return {
        "n": len(px),
        "dx_px": hist(p[:, 0], 1.0),
        "dy_px": hist(p[:, 1], 1.0),
        "dx_norm": hist(q[:, 0], 0.01),
        "dy_norm": hist(q[:, 1], 0.01),
    }


def distance(exs: list[Example]) -> dict:
    """Per-sample distance errors of valid point examples: the values eval's ``score_points``
    stored, which ``aggregate_pointing`` averages (so mean / median equal the metrics')."""
    pts = [ex for ex in exs if kind(ex.task) == "point"]
    px = [v for ex in pts for v in [finite(ex.score.get("distance"))] if v is not None]
    nd = [v for ex in pts for v in [finite(ex.score.get("norm_distance"))] if v is not None]
    return {"px": hist(px, 1.0), "norm": hist(nd, 0.01), "success_frac": pointing.DEFAULT_SUCCESS_FRAC}


# ---------------------------------------------------------------------------------------------
# parse errors, duplicates


def _same_object(a: dict, b: dict, width: int | None, height: int | None) -> bool:
    """Is ``b`` a repeat of ``a`` within one output? Points: the same location bin (within half
    a PaliGemma bin, size/2048, so adjacent bins differ); boxes and boxed masks: IoU > 0.9."""
    if a["type"] != b["type"] or a["label"].strip().casefold() != b["label"].strip().casefold():
        return False
    if a["type"] == "point":
        tx = width / 2048 if width else 1e-6
        ty = height / 2048 if height else 1e-6
        return abs(a["x"] - b["x"]) <= tx and abs(a["y"] - b["y"]) <= ty
    if has_box(a) and has_box(b):
        return box_iou(as_box(a), as_box(b)) > DUPLICATE_IOU
    return False


def duplicates(objs: list[dict], width: int | None, height: int | None) -> int:
    """Objects of one output that repeat an earlier object of the same output."""
    return sum(any(_same_object(objs[k], o, width, height) for k in range(j)) for j, o in enumerate(objs))


def error_stats(exs: list[Example]) -> dict:
    """Parse failures, truncations and duplicates of the trained model's outputs."""
    reasons: Counter = Counter()
    by_task: dict[str, Counter] = {}
    samples: dict[str, list[dict]] = {}
    outputs = Counter()
    trunc = dup_objs = dup_outputs = 0
    for ex in exs:
        outputs["total"] += 1
        outputs["with_errors"] += bool(ex.errors)
        outputs["no_object_parsed"] += not ex.pred
        for reason, frag in ex.errors:
            reasons[reason] += 1
            by_task.setdefault(ex.task, Counter())[reason] += 1
            if len(samples.setdefault(reason, [])) < 3:
                samples[reason].append({"id": ex.id, "task": ex.task, "query": ex.query, "fragment": frag, "text": ex.text})
        if any(r == "truncated_object" for r, _ in ex.errors):
            trunc += 1
        d = duplicates(ex.pred, ex.width, ex.height)
        dup_objs += d
        dup_outputs += d > 0
    return {
        "reasons": dict(reasons.most_common()),
        "by_task": {t: dict(c.most_common()) for t, c in sorted(by_task.items())},
        "outputs": dict(outputs),
        "truncations": {"truncated_object": reasons.get("truncated_object", 0), "outputs": trunc},
        "duplicates": {"objects": dup_objs, "outputs": dup_outputs},
        "samples": samples,
    }


# ---------------------------------------------------------------------------------------------
# overlay selection


def select(exs: list[Example], max_overlays: int) -> list[tuple[str, int, int, Example]]:
    """(category, rank, of, example): best, median and worst by per-sample quality, per task
    (registry order first); rank 1 is the task's best example of ``of``."""
    by_task: dict[str, list[Example]] = {}
    for ex in exs:
        by_task.setdefault(ex.task, []).append(ex)
    order = [t for t in tasks.NAMES if t in by_task] + sorted(set(by_task) - set(tasks.NAMES))
    if not order or max_overlays <= 0:
        return []
    out = []
    for ti, task in enumerate(order):
        budget = max_overlays // len(order) + (ti < max_overlays % len(order))
        ranked = sorted(by_task[task], key=lambda e: (-e.quality, e.id, e.query))
        n = len(ranked)
        if n <= budget:
            picks = [("best" if 3 * i < n else "median" if 3 * i < 2 * n else "worst", i) for i in range(n)]
        else:
            nb = nm = budget // 3
            nw = budget - nb - nm
            start = min(max(n // 2 - nm // 2, nb), n - nw - nm)
            picks = [("best", i) for i in range(nb)]
            picks += [("median", i) for i in range(start, start + nm)]
            picks += [("worst", i) for i in range(n - nw, n)]
        out += [(cat, i + 1, n, ranked[i]) for cat, i in picks]
    return out


# ---------------------------------------------------------------------------------------------
# training curves


def curves(history: list[dict]) -> dict:
    """Series per key (step, value, segment) and restarts: rows where ``resumed_from``
    changes, or where the step goes back (a resumed run appends to the same history)."""
    series: dict[str, list[list[float]]] = {}
    restarts = []
    prev_step = prev_resume = None
    seg = 0
    for i, row in enumerate(history):
        step = finite(row.get("step"))
        step = float(i + 1) if step is None else step
        resume = row.get("resumed_from")
        if i > 0 and (resume != prev_resume or (prev_step is not None and step <= prev_step)):
            seg += 1
            restarts.append({"row": i, "step": step, "resumed_from": resume})
        prev_step, prev_resume = step, resume
        for key, val in row.items():
            v = finite(val)
            if v is not None and key not in ("step", "epoch", "resumed_from", "trainable_params"):
                series.setdefault(key, []).append([step, v, seg])
    return {"series": series, "restarts": restarts, "rows": len(history)}


# ---------------------------------------------------------------------------------------------
# metrics.json: columns, headline numbers, calibration


def metric_columns(metrics: dict | None) -> list[str]:
    """The model columns of metrics.json: trained / untrained / centre_baseline first, then
    any other dict but ``run``."""
    if not metrics:
        return []
    cols = [c for c in COLUMNS if isinstance(metrics.get(c), dict)]
    return cols + [c for c, v in metrics.items() if isinstance(v, dict) and c not in cols and c != "run"]


# (block in a column, key, row title); a block's key may also be spelled as coco.py's
# coco_detection_metrics returns it (map, map_50, map_75, mar_100)
SUMMARY_ROWS = (
    ("coco", "mAP", "COCO mAP @[.5:.95]"),
    ("coco", "AP50", "COCO AP50"),
    ("coco", "AP75", "COCO AP75"),
    ("coco", "mAR", "COCO mAR"),
    ("point_prf", "precision", "point precision (one-to-one)"),
    ("point_prf", "recall", "point recall (one-to-one)"),
    ("point_prf", "f1", "point F1 (one-to-one)"),
    ("calibration", "ece", "ECE (expected calibration error)"),
)
_ALIASES = {"mAP": "map", "AP50": "map_50", "AP75": "map_75", "mAR": "mar_100"}


def summary(metrics: dict | None) -> list[dict]:
    """Headline rows the metrics columns hold, ``[{"block", "key", "title", "values": {column:
    value}}]``; a row appears when any column has its block, so a run without COCO, point
    P/R/F1 or calibration numbers gets no rows."""
    rows = []
    cols = metric_columns(metrics)
    for block, key, title in SUMMARY_ROWS:
        values = {}
        for c in cols:
            b = metrics[c].get(block)
            if isinstance(b, dict):
                v = b.get(key, b.get(_ALIASES.get(key, key)))
                values[c] = v if isinstance(v, (int, float)) or v is None else None
        if values:
            rows.append({"block": block, "key": key, "title": title, "values": values})
    return rows


def calibration(metrics: dict | None, notes: list[str]) -> dict[str, dict]:
    """``{column: {"ece", "bins"}}`` for each column holding a ``calibration`` block (the
    output of ``eval.metrics.calibration.reliability_bins`` and ``expected_calibration_error``). Bins keep
    ``lo``, ``hi``, ``count``, ``confidence``, ``accuracy`` (None for an empty bin); a bin
    without a finite range is dropped and noted, a block without usable bins or ECE too."""
    out: dict[str, dict] = {}
    for c in metric_columns(metrics):
        block = metrics[c].get("calibration")
        if block is None:
            continue
        if not isinstance(block, dict):
            notes.append(f"metrics.json: {c}.calibration is not an object; no reliability diagram for it.")
            continue
        bins, bad = [], 0
        for b in block.get("bins") if isinstance(block.get("bins"), list) else []:
            lo, hi = (finite(b.get(k)) if isinstance(b, dict) else None for k in ("lo", "hi"))
            if lo is None or hi is None or hi <= lo:
                bad += 1
                continue
            count = int(finite(b.get("count")) or 0)
            conf, acc = finite(b.get("confidence")), finite(b.get("accuracy"))
            bins.append({"lo": lo, "hi": hi, "count": count, "confidence": conf if count else None,
                         "accuracy": acc if count else None})
        if bad:
            notes.append(f"metrics.json: {bad} calibration bin(s) of {c} without a finite lo < hi were left out.")
        ece = finite(block.get("ece"))
        if not bins and ece is None:
            notes.append(f"metrics.json: {c}.calibration has neither bins nor an ECE; no reliability diagram for it.")
            continue
        out[c] = {"ece": ece, "bins": bins, "n": sum(b["count"] for b in bins)}
    return out
