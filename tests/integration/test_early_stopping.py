"""In-training validation on a fixed val subset and early stopping on a grounding metric, through
the Ray-free loop (the same code runs on rank 0 under Ray Train, with the decision broadcast)."""


import pytest
import torch

from raytrain import config as config_mod
from raytrain.data import shards
from raytrain.recipes import ddp
from raytrain.training.session import Session
from raytrain.training import validation

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("lr,patience,expect_stop", [(0.0, 1, True), (0.0, 10, False)])
def test_early_stopping_on_validation_metric(lr, patience, expect_stop, tmp_path, tiny_model_path, shape_batches):
    torch.set_num_threads(1)
    uri = str(tmp_path / "data")
    shards.prepare_synthetic(uri, n=80, seed=4, splits={"train": 0.5, "val": 0.5})
    cfg = config_mod.load(None, ["train.steps=16", "train.micro_batch_size=8", "train.warmup_steps=1", "train.log_every=4",
                                 "train.checkpoint_every=100", f"train.lr={lr}", "model.freeze_vision=false",
                                 "train.val_every=4", "train.val_examples=12", "data.tasks=[point]",
                                 "train.early_stop_metric=val_norm_distance_all", f"train.early_stop_patience={patience}"])
    examples = validation.load_examples(uri, "val", 12, tasks=["point"], image_hw=(64, 64), family="paligemma")
    reports = []
    session = Session(rank=0, world_size=1, checkpoint_dir=lambda: None,
                      report=lambda m, d: reports.append(m), epoch_batches=lambda e, m: shape_batches(tiny_model_path),
                      val_examples=lambda: examples)
    result = ddp.train(cfg, tiny_model_path, session, torch.device("cpu"), wrap_ddp=lambda m: m)
    vals = [r for r in reports if "val_norm_distance_all" in r]
    assert vals and all(r["val_n"] == 12 for r in vals)
    assert all(0.0 <= r["val_norm_distance_all"] <= 1.0 for r in vals)
    if expect_stop:  # lr 0: the metric cannot improve -> stop at the second validation
        assert result["early_stopped"] and result["step"] == 8 and vals[-1]["early_stopped"] == 1
    else:  # the same stagnant run with patience 10 goes to the end
        assert not result["early_stopped"] and result["step"] == 16 and len(vals) == 4
