"""Run report: one static HTML page plus PNGs next to it, from what a finished run wrote.

Inputs (all local paths or ``s3://``)::

    <run>/history.jsonl                   training reports (raytrain.training.metrics)
    <run>/eval/metrics.json               trained / untrained / centre_baseline (raytrain.launch.train)
    <run>/eval/predictions_<split>.jsonl  per example: id, task, query, text, objects, errors, score
    <data>/<split>/shard-*.parquet        source images and ground truth (raytrain.data.shards)

Output, in the local folder ``out_dir``::

    index.html       no external CSS / JS / fonts; images referenced by relative path
    report.json      every number the figures plot (tests and other tools read this, not pixels)
    curves.png       loss / ce, lr, grad norm, throughput vs step; restarts marked
    errors.png       parse failures by reason, per model column
    bias_points.png  pred - GT dx / dy of points (closest prediction to each GT, as the metric)
    bias_boxes.png   the same for box centres (one-to-one matched pairs that overlap)
    distance.png     per-sample distance error, source pixels and normalised by the diagonal
    overlays/*.png   GT (blue circle / box) vs prediction (red cross / box) on the source image,
                     best, median and worst examples by per-sample score

Every piece is optional: a missing file, a task that was not evaluated, or predictions that
never parsed give a note on the page instead of an exception. Ground truth for the overlays
and the bias comes from the shards, filtered exactly as ``pipeline.examples_for`` builds
targets: objects of the task's type whose label equals the query.
"""

from __future__ import annotations

import html
import io
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from raytrain import storage
from raytrain.eval.metrics.table import format_value
from raytrain.eval.metrics.values import finite

log = logging.getLogger(__name__)

# Seed report 000's convention: ground truth is a blue circle, the prediction a red cross.
# Exact RGB values, drawn without anti-aliasing, so a test can find them in the PNG.
GT_COLOUR = (30, 144, 255)
PRED_COLOUR = (255, 40, 40)
HALO_COLOUR = (255, 255, 255)  # a thin white rim keeps markers visible on any background
OVERLAY_SIDE = 384  # longer side of an overlay's image area, in PNG pixels
SUCCESS_FRAC = 0.05  # pointing.score_points' default success threshold (fraction of diagonal)
DUPLICATE_IOU = 0.9  # two boxes of one output with IoU above this are one object twice
COLUMNS = ("trained", "untrained", "centre_baseline")
TASK_TYPE = {"point": "point", "detect": "box", "segment": "mask"}  # task -> object "type"
_TASK_ORDER = ("point", "detect", "segment")
_FIGURES = ("curves.png", "errors.png", "bias_points.png", "bias_boxes.png", "distance.png")


# ---------------------------------------------------------------------------------------------
# reading


def _read_text(uri: str, opts) -> str | None:
    if not storage.exists(uri, opts):
        return None
    with storage.fsspec_fs(uri, opts).open(storage.strip_scheme(uri), "r", encoding="utf-8") as f:
        return f.read()


def _read_jsonl(uri: str, opts, notes: list[str]) -> list[dict] | None:
    """Rows of a JSONL file; None if it does not exist. Unreadable lines are skipped and noted."""
    text = _read_text(uri, opts)
    if text is None:
        return None
    rows, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    if bad:
        notes.append(f"{uri}: {bad} unreadable line(s) skipped.")
    return rows



