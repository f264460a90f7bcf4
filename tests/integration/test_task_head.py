"""The task attention head (model.task_head_queries) through the real recipes on the tiny preset.

Ray-free (the recipe loop with a plain Session, deterministic batches): full fine-tuning and LoRA
train with the head, write it to model/ or adapter/ task_head.safetensors, resume exactly from a
mid-epoch checkpoint, and reload for inference with the logits of the trained model; ZeRO-3
(DeepSpeed, one rank) gathers it and `consolidate` writes it out. With Ray (through the lock):
`raytrain train` under TorchTrainer with 2 DDP workers, then the evaluation pool decodes from the
checkpoint with the head re-installed."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from raytrain import config as config_mod
from raytrain import storage
from raytrain.data import pipeline, synthetic
from raytrain.models import family, paligemma, task_head
from raytrain.recipes import ddp
from raytrain.training.model import build_model
from raytrain.training.session import Session
from raytrain.training import checkpointing

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

HEAD = "model.task_head_queries=16"  # the tiny preset's 16 image tokens


@pytest.fixture(scope="module")
def batches(tiny_model_path):
    """32 detect examples in 4 micro-batches of 8, the same order every epoch."""
    proc = paligemma.load_processor(tiny_model_path)
    items = []
    for i in range(32):
        ex = synthetic.make_example(i, seed=5, image_size=64)
        (e,) = pipeline.examples_for(ex["objects"], ["detect"], 64, 64, "paligemma")
        items.append((Image.open(io.BytesIO(ex["image"])).convert("RGB"), e["prefix"], e["suffix"]))
    enc = paligemma.encode_train(proc, [x[0] for x in items], [x[1] for x in items], [x[2] for x in items], 48)
    enc.pop("length")
    data = {k: torch.from_numpy(v) for k, v in enc.items()}
    return [{k: v[i : i + 8] for k, v in data.items()} for i in range(0, 32, 8)]


def _train(cfg, model_path, batches, out: Path, resume=None):
    """recipes.ddp.train in this process; returns (reports, {step: checkpoint copy under `out`, a test's tmp_path})."""
    reports, saved = [], {}

    def report(metrics, ckpt_dir):
        reports.append(metrics)
        if ckpt_dir:
            keep = Path(tempfile.mkdtemp(prefix="head-ckpt-", dir=out))
            shutil.copytree(ckpt_dir, keep, dirs_exist_ok=True)
            saved[metrics["step"]] = keep

    session = Session(rank=0, world_size=1, report=report, epoch_batches=lambda epoch, micro: batches,
                      checkpoint_dir=lambda: contextlib.nullcontext(str(resume)) if resume else None)
    ddp.train(cfg, model_path, session, torch.device("cpu"), wrap_ddp=lambda m: m)
    return reports, saved


def _logits(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    for k in paligemma.SEQ_KEYS:
        inputs[k] = inputs[k].long()
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def _resumed_model(cfg, model_path, ckpt):
    """The training model as the recipe builds it, with the checkpoint's weights (resume path)."""
    model, _, _ = build_model(cfg, model_path)
    checkpointing.load_weights(ckpt, model)
    return model


def _head_count(model_path):
    model, proc = paligemma.load(model_path)
    return sum(p.numel() for p in task_head.install(model, 16, processor=proc).parameters())


COMMON = ["train.steps=8", "train.micro_batch_size=8", "train.warmup_steps=1", "train.log_every=1", "train.checkpoint_every=3",
          "loss.loc_sigma=60", "model.unfreeze_vision_layers=1", "model.train_projector=true"]


def test_full_finetuning_with_the_head_trains_resumes_exactly_and_reloads(tiny_model_path, batches, tmp_path):
    cfg = config_mod.load(None, ["train.strategy=full", "train.lr=3e-3", *COMMON, HEAD])
    reports, saved = _train(cfg, tiny_model_path, batches, tmp_path)
    losses = {r["step"]: r["loss"] for r in reports}
    print(f"\nfull + head losses: {[round(losses[s], 4) for s in sorted(losses)]}")
    assert losses[8] < losses[1] - 1.0
    # the head counts in the trainable-params log, on top of what the freeze policy unfroze
    no_head = config_mod.load(None, ["train.strategy=full", *COMMON])
    assert reports[-1]["trainable_params"] == build_model(no_head, tiny_model_path)[2] + _head_count(tiny_model_path)
    assert sorted(saved) == [3, 6, 8]

    final = saved[8]
    with safe_open(str(final / "model" / task_head.FILE), "pt") as f:
        assert f.metadata()["num_queries"] == "16"
    with safe_open(str(final / "model" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "task_head" in k]

    # resume from the mid-epoch step-3 checkpoint: the same losses and the same final head
    again, saved2 = _train(cfg, tiny_model_path, batches, tmp_path, resume=saved[3])
    resumed = {r["step"]: r["loss"] for r in again}
    assert sorted(resumed) == [4, 5, 6, 7, 8] and all(r["resumed_from"] == 3 for r in again)
    for s in resumed:
        assert abs(resumed[s] - losses[s]) <= 1e-6, (s, resumed[s], losses[s])
    with safe_open(str(final / "model" / task_head.FILE), "pt") as a, safe_open(str(saved2[8] / "model" / task_head.FILE), "pt") as b:
        for k in a.keys():
            torch.testing.assert_close(a.get_tensor(k), b.get_tensor(k), atol=1e-6, rtol=0)

    # inference from the checkpoint: the head is re-installed and the logits are the trained model's
    model, proc = checkpointing.load_for_inference(final, tiny_model_path, family("paligemma"))
    assert task_head.find(model) is not None
    assert torch.equal(_logits(model, batches[0]), _logits(_resumed_model(cfg, tiny_model_path, final), batches[0]))
    # a run configured without the head cannot silently resume a checkpoint that has one
    with pytest.raises(RuntimeError, match="task_head_queries=16"):
        _resumed_model(no_head, tiny_model_path, final)


def test_lora_with_the_head_saves_it_beside_the_adapter(tiny_model_path, batches, tmp_path):
    cfg = config_mod.load(None, ["train.strategy=lora", "lora.r=8", "lora.alpha=16", "train.lr=5e-3", *COMMON, "train.steps=6", HEAD])
    reports, saved = _train(cfg, tiny_model_path, batches, tmp_path)
    print(f"\nlora + head losses: {[round(r['loss'], 4) for r in reports]}")
    assert reports[-1]["loss"] < reports[0]["loss"] - 0.5
    no_head = config_mod.load(None, ["train.strategy=lora", "lora.r=8", "lora.alpha=16", *COMMON])
    assert reports[-1]["trainable_params"] == build_model(no_head, tiny_model_path)[2] + _head_count(tiny_model_path)

    adapter = saved[6] / "adapter"
    assert (adapter / task_head.FILE).exists()
    with safe_open(str(adapter / checkpointing.EXTRA), "pt") as f:  # the unfrozen layer + projector, not the head
        keys = list(f.keys())
    assert keys and not [k for k in keys if "task_head" in k] and any("multi_modal_projector" in k for k in keys)
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "task_head" in k]

    trained = _resumed_model(cfg, tiny_model_path, saved[6])  # peft model + head, as training left it
    merged, _ = checkpointing.load_for_inference(saved[6], tiny_model_path, family("paligemma"))
    assert task_head.find(merged) is not None and not hasattr(merged, "peft_config")
    torch.testing.assert_close(_logits(merged, batches[1]), _logits(trained, batches[1]), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(_logits(merged, batches[1]), _logits(paligemma.load(tiny_model_path)[0], batches[1]), atol=1e-2)


def test_zero3_gathers_and_consolidates_the_head(tiny_model_path, batches, tmp_path, monkeypatch):
    """One DeepSpeed rank in this process: the head's parameters are partitioned with the rest
    (installed before deepspeed.initialize), and consolidation writes them out."""
    import torch.distributed as dist

    from raytrain.launch import consolidate
    from raytrain.recipes import zero

    monkeypatch.setenv("LOCAL_RANK", "0")  # read by deepspeed.zero.Init while loading
    cfg = config_mod.load(None, ["train.strategy=zero3", "train.steps=6", "train.micro_batch_size=8", "train.warmup_steps=1",
                                 "train.log_every=1", "train.checkpoint_every=6", "train.lr=3e-3", HEAD])
    reports, store = [], tmp_path / "ckpt"

    def report(metrics, ckpt_dir):
        reports.append(metrics)
        if ckpt_dir:
            shutil.copytree(ckpt_dir, store, dirs_exist_ok=True)

    session = Session(rank=0, world_size=1, report=report, epoch_batches=lambda e, m: batches, checkpoint_dir=lambda: None)
    try:
        out = zero.train(cfg, tiny_model_path, session, torch.device("cpu"))
        gathered = zero.gathered_state_dict(out["engine"])
    finally:
        if dist.is_initialized():  # through DeepSpeed: its cached groups go too (a later in-process ZeRO run reuses them)
            import deepspeed.comm

            deepspeed.comm.destroy_process_group()
    print(f"\nzero3 + head losses: {[round(r['loss'], 4) for r in reports]}")
    assert reports[-1]["loss"] < reports[0]["loss"]
    head_keys = [k for k in gathered if k.startswith("model.task_head.")]
    assert "model.task_head.queries" in head_keys

    consolidate.consolidate(str(store), str(tmp_path / "hf"), tiny_model_path)
    model, _ = paligemma.load(str(tmp_path / "hf"))
    head = task_head.find(model)
    assert head is not None
    for k, v in head.state_dict().items():
        assert torch.equal(v, gathered[f"model.task_head.{k}"]), k


def test_ray_train_with_the_head_then_eval_from_the_checkpoint(tmp_path, ray_cluster, tiny_model_path):
    """`raytrain train` (TorchTrainer, 2 DDP workers, Ray Data) with LoRA + head, then the eval pool."""
    from raytrain.launch import job
    from raytrain.launch import train as launch_train
    from raytrain.training.metrics import read_history

    cfg = config_mod.load("jobs/tiny/shapes.yaml", [
        f"storage.root={tmp_path}", "name=head", f"model.name_or_path={tiny_model_path}", "data.num_images=80", "train.steps=8",
        "train.micro_batch_size=8", "train.checkpoint_every=8", "train.log_every=2", "train.warmup_steps=2", "eval.baselines=false",
        "eval.batch_size=16", "eval.cpus_per_actor=0.25", "train.strategy=lora", "lora.r=8", "lora.alpha=16", "train.lr=5e-3",
        "model.freeze_vision=true", "model.train_projector=false", HEAD])
    metrics = json.loads(Path(launch_train.main(cfg)).read_text())
    rows = read_history(job.history_uri(cfg))
    assert rows[0]["loss"] > rows[-1]["loss"]
    no_head = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, task_head_queries=0))
    assert rows[-1]["trainable_params"] == build_model(no_head, tiny_model_path)[2] + _head_count(tiny_model_path)
    ckpt = Path(metrics["run"]["checkpoint"])
    assert (ckpt / "adapter" / task_head.FILE).exists() and not (ckpt / "adapter" / checkpointing.EXTRA).exists()
    assert metrics["trained"]["examples"] > 0

    # the eval actors decoded with the head: their texts are what a Predictor built here from the
    # checkpoint (head re-installed) decodes for the same examples
    from raytrain.eval.batch import Predictor

    run = storage.run_dir(job.runs_root(cfg), cfg.name)
    preds = {p["id"]: p["text"] for p in map(json.loads, (Path(run) / "eval" / f"predictions_{cfg.eval.split}.jsonl").read_text().splitlines())}
    proc = paligemma.load_processor(tiny_model_path)
    batch = pipeline.examples_dataset(job.data_uri(cfg), cfg.eval.split, tasks=cfg.data.tasks,
                                      image_hw=paligemma.image_size(proc), family="paligemma").take_batch(6, batch_format="numpy")
    from raytrain.predict import DecodeOptions

    opts = DecodeOptions(max_new_tokens=cfg.eval.max_new_tokens, constrained=cfg.eval.constrained, confidence=cfg.eval.confidence,
                         max_objects=cfg.eval.max_objects, generate=dict(cfg.eval.decoding))
    predictor = Predictor(family="paligemma", model_path=tiny_model_path, checkpoint_uri=str(ckpt), options=opts)
    assert task_head.find(predictor.model) is not None
    out = predictor(batch)
    assert [preds[i] for i in out["id"]] == list(out["text"])
