"""COCO box mAP / mAR over a stream of images, in bounded memory, equal to pycocotools' COCOeval.

``coco.coco_detection_metrics`` hands the whole split to pycocotools at once: its per-image
evaluation records (one dict of arrays per image x category x area range) grow with the split.
Here images arrive one by one (``add_image``) and are evaluated in chunks by pycocotools itself
(``COCOeval.evaluate``: per-image matching at the 10 IoU thresholds, area ranges, crowd and ignore
rules); of each chunk only what ``COCOeval.accumulate`` reads is kept, as flat arrays per category
and area range: each detection's score, its rank in its image, and whether it matched / is ignored
at each IoU threshold, plus the count of non-ignored ground truth. ``result`` then runs
``accumulate``'s arithmetic on those arrays (same ordering rules: images in id order, a stable
sort by descending score, the precision envelope, recall thresholds) and pycocotools' own
``summarize`` on the result, so the numbers equal a COCOeval run over files holding the same
images, ground truth and detections (tests check it to 1e-12, ties included).

Conventions (as ``coco.py``): boxes are ``formats.annotations.Box`` in source pixels; labels are
categories after ``strip().casefold()``, numbered 1..K in order of first appearance; GT "area" is the
box area; a detection without a confidence gets score 0.0 (it ranks last) and is counted; a
non-finite or inverted predicted box becomes a zero-size box (a false positive); a GT box that is
not finite is skipped and counted (a data problem, not a reason to stop an evaluation). Image ids
are 1..N in ``add_image`` order: the ids of the COCO files ``eval.exports`` writes beside.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from raytrain.eval.metrics.coco import STAT_KEYS, _xywh
from raytrain.formats.annotations import Box

MISSING_SCORE = 0.0


def _norm(label: str) -> str:
    return str(label).strip().casefold()


class _Stream:
    """What accumulate reads of one (category, area range), concatenated over images in id order."""

    def __init__(self, n_thr: int):
        self.n_thr = n_thr
        self.scores: list[np.ndarray] = []
        self.ranks: list[np.ndarray] = []
        self.matched: list[np.ndarray] = []
        self.ignored: list[np.ndarray] = []
        self.npig = 0

    def add(self, e: dict) -> None:
        d = len(e["dtScores"])
        self.npig += int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))
        if d:
            self.scores.append(np.asarray(e["dtScores"], dtype=np.float64))
            self.ranks.append(np.arange(d, dtype=np.int32))
            self.matched.append(np.asarray(e["dtMatches"]).reshape(self.n_thr, d) > 0)
            self.ignored.append(np.asarray(e["dtIgnore"]).reshape(self.n_thr, d).astype(bool))

    def compact(self) -> None:
        """Join the per-image arrays (a few arrays instead of many small ones)."""
        if len(self.scores) > 1:
            self.scores = [np.concatenate(self.scores)]
            self.ranks = [np.concatenate(self.ranks)]
            self.matched = [np.concatenate(self.matched, axis=1)]
            self.ignored = [np.concatenate(self.ignored, axis=1)]

    def arrays(self):
        if not self.scores:
            return np.zeros(0), np.zeros(0, np.int32), np.zeros((self.n_thr, 0), bool), np.zeros((self.n_thr, 0), bool)
        self.compact()
        return self.scores[0], self.ranks[0], self.matched[0], self.ignored[0]


class CocoAccumulator:
    """Feed images with ``add_image``; ``result()`` gives ``coco.coco_detection_metrics``' keys.

    ``chunk_images``: images evaluated together by pycocotools (memory is bounded by a chunk plus
    the compact per-detection arrays). ``on_image`` / ``on_annotation`` / ``on_result``: optional
    callables receiving each COCO ground-truth image entry, annotation and result row as they are
    made (``eval.exports`` writes them to the COCO files)."""

    def __init__(self, chunk_images: int = 2000, on_image=None, on_annotation=None, on_result=None):
        from pycocotools.cocoeval import Params

        self.params = Params(iouType="bbox")
        self.chunk_images = max(1, int(chunk_images))
        self.on_image, self.on_annotation, self.on_result = on_image, on_annotation, on_result
        self.categories: dict[str, int] = {}
        self._images: list[dict] = []
        self._anns: list[dict] = []
        self._dets: list[dict] = []
        self._streams: dict[tuple[int, int], _Stream] = {}
        self.n_images = self.n_gt = self.n_pred = 0
        self.n_gt_invalid = self.n_pred_invalid = self.n_pred_missing_score = 0
        self._score_lo, self._score_hi = math.inf, -math.inf

    def category_id(self, label: str) -> int:
        key = _norm(label)
        if key not in self.categories:
            self.categories[key] = len(self.categories) + 1
        return self.categories[key]

    def add_image(self, width: int, height: int, gts: Sequence[Box], preds: Sequence[tuple[Box, Any]],
                  extra: dict | None = None) -> int:
        """One image: its ground-truth boxes and its predicted (box, score) pairs; returns its id.
        ``extra``: more fields of its COCO image entry (file_name, ...)."""
        self.n_images += 1
        image_id = self.n_images
        entry = {"id": image_id, "width": int(width), "height": int(height), **(extra or {})}
        self._images.append(entry)
        if self.on_image:
            self.on_image(entry)
        for box in gts:
            bbox, ok = _xywh(box)
            if not ok:
                self.n_gt_invalid += 1
                continue
            self.n_gt += 1
            ann = {"id": self.n_gt, "image_id": image_id, "category_id": self.category_id(box.label), "bbox": bbox,
                   "area": bbox[2] * bbox[3], "iscrowd": 0}
            self._anns.append(ann)
            if self.on_annotation:
                self.on_annotation(ann)
        for box, score in preds:
            s = None
            with contextlib.suppress(TypeError, ValueError):
                s = float(score) if score is not None else None
            if s is None or not math.isfinite(s):
                self.n_pred_missing_score += 1
                s = MISSING_SCORE
            self._score_lo, self._score_hi = min(self._score_lo, s), max(self._score_hi, s)
            bbox, ok = _xywh(box)
            self.n_pred_invalid += int(not ok)
            self.n_pred += 1
            det = {"image_id": image_id, "category_id": self.category_id(box.label), "bbox": bbox, "score": s}
            self._dets.append(det)
            if self.on_result:
                self.on_result(dict(det))
        if len(self._images) >= self.chunk_images:
            self._flush()
        return image_id

    def _flush(self) -> None:
        """Evaluate the pending images with pycocotools and keep what accumulate needs."""
        if not self._images:
            return
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        cats = [{"id": i, "name": n} for n, i in self.categories.items()]
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            gt = COCO()
            gt.dataset = {"images": self._images, "annotations": self._anns, "categories": cats}
            gt.createIndex()
            if self._dets:
                dt = gt.loadRes([dict(d) for d in self._dets])  # loadRes adds area / id to its input
            else:  # loadRes cannot take an empty list; no detections is a valid evaluation
                dt = COCO()
                dt.dataset = {"images": self._images, "annotations": [], "categories": cats}
                dt.createIndex()
            ev = COCOeval(gt, dt, iouType="bbox")
            ev.params.imgIds = [im["id"] for im in self._images]
            ev.evaluate()
        n_area = len(ev.params.areaRng)
        n_img = len(ev.params.imgIds)
        n_thr = len(self.params.iouThrs)
        for k, cat_id in enumerate(ev.params.catIds):
            for a in range(n_area):
                stream = self._streams.setdefault((cat_id, a), _Stream(n_thr))
                base = (k * n_area + a) * n_img
                for e in ev.evalImgs[base: base + n_img]:  # images in id order
                    if e is not None:
                        stream.add(e)
                stream.compact()
        self._images, self._anns, self._dets = [], [], []

    def _accumulate(self) -> tuple[np.ndarray, np.ndarray]:
        """COCOeval.accumulate's precision [T, R, K, A, M] and recall [T, K, A, M] (-1 = undefined)."""
        p = self.params
        n_thr, n_rec, n_cat, n_area, n_md = len(p.iouThrs), len(p.recThrs), len(self.categories), len(p.areaRng), len(p.maxDets)
        precision = -np.ones((n_thr, n_rec, n_cat, n_area, n_md))
        recall = -np.ones((n_thr, n_cat, n_area, n_md))
        for (cat_id, a), stream in self._streams.items():
            k = cat_id - 1
            if stream.npig == 0:
                continue
            scores, ranks, matched, ignored = stream.arrays()
            for m, max_det in enumerate(p.maxDets):
                keep = ranks < max_det
                order = np.argsort(-scores[keep], kind="mergesort")
                dtm = matched[:, keep][:, order]
                dtig = ignored[:, keep][:, order]
                tps = np.logical_and(dtm, ~dtig)
                fps = np.logical_and(~dtm, ~dtig)
                tp_sum = np.cumsum(tps, axis=1).astype(float)
                fp_sum = np.cumsum(fps, axis=1).astype(float)
                for t in range(n_thr):
                    tp, fp = tp_sum[t], fp_sum[t]
                    nd = len(tp)
                    rc = tp / stream.npig
                    pr = tp / (fp + tp + np.spacing(1))
                    recall[t, k, a, m] = rc[-1] if nd else 0
                    pr = np.maximum.accumulate(pr[::-1])[::-1] if nd else pr  # the precision envelope
                    inds = np.searchsorted(rc, p.recThrs, side="left")
                    q = np.zeros(n_rec)
                    ok = inds < nd
                    q[ok] = pr[inds[ok]]
                    precision[t, :, k, a, m] = q
        return precision, recall

    def result(self) -> dict:
        """The COCO summary (``coco.STAT_KEYS``; None where COCO says -1), ``ap_per_category`` and
        the counts: n_images, n_gt, n_pred, n_gt_invalid, n_pred_invalid_box, n_pred_missing_score,
        n_pred_unknown_label (detections of a label no ground truth has: false positives that no
        category's AP counts, as in COCOeval), scores_constant."""
        from pycocotools.cocoeval import COCOeval

        self._flush()
        precision, recall = self._accumulate()
        ev = COCOeval(iouType="bbox")
        ev.params.catIds = list(range(1, len(self.categories) + 1))
        ev.eval = {"params": ev.params, "precision": precision, "recall": recall}
        with contextlib.redirect_stdout(io.StringIO()):
            ev.summarize()
        out: dict[str, Any] = {k: (float(v) if v > -1 else None) for k, v in zip(STAT_KEYS, ev.stats)}
        names = {i: n for n, i in self.categories.items()}
        with_gt = {cat for (cat, a), s in self._streams.items() if a == 0 and s.npig > 0}
        per_cat: dict[str, float | None] = {}
        for cat_id in sorted(names):
            pc = precision[:, :, cat_id - 1, 0, -1]
            if cat_id in with_gt or (pc > -1).any():
                per_cat[names[cat_id]] = float(pc[pc > -1].mean()) if (pc > -1).any() else None
        out["ap_per_category"] = per_cat
        out.update(
            n_images=self.n_images, n_gt=self.n_gt, n_pred=self.n_pred, n_gt_invalid=self.n_gt_invalid,
            n_pred_invalid_box=self.n_pred_invalid, n_pred_missing_score=self.n_pred_missing_score,
            n_pred_unknown_label=self._unknown_label_preds(with_gt),
            scores_constant=self.n_pred > 0 and self._score_lo == self._score_hi,
        )
        return out

    def _unknown_label_preds(self, with_gt: set[int]) -> int:
        s = {cat: st for (cat, a), st in self._streams.items() if a == 0}
        return int(sum(sum(len(x) for x in st.scores) for cat, st in s.items() if cat not in with_gt))

    def categories_json(self) -> list[dict]:
        return [{"id": i, "name": n} for n, i in self.categories.items()]