def _objects(raw: Any) -> list[dict]:
    """Object dicts from a JSON string or list, leniently: points and boxes with finite
    coordinates, and masks (any fields) are kept; anything else is dropped. Unlike
    ``annotations.objects_from_json`` this accepts types the codecs do not know yet."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            return []
    out = []
    for o in raw if isinstance(raw, list) else []:
        if not isinstance(o, dict):
            continue
        kind = o.get("type")
        keys = {"point": ("x", "y"), "box": ("x1", "y1", "x2", "y2")}.get(kind)
        if keys is not None:
            vals = [finite(o.get(k)) for k in keys]
            if any(v is None for v in vals):
                continue
            out.append({"type": kind, **dict(zip(keys, vals)), "label": str(o.get("label") or "")})
        elif kind == "mask":
            out.append(dict(o, label=str(o.get("label") or "")))
    return out


@dataclass
class _Source:
    """One source image of the split: size in pixels and every annotation on it."""

    width: int
    height: int
    objects: list[dict]


def _load_ground_truth(data_uri: str, split: str, opts) -> dict[str, _Source]:
    """id -> size and objects for every row of the split (images are not read here)."""
    import pyarrow.parquet as pq

    from raytrain.data import shards

    paths, fs = shards.shard_source(data_uri, split, opts)
    out: dict[str, _Source] = {}
    for p in paths:
        t = pq.read_table(p, filesystem=fs, columns=["id", "width", "height", "objects"])
        for i, w, h, objs in zip(*(t.column(c).to_pylist() for c in ("id", "width", "height", "objects"))):
            out[str(i)] = _Source(int(w), int(h), _objects(objs))
    return out


def _load_images(data_uri: str, split: str, ids: set[str], opts) -> dict[str, bytes]:
    """Encoded image bytes of just the rows in ``ids`` (a filter, not a full read of the split)."""
    import pyarrow.parquet as pq

    from raytrain.data import shards

    if not ids:
        return {}
    paths, fs = shards.shard_source(data_uri, split, opts)
    out: dict[str, bytes] = {}
    for p in paths:
        t = pq.read_table(p, filesystem=fs, columns=["id", "image"], filters=[("id", "in", sorted(ids))])
        for i, b in zip(t.column("id").to_pylist(), t.column("image").to_pylist()):
            out[str(i)] = b
    return out


# ---------------------------------------------------------------------------------------------
# per example


@dataclass
class _Example:
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


def _targets(task: str, query: str, objs: list[dict]) -> list[dict]:
    """The example's targets as pipeline.examples_for builds them: task's type, label == query."""
    kind = TASK_TYPE.get(task)
    return [o for o in objs if o["label"] == query and (kind is None or o["type"] == kind)]


def _quality(task: str, score: dict) -> float:
    """One number per example to rank by, higher is better: -normalised distance for points,
    per-sample F1 (+ a little mean IoU to break ties) for boxes, mask IoU for masks."""
    if not isinstance(score, dict) or finite(score.get("valid")) != 1.0:
        return -math.inf
    if task == "point":
        nd = finite(score.get("norm_distance"))
        if nd is not None:
            return -nd
        return 0.0 if finite(score.get("success")) == 1.0 else -1e9  # nothing to point at / no point
    if task == "detect":
        tp, fp, fn = (finite(score.get(k)) or 0.0 for k in ("tp", "fp", "fn"))
        n_gt = finite(score.get("n_gt")) or 0.0
        f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) > 0 else 1.0
        miou = (finite(score.get("iou_sum")) or 0.0) / n_gt if n_gt else f1
        return f1 + 1e-3 * miou
    for key in ("mask_iou", "iou", "f1", "box_iou"):
        v = finite(score.get(key))
        if v is not None:
            return v
    return 0.0


def _errors(raw: Any) -> list[tuple[str, str]]:
    out = []
    for e in raw if isinstance(raw, list) else []:
        if isinstance(e, (list, tuple)) and e:
            out.append((str(e[0]), str(e[1]) if len(e) > 1 else ""))
        elif isinstance(e, dict):
            out.append((str(e.get("reason", "?")), str(e.get("text", ""))))
    return out


def _examples(rows: list[dict], gt: dict[str, _Source] | None) -> tuple[list[_Example], int]:
    """Prediction rows joined with their ground truth; also how many ids the shards lack."""
    out, missing = [], 0
    for r in rows:
        task, query, rid = str(r.get("task", "")), str(r.get("query", "")), str(r.get("id", ""))
        score = r.get("score") if isinstance(r.get("score"), dict) else {}
        src = gt.get(rid) if gt is not None else None
        if gt is not None and src is None:
            missing += 1
        out.append(_Example(
            id=rid, task=task, query=query, text=str(r.get("text", "")),
            pred=_objects(r.get("objects")), errors=_errors(r.get("errors")), score=score,
            gt=_targets(task, query, src.objects) if src else None,
            width=src.width if src else None, height=src.height if src else None,
            quality=_quality(task, score),
        ))
    return out, missing


# ---------------------------------------------------------------------------------------------
# analytics (pure functions of the examples; their results go to report.json as they are)


def _area(o: dict) -> float:
    return max(o["x2"] - o["x1"], 0.0) * max(o["y2"] - o["y1"], 0.0)


def _centre(o: dict) -> tuple[float, float]:
    return (o["x1"] + o["x2"]) / 2, (o["y1"] + o["y2"]) / 2


def _box_iou(a: dict, b: dict) -> float:
    """IoU of two box dicts (annotations.box_iou, on the report's lenient dicts)."""
    iw = min(a["x2"], b["x2"]) - max(a["x1"], b["x1"])
    ih = min(a["y2"], b["y2"]) - max(a["y1"], b["y1"])
    inter = max(iw, 0.0) * max(ih, 0.0)
    union = _area(a) + _area(b) - inter
    return inter / union if union > 0 else 0.0


def _has_box(o: dict) -> bool:
    return all(finite(o.get(k)) is not None for k in ("x1", "y1", "x2", "y2"))


def _same_object(a: dict, b: dict, width: int | None, height: int | None) -> bool:
    """Is ``b`` a repeat of ``a`` within one output? Points: the same location bin (within half
    a PaliGemma bin, size/2048, so adjacent bins differ); boxes and boxed masks: IoU > 0.9."""
    if a["type"] != b["type"] or a["label"].strip().casefold() != b["label"].strip().casefold():
        return False
    if a["type"] == "point":
        tx = width / 2048 if width else 1e-6
        ty = height / 2048 if height else 1e-6
        return abs(a["x"] - b["x"]) <= tx and abs(a["y"] - b["y"]) <= ty
    if _has_box(a) and _has_box(b):
        return _box_iou(a, b) > DUPLICATE_IOU
    return False


def _duplicates(objs: list[dict], width: int | None, height: int | None) -> int:
    """Objects of one output that repeat an earlier object of the same output."""
    return sum(any(_same_object(objs[k], o, width, height) for k in range(j)) for j, o in enumerate(objs))


def _point_offsets(gt: list[dict], pred: list[dict]) -> list[tuple[float, float]]:
    """(dx, dy) = pred - GT for each GT point and its closest predicted point (the pairing
    pointing.score_points measures), in source pixels."""
    g = np.array([(o["x"], o["y"]) for o in gt if o["type"] == "point"], dtype=np.float64).reshape(-1, 2)
    q = np.array([(o["x"], o["y"]) for o in pred if o["type"] == "point"], dtype=np.float64).reshape(-1, 2)
    if not len(g) or not len(q):
        return []
    diff = q[None, :, :] - g[:, None, :]  # (G, P, 2)
    closest = np.sqrt((diff**2).sum(-1)).argmin(axis=1)
    d = diff[np.arange(len(g)), closest]
    return [(float(dx), float(dy)) for dx, dy in d]


def _box_offsets(gt: list[dict], pred: list[dict]) -> list[tuple[float, float]]:
    """(dx, dy) of box centres, pred - GT, over the one-to-one assignment boxes.score_boxes
    uses (most IoU >= 0.5 pairs first, then total IoU); pairs that do not overlap at all are
    left out: their offset measures a wrong object, not a bias."""
    from scipy.optimize import linear_sum_assignment

    g = [o for o in gt if o["type"] == "box"]
    p = [o for o in pred if o["type"] == "box"]
    if not g or not p:
        return []
    iou = np.array([[_box_iou(a, b) for b in p] for a in g])
    weight = (iou >= 0.5) * float(min(len(g), len(p)) + 1) + iou
    rows, cols = linear_sum_assignment(weight, maximize=True)
    out = []
    for i, j in zip(rows, cols):
        if iou[i, j] > 0:
            (gx, gy), (px, py) = _centre(g[i]), _centre(p[j])
            out.append((px - gx, py - gy))
    return out


def _hist(values: Sequence[float], unit: float, max_bins: int = 50) -> dict:
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


def _bias(examples: list[_Example], task: str, offsets: Callable) -> dict:
    """pred - GT offsets of every matched pair of ``task``: pixels and fractions of the image
    width (dx) / height (dy)."""
    px, norm = [], []
    for ex in examples:
        if ex.task != task or ex.gt is None or not ex.pred:
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
        "dx_px": _hist(p[:, 0], 1.0),
        "dy_px": _hist(p[:, 1], 1.0),
        "dx_norm": _hist(q[:, 0], 0.01),
        "dy_norm": _hist(q[:, 1], 0.01),
    }


