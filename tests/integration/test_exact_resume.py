"""Exact resume of the LoRA recipe: an fp32 run interrupted mid-epoch and resumed from its
checkpoint produces the same per-step losses as an uninterrupted run (<= 1e-6). The loop runs
Ray-free with a deterministic batch order, so any difference comes from checkpoint/restore of
weights, optimizer, scheduler, RNG or the data position."""


import pytest
import torch

from raytrain import config as config_mod

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("strategy", ["lora", "full"])
def test_interrupted_mid_epoch_resume_matches_uninterrupted(strategy, tiny_model_path, shape_batches, run_until):
    torch.set_num_threads(1)
    extra = ["train.strategy=lora", "lora.r=4", "lora.alpha=8", "lora.dropout=0.1"] if strategy == "lora" else ["train.strategy=full", "model.freeze_vision=false"]
    cfg = config_mod.load(None, ["train.steps=16", "train.micro_batch_size=4", "train.grad_accum=2", "train.warmup_steps=3",
                                 "train.log_every=1", "train.checkpoint_every=7", "train.lr=3e-3", *extra])
    batches = shape_batches(tiny_model_path, task="detect", n=40, micro=4, seed=5)  # 10 micro-batches = 5 optimizer steps per epoch

    full, _ = run_until(cfg, tiny_model_path, batches)
    assert sorted(full) == list(range(1, 17))

    # crash at step 9: the latest checkpoint is step 7, in the middle of epoch 1 (steps 6-10)
    first, saved = run_until(cfg, tiny_model_path, batches, stop_after=9)
    assert max(first) == 9 and len(saved) == 1
    resumed, _ = run_until(cfg, tiny_model_path, batches, resume_dir=saved[0])
    assert sorted(resumed) == list(range(8, 17))
    for step in range(8, 17):
        assert abs(resumed[step] - full[step]) <= 1e-6, (step, resumed[step], full[step])
    for step in range(1, 10):
        assert abs(first[step] - full[step]) <= 1e-6
