"""Full-split evaluation as a Ray Data job: an actor pool of predictors runs the predict path
(raytrain/predict.py: decode, parse, map to source pixels, confidences, score) over every example of
a split; the driver aggregates. Blind baselines go through the same parse and scoring, so all
columns of the table are comparable.

Per-example output rows (predict.score_rows): id, task, query, text, objects (parsed, JSON, with
confidences), errors (parse reasons, JSON), score (per-sample metrics, JSON).
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from raytrain import predict, tasks
from raytrain.eval.metrics import boxes as box_metrics
from raytrain.eval.metrics import pointing as point_metrics
from raytrain.eval.metrics import segmentation as seg_metrics
from raytrain.formats.annotations import Box, Point
from raytrain.predict import DecodeOptions

log = logging.getLogger(__name__)

class Predictor:
    """Ray Data actor: one model per actor, running the predict path (raytrain/predict.py) over
    numpy batches of examples: decode (greedy by default; grammar-constrained and with per-object
    confidences as `options` say), parse, map to source pixels, score."""

    def __init__(self, *, family: str, model_path: str, checkpoint_uri: str | None = None, storage: dict | None = None,
                 dtype: str = "float32", threads: int = 1, options: DecodeOptions | None = None):
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
        self.options = options or DecodeOptions()

    def __call__(self, batch: dict) -> dict:
        out = predict.predict_batch(self.model, self.processor, self.fam, batch, self.options)
        out["worker"] = np.full(len(out["id"]), os.getpid())  # which actor scored it (coverage checks)
        return out


def centre_baseline(batch: dict, *, mean_box_wh: tuple[float, float] | None, family: str) -> dict:
    """Blind baseline through the same render -> parse -> score path: the task registry's baseline
    (the image centre for points, a centred box of the training set's mean size for boxes)."""
    from raytrain.models import family as model_family

    fam = model_family(family)
    texts = []
    for i, geom in enumerate(predict.batch_geometries(batch)):
        w, h = int(batch["width"][i]), int(batch["height"][i])
        label = str(batch["query"][i])
        task = str(batch["task"][i])
        baseline = tasks.get(task).baseline
        if baseline == "centre_point":
            obj = point_metrics.centre_point(w, h)
            obj = Point(obj.x, obj.y, label)
        elif baseline == "centred_box":
            b = box_metrics.centred_mean_box([mean_box_wh or (0.5, 0.5)], w, h)
            obj = Box(b.x1, b.y1, b.x2, b.y2, label)
        else:  # no blind baseline for captions / regions / masks: an empty answer (scored as invalid)
            texts.append("")
            continue
        texts.append(fam.render_example(task, label, *geom.target_frame([obj]), (geom.out_h, geom.out_w))[1])  # as the model would answer
    return predict.texts_to_rows(fam, batch, texts)


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
                    dtype: str, batch_size: int, num_actors: int, cpus_per_actor: float, options: DecodeOptions) -> list[dict]:
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
            "threads": max(1, int(cpus_per_actor)),
            "options": options,
        },
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=num_actors,
        num_cpus=cpus_per_actor,
    )
    return ds.take_all()


def run_baseline(examples, *, mean_box_wh, batch_size: int, family: str) -> list[dict]:
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
