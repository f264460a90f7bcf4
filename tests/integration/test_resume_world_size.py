"""A run checkpointed mid-epoch with 2 workers resumes on 1 or on 3 workers (a node lost and not
replaced, or one added) through the real Ray Train path (launch/trainer.py's TorchTrainer, Ray
Data's split, recipes/ddp.py) and trains every example of the epoch exactly once: the checkpoint
records the keys of the examples the epoch trained on (all ranks), the resumed run's per-epoch
stage leaves them out before the split (data/packing.py), and the final checkpoint, written at the
epoch's last step, records each of the epoch's examples once.

Sizes are chosen so that nothing is dropped by Ray's equal split or by drop_last: 24 examples,
2 per micro-batch; 2 workers train 4 per step, the step-3 checkpoint holds 12, and the 12 left
make whole micro-batches on 1 worker (6 steps) and on 3 workers (2 steps)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest

from raytrain import config as config_mod
from raytrain.data import pipeline, shards
from raytrain.launch import trainer
from raytrain.training import loop

pytestmark = pytest.mark.integration

N = 24


def _cfg(root, workers: int, steps: int, *extra):
    return config_mod.load("jobs/tiny/shapes.yaml", [
        f"storage.root={root}", "name=worldsize", f"scale.num_workers={workers}", "scale.cpus_per_worker=0.25",
        f"train.steps={steps}", "train.micro_batch_size=2", "train.grad_accum=1", "train.checkpoint_every=3", "train.log_every=1",
        "train.warmup_steps=1", "train.strategy=lora", "lora.r=4", "lora.alpha=8", "data.tasks=[detect]", "eval.baselines=false",
        "scale.max_failures=0", *extra])


def _fit(cfg, uri, model_path, ds):
    t = trainer.build_trainer(cfg, model_path=model_path, data_uri=uri, datasets={"train": ds}, name=cfg.name,
                              runs_root=str(Path(cfg.storage.root) / "runs"), callbacks=[])
    return t.fit()


def _checkpoints(root) -> dict[int, Path]:
    out = {}
    for state in Path(root, "runs").rglob("state.json"):
        out[json.loads(state.read_text())["step"]] = state.parent
    return out


@pytest.mark.parametrize("workers_after", [1, 3])
def test_resume_on_another_world_size_trains_each_example_once(workers_after, tmp_path, ray_cluster, tiny_model_path):
    uri = str(tmp_path / "data")
    # two shards, one per CPU of the test cluster: whole-file read blocks that fuse with the next
    # stage (data/pipeline.py read_blocks), one Ray task each in the tokenization and every epoch
    shards.prepare_synthetic(uri, n=N, seed=7, splits={"train": 1.0}, rows_per_shard=N // 2)
    counter = pipeline.drop_counter()

    # 1) 2 workers; the step-3 checkpoint is written, then rank 0 fails at step 4 (no retries)
    first = _cfg(tmp_path, 2, 6, "train.fail_at_step=4")
    # the tokenized split (materialized: data.cache_preprocessed), built once and fitted by both runs
    # as a sweep's trials share it (launch/tune.py): the two configs differ in scale and steps only
    ds = trainer.train_dataset(first, uri, tiny_model_path, counter)
    with contextlib.suppress(Exception):  # Ray Train reports the injected failure
        _fit(first, uri, tiny_model_path, ds)
    ckpts = _checkpoints(tmp_path)
    assert max(ckpts) == 3, sorted(ckpts)
    state = json.loads((ckpts[3] / "state.json").read_text())
    before = np.load(ckpts[3] / loop.POSITION_FILE)
    assert (state["epoch"], state["world_size"], state["samples_in_epoch"]) == (0, 2, 12) and len(before) == 12

    # 2) the same run resumed on `workers_after` workers, to the last step of the epoch
    steps = 3 + 12 // (2 * workers_after)
    result = _fit(_cfg(tmp_path, workers_after, steps), uri, tiny_model_path, ds)
    assert result.metrics["resumed_from"] == 3 and result.metrics["step"] == steps and result.metrics["epoch"] == 0
    final = _checkpoints(tmp_path)[steps]
    state = json.loads((final / "state.json").read_text())
    trained = np.load(final / loop.POSITION_FILE)
    every = np.concatenate([np.asarray(k).reshape(-1) for k in ds.to_pandas()["example_keys"]])
    assert len(every) == N and len(set(every.tolist())) == N
    assert state["world_size"] == workers_after and state["epoch"] == 0
    assert len(trained) == N and sorted(trained.tolist()) == sorted(every.tolist())  # each example once: none twice, none skipped
    assert set(before.tolist()) <= set(trained.tolist())
