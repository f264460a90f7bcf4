"""Full-split evaluation as a Ray Data job: an actor pool of predictors decodes every example of a
split, parses the text back to objects in source pixels and scores each example; the driver
aggregates. Blind baselines go through the same scoring, so all columns of the table are
comparable.

Per-example output rows: id, task, query, text, objects (parsed, JSON), errors (parse reasons,
JSON), score (per-sample metrics, JSON).

Frames: examples carry `content_box` (where the source image lies in the model input, from
`pipeline.decode_and_expand` and the preprocessing recorded with the checkpoint); text is parsed in
the model input's frame and mapped back to source pixels before scoring (`_geometry`).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Sequence

import numpy as np
from PIL import Image

from raytrain.data.preprocess import Geometry
from raytrain.eval.metrics import boxes as box_metrics
from raytrain.eval.metrics import pointing as point_metrics
from raytrain.eval.metrics import segmentation as seg_metrics
from raytrain.formats.annotations import Box, Mask, Point, objects_from_json, objects_to_json

log = logging.getLogger(__name__)

def score_example(task: str, pred: Sequence | None, targets_json: str, width: int, height: int) -> dict:
    """Per-example metrics for one task; pred None = the output did not parse."""
    gt = objects_from_json(targets_json)
    if task == "point":
        pts = None if pred is None else [o for o in pred if isinstance(o, Point)]
        return point_metrics.score_points(pts, [o for o in gt if isinstance(o, Point)], width, height)
    if task == "detect":
        bxs = None if pred is None else [o for o in pred if isinstance(o, Box)]
        return box_metrics.score_boxes(bxs, [o for o in gt if isinstance(o, Box)])
    if task == "segment":
        # big_vision's referring-segmentation scores: mask IoU of the union of predicted masks vs
        # the union of GT masks (= big_vision's when the model answers one object), box IoU of
        # the first predicted box (its locs) vs the GT box when there is exactly one GT object.
        def union(ms):
            return np.logical_or.reduce([m.to_array() for m in ms]) if ms else np.zeros((height, width), bool)

        masks = None if pred is None else [o for o in _unwrap(pred) if isinstance(o, Mask)]
        gts = [o for o in gt if isinstance(o, Mask)]
        return seg_metrics.score_segmentation(union(masks) if masks else None, union(gts),
                                              masks[0].box if masks else None, gts[0].box if len(gts) == 1 else None)
    if task == "caption":  # corpus-level metrics (CIDEr, BLEU): keep hypothesis and references
        hyp = "" if not pred else pred[0].text
        return {"valid": int(bool(pred)), "hyp": hyp, "refs": [c.text for c in gt]}
    if task == "dense_caption":  # matched by box IoU at aggregation time
        regions = [] if not pred else [[r.x1, r.y1, r.x2, r.y2, r.phrase] for r in pred]
        return {"valid": int(bool(pred)), "pred": regions, "gt": [[r.x1, r.y1, r.x2, r.y2, r.phrase] for r in gt]}
    raise ValueError(f"no metrics for task {task!r}")


def _geometry(batch: dict, i: int, image_hw):
    """Example i's source -> model-input map; batches without `content_box` were stretched."""
    w, h = int(batch["width"][i]), int(batch["height"][i])
    box = batch["content_box"][i] if "content_box" in batch else (0, 0, int(image_hw[1]), int(image_hw[0]))
    return Geometry.from_content_box(w, h, image_hw, box)


def _rows_from_predictions(batch: dict, texts: list[str], fam, image_hw, confidences: list | None = None) -> dict:
    out = {"id": [], "task": [], "query": [], "text": [], "objects": [], "errors": [], "score": []}
    for i, text in enumerate(texts):
        task = str(batch["task"][i])
        w, h = int(batch["width"][i]), int(batch["height"][i])
        geom = _geometry(batch, i, image_hw)
        res = fam.parse_output(text, task, *geom.parse_size, image_hw)
        res.objects = geom.from_frame(res.objects)  # source pixels (clipped) for scoring and output
        if confidences is not None and len(confidences[i]) == len(res.objects):
            # scores ride along in the objects JSON (COCO results, NMS, calibration use them)
            res.objects = [_Scored(o, c) for o, c in zip(res.objects, confidences[i])]
        # An output counts as valid when at least one object parsed; rejected fragments are
        # reported (errors) but do not void the objects that did parse.
        pred = _unwrap(res.objects) if res.objects else None  # scoring sees the plain objects
        score = score_example(task, pred, batch["targets"][i], w, h)
        out["id"].append(str(batch["id"][i]))
        out["task"].append(task)
        out["query"].append(str(batch["query"][i]))
        out["text"].append(text)
        out["objects"].append(_objects_json(res.objects))
        out["errors"].append(json.dumps([[e.reason, e.text] for e in res.errors]))
        out["score"].append(json.dumps(score))
    return {k: np.array(v, dtype=object) for k, v in out.items()}


