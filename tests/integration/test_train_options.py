"""Issue 14 item 7's training options through the recipe loop itself (Ray-free, the code every Ray
Train worker runs): the teacher-forced validation loss, checkpoint selection by it, SGD with
momentum, float16 mixed precision."""

import json
import os
import shutil

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from raytrain import config as config_mod
from raytrain.data import shards
from raytrain.launch import eval as launch_eval
from raytrain.launch import job
from raytrain.models import paligemma
from raytrain.models.losses import suffix_loss
from raytrain.recipes import ddp
from raytrain.training import checkpointing, optim, validation
from raytrain.training.model import build_model
from raytrain.training.session import Session

pytestmark = pytest.mark.integration

BASE = ["train.steps=8", "train.micro_batch_size=8", "train.warmup_steps=1", "train.log_every=4", "train.checkpoint_every=100",
        "train.val_every=4", "train.val_examples=12", "data.tasks=[point]", "data.max_seq_len=48"]


@pytest.fixture(scope="module")
def batches(tiny_model_path, shape_batches):
    return shape_batches(tiny_model_path)  # 4 point micro-batches of 8


@pytest.fixture(scope="module")
def val_examples(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("data"))
    shards.prepare_synthetic(uri, n=80, seed=4, splits={"train": 0.5, "val": 0.5})
    return validation.load_examples(uri, "val", 12, tasks=["point"], image_hw=(64, 64), family="paligemma")


def _train(cfg, model_path, examples, batches, keep_dir=None):
    """ddp.train with a hand-made session; checkpoints copied to keep_dir/checkpoint_<n> (as Ray Train
    would persist them) when given. Returns the reports."""
    reports = []

    def report(metrics, d):
        reports.append(dict(metrics))
        if d and keep_dir is not None:
            shutil.copytree(d, os.path.join(keep_dir, f"checkpoint_{len(reports):06d}"))

    session = Session(rank=0, world_size=1, checkpoint_dir=lambda: None, report=report,
                      epoch_batches=lambda e, m: [dict(b) for b in batches], val_examples=lambda: examples)
    ddp.train(cfg, model_path, session, torch.device("cpu"), wrap_ddp=lambda m: m)
    return reports


def test_val_loss_is_the_training_objective_on_the_val_subset(tiny_model_path, val_examples, batches):
    torch.set_num_threads(1)
    # lr 0: the model never changes, so every validation scores the initial model
    cfg = config_mod.load(None, BASE + ["train.lr=0.0", "model.freeze_vision=false"])
    reports = _train(cfg, tiny_model_path, val_examples, batches)
    vals = [r for r in reports if "val_loss" in r]
    assert [r["step"] for r in vals] == [4, 8] and all(r["val_loss_examples"] == 12 for r in vals)
    # the same number computed here: the recipe's seeded model, eval mode, the objective on the 12 examples
    torch.manual_seed(cfg.train.seed)
    model, proc, _ = build_model(cfg, tiny_model_path)
    model.eval()
    fam = cfg.model_family()
    enc = paligemma.encode_train(proc, [Image.fromarray(a) for a in val_examples["image"]], list(val_examples["prefix"]),
                                 list(val_examples["suffix"]), 48)
    enc.pop("length")
    loc = torch.as_tensor(fam.loc_token_ids(proc.tokenizer))
    total = 0.0
    with torch.no_grad():
        for i in range(0, 12, 8):  # validation's batches of 8: the loss is per batch, weighted by its examples
            b = {k: torch.as_tensor(v[i : i + 8]) for k, v in enc.items()}
            inputs = fam.prepare_inputs({k: v for k, v in b.items() if k != "labels"})  # pixels normalised as the family does
            out = model(input_ids=b["input_ids"].long(), attention_mask=b["attention_mask"].long(),
                        token_type_ids=b["token_type_ids"].long(), pixel_values=inputs["pixel_values"].float())
            loss, _ = suffix_loss(out.logits, b["labels"].long(), loc, cfg.loss.loc_sigma, cfg.loss.loc_weight)
            total += float(loss) * len(b["input_ids"])
    assert vals[0]["val_loss"] == pytest.approx(total / 12, rel=1e-4)
    assert vals[1]["val_loss"] == pytest.approx(vals[0]["val_loss"], rel=1e-5)


