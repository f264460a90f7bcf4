"""Every metric of an evaluation, from its prediction rows taken one at a time (driver side).

`Aggregator.add(row)` takes one prediction row (predict.score_rows' columns: id, task, query,
text, objects, errors, score, targets, width, height; JSON strings or already parsed) and keeps
only what the metrics need: per-sample numbers as float arrays (pointing, boxes, segmentation,
point P/R/F1), (confidence, correct) pairs for calibration, COCO matching state in bounded chunks
(metrics/coco_stream.py), and the captions themselves (corpus metrics need every hypothesis and
reference). `result()` is the metrics dict `raytrain eval` prints and writes:

    <pointing keys>      seed 000's names at the top level (metrics/pointing.py)
    boxes                P/R/F1 at IoU 0.5, mean IoU (metrics/boxes.py)
    coco                 mAP, AP50, AP75, mAR ... through pycocotools, ranked by the per-object confidences
    point_prf            one-to-one (Hungarian) point precision / recall / F1 (metrics/point_prf.py)
    calibration          {"ece", "bins", "n"}: reliability diagram of the per-object confidences
    segmentation, captions (BLEU, METEOR, ROUGE-L, CIDEr, CLIPScore), dense_captions
    valid_rate_by_task   share of each task's answers that parsed to at least one object
    image_level          object present or not per example (accuracy, precision, recall, F1,
                         specificity), when the split holds negatives (seed 004's Normal rows)
    parse_errors, examples, warnings

The same code scores `raytrain eval`, the end of `raytrain train` and in-training validation.
"""

from __future__ import annotations

import json
import math
from array import array
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np

from raytrain import tasks
from raytrain.eval.metrics import boxes as box_metrics
from raytrain.eval.metrics import point_prf
from raytrain.eval.metrics import pointing as point_metrics
from raytrain.eval.metrics import segmentation as seg_metrics
from raytrain.eval.metrics.calibration import correct_predictions, expected_calibration_error, reliability_bins
from raytrain.eval.metrics.coco_stream import CocoAccumulator
from raytrain.formats.annotations import Box, Point, objects_from_json

JAVA_MISSING = ("METEOR not computed: no `java` on PATH (pycocoevalcap runs METEOR 1.5 and the PTB tokenizer "
                "under Java; cluster.yaml installs default-jre-headless, locally: apt-get install default-jre-headless). "
                "BLEU / ROUGE-L / CIDEr use a Python tokenizer, close to but not equal to the COCO server's.")


def parsed(v: Any) -> Any:
    """A JSON column as Python: strings are parsed, anything else (already parsed) passes."""
    if isinstance(v, (str, bytes)):
        return json.loads(v)
    return v


def _objects(v: Any) -> tuple[list, list]:
    """(objects, confidences) of an objects column: annotations objects and each one's "score" (None if absent)."""
    raw = [d for d in parsed(v) or [] if isinstance(d, dict)]
    objs = objects_from_json(json.dumps([{k: x for k, x in d.items() if k != "score"} for d in raw]))
    return objs, [d.get("score") for d in raw]


class _Samples:
    """Per-sample metric dicts of one family kept as float columns (None -> NaN), replayed for the
    family's aggregate function (which reads NaN as undefined, as after a trip through Arrow)."""

    def __init__(self):
        self.cols: dict[str, array] = {}
        self.n = 0

    def add(self, d: dict) -> None:
        for k in d:
            if k not in self.cols:
                self.cols[k] = array("d", [math.nan]) * self.n
        for k, col in self.cols.items():
            v = d.get(k)
            try:
                col.append(math.nan if v is None else float(v))
            except (TypeError, ValueError):
                col.append(math.nan)
        self.n += 1

    def __iter__(self):
        keys = list(self.cols)
        for i in range(self.n):
            yield {k: self.cols[k][i] for k in keys}


