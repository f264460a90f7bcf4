"""Where a job's things are, from its config: storage options, the data, the runs, the base model.
Shared by the driver-side subcommands (launch/*.py)."""

from __future__ import annotations

import os

from raytrain import storage
from raytrain.config import Experiment


def storage_opts(cfg: Experiment) -> storage.StorageOptions:
    return storage.StorageOptions(endpoint_url=cfg.storage.endpoint_url, region=cfg.storage.region)


def data_uri(cfg: Experiment) -> str:
    """The prepared shards: data.uri, or <storage.root>/data/<name>."""
    return cfg.data.uri or storage.join(cfg.storage.root, "data", cfg.name)


def runs_root(cfg: Experiment) -> str:
    """Ray Train's storage_path: local runs get an absolute path (Ray requires it)."""
    root = storage.join(cfg.storage.root, "runs")
    return root if storage.is_s3(root) else os.path.abspath(root)


def history_uri(cfg: Experiment) -> str:
    return storage.join(storage.run_dir(runs_root(cfg), cfg.name), "history.jsonl")


def model_path(cfg: Experiment) -> str:
    """The base model as a local folder (a tiny preset is built offline on first use)."""
    from raytrain.models import family

    return family(cfg.model.spec).resolve(cfg.model.name_or_path)


def checkpoint_uri(result) -> str:
    """URI of a Ray Train result's checkpoint (local path, or s3://bucket/key for S3 storage)."""
    ckpt = result.checkpoint
    if ckpt is None:
        raise RuntimeError("training finished without a checkpoint")
    fs_type = type(ckpt.filesystem).__name__
    return ("s3://" + ckpt.path) if "S3" in fs_type else ckpt.path