def _distance(examples: list[_Example]) -> dict:
    """Per-sample distance errors of valid point examples (the numbers the metric averages)."""
    px = [v for ex in examples if ex.task == "point" for v in [finite(ex.score.get("distance"))] if v is not None]
    nd = [v for ex in examples if ex.task == "point" for v in [finite(ex.score.get("norm_distance"))] if v is not None]
    return {"px": _hist(px, 1.0), "norm": _hist(nd, 0.01), "success_frac": SUCCESS_FRAC}


def _error_stats(examples: list[_Example]) -> dict:
    """Parse failures, truncations and duplicates of the trained model's outputs."""
    reasons: Counter = Counter()
    by_task: dict[str, Counter] = {}
    samples: dict[str, list[dict]] = {}
    outputs = Counter()
    trunc = dup_objs = dup_outputs = 0
    for ex in examples:
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
        d = _duplicates(ex.pred, ex.width, ex.height)
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


def _select(examples: list[_Example], max_overlays: int) -> list[tuple[str, int, int, _Example]]:
    """(category, rank, of, example): best, median and worst by per-sample quality, per task;
    rank 1 is the task's best example of ``of``."""
    by_task: dict[str, list[_Example]] = {}
    for ex in examples:
        by_task.setdefault(ex.task, []).append(ex)
    tasks = [t for t in _TASK_ORDER if t in by_task] + sorted(set(by_task) - set(_TASK_ORDER))
    if not tasks or max_overlays <= 0:
        return []
    out = []
    for ti, task in enumerate(tasks):
        budget = max_overlays // len(tasks) + (ti < max_overlays % len(tasks))
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
# overlays (PIL: exact colours, no anti-aliasing, no matplotlib per image)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font, fixed size
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> str:
    text = " ".join(text.split())
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[: max(len(text) - 4, 0)]
    return text + "..."


def _mask_array(o: dict, width: int, height: int) -> np.ndarray | None:
    """A mask object as a bool (height, width) array in source pixels, or None if its encoding
    is unknown. Accepted: ``rle`` (COCO RLE), ``polygon`` / ``polygons`` (source-pixel
    vertices, [[x, y], ...] or flat), ``mask`` (a 2-D grid of 0..1 spanning the object's box
    x1..y2, as PaliGemma's 64x64 masks, or the whole image when there is no box)."""
    if isinstance(o.get("rle"), dict):
        from pycocotools import mask as mask_utils

        rle = o["rle"]
        if isinstance(rle.get("counts"), list):
            rle = mask_utils.frPyObjects(rle, height, width)
        m = np.asarray(mask_utils.decode(rle), dtype=bool)
        return m if m.shape == (height, width) else None
    polys = o.get("polygons") or ([o["polygon"]] if o.get("polygon") else None)
    if polys:
        canvas = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        for poly in polys:
            xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
            if len(xy) >= 3:
                draw.polygon([tuple(v) for v in xy], fill=1)
        return np.asarray(canvas, dtype=bool)
    if o.get("mask") is not None:
        grid = np.asarray(o["mask"], dtype=np.float32)
        if grid.ndim != 2 or not grid.size:
            return None
        full = np.zeros((height, width), dtype=bool)
        if _has_box(o):
            x1, y1 = max(math.floor(o["x1"]), 0), max(math.floor(o["y1"]), 0)
            x2, y2 = min(math.ceil(o["x2"]), width), min(math.ceil(o["y2"]), height)
        else:
            x1, y1, x2, y2 = 0, 0, width, height
        if x2 <= x1 or y2 <= y1:
            return full
        patch = Image.fromarray(grid).resize((x2 - x1, y2 - y1), Image.BILINEAR)
        full[y1:y2, x1:x2] = np.asarray(patch) > 0.5
        return full
    return None


def _paint_mask(canvas: Image.Image, m: np.ndarray, colour: tuple[int, int, int]) -> None:
    """Tint the mask's pixels (alpha 0.35) and draw its outline in the exact colour."""
    m = np.asarray(Image.fromarray(m).resize(canvas.size, Image.NEAREST), dtype=bool)
    if not m.any():
        return
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    rgb = np.asarray(canvas, dtype=np.float32)
    rgb[m] = 0.65 * rgb[m] + 0.35 * np.asarray(colour, dtype=np.float32)
    rgb = rgb.round().astype(np.uint8)
    rgb[m & ~inner] = colour
    canvas.paste(Image.fromarray(rgb))