class Aggregator:
    """Metrics over a stream of prediction rows (module docstring). ``coco_chunk``: images per
    pycocotools evaluation chunk; ``on_image`` / ``on_annotation`` / ``on_result``: the COCO
    ground-truth / results writers (eval/exports.py), called as detect rows arrive."""

    def __init__(self, *, calibration_bins: int = 10, coco_chunk: int = 2000, on_image=None, on_annotation=None, on_result=None):
        self.calibration_bins = calibration_bins
        self.samples: dict[str, _Samples] = {}
        self.prf = _Samples()
        self.coco = CocoAccumulator(coco_chunk, on_image, on_annotation, on_result)
        self.n_detect = 0
        self.conf = array("d")
        self.correct = array("b")
        self.n_no_conf = 0
        self.captions: dict[str, tuple[str, list[str]]] = {}
        self.caption_valid = 0
        self.clip = array("d")
        self.dense_gt: list = []
        self.dense_pred: list = []
        self.dense_valid = self.n_dense = 0
        self.errors: Counter = Counter()
        self.by_task: dict[str, list[int]] = {}
        self.presence: Counter = Counter()  # image level: (object present, answer names one) -> count
        self.n = 0

    # ------------------------------------------------------------------ one row

    def add(self, row: dict) -> None:
        self.n += 1
        task = str(row["task"])
        spec = tasks.get(task)
        score = parsed(row.get("score")) or {}
        for reason, _ in parsed(row.get("errors")) or []:
            self.errors[str(reason)] += 1
        objs, confs = _objects(row.get("objects"))
        seen = self.by_task.setdefault(task, [0, 0])
        seen[0] += 1
        seen[1] += int(bool(objs))
        if spec.metrics in ("pointing", "boxes", "segmentation"):
            self.samples.setdefault(spec.metrics, _Samples()).add(score)
        if spec.metrics in ("pointing", "boxes") and "targets" in row:
            self._grounding(task, row, objs, confs)
        elif spec.metrics == "captions":
            key = str(row["id"])
            if key in self.captions:  # the same image asked twice (a prompt grid cell): keep both
                key = f"{key}#{self.n}"
            self.captions[key] = (score.get("hyp", ""), list(score.get("refs", [])))
            self.caption_valid += int(bool(score.get("valid")))
            if score.get("clip_score") is not None:
                self.clip.append(float(score["clip_score"]))
        elif spec.metrics == "dense_captions":
            key = f"{row['id']}#{self.n}"
            self.n_dense += 1
            self.dense_valid += int(bool(score.get("valid")))
            self.dense_gt += [(key, Box(*g[:4]), g[4]) for g in score.get("gt", [])]
            self.dense_pred += [(key, Box(*p[:4]), p[4], None) for p in score.get("pred", [])]

    def _grounding(self, task: str, row: dict, objs: list, confs: list) -> None:
        gt = objects_from_json(json.dumps(parsed(row["targets"]) or []))
        w, h = int(row["width"]), int(row["height"])
        kind = Point if tasks.get(task).metrics == "pointing" else Box
        pred = [(o, c) for o, c in zip(objs, confs) if isinstance(o, kind)]
        gt = [o for o in gt if isinstance(o, kind)]
        self.presence[(bool(gt), bool(pred))] += 1
        if kind is Point:
            self.prf.add(point_prf.score_points_prf([o for o, _ in pred] if objs else None, gt, w, h))
        else:
            self.n_detect += 1
            self.coco.add_image(w, h, gt, pred, extra={"file_name": str(row["id"]), "raytrain_id": str(row["id"]),
                                                       "query": str(row.get("query", ""))})
        # calibration: is each object with a confidence correct (greedy one-to-one in confidence order)
        if pred:
            scores = [c if isinstance(c, (int, float)) and math.isfinite(c) else -1.0 for _, c in pred]
            ok = correct_predictions([o for o, _ in pred], gt, w, h, scores)
            for (_, c), good in zip(pred, ok):
                if isinstance(c, (int, float)) and math.isfinite(c) and 0.0 <= c <= 1.0:
                    self.conf.append(float(c))
                    self.correct.append(int(good))
                else:
                    self.n_no_conf += 1

    def add_all(self, rows: Iterable[dict]) -> Aggregator:
        for r in rows:
            self.add(r)
        return self

    # ------------------------------------------------------------------ the metrics

    def result(self) -> dict:
        out: dict[str, Any] = {}
        warnings: list[str] = []
        if "pointing" in self.samples:
            out.update(point_metrics.aggregate_pointing(self.samples["pointing"]))
            out["point_prf"] = point_prf.aggregate_points_prf(self.prf)
        if "boxes" in self.samples:
            out["boxes"] = box_metrics.aggregate_boxes(self.samples["boxes"])
        if self.n_detect:
            out["coco"] = self.coco.result()
        if "segmentation" in self.samples:
            out["segmentation"] = seg_metrics.aggregate_segmentation(self.samples["segmentation"])
        if len(self.conf) or self.n_no_conf:
            out["calibration"] = self._calibration()
        if self.captions:
            out["captions"] = self._captions(warnings)
        if self.n_dense:
            from raytrain.eval.metrics.captions import dense_caption_metrics

            out["dense_captions"] = dense_caption_metrics(self.dense_gt, self.dense_pred, on_missing_java="skip")
            out["dense_captions"]["valid_rate"] = self.dense_valid / self.n_dense
            if out["dense_captions"].pop("warnings", None):
                out["dense_captions"]["meteor_note"] = JAVA_MISSING
                warnings.append(JAVA_MISSING)
        if any(not present for present, _ in self.presence):
            out["image_level"] = image_level(self.presence)
        out["valid_rate_by_task"] = {t: v / n for t, (n, v) in sorted(self.by_task.items())}
        out["parse_errors"] = dict(self.errors)
        out["examples"] = self.n
        out["warnings"] = sorted(set(warnings))
        return out

    def _calibration(self) -> dict:
        conf = np.frombuffer(self.conf, dtype=np.float64) if len(self.conf) else np.zeros(0)
        ok = np.frombuffer(self.correct, dtype=np.int8).astype(bool) if len(self.correct) else np.zeros(0, bool)
        return {"ece": expected_calibration_error(conf, ok, self.calibration_bins),
                "bins": reliability_bins(conf, ok, self.calibration_bins),
                "n": int(conf.size), "accuracy": float(ok.mean()) if ok.size else None,
                "mean_confidence": float(conf.mean()) if conf.size else None, "n_without_confidence": self.n_no_conf}

    def _captions(self, warnings: list[str]) -> dict:
        from raytrain.eval.metrics.captions import caption_metrics

        refs = {k: r for k, (_, r) in self.captions.items()}
        hyps = {k: h for k, (h, _) in self.captions.items()}
        out = caption_metrics(refs, hyps, on_missing_java="skip")
        if out.pop("warnings", None):
            out["meteor_note"] = JAVA_MISSING
            warnings.append(JAVA_MISSING)
        out["valid_rate"] = self.caption_valid / len(self.captions)
        out["clip_score"] = float(np.mean(self.clip)) if len(self.clip) else None
        out["n_clip_score"] = len(self.clip)
        return out


def aggregate(rows: Iterable[dict], **kwargs) -> dict:
    """Every metric of a list (or any iterable) of prediction rows."""
    return Aggregator(**kwargs).add_all(rows).result()


def image_level(presence: Counter) -> dict:
    """Object present or not, per example (seed 004's Normal vs Fracture): a positive answer names at
    least one object, a negative one none ("nothing found"). `presence`: (present, answered) -> count.
    Reported when the split holds negatives."""
    tp, fp = presence[(True, True)], presence[(False, True)]
    fn, tn = presence[(True, False)], presence[(False, False)]
    n = tp + fp + fn + tn
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None  # = 2PR / (P + R); 0 when nothing positive was right
    return {"n": n, "positives": tp + fn, "negatives": fp + tn, "tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "accuracy": (tp + tn) / n if n else None, "precision": precision, "recall": recall, "f1": f1,
            "specificity": tn / (tn + fp) if tn + fp else None}

