"""COCO detection mAP / mAR through ``pycocotools`` (the reference implementation).

Unlike ``boxes.py`` (matched-or-not P/R/F1, no ranking), COCO AP ranks predictions by a
confidence score. A VLM emits none, so the caller must supply one per object (e.g. the
mean log-probability of the object's coordinate tokens); scores only need to ORDER the
predictions (any real number, log-probs included). If the caller has none, every score is
1.0, the ranking is arbitrary (pycocotools keeps input order among ties) and the result
says so with ``scores_constant: True``: such an AP is a lower-confidence number, not
comparable with detectors' published AP.

This runs on the driver over the whole split (AP is not a sum of per-sample numbers).
Boxes are ``raytrain.formats.annotations.Box`` in SOURCE-image pixels; COCO's size
buckets (small < 32**2 <= medium < 96**2 <= large) are therefore in original-image pixels,
as in COCO. GT "area" is the BOX area (w * h): official COCO annotations use the mask
area, so ``map_small/medium/large`` can differ from numbers computed on official COCO
json for the same boxes.

Labels: compared after ``strip().casefold()`` (as ``boxes.py`` does). Categories are the
given list, or the sorted set of GT labels; ids are 1..K in that order.
``class_agnostic=True`` maps every box to one category, id 1, named "object".
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any, Hashable, Mapping, Sequence

from raytrain.formats.annotations import Box

# Keys of the result that hold COCO summary numbers, in pycocotools' ``stats`` order.
STAT_KEYS = (
    "map",
    "map_50",
    "map_75",
    "map_small",
    "map_medium",
    "map_large",
    "mar_1",
    "mar_10",
    "mar_100",
    "mar_small",
    "mar_medium",
    "mar_large",
)

AGNOSTIC_NAME = "object"


def _norm(label: str) -> str:
    return label.strip().casefold()


def coco_categories(
    gt_labels: Sequence[str],
    categories: Sequence[str] | None = None,
    class_agnostic: bool = False,
) -> tuple[list[dict], dict[str, int] | int]:
    """COCO ``categories`` list and the label -> category id mapping.

    Returns ``(cats, label_to_cat)``: ``cats`` is ``[{"id": 1, "name": ...}, ...]``;
    ``label_to_cat`` maps a NORMALISED label (``strip().casefold()``) to its id, or is
    the int ``1`` in class-agnostic mode (every box is category 1). Raises ValueError
    when ``categories`` has duplicates (after normalisation) or misses a GT label: the
    caller declared the list complete, so a GT box outside it is a bug upstream.
    """
    if class_agnostic:
        return [{"id": 1, "name": AGNOSTIC_NAME}], 1
    if categories is None:
        names = sorted({_norm(lab) for lab in gt_labels})
    else:
        names = list(categories)
    mapping: dict[str, int] = {}
    for i, name in enumerate(names, start=1):
        key = _norm(name)
        if key in mapping:
            raise ValueError(f"duplicate category {name!r} (labels compare after strip().casefold())")
        mapping[key] = i
    missing = sorted({_norm(lab) for lab in gt_labels} - set(mapping))
    if missing:
        raise ValueError(f"GT labels not in categories: {missing[:10]}")
    return [{"id": i, "name": n} for i, n in enumerate(names, start=1)], mapping


def _xywh(box: Box) -> tuple[list[float], bool]:
    """COCO ``[x, y, w, h]`` and whether the box was usable.

    A box with a non-finite coordinate or x2 < x1 / y2 < y1 becomes a zero-size box
    (at (x1, y1) when finite, else at the origin): it overlaps nothing, so it stays a
    false positive instead of vanishing from the ranking.
    """
    c = (box.x1, box.y1, box.x2, box.y2)
    if all(math.isfinite(v) for v in c) and box.x2 >= box.x1 and box.y2 >= box.y1:
        return [float(box.x1), float(box.y1), float(box.x2 - box.x1), float(box.y2 - box.y1)], True
    if math.isfinite(box.x1) and math.isfinite(box.y1):
        return [float(box.x1), float(box.y1), 0.0, 0.0], False
    return [0.0, 0.0, 0.0, 0.0], False


def _scores(raw: Sequence[Any]) -> tuple[list[float], int, bool]:
    """Finite float scores, how many were missing, and whether the ranking is constant.

    Missing (None) or non-finite scores rank below every real score (min - 1). If no
    prediction has a real score, all get 1.0.
    """
    vals: list[float | None] = []
    for s in raw:
        try:
            f = float(s) if s is not None else None
        except (TypeError, ValueError):
            f = None
        vals.append(f if f is not None and math.isfinite(f) else None)
    finite = [v for v in vals if v is not None]
    n_missing = len(vals) - len(finite)
    if not finite:
        return [1.0] * len(vals), n_missing, len(vals) > 0
    floor = min(finite) - 1.0
    out = [v if v is not None else floor for v in vals]
    return out, n_missing, len(set(out)) <= 1


def _results(
    preds: Sequence[tuple[Hashable, Box, Any]],
    label_to_cat: Mapping[str, int] | int,
    image_id_map: Mapping[Hashable, int] | None = None,
) -> tuple[list[dict], dict[str, Any]]:
    scores, n_missing, constant = _scores([p[2] if len(p) > 2 else None for p in preds])
    out: list[dict] = []
    n_unknown = n_invalid = 0
    for (image_id, box, *_), score in zip(preds, scores):
        if isinstance(label_to_cat, int):
            cat = label_to_cat
        else:
            cat = label_to_cat.get(_norm(box.label))
            if cat is None:
                n_unknown += 1
                continue
        bbox, ok = _xywh(box)
        n_invalid += int(not ok)
        iid = image_id_map[image_id] if image_id_map is not None else image_id
        out.append({"image_id": iid, "category_id": cat, "bbox": bbox, "score": score})
    counts = {
        "n_pred_unknown_label": n_unknown,
        "n_pred_invalid_box": n_invalid,
        "n_pred_missing_score": n_missing,
        "scores_constant": constant,
    }
    return out, counts


def to_coco_results_json(
    preds: Sequence[tuple[Hashable, Box, Any]],
    label_to_cat: Mapping[str, int] | int,
) -> list[dict]:
    """Predictions in the standard COCO results format (what ``COCO.loadRes`` reads).

    ``preds`` holds ``(image_id, Box, score)``; ``image_id`` passes through unchanged
    (COCO tools expect the int ids of the GT file). ``label_to_cat`` comes from
    ``coco_categories``: a dict keyed by normalised label, or one int for class-agnostic
    output. Each row is ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``
    in source pixels. A prediction whose label has no category is left out
    (``coco_detection_metrics`` reports how many as ``n_pred_unknown_label``);
    unusable boxes become zero-size boxes and missing scores rank last (see ``_xywh``,
    ``_scores``), so the output is always valid JSON.
    """
    return _results(preds, label_to_cat)[0]


def coco_detection_metrics(
    images: Sequence[Mapping[str, Any]],
    gts: Sequence[tuple[Hashable, Box]],
    preds: Sequence[tuple[Hashable, Box, Any]],
    categories: Sequence[str] | None = None,
    class_agnostic: bool = False,
) -> dict:
    """COCO box mAP / mAR (``pycocotools.cocoeval.COCOeval``, iouType "bbox", default params).

    ``images``: ``[{"id", "width", "height"}]``, every image of the split, including those
    without GT or predictions (a prediction on a GT-free image is a false positive).
    ``gts``: ``(image_id, Box)``; ``preds``: ``(image_id, Box, score)`` with score
    None when the model gave none. Image ids may be any hashable; they are renumbered
    1..N in ``images`` order for pycocotools. Raises ValueError on duplicate image ids,
    a box on an unknown image, or a GT label outside ``categories`` (caller bugs);
    bad predictions are counted, never raised on.

    Returns floats for ``STAT_KEYS`` (``map`` = AP@[.5:.95], ``map_50``, ``map_75``,
    ``map_small/medium/large``, ``mar_1/10/100``, ``mar_small/medium/large``), ``None``
    where COCO reports -1 (nothing to evaluate, e.g. no GT in that size bucket), plus
    ``ap_per_category`` ({name: AP@[.5:.95] or None}), ``scores_constant``,
    ``n_images``, ``n_gt``, ``n_pred``, ``n_pred_unknown_label`` (left out: their label
    is no category), ``n_pred_invalid_box``, ``n_pred_missing_score``, ``class_agnostic``.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    id_map: dict[Hashable, int] = {}
    coco_images = []
    for i, im in enumerate(images, start=1):
        if im["id"] in id_map:
            raise ValueError(f"duplicate image id {im['id']!r}")
        id_map[im["id"]] = i
        coco_images.append({"id": i, "width": int(im["width"]), "height": int(im["height"])})
    for image_id, *_ in list(gts) + list(preds):
        if image_id not in id_map:
            raise ValueError(f"box on unknown image id {image_id!r}")

    cats, label_to_cat = coco_categories([b.label for _, b in gts], categories, class_agnostic)
    anns = []
    for k, (image_id, box) in enumerate(gts, start=1):
        bbox, ok = _xywh(box)
        if not ok:
            raise ValueError(f"GT box {k} on image {image_id!r} is not a finite, non-inverted box: {box}")
        cat = label_to_cat if isinstance(label_to_cat, int) else label_to_cat[_norm(box.label)]
        # ids start at 1: pycocotools stores matched ids in arrays where 0 means "unmatched"
        anns.append(
            {
                "id": k,
                "image_id": id_map[image_id],
                "category_id": cat,
                "bbox": bbox,
                "area": bbox[2] * bbox[3],
                "iscrowd": 0,
            }
        )
    results, counts = _results(preds, label_to_cat, id_map)

    quiet = contextlib.redirect_stdout(io.StringIO())  # pycocotools prints progress
    with quiet:
        coco_gt = COCO()
        coco_gt.dataset = {"images": coco_images, "annotations": anns, "categories": cats}
        coco_gt.createIndex()
        if results:
            coco_dt = coco_gt.loadRes([dict(r) for r in results])  # loadRes mutates its input
        else:  # loadRes indexes anns[0]; an empty result set is a valid (all-miss) evaluation
            coco_dt = COCO()
            coco_dt.dataset = {"images": coco_images, "annotations": [], "categories": cats}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()

    out: dict[str, Any] = {k: (float(v) if v > -1 else None) for k, v in zip(STAT_KEYS, ev.stats)}
    # Per category, as summarize() computes "map": mean over IoU thresholds and recall
    # points of the defined precision entries, area "all", maxDets 100.
    prec = ev.eval["precision"]  # [T, R, K, A, M]
    per_cat: dict[str, float | None] = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = prec[:, :, k, 0, -1]
        per_cat[cats[cat_id - 1]["name"]] = float(p[p > -1].mean()) if (p > -1).any() else None
    out["ap_per_category"] = per_cat
    out.update(counts)
    out.update(n_images=len(coco_images), n_gt=len(anns), n_pred=len(preds), class_agnostic=class_agnostic)
    return out