def test_checkpoint_selected_by_val_loss(tiny_model_path, val_examples, batches, tmp_path):
    torch.set_num_threads(1)
    cfg = config_mod.load(None, BASE + [f"storage.root={tmp_path}", "name=sel", "train.steps=12", "train.val_every=4",
                                        "train.lr=0.02", "model.freeze_vision=false", "train.select_checkpoint=val_loss"])
    run = os.path.join(job.runs_root(cfg), cfg.name)
    os.makedirs(run)
    reports = _train(cfg, tiny_model_path, val_examples, batches, keep_dir=run)
    ckpts = [r for r in reports if "val_loss" in r]
    assert [r["step"] for r in ckpts] == [4, 8, 12] and len(os.listdir(run)) == 3  # every validation is a checkpoint
    best = min(ckpts, key=lambda r: r["val_loss"])
    chosen = launch_eval.latest_checkpoint(cfg)
    assert checkpointing.read_state(chosen)["step"] == best["step"]
    assert checkpointing.read_state(chosen)["metrics"]["val_loss"] == best["val_loss"]
    last = config_mod.load(None, BASE + [f"storage.root={tmp_path}", "name=sel", "train.steps=12"])
    assert checkpointing.read_state(launch_eval.latest_checkpoint(last))["step"] == 12


def test_sgd_with_momentum_and_float16_mixed_precision(tiny_model_path, val_examples, batches, tmp_path):
    torch.set_num_threads(1)
    cfg = config_mod.load(None, BASE + ["model.dtype=float16", "model.freeze_vision=true", "train.optimizer=sgd",
                                        "train.momentum=0.9", "train.lr=0.05", "train.val_every=8", "train.checkpoint_every=8"])
    reports = _train(cfg, tiny_model_path, val_examples, batches, keep_dir=str(tmp_path))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in reports)
    assert reports[-1]["loss"] < reports[0]["loss"]
    (ckpt,) = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    state = checkpointing.read_state(ckpt)
    assert state["grad_scaler"]["scale"] > 1  # the dynamic loss scale, recorded to resume with
    blob = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=True)
    group = blob["optimizer"]["param_groups"][0]
    assert group["momentum"] == 0.9 and "betas" not in group
    assert all("momentum_buffer" in s for s in blob["optimizer"]["state"].values())
    dtypes = {}
    with safe_open(os.path.join(ckpt, "model", "model.safetensors"), "pt") as f:
        for k in f.keys():
            dtypes.setdefault("vision" if "vision_tower" in k else "language" if "language_model" in k else "other", set()).add(
                f.get_slice(k).get_dtype())
    assert dtypes["vision"] == {"F16"}  # frozen: float16, where the memory goes
    assert dtypes["language"] == {"F32"}  # trained: float32 master weights


def test_raytrain_train_on_two_splits_evaluates_the_selected_checkpoint(tmp_path, ray_cluster, tiny_model_path):
    """`raytrain train` end to end on Ray: the training dataset is the union of train.splits (each
    split's examples counted), Ray Train keeps the best checkpoint by the selection metric, and that
    checkpoint is what the run evaluates and names in its metrics JSON. The selection here is the
    HIGHEST val_loss (select_mode max): a tiny model's val loss falls step after step, so the chosen
    checkpoint is the first, never the last one that a selection doing nothing would give."""
    from pathlib import Path

    from raytrain import storage
    from raytrain.launch import train as launch_train
    from raytrain.training.metrics import read_history

    cfg = config_mod.load("jobs/tiny/shapes.yaml", [
        f"storage.root={tmp_path}", "name=twosplits", f"model.name_or_path={tiny_model_path}", "data.num_images=160",
        "data.splits={train: 0.5, extra: 0.25, val: 0.125, test: 0.125}", "train.splits=[train, extra]",
        "train.steps=12", "train.micro_batch_size=8", "train.warmup_steps=2", "train.log_every=4", "train.checkpoint_every=100",
        "train.val_every=4", "train.val_examples=8", "train.select_checkpoint=val_loss", "train.select_mode=max",
        "train.keep_checkpoints=1",
        "scale.num_workers=1", "eval.baselines=false", "eval.batch_size=32", "eval.num_actors=1", "eval.cpus_per_actor=0.25"])
    out = launch_train.main(cfg)
    metrics = json.loads(Path(out).read_text())
    counts = metrics["run"]["data_counts"]
    assert counts["train"]["tokenized"] > 0 and counts["extra"]["tokenized"] > 0  # both splits were read for training
    rows = [r for r in read_history(job.history_uri(cfg)) if "val_loss" in r]
    assert [r["step"] for r in rows] == [4, 8, 12]
    assert rows[0]["val_loss"] > rows[1]["val_loss"] > rows[2]["val_loss"]  # it learns
    best = rows[0]
    choice = metrics["run"]["checkpoint_choice"]
    assert (choice["select_checkpoint"], choice["select_mode"], choice["step"], choice["value"]) == ("val_loss", "max", 4, best["val_loss"])
    assert metrics["run"]["checkpoint"] == choice["checkpoint"]
    assert checkpointing.read_state(choice["checkpoint"])["step"] == best["step"]
    # Ray Train kept the best by val_loss (keep_checkpoints 1) and the latest, to resume from
    run = storage.run_dir(job.runs_root(cfg), cfg.name)
    kept = sorted(checkpointing.read_state(os.path.join(run, d))["step"] for d in os.listdir(run)
                  if d.startswith("checkpoint_") and os.path.isdir(os.path.join(run, d)))
    assert kept == [4, 12]
    # `raytrain eval` without eval.checkpoint picks the same one
    assert launch_eval.latest_checkpoint(cfg) == choice["checkpoint"]


