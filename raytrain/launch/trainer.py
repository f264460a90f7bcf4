"""The one TorchTrainer builder: `raytrain train` and every `raytrain tune` trial fit what it builds.

    recipe(train.strategy)        full | lora -> recipes/ddp.py, zero2 | zero3 -> recipes/zero.py
    scaling_config(scale)         workers, CPUs + custom resources per worker, placement, GPU (type)
    build_trainer(cfg, ...)       TorchTrainer(recipe, the experiment, ScalingConfig, RunConfig)
    train_dataset(cfg, ...)       the tokenized train.splits, one dataset (materialized once when configured)
    epoch_dataset(cfg, ds, ...)   the rows of each epoch (data/packing.py: packed, resumed epochs filtered)
    with_epoch_steps(cfg, ds)     train.epochs > 0 -> train.steps
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from types import ModuleType

from raytrain import storage
from raytrain.config import ZERO_STAGES, Experiment, ScaleConfig
from raytrain.launch import job


def recipe(strategy: str) -> ModuleType:
    """The recipe module that runs `strategy` (each has train_fn_per_worker)."""
    name = "zero" if strategy in ZERO_STAGES else "ddp"
    return importlib.import_module(f"raytrain.recipes.{name}")


def scaling_config(scale: ScaleConfig):
    import ray.train

    return ray.train.ScalingConfig(
        num_workers=scale.num_workers,
        use_gpu=scale.use_gpu,
        resources_per_worker={"CPU": scale.cpus_per_worker, **scale.resources_per_worker},
        placement_strategy=scale.placement_strategy,
        accelerator_type=scale.accelerator_type,
    )


def build_trainer(cfg: Experiment, *, model_path: str, data_uri: str, datasets: dict, name: str, runs_root: str, callbacks: list):
    """A TorchTrainer running cfg's recipe on cfg.scale's workers, its run `name` under `runs_root`
    (local path or s3://; a rerun of the same name resumes from the run's latest checkpoint).
    The train split gets this run's per-epoch stage (data/packing.py: a resumed epoch leaves out
    what its checkpoint trained on, with this run's own EpochFilter; data.packing packs rows)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from raytrain.data import packing

    position = packing.epoch_filter()
    datasets = dict(datasets, train=epoch_dataset(cfg, datasets["train"], model_path, position))
    s3 = storage.is_s3(runs_root)
    fs, fs_path = storage.pyarrow_fs(runs_root, job.storage_opts(cfg))
    return TorchTrainer(
        # looked up at call time: a wrapper patched onto the recipe module is what runs
        recipe(cfg.train.strategy).train_fn_per_worker,
        train_loop_config={"experiment": cfg.to_dict(), "model_path": model_path, "data_uri": data_uri, "data_position": position},
        scaling_config=scaling_config(cfg.scale),
        run_config=ray.train.RunConfig(
            name=name,
            # with an explicit filesystem Ray wants the path without its scheme ("bucket/key")
            storage_path=fs_path if s3 else runs_root,
            storage_filesystem=fs if s3 else None,
            failure_config=ray.train.FailureConfig(max_failures=cfg.scale.max_failures),
            checkpoint_config=checkpoint_config(cfg),
            callbacks=callbacks,
        ),
        datasets=datasets,
    )


def checkpoint_config(cfg: Experiment):
    """Which checkpoints Ray Train keeps: the train.keep_checkpoints latest, or with
    train.select_checkpoint the best by that metric (every checkpoint then carries it: loop.due
    validates each one), Ray always keeping the latest too, to resume from."""
    import ray.train

    t = cfg.train
    if t.select_checkpoint == "last":
        return ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints)
    return ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints, checkpoint_score_attribute=t.select_checkpoint,
                                      checkpoint_score_order=t.select_mode)


def train_dataset(cfg: Experiment, uri: str, base_path: str, counter):
    """The tokenized examples of train.splits (Ray Data; several splits are one union dataset, seed
    003 trained on train + val), materialized in the object store once when data.cache_preprocessed
    (every epoch, and every Tune trial, then re-reads it). Drop counts stay per split."""
    from raytrain.data import pipeline, preprocess

    fam = cfg.model_family()
    processor = fam.load_processor(base_path)
    parts = [
        pipeline.train_dataset(
            uri,
            split,
            tasks=cfg.data.tasks,
            model_path=base_path,
            image_hw=preprocess.frame_for(fam, processor, cfg.data.preprocess),
            family=fam,
            max_len=cfg.data.max_seq_len,
            allow_convert=cfg.data.allow_convert,
            opts=job.storage_opts(cfg),
            counter=counter,
            preprocess=cfg.data.preprocess,
        )
        for split in cfg.train.splits
    ]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return ds.materialize() if cfg.data.cache_preprocessed else ds


def epoch_dataset(cfg: Experiment, train_ds, model_path: str, position=None):
    """The rows training iterates each epoch: the tokenized split, packed when data.packing > 0."""
    from raytrain.data import packing

    return packing.epoch_dataset(train_ds, family=cfg.model.spec, model_path=model_path, packing=cfg.data.packing, position=position)


def with_epoch_steps(cfg: Experiment, train_ds, model_path: str = "") -> Experiment:
    """train.epochs > 0: train.steps = the optimizer steps that cover the (post-filter) training
    rows that many times (packed rows with data.packing, which needs `model_path`); otherwise cfg
    as it is."""
    if cfg.train.epochs <= 0:
        return cfg
    if cfg.data.packing and not model_path:
        raise ValueError("with_epoch_steps counts packed rows: pass the model path")
    n_examples = epoch_dataset(cfg, train_ds, model_path).count()
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.scale.num_workers
    steps = max(1, math.ceil(n_examples * cfg.train.epochs / per_step))
    print(f"train.epochs={cfg.train.epochs}: {n_examples} rows / {per_step} per step -> train.steps={steps}", flush=True)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