class _Scored:
    """A parsed object plus its confidence; behaves like the object for scoring."""

    def __init__(self, obj, score: float):
        self.obj, self.score = obj, float(score)

    def __getattr__(self, name):
        return getattr(self.obj, name)


def _unwrap(objs):
    return [o.obj if isinstance(o, _Scored) else o for o in objs]


def _objects_json(objs) -> str:
    plain = json.loads(objects_to_json(_unwrap(objs)))
    for d, o in zip(plain, objs):
        if isinstance(o, _Scored):
            d["score"] = o.score
    return json.dumps(plain)


class Predictor:
    """Ray Data actor: one model per actor, decoding numpy batches of examples (greedy by default;
    optional grammar constraints and per-object confidences for PaliGemma)."""

    def __init__(self, *, family: str, model_path: str, checkpoint_uri: str | None = None, storage: dict | None = None,
                 dtype: str = "float32", max_new_tokens: int = 16, threads: int = 1, decoding: dict | None = None,
                 constrained: bool = False, max_objects: int = 0, confidence: bool = False):
        import torch

        from raytrain import storage as storage_mod
        from raytrain.models import family as model_family
        from raytrain.training import checkpointing

        torch.set_num_threads(max(1, threads))
        self.fam = model_family(family)
        if checkpoint_uri:
            local = checkpointing.local_copy(checkpoint_uri, storage_mod.StorageOptions(**(storage or {})))
            self.model, self.processor = checkpointing.load_for_inference(local, model_path, self.fam, dtype)
        else:
            self.model, self.processor = self.fam.load(model_path, dtype=dtype)
            self.model.eval()
        self.max_new_tokens = max_new_tokens
        self.decoding = dict(decoding or {})
        # grammar and confidences are implemented for PaliGemma's <loc> format
        self.detections = family == "paligemma" and (constrained or confidence)
        self.constrained = constrained and family == "paligemma"
        self.max_objects = max_objects or None
        if self.constrained:
            from raytrain.eval.decoding import PaliGemmaGrammars

            self.grammars = PaliGemmaGrammars(self.processor)

    def _generate(self, images, batch):
        prefixes = list(batch["prefix"])
        if not self.detections:
            texts = self.fam.generate(self.model, self.processor, images, prefixes, max_new_tokens=self.max_new_tokens, **self.decoding)
            return texts, None
        from raytrain.eval import decoding
        from raytrain.formats.grammar import query_labels

        if not all(str(t) in ("point", "detect") for t in batch["task"]):  # captions, masks: plain decoding
            return self.fam.generate(self.model, self.processor, images, prefixes, max_new_tokens=self.max_new_tokens, **self.decoding), None
        kinds = [self.fam.KIND_OF_TASK[str(t)] for t in batch["task"]]
        grammars = None
        if self.constrained:
            grammars = [self.grammars.for_labels(k, query_labels(str(q)), self.max_objects) for k, q in zip(kinds, batch["query"])]
        gens = decoding.generate_detections(self.model, self.processor, images, prefixes, grammars=grammars,
                                            max_new_tokens=self.max_new_tokens, **self.decoding)
        confs = [decoding.object_confidences(g.logprobs, g.token_ids, self.processor.tokenizer, k) for g, k in zip(gens, kinds)]
        return [g.text for g in gens], confs

    def __call__(self, batch: dict) -> dict:
        images = [Image.fromarray(a) for a in batch["image"]]
        texts, confs = self._generate(images, batch)
        out = _rows_from_predictions(batch, texts, self.fam, tuple(batch["image"].shape[1:3]), confs)
        out["worker"] = np.full(len(texts), os.getpid())  # which actor scored it (coverage checks)
        return out


def centre_baseline(batch: dict, *, mean_box_wh: tuple[float, float] | None, family: str = "paligemma") -> dict:
    """Blind baseline through the same render -> parse -> score path: always the image centre for
    points, a centred box of the training set's mean size for detection."""
    from raytrain.models import family as model_family

    fam = model_family(family)
    image_hw = tuple(batch["image"].shape[1:3])
    texts = []
    for i in range(len(batch["id"])):
        geom = _geometry(batch, i, image_hw)
        w, h = int(batch["width"][i]), int(batch["height"][i])
        label = str(batch["query"][i])
        task = str(batch["task"][i])
        if task == "point":
            obj = point_metrics.centre_point(w, h)
            obj = Point(obj.x, obj.y, label)
        elif task == "detect":
            b = box_metrics.centred_mean_box([mean_box_wh or (0.5, 0.5)], w, h)
            obj = Box(b.x1, b.y1, b.x2, b.y2, label)
        else:  # no blind baseline for captions / regions / masks: an empty answer (scored as invalid)
            texts.append("")
            continue
        texts.append(fam.render_example(task, label, *geom.target_frame([obj]), image_hw)[1])  # as the model would answer
    return _rows_from_predictions(batch, texts, fam, image_hw)


