"""Driver side of `raytrain eval`: evaluate a checkpoint on a whole split with a pool of predictor
actors (Ray Data), write predictions (JSONL, COCO results JSON) and metrics JSON.

    raytrain eval --config jobs/tiny/shapes.yaml [eval.checkpoint=<uri>] [eval.split=val]

Without eval.checkpoint the run's latest checkpoint (by step) is used. `evaluate` is also the last
step of `raytrain train` (trained / untrained / blind baseline on the held-out split).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import time

from raytrain import config as config_mod
from raytrain import storage
from raytrain.config import Experiment
from raytrain.launch import job
from raytrain.launch.ray_runtime import init_ray

log = logging.getLogger("raytrain.launch.eval")


def latest_checkpoint(cfg: Experiment) -> str:
    """URI of the highest-step checkpoint under the run directory."""
    run = storage.run_dir(job.runs_root(cfg), cfg.name)
    opts = job.storage_opts(cfg)
    fs = storage.fsspec_fs(run, opts)
    root = storage.strip_scheme(run)
    best, best_step = None, -1
    for d in fs.glob(posixpath.join(root, "checkpoint_*")):
        state = posixpath.join(d, "state.json")
        if not fs.exists(state):
            continue  # an interrupted upload: not a usable checkpoint
        step = json.loads(fs.cat(state))["step"]
        if step > best_step:
            best, best_step = d, step
    if best is None:
        raise FileNotFoundError(f"no checkpoint under {run}")
    return ("s3://" + best) if storage.is_s3(run) else best


def evaluate(cfg: Experiment, uri: str, base_path: str, ckpt_uri: str | None, counter) -> tuple[dict, list[dict]]:
    """Metrics for trained / untrained / centre_baseline on the eval split; plus trained rows."""
    from raytrain.data import pipeline, preprocess
    from raytrain.eval import batch as eval_batch
    from raytrain.models import family

    fam = family(cfg.model.spec)
    processor = fam.load_processor(base_path)
    # the checkpoint's recorded preprocessing wins over the config (a mismatch is logged)
    prep = cfg.data.preprocess
    if ckpt_uri:
        from raytrain.training import checkpointing

        prep = preprocess.resolve_recorded(checkpointing.recorded_preprocess(ckpt_uri, job.storage_opts(cfg)), prep, ckpt_uri)
    print(f"eval preprocessing: {prep.to_dict()}", flush=True)
    examples = pipeline.examples_dataset(
        uri,
        cfg.eval.split,
        tasks=cfg.data.tasks,
        image_hw=preprocess.frame_for(fam, processor, prep),
        family=cfg.model.spec,
        allow_convert=cfg.data.allow_convert,
        opts=job.storage_opts(cfg),
        counter=counter,
        preprocess=prep,
    ).materialize()
    common = dict(
        family=cfg.model.spec,
        model_path=base_path,
        storage={"endpoint_url": cfg.storage.endpoint_url, "region": cfg.storage.region},
        dtype=cfg.model.dtype,
        batch_size=cfg.eval.batch_size,
        num_actors=cfg.eval.num_actors,
        cpus_per_actor=cfg.eval.cpus_per_actor,
        options=decode_options(cfg),
    )
    results: dict = {}
    t = time.perf_counter()
    trained_rows = eval_batch.run_predictions(examples, checkpoint_uri=ckpt_uri, **common)
    results["trained"] = eval_batch.aggregate(trained_rows)
    results["trained"]["eval_seconds"] = round(time.perf_counter() - t, 2)
    if cfg.eval.baselines:
        results["untrained"] = eval_batch.aggregate(eval_batch.run_predictions(examples, checkpoint_uri=None, **common))
        mean_wh = eval_batch.mean_box_size(pipeline.train_box_sizes(uri, "train", job.storage_opts(cfg)))
        results["centre_baseline"] = eval_batch.aggregate(eval_batch.run_baseline(examples, mean_box_wh=mean_wh, batch_size=cfg.eval.batch_size, family=cfg.model.spec))
    return results, trained_rows


def decode_options(cfg: Experiment):
    """The predict path's decoding options from the job's `eval` section (raytrain/predict.py)."""
    from raytrain.predict import DecodeOptions

    return DecodeOptions(max_new_tokens=cfg.eval.max_new_tokens, constrained=cfg.eval.constrained, confidence=cfg.eval.confidence,
                         max_objects=cfg.eval.max_objects, generate=dict(cfg.eval.decoding))


def save_predictions(cfg: Experiment, rows: list[dict]) -> str:
    """The predictions as `<run>/eval/predictions_<split>.jsonl` (local or S3); returns that eval dir."""
    from raytrain.eval import batch as eval_batch

    out_dir = storage.join(storage.run_dir(job.runs_root(cfg), cfg.name), "eval")
    if not storage.is_s3(out_dir):
        os.makedirs(out_dir, exist_ok=True)
    eval_batch.write_predictions(rows, storage.join(out_dir, f"predictions_{cfg.eval.split}.jsonl"), job.storage_opts(cfg))
    return out_dir


def coco_results(rows: list[dict]) -> list[dict]:
    """Detection predictions in COCO results format (image ids = example ids, category = label).
    Scores are 1.0 until per-object confidences are produced by the predictor."""
    out = []
    for r in rows:
        if r["task"] != "detect":
            continue
        for o in json.loads(r["objects"]):
            if o.get("type") != "box":
                continue
            out.append({"image_id": r["id"], "category": o.get("label", ""), "score": o.get("score", 1.0),
                        "bbox": [o["x1"], o["y1"], o["x2"] - o["x1"], o["y2"] - o["y1"]]})
    return out


def main(cfg: Experiment) -> str:
    from raytrain.data import pipeline
    from raytrain.eval.metrics.table import format_table

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    init_ray(cfg.ray)
    uri = job.data_uri(cfg)
    base_path = job.model_path(cfg)
    ckpt = cfg.eval.checkpoint or latest_checkpoint(cfg)
    print(f"evaluating {ckpt} on split {cfg.eval.split} of {uri}", flush=True)
    counter = pipeline.drop_counter()
    metrics, rows = evaluate(cfg, uri, base_path, ckpt, counter)
    opts = job.storage_opts(cfg)
    out_dir = save_predictions(cfg, rows)
    storage.write_json(storage.join(out_dir, f"coco_results_{cfg.eval.split}.json"), coco_results(rows), opts)
    metrics["run"] = {"checkpoint": ckpt, "data": uri, "split": cfg.eval.split, "data_counts": pipeline.drop_counts(counter)}
    out = storage.write_json(storage.join(out_dir, f"metrics_{cfg.eval.split}.json"), metrics, opts)
    cols = {k: metrics[k] for k in ("trained", "untrained", "centre_baseline") if k in metrics}
    print(format_table(cols, ["n", "valid_rate", "mean_norm_distance", "median_norm_distance", "success_rate", "success_rate_all"]))
    print(out, flush=True)
    return out


if __name__ == "__main__":
    import sys

    main(config_mod.load(sys.argv[1] if len(sys.argv) > 1 else None, sys.argv[2:]))
