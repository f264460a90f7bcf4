"""What a recipe's loop needs from whoever runs it, and the Ray Train glue that provides it.

`Session` is the loop's whole view of its runner: rank, world size, the checkpoint to resume from,
where reports go, the batches of each epoch, the fixed validation subset and rank 0's decisions.
Tests and the smoke mode build one by hand (no Ray); `from_ray_train` builds it inside a Ray Train
worker, for every recipe's `train_fn_per_worker`.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from raytrain import config as config_mod


@dataclass
class Session:
    """What the loop needs from its runner (Ray Train, a plain torch.distributed process, a test)."""

    rank: int
    world_size: int
    checkpoint_dir: Callable[[], contextlib.AbstractContextManager[str] | None]  # the checkpoint to resume from, as a local dir
    report: Callable[[dict, str | None], None]  # (metrics, checkpoint dir or None); every rank calls it
    epoch_batches: Callable[[int, int], Iterable[dict]]  # (epoch, micro_batch_size) -> batches of tensors
    val_examples: Callable[[], dict] | None = None  # fixed validation subset, see training/validation.py
    broadcast_flag: Callable[[bool], bool] = lambda flag: flag  # rank 0's decision, seen by every rank
    # The data position (training/loop.py DataPosition): resume_data(epoch, keys of the examples that
    # epoch trained on) -> True when the runner leaves those examples out of that epoch itself (then
    # the loop skips nothing), False when the loop must skip the checkpoint's batch count;
    # begin_epoch(epoch) before each epoch's batches are asked for; gather(array) -> every rank's.
    resume_data: Callable[[int, np.ndarray], bool] = lambda epoch, keys: False
    begin_epoch: Callable[[int], None] = lambda epoch: None
    gather: Callable[[np.ndarray], list] = lambda a: [a]


def collate(batch: dict) -> dict:
    """A numpy batch -> torch tensors; a ragged column (an object array of per-row arrays: native
    image sizes, several examples per packed row) becomes a list of per-row tensors, which the
    family's prepare_inputs joins (models/_batch.py)."""
    with warnings.catch_warnings():  # arrays from the object store are read-only; nothing writes to them
        warnings.simplefilter("ignore")
        return {k: [torch.as_tensor(np.asarray(x)) for x in v] if v.dtype == object else torch.as_tensor(v) for k, v in batch.items()}


def gather(array: np.ndarray) -> list:
    """Every rank's `array` (a list in rank order; [array] without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [array]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, array)
    return out


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's `flag` on every rank (a no-op without a process group or with one rank)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)])
    dist.broadcast(t, src=0)
    return bool(t.item())


def from_ray_train(cfg: config_mod.Experiment, loop_config: dict) -> tuple[Session, torch.device]:
    """The Session of this Ray Train worker, and its torch device.

    loop_config is the TorchTrainer's train_loop_config (launch/trainer.py): "model_path" (the base
    model, for the validation subset's image size), "data_uri" (the shards; without it there is
    no in-training validation) and "data_position" (the run's data/packing.py EpochFilter, which
    leaves a resumed epoch's trained examples out before the split; without it a resume skips the
    checkpoint's batch count). Batches come from the worker's shard of the "train" dataset with a
    seeded local shuffle per epoch; every report carries the worker's node IP (history.jsonl
    records where each rank ran)."""
    import ray
    import ray.train
    import ray.train.torch
    import ray.util
    from ray.data.collate_fn import NumpyBatchCollateFn

    ctx = ray.train.get_context()
    # Fractional CPUs per worker: one intra-op thread each, or workers fight over the cores.
    torch.set_num_threads(max(1, int(cfg.scale.cpus_per_worker)))
    shard = ray.train.get_dataset_shard("train")

    class Collate(NumpyBatchCollateFn):
        def __call__(self, batch):
            return collate(batch)

    def epoch_batches(epoch: int, micro: int):
        return shard.iter_torch_batches(
            batch_size=micro,
            drop_last=True,
            local_shuffle_buffer_size=micro * 8,
            local_shuffle_seed=cfg.train.seed * 100_003 + epoch,
            collate_fn=Collate(),
        )

    position = loop_config.get("data_position")
    rank = ctx.get_world_rank()

    def resume_data(epoch: int, keys) -> bool:
        if position is None:
            return False
        if rank == 0:  # before rank 0 asks for the epoch, so before Ray Data starts it (data/packing.py)
            ray.get(position.resume.remote(epoch, keys))
        return True

    def begin_epoch(epoch: int) -> None:
        if position is not None:
            ray.get(position.begin.remote(epoch))

    def checkpoint_dir():
        ckpt = ray.train.get_checkpoint()
        return ckpt.as_directory() if ckpt is not None else None

    node_ip = ray.util.get_node_ip_address()

    def report(metrics: dict, ckpt_dir: str | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
        ray.train.report(dict(metrics, node_ip=node_ip), checkpoint=ckpt)

    def val_examples():
        from raytrain import storage
        from raytrain.data import preprocess
        from raytrain.training import validation

        fam = cfg.model_family()
        proc = fam.load_processor(loop_config["model_path"])
        return validation.load_examples(loop_config["data_uri"], cfg.train.val_split, cfg.train.val_examples, tasks=cfg.data.tasks,
                                        image_hw=preprocess.frame_for(fam, proc, cfg.data.preprocess), family=fam,
                                        allow_convert=cfg.data.allow_convert,
                                        preprocess=cfg.data.preprocess,
                                        opts=storage.StorageOptions(cfg.storage.endpoint_url, cfg.storage.region))

    session = Session(
        rank=rank,
        world_size=ctx.get_world_size(),
        checkpoint_dir=checkpoint_dir,
        report=report,
        epoch_batches=epoch_batches,
        val_examples=val_examples if loop_config.get("data_uri") else None,
        broadcast_flag=broadcast_flag,
        resume_data=resume_data,
        begin_epoch=begin_epoch,
        gather=gather,
    )
    return session, ray.train.torch.get_device()