def _draw_overlay(img: Image.Image, ex: _Example, caption: list[str]) -> tuple[Image.Image, dict]:
    """The source image scaled so its longer side is OVERLAY_SIDE, GT and prediction drawn on
    it, and a caption band below. Returns the PNG image and the geometry (scale, drawn
    coordinates) that report.json records."""
    w, h = ex.width or img.width, ex.height or img.height
    scale = OVERLAY_SIDE / max(w, h)
    size = (max(round(w * scale), 1), max(round(h * scale), 1))
    sx, sy = size[0] / w, size[1] / h  # source pixel edge coordinates map linearly
    base = img.convert("RGB").resize(size, Image.NEAREST if scale >= 1 else Image.LANCZOS)
    font = _font(13)
    line_h = 17
    canvas = Image.new("RGB", (size[0], size[1] + line_h * len(caption) + 6), (255, 255, 255))
    canvas.paste(base, (0, 0))
    gt = ex.gt or []
    drawn: dict[str, list] = {"gt": [], "pred": []}
    undrawable = 0

    # masks first (tints), then boxes, then points on top; GT before prediction
    image_area = canvas.crop((0, 0, *size))
    for who, objs, colour in (("gt", gt, GT_COLOUR), ("pred", ex.pred, PRED_COLOUR)):
        for o in objs:
            if o["type"] == "mask":
                m = _mask_array(o, w, h)
                if m is None:
                    undrawable += 1
                    continue
                _paint_mask(image_area, m, colour)
                drawn[who].append({"type": "mask", "pixels": int(m.sum())})
    canvas.paste(image_area, (0, 0))
    draw = ImageDraw.Draw(canvas)
    small = _font(11)

    def label_box(x: float, y: float, text: str, colour, above: bool) -> None:
        tw = draw.textlength(text, font=small) + 6
        top = y - 15 if above else y + 1
        top = min(max(top, 0), size[1] - 15)
        left = min(max(x, 0), max(size[0] - tw, 0))
        draw.rectangle([left, top, left + tw, top + 14], fill=colour)
        draw.text((left + 3, top + 1), text, fill=(255, 255, 255), font=small)

    gt_boxes = [o for o in gt if o["type"] == "box"]
    labels = []  # drawn after every rectangle, so no outline crosses a label
    for who, objs, colour in (("gt", gt, GT_COLOUR), ("pred", ex.pred, PRED_COLOUR)):
        for o in objs:
            if o["type"] == "box" or (o["type"] == "mask" and _has_box(o)):
                r = [o["x1"] * sx, o["y1"] * sy, o["x2"] * sx, o["y2"] * sy]
                if r[2] < r[0] or r[3] < r[1]:  # inverted: the parser rejects these; never drawn
                    continue
                draw.rectangle([r[0] - 1, r[1] - 1, r[2] + 1, r[3] + 1], outline=HALO_COLOUR, width=1)
                draw.rectangle(r, outline=colour, width=2)
                if who == "gt":  # GT label above the box's top-left, prediction's below its bottom-left
                    labels.append((r[0], r[1], f"GT {o['label']}", colour, True))
                else:
                    best = max((_box_iou(o, g) for g in gt_boxes), default=None)
                    labels.append((r[0], r[3], o["label"] + ("" if best is None else f" IoU {best:.2f}"), colour, False))
                if o["type"] == "box":
                    drawn[who].append({"type": "box", "xyxy": r})
    for args in labels:
        label_box(*args)
    for o in gt:
        if o["type"] == "point":
            x, y = o["x"] * sx, o["y"] * sy
            draw.ellipse([x - 8, y - 8, x + 8, y + 8], outline=HALO_COLOUR, width=4)
            draw.ellipse([x - 7, y - 7, x + 7, y + 7], outline=GT_COLOUR, width=2)
            drawn["gt"].append({"type": "point", "xy": [x, y]})
    for o in ex.pred:
        if o["type"] == "point":
            x, y = o["x"] * sx, o["y"] * sy
            for colour, width in ((HALO_COLOUR, 5), (PRED_COLOUR, 3)):
                draw.line([(x - 6, y - 6), (x + 6, y + 6)], fill=colour, width=width)
                draw.line([(x - 6, y + 6), (x + 6, y - 6)], fill=colour, width=width)
            drawn["pred"].append({"type": "point", "xy": [x, y]})

    for k, line in enumerate(caption):
        draw.text((4, size[1] + 3 + k * line_h), _fit(draw, line, font, size[0] - 8), fill=(0, 0, 0), font=font)
    return canvas, {"scale": [sx, sy], "image_size": list(size), "drawn": drawn, "undrawable_masks": undrawable}


def _score_text(ex: _Example) -> str:
    s = ex.score
    if finite(s.get("valid")) != 1.0:
        return "no object parsed"
    if ex.task == "point":
        d, nd = finite(s.get("distance")), finite(s.get("norm_distance"))
        return "no point to measure" if d is None else f"distance {d:.2f} px" + (f" = {nd:.3f} diagonal" if nd is not None else "")
    if ex.task == "detect":
        n_gt = finite(s.get("n_gt")) or 0
        miou = (finite(s.get("iou_sum")) or 0) / n_gt if n_gt else None
        tp, fp, fn = (int(finite(s.get(k)) or 0) for k in ("tp", "fp", "fn"))
        return f"TP {tp} FP {fp} FN {fn}" + (f"  IoU {miou:.2f}" if miou is not None else "")
    v = next((finite(s.get(k)) for k in ("mask_iou", "iou") if finite(s.get(k)) is not None), None)
    return f"IoU {v:.2f}" if v is not None else "valid"


