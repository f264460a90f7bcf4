"""Driver side of `raytrain train` (what `ray job submit` runs on the head node).

    connect/start Ray (ray_runtime) -> prepare data (prepare.prepare_data; synthetic default) ->
    model preset -> tokenized train split -> TorchTrainer (trainer.build_trainer: the recipe of
    train.strategy on scale's workers) -> [ZeRO: consolidate the shards] -> evaluate trained /
    untrained / blind baseline on the held-out split (eval.evaluate) -> metrics JSON (its path is
    the last line printed)

A rerun with the same experiment name and storage root resumes from the run's latest checkpoint
(Ray Train restores its checkpoint state from storage).
"""

from __future__ import annotations

import json
import logging
import time

from raytrain import config as config_mod
from raytrain import storage
from raytrain.config import ZERO_STAGES, Experiment
from raytrain.launch import console, job, trainer, tracking
from raytrain.launch.eval import checkpoint_choice, decode_options, evaluate, print_tables
from raytrain.launch.prepare import prepare_data
from raytrain.launch.ray_runtime import init_ray

log = logging.getLogger("raytrain.launch.train")


def fit(cfg: Experiment, uri: str, base_path: str, counter, tracker: tracking.Tracker | None = None):
    """Train with the TorchTrainer of launch/trainer.py (the job's recipe on its scale); returns the
    Ray Train Result. Every report reaches this process as it happens (console.ReportStream): a
    progress line, and the tracker's metrics."""
    from raytrain.training.metrics import HistoryCallback

    train_ds = trainer.train_dataset(cfg, uri, base_path, counter)
    cfg = trainer.with_epoch_steps(cfg, train_ds, base_path)
    sinks = [console.TrainProgress(cfg.train.steps), tracker.log_report if tracker else None]
    with console.ReportStream(sinks) as reports:
        return trainer.build_trainer(
            cfg, model_path=base_path, data_uri=uri, datasets={"train": train_ds}, name=cfg.name, runs_root=job.runs_root(cfg),
            callbacks=[HistoryCallback(job.history_uri(cfg), job.storage_opts(cfg)), reports.callback()],
        ).fit()


# ----------------------------------------------------------------------------------------------
# entry point


def main(cfg: Experiment) -> str:
    """Run the whole job; returns the metrics JSON URI (also printed as the last line). With track: on,
    the run's tracking run is marked finished, or failed when anything raises."""
    from raytrain.data import pipeline

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.perf_counter()
    decode_options(cfg)  # the evaluation after training decodes with these: a bad setting fails now, not hours later
    init_ray(cfg.ray)
    uri = prepare_data(cfg)
    base_path = job.model_path(cfg)
    counter = pipeline.drop_counter()
    run = storage.run_dir(job.runs_root(cfg), cfg.name)
    tracker = tracking.open_run(cfg, run, name=cfg.name)  # None unless track: is on
    try:
        out = _train_and_evaluate(cfg, uri, base_path, counter, run, tracker, t0)
    except BaseException:
        if tracker is not None:
            tracker.finish(ok=False)
        raise
    if tracker is not None:
        tracker.finish(ok=True)
    return out


def _train_and_evaluate(cfg: Experiment, uri: str, base_path: str, counter, run: str, tracker, t0: float) -> str:
    from raytrain.data import pipeline

    result = fit(cfg, uri, base_path, counter, tracker)
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}")
    # the run's result: its last checkpoint, or the best by train.select_checkpoint (what `raytrain eval` picks too)
    choice = {"checkpoint": job.checkpoint_uri(result), "select_checkpoint": "last"}
    if cfg.train.select_checkpoint != "last":
        choice = checkpoint_choice(cfg)
    ckpt = choice["checkpoint"]
    if cfg.train.strategy in ZERO_STAGES:
        from raytrain.launch import consolidate

        # ZeRO shards -> <ckpt>/model, the plain HF layout evaluation loads
        consolidate.consolidate(ckpt, storage.join(ckpt, "model"), base_path, opts=job.storage_opts(cfg))
    train_seconds = time.perf_counter() - t0
    print(f"checkpoint: {ckpt}", flush=True)

    metrics, eval_dir = evaluate(cfg, uri, base_path, ckpt, counter)
    opts = job.storage_opts(cfg)

    metrics["run"] = {
        "name": cfg.name,
        "checkpoint": ckpt,
        "checkpoint_choice": choice,
        "final_step": (result.metrics or {}).get("step"),
        "train_metrics": result.metrics,
        "data": uri,
        "split": cfg.eval.split,
        "data_counts": pipeline.drop_counts(counter),
        "seconds_to_checkpoint": round(train_seconds, 1),
        "seconds_total": round(time.perf_counter() - t0, 1),
        "config": cfg.to_dict(),
    }
    out = storage.write_json(storage.join(eval_dir, "metrics.json"), metrics, opts)
    if not storage.is_s3(run):
        from raytrain.eval.report import build_report

        print(f"report: {build_report(run, uri, storage.join(run, 'report'), opts, split=cfg.eval.split)}", flush=True)
    tracking.log_run_outputs(tracker, cfg, run, metrics, split=cfg.eval.split, step=metrics["run"]["final_step"])

    print_tables(cfg, metrics)
    print(f"\nfinal step {metrics['run']['final_step']}, {metrics['run']['seconds_total']} s total")
    print(json.dumps({"data_counts": metrics["run"]["data_counts"]}))
    print(out, flush=True)
    return out


if __name__ == "__main__":
    import sys

    main(config_mod.load(sys.argv[1] if len(sys.argv) > 1 else None, sys.argv[2:]))
