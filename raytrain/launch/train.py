"""Driver side of `raytrain train` (what `ray job submit` runs on the head node).

    connect/start Ray -> prepare data (synthetic default) -> model preset -> Ray Data datasets
    -> TorchTrainer(recipes.lora.train_fn_per_worker) -> evaluate trained / untrained / blind
    baseline on the held-out split -> metrics JSON (its path is the last line printed)

A rerun with the same experiment name and storage root resumes from the run's latest checkpoint
(Ray Train restores its checkpoint state from storage).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time

from raytrain import config as config_mod
from raytrain import storage
from raytrain.config import Experiment

log = logging.getLogger("raytrain.launch.train")


# ----------------------------------------------------------------------------------------------
# Ray


def runtime_env_vars() -> dict[str, str]:
    """Environment of every process of a raytrain job (the job's runtime_env)."""
    return {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "TOKENIZERS_PARALLELISM": "false",
        # Ray Train V2's controller collects worker reports when it polls them, every 2 s by default,
        # and a worker's result queue holds ONE report: a worker reporting more often than every
        # 2 s blocks in ray.train.report until the next poll. Measured on bench/train_overhead.py
        # (tiny model, a report every 25 steps = ~2 s): 0.61x the plain loop's steps/s at 2 s,
        # 1.04x at 0.5 s. An operator's own value wins.
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"),
    }


def runtime_env() -> dict:
    """The runtime_env of a raytrain job: its environment variables, and a setup hook that gives
    every worker process (Ray Train's dataset split coordinators run the training pipeline's
    executor) the process-level Ray Data setting of tune_ray_data_process."""
    return {"env_vars": runtime_env_vars(), "worker_process_setup_hook": "raytrain.launch.train.tune_ray_data_process"}


# How often Ray Data's streaming executor refreshes the CPUs it may use (Ray 2.60: every 1 s). Its
# first answer comes from Ray's autoscaling-coordinator actor, asynchronously, so for the first
# refresh interval of EVERY execution the limits are zero and one task runs alone: on 2 CPUs one
# slot idled for a second per pass (bench/data_pipeline.py, 20,000 rows: 1.42x -> ~1.55x the plain
# loop at 0.1 s). The refresh is a non-blocking RPC at most every 0.1 s per running execution.
LIMITS_REFRESH_S = 0.1


def tune_ray_data_process() -> None:
    """Process-level Ray Data setting (a class attribute, not a DataContext field, so it does not
    travel with a dataset): the executor's resource-limit refresh interval (LIMITS_REFRESH_S).
    A Ray without that attribute (another version) is left as it is."""
    try:
        from ray.data._internal.execution.resource_manager import ResourceManager
    except ImportError:
        return
    current = getattr(ResourceManager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S", None)
    if isinstance(current, (int, float)) and current > LIMITS_REFRESH_S:
        ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S = LIMITS_REFRESH_S


def configure_ray_data() -> None:
    """raytrain's Ray Data settings, on this process's DataContext (datasets built here carry it
    to their tasks) and, for this process, tune_ray_data_process (runtime_env's setup hook does
    that in the job's workers). init_ray applies them; so do the test fixture and the benches,
    which start Ray themselves."""
    import ray.data

    from raytrain.data import pipeline

    tune_ray_data_process()

    # Progress bars and per-dataset execution banners drown the job's own output.
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Evaluation pools: start every predictor before dispatching (otherwise the first actor to load
    # its model takes every queued batch of a small split), then keep two batches queued per actor
    # so it never waits for its next block (1 in flight: 90-102 samples/s on the eval bench's 2,000
    # examples; 4 in flight: 119-137).
    ctx.wait_for_min_actors_s = 600
    ctx.max_tasks_in_flight_per_actor = 2
    # Ray 2.60's Parquet datasource V2 starts 32 footer-reader actors per read and bin-packs row
    # groups into 128 MiB read tasks, so a split of a few thousand images became ONE read task and
    # one preprocessing task (one busy core). The V1 reader splits by file/row group and honours
    # override_num_blocks: measured 2.8-4.3x the images/s (bench/README.md, bottleneck 1).
    if hasattr(ctx, "use_datasource_v2"):
        ctx.use_datasource_v2 = False
    # Output blocks of 16 MiB rather than Ray's 128 MiB: a training task (read + prepare_block over
    # ~5 shards) then hands its examples over as it goes instead of in one block at its end
    # (bench/data_pipeline.py: first batch after 5.2 s -> see bench/README.md), and the object
    # store holds a few small blocks per task rather than one large one (pipeline.BLOCK_BYTES).
    ctx.target_max_block_size = pipeline.BLOCK_BYTES


def init_ray(cfg: Experiment):
    """Join the cluster named by ray.address / RAY_ADDRESS, or start a local one on 127.0.0.1, with
    the job environment (runtime_env) and raytrain's Ray Data settings (configure_ray_data)."""
    # Bind a local cluster to loopback rather than the machine's external address.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    configure_ray_data()
    if ray.is_initialized():
        return ray
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    env = runtime_env()
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        ray.init(
            address="local",  # a fresh local cluster, never silently joining another one
            num_cpus=cfg.ray.num_cpus,
            object_store_memory=cfg.ray.object_store_mb * 1024 * 1024,
            include_dashboard=False,
            runtime_env=env,
        )
    return ray


def storage_opts(cfg: Experiment) -> storage.StorageOptions:
    return storage.StorageOptions(endpoint_url=cfg.storage.endpoint_url, region=cfg.storage.region)


def data_uri(cfg: Experiment) -> str:
    return cfg.data.uri or storage.join(cfg.storage.root, "data", cfg.name)


def runs_root(cfg: Experiment) -> str:
    """Ray Train's storage_path: local runs get an absolute path (Ray requires it)."""
    root = storage.join(cfg.storage.root, "runs")
    return root if storage.is_s3(root) else os.path.abspath(root)


def history_uri(cfg: Experiment) -> str:
    return storage.join(storage.run_dir(runs_root(cfg), cfg.name), "history.jsonl")


# ----------------------------------------------------------------------------------------------
# steps


def prepare_data(cfg: Experiment) -> str:
    """Synthetic source: generate shards once (idempotent); 'shards': check they exist."""
    from raytrain.data import shards

    uri = data_uri(cfg)
    opts = storage_opts(cfg)
    if cfg.data.source == "synthetic":
        report = shards.prepare_synthetic(
            uri,
            n=cfg.data.num_images,
            seed=cfg.data.seed,
            image_size=cfg.data.image_size,
            shapes_per_image=cfg.data.shapes_per_image,
            splits=cfg.data.splits,
            rows_per_shard=cfg.data.rows_per_shard,
            opts=opts,
        )
        print(f"data: {uri}\n{report.format_table()}", flush=True)
    elif cfg.data.source == "shards":
        if not shards.shard_paths(uri, "train", opts):
            raise FileNotFoundError(f"data.source=shards but no train shards under {uri} (run `raytrain prepare`)")
    else:
        # "<format>:<path>": convert once (Ray Data job; reused when its parameters are unchanged)
        from raytrain.launch import prepare as launch_prepare

        launch_prepare.prepare(launch_prepare.PrepareConfig.from_experiment(cfg))
    return uri


def model_path(cfg: Experiment) -> str:
    from raytrain.models import family

    return family(cfg.model.spec).resolve(cfg.model.name_or_path)


def fit(cfg: Experiment, uri: str, base_path: str, counter):
    """Train with TorchTrainer; returns the Ray Train Result."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from raytrain.data import pipeline, preprocess
    from raytrain.models import family
    from raytrain.recipes import lora, zero
    from raytrain.training.metrics import HistoryCallback

    fam = family(cfg.model.spec)
    processor = fam.load_processor(base_path)
    train_ds = pipeline.train_dataset(
        uri,
        "train",
        tasks=cfg.data.tasks,
        model_path=base_path,
        image_hw=fam.image_size(processor),
        family=cfg.model.spec,
        max_len=cfg.data.max_seq_len,
        allow_convert=cfg.data.allow_convert,
        opts=storage_opts(cfg),
        counter=counter,
        preprocess=preprocess.from_data_config(cfg.data),
    )
    if cfg.data.cache_preprocessed:
        train_ds = train_ds.materialize()  # tokenized once; every epoch re-reads the object store
    if cfg.train.epochs > 0:
        # steps from epochs: optimizer steps that cover the (post-filter) training examples
        per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.scale.num_workers
        n = train_ds.count()
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=max(1, math.ceil(n * cfg.train.epochs / per_step))))
        print(f"train.epochs={cfg.train.epochs}: {n} examples / {per_step} per step -> train.steps={cfg.train.steps}", flush=True)

    recipe = zero if cfg.train.strategy in zero.STAGES else lora  # one recipe per strategy
    runs = runs_root(cfg)
    fs, fs_path = storage.pyarrow_fs(runs, storage_opts(cfg))
    trainer = TorchTrainer(
        recipe.train_fn_per_worker,
        train_loop_config={"experiment": cfg.to_dict(), "model_path": base_path, "data_uri": uri},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scale.num_workers,
            use_gpu=cfg.scale.use_gpu,
            resources_per_worker={"CPU": cfg.scale.cpus_per_worker, **cfg.scale.resources_per_worker},
            placement_strategy=cfg.scale.placement_strategy,
            accelerator_type=cfg.scale.accelerator_type,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            # with an explicit filesystem Ray wants the path without its scheme ("bucket/key")
            storage_path=fs_path if storage.is_s3(runs) else runs,
            storage_filesystem=fs if storage.is_s3(runs) else None,
            failure_config=ray.train.FailureConfig(max_failures=cfg.scale.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=[HistoryCallback(history_uri(cfg), storage_opts(cfg))],
        ),
        datasets={"train": train_ds},
    )
    return trainer.fit()


def checkpoint_uri(result) -> str:
    """URI of the result's checkpoint (local path, or s3://bucket/key for S3 storage)."""
    ckpt = result.checkpoint
    if ckpt is None:
        raise RuntimeError("training finished without a checkpoint")
    fs_type = type(ckpt.filesystem).__name__
    return ("s3://" + ckpt.path) if "S3" in fs_type else ckpt.path


def evaluate(cfg: Experiment, uri: str, base_path: str, ckpt_uri: str | None, counter) -> tuple[dict, list[dict]]:
    """Metrics for trained / untrained / centre_baseline on the eval split; plus trained rows."""
    from raytrain.data import pipeline, preprocess
    from raytrain.eval import batch as eval_batch
    from raytrain.models import family
    from raytrain.predict import DecodeOptions

    fam = family(cfg.model.spec)
    processor = fam.load_processor(base_path)
    # the checkpoint's recorded preprocessing wins over the config (a mismatch is logged)
    prep = preprocess.from_data_config(cfg.data)
    if ckpt_uri:
        from raytrain.training import checkpointing

        prep = preprocess.resolve_recorded(checkpointing.recorded_preprocess(ckpt_uri, storage_opts(cfg)), prep, ckpt_uri)
    print(f"eval preprocessing: {prep.to_dict()}", flush=True)
    examples = pipeline.examples_dataset(
        uri,
        cfg.eval.split,
        tasks=cfg.data.tasks,
        image_hw=fam.image_size(processor),
        family=cfg.model.spec,
        allow_convert=cfg.data.allow_convert,
        opts=storage_opts(cfg),
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
        options=DecodeOptions(max_new_tokens=cfg.eval.max_new_tokens, constrained=cfg.eval.constrained,
                              confidence=cfg.eval.confidence, max_objects=cfg.eval.max_objects, generate=dict(cfg.eval.decoding)),
    )
    results: dict = {}
    t = time.perf_counter()
    trained_rows = eval_batch.run_predictions(examples, checkpoint_uri=ckpt_uri, **common)
    results["trained"] = eval_batch.aggregate(trained_rows)
    results["trained"]["eval_seconds"] = round(time.perf_counter() - t, 2)
    if cfg.eval.baselines:
        results["untrained"] = eval_batch.aggregate(eval_batch.run_predictions(examples, checkpoint_uri=None, **common))
        mean_wh = eval_batch.mean_box_size(pipeline.train_box_sizes(uri, "train", storage_opts(cfg)))
        results["centre_baseline"] = eval_batch.aggregate(eval_batch.run_baseline(examples, mean_box_wh=mean_wh, batch_size=cfg.eval.batch_size, family=cfg.model.spec))
    return results, trained_rows


# ----------------------------------------------------------------------------------------------
# entry point


def main(cfg: Experiment) -> str:
    """Run the whole job; returns the metrics JSON URI (also printed as the last line)."""
    from raytrain.data import pipeline
    from raytrain.eval import batch as eval_batch
    from raytrain.eval.metrics.table import format_table

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.perf_counter()
    init_ray(cfg)
    uri = prepare_data(cfg)
    base_path = model_path(cfg)
    counter = pipeline.drop_counter()

    result = fit(cfg, uri, base_path, counter)
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}")
    ckpt = checkpoint_uri(result)
    if cfg.train.strategy in ("zero2", "zero3"):
        from raytrain.launch import consolidate

        # ZeRO shards -> <ckpt>/model, the plain HF layout evaluation loads
        consolidate.consolidate(ckpt, storage.join(ckpt, "model"), base_path, opts=storage_opts(cfg))
    train_seconds = time.perf_counter() - t0
    print(f"checkpoint: {ckpt}", flush=True)

    metrics, rows = evaluate(cfg, uri, base_path, ckpt, counter)
    run = storage.run_dir(runs_root(cfg), cfg.name)
    eval_dir = storage.join(run, "eval")
    opts = storage_opts(cfg)
    if not storage.is_s3(eval_dir):
        os.makedirs(eval_dir, exist_ok=True)
    eval_batch.write_predictions(rows, storage.join(eval_dir, f"predictions_{cfg.eval.split}.jsonl"), opts)

    metrics["run"] = {
        "name": cfg.name,
        "checkpoint": ckpt,
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

    cols = {k: metrics[k] for k in ("trained", "untrained", "centre_baseline") if k in metrics}
    keys = ["n", "valid_rate", "mean_norm_distance", "median_norm_distance", "mean_distance", "median_distance",
            "std_distance", "mse_x", "mse_y", "mae_x", "mae_y", "success_rate", "success_rate_all"]
    print(f"\npointing ({cfg.eval.split} split, distances in source pixels):")
    print(format_table(cols, keys))
    box_cols = {k: v["boxes"] for k, v in cols.items() if "boxes" in v}
    if box_cols:
        print(f"\nboxes ({cfg.eval.split} split, IoU 0.5):")
        print(format_table(box_cols))
    print(f"\nfinal step {metrics['run']['final_step']}, {metrics['run']['seconds_total']} s total")
    print(json.dumps({"data_counts": metrics["run"]["data_counts"]}))
    print(out, flush=True)
    return out


if __name__ == "__main__":
    import sys

    main(config_mod.load(sys.argv[1] if len(sys.argv) > 1 else None, sys.argv[2:]))
