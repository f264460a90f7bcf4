"""Referring-segmentation metrics as big_vision's PaliGemma evaluator defines them.

Reference: google-research/big_vision,
``big_vision/evaluators/proj/paligemma/transfers/segmentation.py`` (RefCOCO transfers).
Per sample it computes

* mask IoU between the predicted mask (the 64x64 VAE mask resized into the predicted box,
  so zero outside the box) and the GT mask, both at original image resolution, and
* box IoU between the predicted and GT boxes,

and reports ``miou = sum(IoU) / n`` (the MEAN OF PER-SAMPLE IoU, every sample weighted
equally) and ``boxacc/<t> = fraction of samples with box IoU >= t`` for t in (0.5, 0.75),
plus counts ``invalid`` / ``total``. An invalid prediction (unparsable tokens, empty box)
scores IoU 0 and stays in the denominator. (big_vision also counts as invalid a parsed
box that collapses to zero pixels after ``int()``; here that arrives as a valid, empty
pred mask: same IoU 0, but ``invalid`` then depends on what the codec returns.)

RefCOCO papers (LAVT, CRIS, ...) also report "overall IoU" (oIoU / cIoU): cumulative
intersection over cumulative union across the split, which weights large objects more.
big_vision does NOT report it; it is here as ``overall_iou`` so the two are never mixed up.

Masks are numpy bool arrays of shape ``(height, width)`` in SOURCE-image pixels (the
pred mask already pasted into its box; decoding ``<seg>`` tokens is the codec's job);
boxes are ``raytrain.formats.annotations.Box`` in the same pixels. Box IoU is invariant to
big_vision's [0, 1] normalisation (it scales both axes of both boxes alike).

``score_segmentation`` runs per sample on Ray Data workers; ``aggregate_segmentation``
on the driver.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from raytrain.formats.annotations import Box, box_iou
from raytrain.eval.metrics.values import finite

DEFAULT_BOX_IOUS = (0.5, 0.75)


def _hit_key(t: float) -> str:
    """Column name of one box-accuracy threshold: 0.5 -> "box_hit_50", 0.75 -> "box_hit_75"."""
    return f"box_hit_{round(t * 100):d}"


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> tuple[float, int, int]:
    """``(IoU, intersection, union)`` of two same-shaped masks, counts in pixels.

    Both masks empty gives IoU 1.0 (correctly predicting "nothing"; gRefCOCO's convention
    for no-target expressions). big_vision never meets it: RefCOCO GT masks are non-empty.
    """
    p = np.asarray(pred, dtype=bool)
    g = np.asarray(gt, dtype=bool)
    if p.shape != g.shape:
        raise ValueError(f"mask shapes differ: pred {p.shape} vs gt {g.shape} (both must be source-image pixels)")
    inter = int(np.count_nonzero(p & g))
    union = int(np.count_nonzero(p | g))
    return (inter / union if union else 1.0), inter, union


def score_segmentation(
    pred_mask: np.ndarray | None,
    gt_mask: np.ndarray,
    pred_box: Box | None = None,
    gt_box: Box | None = None,
    box_ious: Sequence[float] = DEFAULT_BOX_IOUS,
) -> dict:
    """Score one referring-segmentation sample.

    ``pred_mask=None`` means the model output did not parse (big_vision's "invalid"):
    ``valid=0``, ``mask_iou=0``, intersection 0, union = GT area, box hits 0.
    Box metrics need ``gt_box``; without it ``box_iou`` and every ``box_hit_<t>`` are
    ``None`` (not evaluated). With ``gt_box`` but no ``pred_box`` the box scores IoU 0.

    Returns ``valid``, ``mask_iou``, ``intersection``, ``union`` (pixels), ``gt_area``,
    ``box_iou``, and ``box_hit_<round(100 t)>`` (1 if ``box_iou >= t``, inclusive as in
    big_vision) for each ``t`` in ``box_ious``.
    """
    g = np.asarray(gt_mask, dtype=bool)
    gt_area = int(np.count_nonzero(g))
    out: dict[str, Any] = {"valid": int(pred_mask is not None), "gt_area": gt_area}
    if pred_mask is None:
        out.update(mask_iou=0.0, intersection=0, union=gt_area)
    else:
        iou, inter, union = mask_iou(pred_mask, g)
        out.update(mask_iou=iou, intersection=inter, union=union)
    if gt_box is None:
        biou = None
    elif pred_mask is None or pred_box is None:
        biou = 0.0
    else:
        biou = box_iou(pred_box, gt_box)
    out["box_iou"] = biou
    for t in box_ious:
        out[_hit_key(t)] = None if biou is None else int(biou >= t)
    return out



MASKS_UNAVAILABLE = ("mask codec weights not configured (RAYTRAIN_MASK_CODEC names big_vision's vae-oid.npz): "
                     "the answers' <seg> codes cannot become pixels, so only box and seg-token metrics are reported")


def score_segmentation_tokens(pred: Sequence | None, gt_box: Box | None, box_ious: Sequence[float] = DEFAULT_BOX_IOUS) -> dict:
    """Score one segment answer read WITHOUT the mask codec (objects with a box and their 16 seg
    codes, formats.annotations.CodedMask): no mask IoU (None, and `no_masks` says why), the first
    object's box against the single GT box as `score_segmentation` does, and `seg_tokens_valid`
    (1 when the answer parsed into complete objects: 4 locs + 16 seg tokens + a label)."""
    out: dict[str, Any] = {"valid": int(pred is not None), "mask_iou": None, "intersection": None, "union": None,
                           "seg_tokens_valid": int(bool(pred)), "no_masks": 1}
    if gt_box is None:
        biou = None
    elif not pred:
        biou = 0.0
    else:
        biou = box_iou(pred[0].box, gt_box)
    out["box_iou"] = biou
    for t in box_ious:
        out[_hit_key(t)] = None if biou is None else int(biou >= t)
    return out


def aggregate_segmentation(samples: Iterable[dict]) -> dict:
    """Aggregate per-sample ``score_segmentation`` dicts (driver side). Never raises.

    * ``miou``: mean of per-sample mask IoU over all samples, invalid ones 0 —
      big_vision's ``miou``.
    * ``overall_iou``: sum of intersections / sum of unions (oIoU / cIoU of RefCOCO
      papers; NOT a big_vision number).
    * ``box_acc_<t>``: mean of ``box_hit_<t>`` over samples where it is defined —
      big_vision's ``boxacc/<t>``.
    * ``n``, ``n_valid``, ``invalid`` (big_vision's ``invalid``; ``n`` is its ``total``),
      ``valid_rate``, ``mean_box_iou``.
    * samples scored without the codec (``score_segmentation_tokens``): they count in the box
      metrics and ``seg_token_rate`` but not in ``miou`` / ``overall_iou``; when no sample has a
      mask, those are None and ``masks_unavailable`` says why.

    Undefined values (no samples, zero total union) are ``None``.
    """
    n = n_valid = n_mask = n_tokens = n_tokens_valid = 0
    iou_sum = inter = union = 0.0
    box_ious: list[float] = []
    hits: dict[str, list[float]] = {}
    for s in samples:
        n += 1
        s = s or {}
        n_valid += int(finite(s.get("valid")) == 1.0)
        if s.get("no_masks"):
            n_tokens += 1
            n_tokens_valid += int(finite(s.get("seg_tokens_valid")) == 1.0)
        else:
            n_mask += 1
        iou_sum += finite(s.get("mask_iou")) or 0.0
        inter += finite(s.get("intersection")) or 0.0
        union += finite(s.get("union")) or 0.0
        b = finite(s.get("box_iou"))
        if b is not None:
            box_ious.append(b)
        for k, v in s.items():
            if k.startswith("box_hit_"):
                col = hits.setdefault(k, [])
                if finite(v) is not None:
                    col.append(finite(v))
    out: dict[str, Any] = {
        "n": n,
        "n_valid": n_valid,
        "invalid": n - n_valid,
        "valid_rate": n_valid / n if n else None,
        "miou": iou_sum / n_mask if n_mask else None,
        "overall_iou": inter / union if union > 0 else None,
        "mean_box_iou": float(np.mean(box_ious)) if box_ious else None,
    }
    for k in sorted(hits, key=lambda k: int(k.rsplit("_", 1)[1])):
        col = hits[k]
        out["box_acc_" + k.rsplit("_", 1)[1]] = float(np.mean(col)) if col else None
    if n_tokens:
        out["seg_token_rate"] = n_tokens_valid / n_tokens
        if not n_mask:
            out["masks_unavailable"] = MASKS_UNAVAILABLE
    return out