def aggregate(rows: list[dict]) -> dict:
    """Driver side: pointing metrics at the top level (seed 000's names), boxes under 'boxes'."""
    point_scores = [json.loads(r["score"]) for r in rows if r["task"] == "point"]
    box_scores = [json.loads(r["score"]) for r in rows if r["task"] == "detect"]
    out: dict = {}
    if point_scores:
        out.update(point_metrics.aggregate_pointing(point_scores))
    if box_scores:
        out["boxes"] = box_metrics.aggregate_boxes(box_scores)
    seg_scores = [json.loads(r["score"]) for r in rows if r["task"] == "segment"]
    if seg_scores:
        out["segmentation"] = seg_metrics.aggregate_segmentation(seg_scores)
    cap = [(r["id"], json.loads(r["score"])) for r in rows if r["task"] == "caption"]
    if cap:
        from raytrain.eval.metrics.captions import caption_metrics

        out["captions"] = caption_metrics({i: s["refs"] for i, s in cap}, {i: s["hyp"] for i, s in cap}, on_missing_java="skip")
        out["captions"]["valid_rate"] = sum(s["valid"] for _, s in cap) / len(cap)
    dense = [(r["id"], json.loads(r["score"])) for r in rows if r["task"] == "dense_caption"]
    if dense:
        from raytrain.eval.metrics.captions import dense_caption_metrics

        gt = [(i, Box(*g[:4]), g[4]) for i, s in dense for g in s["gt"]]
        pred = [(i, Box(*p[:4]), p[4], None) for i, s in dense for p in s["pred"]]
        out["dense_captions"] = dense_caption_metrics(gt, pred, on_missing_java="skip")
        out["dense_captions"]["valid_rate"] = sum(s["valid"] for _, s in dense) / len(dense)
    reasons: dict[str, int] = {}
    for r in rows:
        for reason, _ in json.loads(r["errors"]):
            reasons[reason] = reasons.get(reason, 0) + 1
    out["parse_errors"] = reasons
    out["examples"] = len(rows)
    return out


def run_predictions(examples, *, family: str, model_path: str, checkpoint_uri: str | None, storage: dict | None,
                    dtype: str, max_new_tokens: int, batch_size: int, num_actors: int, cpus_per_actor: float,
                    decoding: dict | None = None, constrained: bool = False, max_objects: int = 0, confidence: bool = False) -> list[dict]:
    """Every example of `examples` (a Ray Dataset from pipeline.examples_dataset) through a pool of
    `num_actors` predictors; returns the per-example rows."""
    # (launch.train.init_ray sets the DataContext so the whole pool starts before dispatching)
    # One block per batch: Ray Data hands whole blocks to actors, and a small split read from one
    # Parquet row group would otherwise be a single block served by a single actor.
    # (materialized: a lazy repartition hands all its blocks to the pool as ONE bundle, i.e. one
    # task on one actor; materialized blocks are dispatched one by one across the pool)
    ds = examples.repartition(target_num_rows_per_block=batch_size).materialize().map_batches(
        Predictor,
        fn_constructor_kwargs={
            "family": family,
            "model_path": model_path,
            "checkpoint_uri": checkpoint_uri,
            "storage": storage,
            "dtype": dtype,
            "max_new_tokens": max_new_tokens,
            "threads": max(1, int(cpus_per_actor)),
            "decoding": decoding,
            "constrained": constrained,
            "max_objects": max_objects,
            "confidence": confidence,
        },
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=num_actors,
        num_cpus=cpus_per_actor,
    )
    return ds.take_all()


def run_baseline(examples, *, mean_box_wh, batch_size: int, family: str = "paligemma") -> list[dict]:
    return examples.map_batches(centre_baseline, fn_kwargs={"mean_box_wh": mean_box_wh, "family": family}, batch_size=batch_size, batch_format="numpy").take_all()


def write_predictions(rows: list[dict], path_uri: str, opts=None) -> str:
    """Predictions as JSONL (one example per line)."""
    from raytrain import storage

    fs = storage.fsspec_fs(path_uri, opts)
    with fs.open(storage.strip_scheme(path_uri), "w") as f:
        for r in rows:
            f.write(json.dumps({k: (json.loads(r[k]) if k in ("objects", "errors", "score") else _plain(r[k])) for k in r}) + "\n")
    return path_uri


def _plain(v):
    return v.item() if isinstance(v, np.generic) else v


def mean_box_size(sizes: list[tuple[float, float]]) -> tuple[float, float] | None:
    if not sizes:
        return None
    a = np.asarray(sizes, dtype=np.float64)
    return float(a[:, 0].mean()), float(a[:, 1].mean())
