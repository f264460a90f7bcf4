"""Exact resume of the LoRA recipe: an fp32 run interrupted mid-epoch and resumed from its
checkpoint produces the same per-step losses as an uninterrupted run (<= 1e-6). The loop runs
Ray-free with a deterministic batch order, so any difference comes from checkpoint/restore of
weights, optimizer, scheduler, RNG or the data position."""

import contextlib
import io
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from raytrain import config as config_mod
from raytrain.data import pipeline, synthetic
from raytrain.models import paligemma
from raytrain.recipes import ddp
from raytrain.training.session import Session

pytestmark = pytest.mark.integration


def _batches(model_path, n=40, micro=4):
    proc = paligemma.load_processor(model_path)
    items = []
    for i in range(n):
        ex = synthetic.make_example(i, seed=5, image_size=64)
        (e,) = pipeline.examples_for(ex["objects"], ["detect"], 64, 64, "paligemma")
        items.append((Image.open(io.BytesIO(ex["image"])).convert("RGB"), e["prefix"], e["suffix"]))
    out = []
    for i in range(0, n, micro):
        c = items[i : i + micro]
        enc = paligemma.encode_train(proc, [x[0] for x in c], [x[1] for x in c], [x[2] for x in c], 48)
        enc.pop("length")
        out.append({k: torch.from_numpy(v) for k, v in enc.items()})
    return out  # 10 batches per epoch


def _run(cfg, model_path, batches, resume_dir=None, stop_after=None):
    losses, saved = {}, []

    class Stop(Exception):
        pass

    def report(metrics, ckpt_dir):
        losses[metrics["step"]] = metrics["loss"]
        if ckpt_dir:
            keep = Path(tempfile.mkdtemp(prefix="exact-"))
            shutil.copytree(ckpt_dir, keep, dirs_exist_ok=True)
            saved.append(keep)
        if stop_after is not None and metrics["step"] >= stop_after:
            raise Stop()  # the "crash": nothing after this step runs

    session = Session(
        rank=0, world_size=1,
        checkpoint_dir=lambda: contextlib.nullcontext(str(resume_dir)) if resume_dir else None,
        report=report, epoch_batches=lambda epoch, micro: batches)
    with contextlib.suppress(Stop):
        ddp.train(cfg, model_path, session, torch.device("cpu"), wrap_ddp=lambda m: m)
    return losses, saved


@pytest.mark.parametrize("strategy", ["lora", "full"])
def test_interrupted_mid_epoch_resume_matches_uninterrupted(strategy, tiny_model_path):
    torch.set_num_threads(1)
    extra = ["train.strategy=lora", "lora.r=4", "lora.alpha=8", "lora.dropout=0.1"] if strategy == "lora" else ["train.strategy=full", "model.freeze_vision=false"]
    cfg = config_mod.load(None, ["train.steps=16", "train.micro_batch_size=4", "train.grad_accum=2", "train.warmup_steps=3",
                                 "train.log_every=1", "train.checkpoint_every=7", "train.lr=3e-3", *extra])
    batches = _batches(tiny_model_path)  # 10 micro-batches = 5 optimizer steps per epoch

    full, _ = _run(cfg, tiny_model_path, batches)
    assert sorted(full) == list(range(1, 17))

    # crash at step 9: the latest checkpoint is step 7, in the middle of epoch 1 (steps 6-10)
    first, saved = _run(cfg, tiny_model_path, batches, stop_after=9)
    assert max(first) == 9 and len(saved) == 1
    resumed, _ = _run(cfg, tiny_model_path, batches, resume_dir=saved[0])
    assert sorted(resumed) == list(range(8, 17))
    for step in range(8, 17):
        assert abs(resumed[step] - full[step]) <= 1e-6, (step, resumed[step], full[step])
    for step in range(1, 10):
        assert abs(first[step] - full[step]) <= 1e-6