def test_float16_resume_keeps_the_float32_weights_exact(tiny_model_path, val_examples, batches, tmp_path):
    """A resumed float16 run rebuilds the model (float16 frozen, float32 trained) and loads the
    checkpoint: the trained weights come back bit-exact, not rounded through float16."""
    torch.set_num_threads(1)
    cfg = config_mod.load(None, BASE + ["model.dtype=float16", "model.freeze_vision=true", "train.val_every=0",
                                        "train.checkpoint_every=4", "train.steps=4", "train.lr=1e-3"])
    _train(cfg, tiny_model_path, val_examples, batches, keep_dir=str(tmp_path))
    (ckpt,) = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    saved = {}
    with safe_open(os.path.join(ckpt, "model", "model.safetensors"), "pt") as f:
        for k in f.keys():
            if "language_model" in k and k.endswith("q_proj.weight"):
                saved[k] = f.get_tensor(k)
    assert saved and all(t.dtype == torch.float32 for t in saved.values())
    model, _, _ = build_model(cfg, tiny_model_path)
    optim.master_weights_fp32(model)  # as recipes/ddp.py does before it resumes
    checkpointing.load_weights(ckpt, model)
    params = {n: p for n, p in model.named_parameters() if "language_model" in n and n.endswith("q_proj.weight")}
    assert params and all(p.dtype == torch.float32 for p in params.values())
    # The file may use legacy key names; compare as multisets of exact tensors.
    loaded = sorted(p.detach().flatten()[:8].tolist() for p in params.values())
    assert loaded == sorted(t.flatten()[:8].tolist() for t in saved.values())
    assert any(t.flatten()[:8].to(torch.float16).to(torch.float32).tolist() != t.flatten()[:8].tolist() for t in saved.values())


def test_train_modules_trains_only_the_language_models_attention(tiny_model_path, val_examples, batches, tmp_path):
    """Seed 001 (Google's notebook): full fine-tuning of the language model's attention weights,
    everything else frozen (model.train_modules)."""
    import glob

    torch.set_num_threads(1)
    cfg = config_mod.load(None, BASE + ['model.train_modules=["*language_model*self_attn*"]', "model.freeze_vision=false",
                                        "train.val_every=0", "train.checkpoint_every=8"])
    reports = _train(cfg, tiny_model_path, val_examples, batches, keep_dir=str(tmp_path))
    assert reports[-1]["loss"] < reports[0]["loss"]
    (ckpt,) = glob.glob(os.path.join(tmp_path, "checkpoint_*"))

    def tensors(path):
        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    before = tensors(os.path.join(tiny_model_path, "model.safetensors"))
    after = tensors(os.path.join(ckpt, "model", "model.safetensors"))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k].to(before[k].dtype))}
    attention = {k for k in before if "language_model" in k and "self_attn" in k}
    assert attention and changed == attention  # every attention weight moved, nothing else did

    with pytest.raises(ValueError, match="matches no parameter"):
        build_model(config_mod.load(None, BASE + ['model.train_modules=["*no_such_module*"]']), tiny_model_path)
    with pytest.raises(ValueError, match="train.strategy full"):
        config_mod.load(None, BASE + ['model.train_modules=["*self_attn*"]', "train.strategy=lora"])
