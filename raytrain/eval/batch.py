"""Full-split evaluation as a Ray Data job: an actor pool of predictors runs the predict path
(raytrain/predict.py: decode, parse, map to source pixels, confidences, score) over every example of
a split, and a writer stage stores each block of predictions as a JSONL part in the run's eval
directory (local or S3) as soon as it is produced. Nothing is collected on the driver; it reads the
parts back in order (eval/streaming.py). Blind baselines go through the same parse and scoring, so
all columns of the table are comparable.

Per-example output rows (predict.score_rows): id, task, query, text, objects (parsed, JSON, with
confidences), errors (parse reasons, JSON), score (per-sample metrics, JSON), targets, width,
height; plus `prompt` (the text the model was given), `worker` (the actor's pid) and `device`
(where its model ran).

Predictors reserve `gpus_per_actor` GPUs (fractions share one) and put the model on the actor's GPU
when CUDA is visible there (bfloat16 by default), else on CPU (float32). Each actor call takes up to
`bucket_batches` batches, orders them by task and prompt length (length bucketing) and decodes them
`batch_size` at a time.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from raytrain import predict, tasks
from raytrain.eval.aggregate import aggregate  # noqa: F401  (re-exported: validation and benches score rows with it)
from raytrain.eval.metrics import boxes as box_metrics
from raytrain.eval.metrics import pointing as point_metrics
from raytrain.eval.parts import JSON_COLUMNS, row_json, write_part  # noqa: F401  (the writer stage, light to import)
from raytrain.formats.annotations import Box, Point
from raytrain.predict import DecodeOptions

log = logging.getLogger(__name__)


class Predictor:
    """Ray Data actor: one model per actor, running the predict path (raytrain/predict.py) over
    numpy batches of examples: decode (greedy by default; grammar-constrained and with per-object
    confidences as `options` say), parse, map to source pixels, score. `prompt`: a prompt that
    replaces the family's ("{query}" = the example's label); `clip_path`: local CLIP weights that
    add CLIPScore to caption examples' scores."""

    def __init__(self, *, family: str, model_path: str, checkpoint_uri: str | None = None, storage: dict | None = None,
                 dtype: str = "auto", threads: int = 1, options: DecodeOptions | None = None, batch_size: int = 64,
                 clip_path: str = "", prompt: str | None = None):
        import torch

        from raytrain import storage as storage_mod
        from raytrain.models import family as model_family
        from raytrain.training import checkpointing

        torch.set_num_threads(max(1, threads))
        self.fam = model_family(family)
        self.device, self.dtype = predict.inference_device(dtype)
        if checkpoint_uri:
            # an S3 checkpoint's download is removed once loaded (the weights are in memory by then)
            with checkpointing.local_checkpoint(checkpoint_uri, storage_mod.StorageOptions(**(storage or {}))) as local:
                self.model, self.processor = checkpointing.load_for_inference(local, model_path, self.fam, self.dtype)
        else:
            self.model, self.processor = self.fam.load(model_path, dtype=self.dtype)
        self.model.to(self.device).eval()
        self.options = options or DecodeOptions()
        self.batch_size = max(1, int(batch_size))
        self.prompt = prompt
        self.clip = None
        if clip_path:
            from raytrain.eval.metrics.clipscore import ClipScore

            self.clip = ClipScore(clip_path, self.device)

    def __call__(self, batch: dict) -> dict:
        if self.prompt is not None:
            batch = dict(batch, prefix=np.array([self.prompt.format(query=q) if "{query}" in self.prompt else self.prompt
                                                 for q in batch["query"]], dtype=object))
        n = len(batch["id"])
        order = predict.bucket_order(batch["task"], predict.prompt_lengths(self.processor, batch["prefix"])) if n > self.batch_size else list(range(n))
        parts = []
        for start in range(0, n, self.batch_size):
            idx = np.asarray(order[start: start + self.batch_size])
            sub = {k: v[idx] for k, v in batch.items()}
            if self.options.generate.get("do_sample"):
                predict.seed_everything(predict.batch_seed(self.options.seed, str(sub["id"][0])))
            out = predict.predict_batch(self.model, self.processor, self.fam, sub, self.options)
            out["prompt"] = np.asarray(sub["prefix"], dtype=object)  # what the model was asked (grids vary it)
            if self.clip is not None:
                self._clip_scores(sub, out)
            parts.append(out)
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else predict.score_rows(batch, [])
        out["worker"] = np.full(len(out["id"]), os.getpid())  # which actor scored it (coverage checks)
        out["device"] = np.full(len(out["id"]), str(self.device), dtype=object)  # cuda or cpu (the GPU fallback shows here)
        return out

    def _clip_scores(self, batch: dict, out: dict) -> None:
        """CLIPScore of each caption example's answer against the image the model saw, into its
        score (an empty answer scores 0)."""
        from PIL import Image

        idx = [i for i, t in enumerate(out["task"]) if tasks.get(str(t)).metrics == "captions"]
        scores = [json.loads(out["score"][i]) for i in idx]
        said = [k for k, s in enumerate(scores) if s.get("hyp")]
        values = self.clip.scores([Image.fromarray(np.asarray(batch["image"][idx[k]], dtype=np.uint8)) for k in said],
                                  [scores[k]["hyp"] for k in said])
        for s in scores:
            s["clip_score"] = 0.0
        for k, v in zip(said, values):
            scores[k]["clip_score"] = v
        for i, s in zip(idx, scores):
            out["score"][i] = json.dumps(s)


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