def _overlays(selected, images: dict[str, bytes], out: Path) -> tuple[list[dict], list[str]]:
    """Write overlays/<task>_<category>_<nn>.png; returns their records and notes."""
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    records, notes = [], []
    no_image = undrawable = 0
    for k, (cat, rank, of, ex) in enumerate(selected):
        data = images.get(ex.id)
        if data is None:
            no_image += 1
            continue
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # a broken image is a note, not a crash
            notes.append(f"overlay for {ex.id}: image does not decode ({type(e).__name__})")
            continue
        errs = Counter(r for r, _ in ex.errors)
        caption = [
            f"{cat}: {rank} of {of}   {ex.task} \"{ex.query}\"",
            _score_text(ex) + (f";  errors: {', '.join(f'{r} x{n}' for r, n in errs.items())}" if errs else ""),
            f"output: {ex.text!r}",
            f"id {ex.id}",
        ]
        png, geom = _draw_overlay(img, ex, caption)
        undrawable += geom.pop("undrawable_masks")
        name = f"overlays/{_safe(ex.task)}_{cat}_{k:02d}.png"
        png.save(out / name)
        records.append({
            "file": name, "category": cat, "rank": rank, "of": of, "id": ex.id, "task": ex.task, "query": ex.query,
            "text": ex.text, "errors": [list(e) for e in ex.errors], "score": ex.score, "summary": _score_text(ex),
            "source_size": [ex.width, ex.height], "gt": ex.gt, "pred": ex.pred, **geom,
        })
    if no_image:
        notes.append(f"{no_image} selected example(s) have no image in the shards: no overlay drawn.")
    if undrawable:
        notes.append(f"{undrawable} mask object(s) in an encoding the report does not know were not drawn.")
    return records, notes


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in s) or "task"


# ---------------------------------------------------------------------------------------------
# figures (matplotlib's object API: no pyplot state, no backend switch for the caller)


def _figure(nrows: int, ncols: int, width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


_CURVE_PANELS = (
    ("loss", ("loss", "ce")),
    ("learning rate", ("lr",)),
    ("grad norm (before clipping)", ("grad_norm",)),
    ("throughput (samples / s)", ("samples_per_s",)),
)


def _curves(history: list[dict]) -> dict:
    """Series per key (step, value) and restarts: rows where ``resumed_from`` changes, or where
    the step goes back (a resumed run appends to the same history)."""
    series: dict[str, list[list[float]]] = {}
    restarts, segment = [], []
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
        segment.append(seg)
        for key, val in row.items():
            v = finite(val)
            if v is not None and key not in ("step", "epoch", "resumed_from", "trainable_params"):
                series.setdefault(key, []).append([step, v, seg])
    return {"series": series, "restarts": restarts, "rows": len(history)}


def _plot_curves(curves: dict, path: Path) -> bool:
    series = curves["series"]
    extra = tuple(k for k in series if k.startswith(("val_", "eval_")) and "loss" in k)
    panels = [(t, tuple(k for k in keys + (extra if t == "loss" else ()) if k in series)) for t, keys in _CURVE_PANELS]
    panels = [(t, keys) for t, keys in panels if keys]
    if not panels:
        return False
    ncols = 2 if len(panels) > 1 else 1
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = _figure(nrows, ncols, 11, 3.6 * nrows)
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown"]
    for ax, (title, keys) in zip(axes.flat, panels):
        for key, colour in zip(keys, colours):
            pts = np.asarray(series[key])
            for s in np.unique(pts[:, 2]):  # one line per segment: a restart never zigzags back
                seg = pts[pts[:, 2] == s]
                ax.plot(seg[:, 0], seg[:, 1], color=colour, lw=1.4, marker="." if len(seg) < 30 else None,
                        label=key if s == pts[0, 2] else None)
        vals = np.concatenate([np.asarray(series[k])[:, 1] for k in keys])
        if title != "learning rate" and vals.min() > 0 and vals.max() / vals.min() > 30:
            ax.set_yscale("log")
        for r in curves["restarts"]:
            ax.axvline(r["step"], color="0.3", ls="--", lw=1)
            ax.annotate(f"restart (from {r['resumed_from']})", (r["step"], 1), xycoords=("data", "axes fraction"),
                        xytext=(3, -12), textcoords="offset points", fontsize=8, color="0.3")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.savefig(path)
    return True


def _plot_errors(columns: dict[str, dict[str, int]], path: Path) -> bool:
    """Grouped horizontal bars: parse-failure reason x model column (columns without any
    failure are left out, except the trained model's)."""
    columns = {k: v for k, v in columns.items() if v or k == "trained"}
    reasons = sorted({r for c in columns.values() for r in c}, key=lambda r: -sum(c.get(r, 0) for c in columns.values()))
    if not reasons:
        return False
    names = list(columns)
    fig, axes = _figure(1, 1, 9, 1.4 + 0.28 * len(reasons) * len(names))
    ax = axes[0, 0]
    height = 0.8 / len(names)
    y = np.arange(len(reasons))
    for k, name in enumerate(names):
        counts = [columns[name].get(r, 0) for r in reasons]
        bars = ax.barh(y + k * height, counts, height=height, label=name)
        ax.bar_label(bars, labels=[str(c) if c else "" for c in counts], fontsize=8, padding=2)
    ax.set_yticks(y + height * (len(names) - 1) / 2, reasons)
    ax.invert_yaxis()
    ax.set_xlabel("rejected fragments")
    ax.set_title("parse failures by reason")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path)
    return True


