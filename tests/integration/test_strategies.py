"""Each strategy of recipes/ddp.py trains the tiny preset on CPU through the Ray-free loop
(`train` with a plain Session): full fine-tuning, LoRA, QLoRA 4-bit (nf4, double quant) and
QLoRA 8-bit with real bitsandbytes and peft. The same loop runs under Ray Train in the e2e tests."""

import contextlib
import json
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from raytrain import config as config_mod
from raytrain.data import pipeline, synthetic
from raytrain.models import family, paligemma
from raytrain.recipes import ddp
from raytrain.training.session import Session
from raytrain.training import checkpointing

pytestmark = pytest.mark.integration


def _batches(model_path, n=64, micro=8, task="point"):
    proc = paligemma.load_processor(model_path)
    rows = []
    for i in range(n):
        ex = synthetic.make_example(i, seed=11, image_size=64)
        (e,) = [x for x in pipeline.examples_for(ex["objects"], [task], 64, 64, "paligemma")]
        rows.append((Image.open(__import__("io").BytesIO(ex["image"])).convert("RGB"), e["prefix"], e["suffix"]))
    out = []
    for i in range(0, n, micro):
        chunk = rows[i : i + micro]
        enc = paligemma.encode_train(proc, [r[0] for r in chunk], [r[1] for r in chunk], [r[2] for r in chunk], 48)
        enc.pop("length")
        out.append({k: torch.from_numpy(v) for k, v in enc.items()})
    return out


def _session(batches, reports, out: Path, resume_dir=None):
    """A plain Session over `batches`; every checkpoint is copied under `out` (a test's tmp_path)."""
    def checkpoint_dir():
        return contextlib.nullcontext(str(resume_dir)) if resume_dir else None

    saved = []

    def report(metrics, ckpt_dir):
        reports.append(metrics)
        if ckpt_dir:
            keep = Path(tempfile.mkdtemp(prefix="ckpt-", dir=out))
            import shutil

            shutil.copytree(ckpt_dir, keep, dirs_exist_ok=True)
            saved.append(keep)

    s = Session(rank=0, world_size=1, checkpoint_dir=checkpoint_dir, report=report, epoch_batches=lambda epoch, micro: batches)
    return s, saved


STRATEGIES = {
    "full": ["train.strategy=full", "model.freeze_vision=false", "train.lr=2e-3"],
    "lora": ["train.strategy=lora", "lora.r=8", "lora.alpha=16", "train.lr=5e-3"],
    "qlora4": ["train.strategy=lora", "quant.bits=4", "quant.quant_type=nf4", "quant.double_quant=true", "lora.r=8", "lora.alpha=16", "train.lr=5e-3"],
    "qlora8": ["train.strategy=lora", "quant.bits=8", "lora.r=8", "lora.alpha=16", "train.lr=5e-3"],
    # seed 000's recipe shape: 4-bit QLoRA r8 on all linear layers with paged 8-bit AdamW, plus
    # seed 004's extra losses (focal on label tokens, a box IoU term) on a detection task
    "qlora4_paged8_iou": ["train.strategy=lora", "quant.bits=4", "lora.r=8", "lora.alpha=16", "train.lr=5e-3",
                          "train.optimizer=paged_adamw_8bit", "loss.focal_gamma=1.0", "loss.box_iou_weight=0.5", "data.tasks=[detect]"],
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_strategy_trains_and_checkpoints(strategy, tiny_model_path, tmp_path):
    torch.set_num_threads(1)
    cfg = config_mod.load(None, ["train.steps=24", "train.micro_batch_size=8", "train.warmup_steps=2", "train.log_every=1",
                                 "train.checkpoint_every=12", "loss.loc_sigma=60", *STRATEGIES[strategy]])
    batches = _batches(tiny_model_path, task=cfg.data.tasks[0] if cfg.data.tasks == ["detect"] else "point")
    reports = []
    session, saved = _session(batches, reports, tmp_path)
    ddp.train(cfg, tiny_model_path, session, torch.device("cpu"), wrap_ddp=lambda m: m)
    losses = [r["loss"] for r in reports]
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5, losses  # half a nat in 24 steps
    assert len(saved) == 2
    ckpt = saved[-1]
    layout = "model" if strategy == "full" else "adapter"
    assert (ckpt / layout).is_dir() and not (ckpt / ({"model", "adapter"} - {layout}).pop()).exists()
    assert json.loads((ckpt / "state.json").read_text())["step"] == 24
    if strategy != "full":
        # adapters are small: no base weights inside
        size = sum(f.stat().st_size for f in (ckpt / "adapter").iterdir())
        assert size < 0.25 * 596544 * 4
    # the checkpoint reloads for inference (QLoRA adapters merge into a full-precision base)
    model, proc = checkpointing.load_for_inference(ckpt, tiny_model_path, family("paligemma"))
    assert model.training is False


def test_accumulation_carries_across_epochs_shorter_than_one_step(tiny_model_path):
    """3 micro-batches per epoch, 4 per optimizer step: every step takes exactly 4 micro-batches,
    crossing epoch boundaries, and the run ends (an epoch shorter than a step used to loop forever,
    and an epoch's tail leaked its gradients into the next epoch's step)."""
    torch.set_num_threads(1)
    cfg = config_mod.load(None, ["train.strategy=lora", "lora.r=4", "lora.alpha=8", "train.steps=3", "train.micro_batch_size=8",
                                 "train.grad_accum=4", "train.warmup_steps=1", "train.log_every=1", "train.checkpoint_every=100"])
    batches = _batches(tiny_model_path, n=24)  # 3 batches of 8
    drawn, epochs = [], []

    def epoch_batches(epoch, micro):
        epochs.append(epoch)
        if len(epochs) > 20:
            raise AssertionError("no progress: 20 epochs without finishing 3 steps")
        for b in batches:
            drawn.append(epoch)
            yield b

    reports = []
    s = Session(rank=0, world_size=1, checkpoint_dir=lambda: None, report=lambda m, d: reports.append(m), epoch_batches=epoch_batches)
    result = ddp.train(cfg, tiny_model_path, s, torch.device("cpu"), wrap_ddp=lambda m: m)
    assert result["step"] == 3
    assert len(drawn) == 3 * 4  # no micro-batch dropped or counted twice
    assert epochs == [0, 1, 2, 3]
    assert [r["step"] for r in reports if "loss" in r] == [1, 2, 3]