# ---------------------------------------------------------------------------------------------- the job


def block_rows(n_examples: int | None, batch_size: int, bucket_batches: int, actors: int) -> int:
    """Rows per block handed to one predictor call: `bucket_batches` batches, but few enough that a
    split of `n_examples` still gives every actor at least two blocks (load balance on small splits)."""
    rows = batch_size * max(1, bucket_batches)
    if n_examples:
        fair = (n_examples // max(1, 2 * actors)) // batch_size * batch_size
        rows = max(batch_size, min(rows, fair))
    return rows


def predictions_dataset(examples, *, family: str, model_path: str, checkpoint_uri: str | None, storage: dict | None,
                        dtype: str, batch_size: int, pool, cpus_per_actor: float, gpus_per_actor: float,
                        options: DecodeOptions, rows_per_block: int, clip_path: str = "", prompt: str | None = None,
                        accelerator_type: str | None = None):
    """The lazy Ray Dataset of prediction rows: `examples` (pipeline.examples_dataset) through a
    pool of predictors (`pool`: n actors, or (min, max) for an autoscaling pool)."""
    from ray.data import ActorPoolStrategy

    # A streaming repartition into blocks of `rows_per_block`, so the pool's actors share even a
    # small split (a split read from one Parquet row group arrives as one big block).
    return examples.repartition(target_num_rows_per_block=rows_per_block).map_batches(
        Predictor,
        fn_constructor_kwargs={
            "family": family, "model_path": model_path, "checkpoint_uri": checkpoint_uri, "storage": storage,
            "dtype": dtype, "threads": max(1, int(cpus_per_actor)), "options": options, "batch_size": batch_size,
            "clip_path": clip_path, "prompt": prompt,
        },
        batch_size=rows_per_block,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=pool) if isinstance(pool, int) else ActorPoolStrategy(min_size=pool[0], max_size=pool[1]),
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor or None,
        **({"accelerator_type": accelerator_type} if gpus_per_actor and accelerator_type else {}),
    )


def baseline_dataset(examples, *, mean_box_wh, batch_size: int, family: str):
    return examples.map_batches(centre_baseline, fn_kwargs={"mean_box_wh": mean_box_wh, "family": family},
                                batch_size=batch_size, batch_format="numpy")


def write_predictions_job(predictions, parts_uri: str, storage: dict | None = None) -> list[tuple[str, int]]:
    """Run the job: every block of `predictions` written as a JSONL part under `parts_uri` by the
    writer stage; returns (part URI, rows) per part, in completion order (one small row per block)."""
    written = predictions.map_batches(write_part, fn_kwargs={"parts_uri": parts_uri, "storage": storage},
                                      batch_size=None, batch_format="numpy", num_cpus=0.25)
    return [(str(r["part"]), int(r["rows"])) for r in written.iter_rows()]


def write_predictions(rows: list[dict], path_uri: str, opts=None) -> str:
    """A list of prediction rows as one predictions JSONL file (tests, small tools; `raytrain eval`
    streams through eval/streaming.py instead)."""
    from raytrain import storage as storage_mod

    with storage_mod.fsspec_fs(path_uri, opts).open(storage_mod.strip_scheme(path_uri), "w", encoding="utf-8") as f:
        for r in rows:
            f.write(row_json({k: [v] for k, v in r.items()}, 0) + "\n")
    return path_uri


def mean_box_size(sizes: list[tuple[float, float]]) -> tuple[float, float] | None:
    if not sizes:
        return None
    a = np.asarray(sizes, dtype=np.float64)
    return float(a[:, 0].mean()), float(a[:, 1].mean())