def _stairs(ax, h: dict, colour: str, title: str, xlabel: str, marks: Sequence[tuple[float, str, str]] = (), sign: str = "+") -> None:
    ax.stairs(h["counts"], h["edges"], fill=True, color=colour, alpha=0.75)
    ax.axvline(0, color="black", lw=0.8)
    for x, style, label in marks:
        ax.axvline(x, color="black", ls=style, lw=1.2, label=label)
    out = f", {h['n_outside']} outside" if h["n_outside"] else ""
    ax.set_title(f"{title}\nn={h['n']}, mean {h['mean']:{sign}.3g}, median {h['median']:{sign}.3g}, std {h['std']:.3g}{out}", fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.grid(alpha=0.3)
    if marks:
        ax.legend(fontsize=8)


def _plot_bias(bias: dict, what: str, path: Path) -> bool:
    if not bias.get("n"):
        return False
    fig, axes = _figure(2, 2, 10, 7)
    for r, (unit, xlabel) in enumerate((("px", "source pixels"), ("norm", "fraction of image width / height"))):
        for c, axis in enumerate(("dx", "dy")):
            h = bias[f"{axis}_{unit}"]
            if not h.get("n"):
                axes[r, c].set_visible(False)
                continue
            _stairs(axes[r, c], h, "tab:red" if c == 0 else "tab:blue", f"{what}: {axis} = pred - GT ({unit})", xlabel,
                    [(h["mean"], "--", "mean")])
    fig.savefig(path)
    return True


def _plot_distance(dist: dict, path: Path) -> bool:
    if not dist["px"].get("n"):
        return False
    fig, axes = _figure(1, 2, 10, 3.6)
    _stairs(axes[0, 0], dist["px"], "tab:purple", "distance error per example", "source pixels",
            [(dist["px"]["median"], ":", "median")], sign="")
    _stairs(axes[0, 1], dist["norm"], "tab:purple", "normalised distance error", "fraction of image diagonal",
            [(dist["success_frac"], "--", f"success < {dist['success_frac']}")], sign="")
    fig.savefig(path)
    return True


# ---------------------------------------------------------------------------------------------
# HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{font-size:1.5em} h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:2em} h3{margin-bottom:.3em}
table{border-collapse:collapse;margin:8px 0 16px} th,td{border:1px solid #ddd;padding:3px 8px;font-size:.9em}
th{background:#f4f4f4;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
.notes{background:#fff8e1;border:1px solid #f0d98a;padding:8px 16px} .meta{color:#555;font-size:.9em}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:14px}
figure{margin:0;border:1px solid #e3e3e3;padding:6px;background:#fafafa} figure img{width:100%;height:auto;image-rendering:pixelated}
figcaption{font-size:.8em;word-break:break-all} code,pre{font-size:.85em;background:#f4f4f4}
.legend span{display:inline-block;margin-right:18px} img.fig{max-width:100%}
"""


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{_e(c)}</td>' if i >= numeric_from else f"<td>{_e(c)}</td>" for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _metrics_html(metrics: dict) -> str:
    """One table of top-level metrics (rows) x columns (trained / untrained / baseline), one per
    sub-dict (boxes, ...), and the parse-error counts; values through table.format_value."""
    cols = [c for c in COLUMNS if isinstance(metrics.get(c), dict)]
    cols += [c for c, v in metrics.items() if isinstance(v, dict) and c not in cols and c != "run"]
    if not cols:
        return "<p>eval/metrics.json has no metric columns.</p>"
    parts = []

    def rows_of(get) -> list[str]:
        keys: dict[str, None] = {}
        for c in cols:
            for k, v in (get(metrics[c]) or {}).items():
                if not isinstance(v, (dict, list)):
                    keys[k] = None
        return list(keys)

    top = rows_of(lambda d: d)
    if top:
        parts.append("<h3>pointing and totals</h3>" + _table(["metric", *cols], [[k, *(format_value(metrics[c].get(k)) for c in cols)] for k in top]))
    subs = list(dict.fromkeys(k for c in cols for k, v in metrics[c].items() if isinstance(v, dict) and k != "parse_errors"))
    for sub in subs:
        keys = rows_of(lambda d, sub=sub: d.get(sub) if isinstance(d.get(sub), dict) else {})
        parts.append(f"<h3>{_e(sub)}</h3>" + _table(["metric", *cols], [
            [k, *(format_value((metrics[c].get(sub) or {}).get(k)) if isinstance(metrics[c].get(sub), dict) else "-" for c in cols)] for k in keys]))
    reasons = rows_of(lambda d: d.get("parse_errors") if isinstance(d.get("parse_errors"), dict) else {})
    if reasons:
        parts.append("<h3>parse errors (rejected fragments)</h3>" + _table(["reason", *cols], [
            [r, *(format_value((metrics[c].get("parse_errors") or {}).get(r, 0)) for c in cols)] for r in reasons]))
    return "\n".join(parts)


def _run_html(run: dict) -> str:
    keys = ("name", "checkpoint", "final_step", "split", "data", "seconds_to_checkpoint", "seconds_total")
    rows = [[k, format_value(run[k])] for k in keys if k in run]
    out = _table(["run", ""], rows, numeric_from=2) if rows else ""
    if run.get("data_counts"):
        out += f"<details><summary>data counts</summary><pre>{_e(json.dumps(run['data_counts'], indent=2))}</pre></details>"
    if run.get("config"):
        out += f"<details><summary>config</summary><pre>{_e(json.dumps(run['config'], indent=2))}</pre></details>"
    return out


def _hist_row(name: str, h: dict, fmt: str = "{:+.3f}") -> list:
    if not h.get("n"):
        return [name, 0, "-", "-", "-"]
    return [name, h["n"], fmt.format(h["mean"]), fmt.format(h["median"]), f"{h['std']:.3f}"]


def _img(name: str, alt: str, images: list[str]) -> str:
    return f'<p><img class="fig" src="{_e(name)}" alt="{_e(alt)}"></p>' if name in images else ""


def _html(rep: dict, metrics: dict | None) -> str:
    images = rep["images"]
    e = rep["errors"]
    p = []
    p.append(f"<h1>raytrain report: {_e(rep['name'])}</h1>")
    p.append(f'<p class="meta">run <code>{_e(rep["run"])}</code> &middot; data <code>{_e(rep["data"])}</code> &middot; '
             f"split <b>{_e(rep['split'])}</b> &middot; {rep['n_predictions']} predictions</p>")
    if rep["notes"]:
        p.append('<div class="notes"><b>Notes</b><ul>' + "".join(f"<li>{_e(n)}</li>" for n in rep["notes"]) + "</ul></div>")

    p.append("<h2>Metrics</h2>")
    if metrics:
        p.append("<p>Pointing distances in source pixels; boxes at IoU 0.5. "
                 "<i>untrained</i> is the base model, <i>centre_baseline</i> a blind guess (image centre / mean-size centred box).</p>")
        p.append(_metrics_html(metrics))
        if isinstance(metrics.get("run"), dict):
            p.append(_run_html(metrics["run"]))
    else:
        p.append("<p>No metrics (eval/metrics.json missing).</p>")

    p.append("<h2>Training curves</h2>")
    c = rep["curves"]
    if "curves.png" in images:
        p.append(_img("curves.png", "training curves", images))
        p.append(f"<p>{c['rows']} training reports.</p>")
        if c["restarts"]:
            p.append("<p>Restarts (dashed lines): " + ", ".join(
                f"step {format_value(r['step'])} (resumed from {_e(r['resumed_from'])})" for r in c["restarts"]) + ".</p>")
    else:
        p.append("<p>No training history to plot.</p>")

    p.append("<h2>Errors</h2>")
    o = e["outputs"]
    if o.get("total"):
        p.append(_table(["outputs (trained model)", "count"], [
            ["total", o.get("total", 0)],
            ["with at least one rejected fragment", o.get("with_errors", 0)],
            ["no object parsed (invalid)", o.get("no_object_parsed", 0)],
            ["truncated_object fragments", e["truncations"]["truncated_object"]],
            ["outputs cut off (truncated_object)", e["truncations"]["outputs"]],
            ["duplicate objects (same bins / IoU > 0.9 within one output)", e["duplicates"]["objects"]],
            ["outputs with duplicates", e["duplicates"]["outputs"]],
        ]))
    p.append(_img("errors.png", "parse failures by reason", images) or "<p>No parse failures.</p>")
    if e["samples"]:
        rows = [[r, s["task"], s["query"], s["fragment"], s["text"]] for r, ss in e["samples"].items() for s in ss]
        p.append("<details><summary>examples of rejected fragments</summary>" + _table(["reason", "task", "query", "fragment", "output"], rows, numeric_from=99) + "</details>")

    p.append("<h2>Localisation error</h2>")
    for key, title, fig in (("points", "points (closest prediction to each GT point)", "bias_points.png"),
                            ("box_centres", "box centres (one-to-one matched, overlapping pairs)", "bias_boxes.png")):
        b = rep["bias"][key]
        p.append(f"<h3>Bias: {title}</h3>")
        if b.get("n"):
            p.append(_table(["pred - GT", "n", "mean", "median", "std"], [
                _hist_row("dx (px)", b["dx_px"]), _hist_row("dy (px)", b["dy_px"]),
                _hist_row("dx (fraction of width)", b["dx_norm"], "{:+.4f}"), _hist_row("dy (fraction of height)", b["dy_norm"], "{:+.4f}")]))
            p.append(_img(fig, f"bias {key}", images))
        else:
            p.append(f"<p>No matched {key.replace('_', ' ')} (no such task, no ground truth, or no valid prediction).</p>")
    p.append("<h3>Distance error (points)</h3>")
    p.append(_img("distance.png", "distance error histogram", images) or "<p>No valid point predictions with a distance.</p>")

    p.append("<h2>Examples</h2>")
    p.append(f'<p class="legend"><span style="color:rgb{GT_COLOUR}">&#9711; ground truth (blue circle / box)</span>'
             f'<span style="color:rgb{PRED_COLOUR}">&#10005; prediction (red cross / box)</span>'
             "<br>Best, median and worst examples of each task, ranked by per-sample score "
             "(points: normalised distance; boxes: per-sample F1, then IoU; unparsable outputs rank last).</p>")
    if not rep["overlays"]:
        p.append("<p>No overlays (no predictions, no images, or max_overlays=0).</p>")
    by_task: dict[str, list[dict]] = {}
    for r in rep["overlays"]:
        by_task.setdefault(r["task"], []).append(r)
    for task, recs in by_task.items():
        p.append(f"<h3>{_e(task)}</h3>")
        for cat in ("best", "median", "worst"):
            figs = [r for r in recs if r["category"] == cat]
            if not figs:
                continue
            p.append(f"<h4>{cat}</h4><div class=\"grid\">")
            for r in figs:
                errs = "".join(f"<br>{_e(a)}: <code>{_e(b)}</code>" for a, b in r["errors"])
                p.append(f'<figure><img src="{_e(r["file"])}" alt="{_e(r["id"])}"><figcaption>{r["rank"]} of {r["of"]}: '
                         f'<b>{_e(r["query"])}</b> &middot; {_e(r["summary"])}<br>id {_e(r["id"])}<br>'
                         f"output: <code>{_e(r['text'])}</code>{errs}</figcaption></figure>")
            p.append("</div>")
    body = "\n".join(p)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>raytrain report: {_e(rep["name"])}</title>'
            f"<style>{_CSS}</style></head><body>\n{body}\n</body></html>\n")


# ---------------------------------------------------------------------------------------------
# entry point


def build_report(run_uri: str, data_uri: str | None, out_dir, opts: storage.StorageOptions | None = None,
                 split: str = "test", max_overlays: int = 24) -> Path:
    """Render the report of the run at ``run_uri`` (``<root>/runs/<name>``, local or s3://)
    into the local folder ``out_dir``; returns the path of ``index.html``.

    ``data_uri`` is the prepared dataset (shards) the run evaluated on; None takes the one
    recorded in ``eval/metrics.json``. ``max_overlays`` caps the overlay images, shared
    between tasks, each task's share split into best / median / worst thirds.
    Never raises on missing or malformed run files: each gap is a note on the page.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(exist_ok=True)
    for stale in [*(out / "overlays").glob("*.png"), *(out / f for f in _FIGURES)]:  # ours, from an earlier report
        stale.unlink(missing_ok=True)
    notes: list[str] = []

    def guarded(what: str, fn: Callable, default: Any) -> Any:
        try:
            return fn()
        except Exception as e:  # the page says what failed; the rest still renders
            log.exception("report: %s failed", what)
            notes.append(f"{what} failed: {type(e).__name__}: {e}")
            return default

    eval_dir = storage.join(run_uri, "eval")
    metrics = guarded("reading eval/metrics.json", lambda: json.loads(_read_text(storage.join(eval_dir, "metrics.json"), opts) or "null"), None)
    if not isinstance(metrics, dict):
        metrics = None
        notes.append("No eval/metrics.json: no metrics table.")
    run_info = metrics.get("run") if metrics and isinstance(metrics.get("run"), dict) else {}
    if not data_uri:
        data_uri = run_info.get("data")
    pred_uri = storage.join(eval_dir, f"predictions_{split}.jsonl")
    rows = guarded("reading predictions", lambda: _read_jsonl(pred_uri, opts, notes), None)
    if rows is None:
        notes.append(f"No eval/predictions_{split}.jsonl: no overlays or error analytics.")
        rows = []
    history = guarded("reading history.jsonl", lambda: _read_jsonl(storage.join(run_uri, "history.jsonl"), opts, notes), None)
    if not history:
        notes.append("No training history (history.jsonl missing or empty): no curves.")
        history = []

    gt = None
    if not data_uri:
        notes.append("No data URI given or recorded in metrics.json: no ground truth, overlays or bias.")
    elif rows:
        gt = guarded(f"reading ground truth from {data_uri} ({split})", lambda: _load_ground_truth(data_uri, split, opts), None)
        if gt is not None and not gt:
            notes.append(f"No shards for split {split!r} under {data_uri}: no ground truth, overlays or bias.")
            gt = None
    examples, missing = _examples(rows, gt)
    if missing:
        notes.append(f"{missing} prediction(s) refer to ids not in the {split!r} shards: no ground truth for them.")
    if rows and not any(ex.pred for ex in examples):
        notes.append("No output of the trained model parsed to any object: only ground truth is drawn, no bias or distance plots.")
    tasks = sorted({ex.task for ex in examples})
    for task in ("point", "detect"):
        if rows and task not in tasks:
            notes.append(f"No {task!r} examples in the predictions: no {'point' if task == 'point' else 'box'} analytics.")

    rep: dict[str, Any] = {
        "name": run_info.get("name") or run_uri.rstrip("/").rsplit("/", 1)[-1],
        "run": run_uri, "data": data_uri, "split": split, "n_predictions": len(rows), "tasks": tasks,
    }
    rep["errors"] = _error_stats(examples)
    rep["parse_errors"] = {"trained": rep["errors"]["reasons"]} if rows else {}
    for c in COLUMNS[1:]:
        pe = (metrics or {}).get(c, {}).get("parse_errors") if isinstance((metrics or {}).get(c), dict) else None
        if isinstance(pe, dict):
            rep["parse_errors"][c] = {str(k): int(finite(v) or 0) for k, v in pe.items()}
    rep["bias"] = {"points": _bias(examples, "point", _point_offsets), "box_centres": _bias(examples, "detect", _box_offsets)}
    rep["distance"] = _distance(examples)
    rep["curves"] = _curves(history)

    images: list[str] = []
    for name, fn in (
        ("curves.png", lambda p: _plot_curves(rep["curves"], p)),
        ("errors.png", lambda p: _plot_errors(rep["parse_errors"], p)),
        ("bias_points.png", lambda p: _plot_bias(rep["bias"]["points"], "points", p)),
        ("bias_boxes.png", lambda p: _plot_bias(rep["bias"]["box_centres"], "box centres", p)),
        ("distance.png", lambda p: _plot_distance(rep["distance"], p)),
    ):
        if guarded(f"plotting {name}", lambda fn=fn, name=name: fn(out / name), False):
            images.append(name)

    # only examples whose image is in the shards can be drawn (the others are noted above)
    selected = _select([ex for ex in examples if ex.gt is not None], max_overlays) if gt is not None else []
    overlays: list[dict] = []
    if selected:
        imgs = guarded("reading overlay images", lambda: _load_images(data_uri, split, {ex.id for *_, ex in selected}, opts), {})
        overlays, more = guarded("drawing overlays", lambda: _overlays(selected, imgs, out), ([], []))
        notes += more
    rep["overlays"] = overlays
    images += [r["file"] for r in overlays]
    rep["images"] = images
    rep["notes"] = notes

    (out / "report.json").write_text(json.dumps(rep, indent=1, default=str) + "\n", encoding="utf-8")
    index = out / "index.html"
    index.write_text(_html(rep, metrics), encoding="utf-8")
    return index


def main(argv: Sequence[str] | None = None) -> str:
    """``python -m raytrain.eval.report --run <uri> --data <uri> --out <dir>``."""
    import argparse

    ap = argparse.ArgumentParser(prog="raytrain report", description=build_report.__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="run directory: <storage.root>/runs/<name> (local or s3://)")
    ap.add_argument("--data", default=None, help="prepared dataset URI (default: the one in eval/metrics.json)")
    ap.add_argument("--out", required=True, help="local output folder (index.html, report.json, PNGs)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--max-overlays", type=int, default=24)
    ap.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (MinIO / moto)")
    ap.add_argument("--region", default=None)
    a = ap.parse_args(argv)
    index = build_report(a.run, a.data, a.out, storage.StorageOptions(a.endpoint_url, a.region), a.split, a.max_overlays)
    print(index)
    return str(index)


if __name__ == "__main__":
    main()
