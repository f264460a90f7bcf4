"""The main job end to end on real Ray Train / Ray Data / transformers / peft, with small budgets:
stop-and-rerun resumes from the latest checkpoint (storage on S3 via moto on 127.0.0.1), an
injected worker failure is retried from the latest checkpoint, LoRA mode trains an adapter."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from raytrain import config as config_mod
from raytrain import storage
from raytrain.launch import job
from raytrain.launch import train as launch_train
from raytrain.training import checkpointing
from raytrain.training.metrics import read_history

pytestmark = pytest.mark.integration

SMALL = [
    "data.num_images=200",
    # the 180 train rows as 2 shards, one per CPU of the test cluster: whole-file read blocks that
    # fuse with the next stage (data/pipeline.py read_blocks), one Ray task each per epoch
    "data.rows_per_shard=90",
    "train.steps=24",
    "train.micro_batch_size=8",
    "train.checkpoint_every=8",
    "train.log_every=4",
    "train.warmup_steps=4",
    "eval.baselines=false",
    "eval.batch_size=32",
    "eval.cpus_per_actor=0.25",
]


def _cfg(root: str, name: str, model: str, *extra: str) -> config_mod.Experiment:
    return config_mod.load("jobs/tiny/shapes.yaml", [f"storage.root={root}", f"name={name}", f"model.name_or_path={model}", *SMALL, *extra])


def _run_dir(cfg) -> str:
    return storage.run_dir(job.runs_root(cfg), cfg.name)


def test_stop_and_rerun_resumes_from_latest_checkpoint(s3_bucket, s3_opts, ray_cluster, tiny_model_path, tmp_path):
    root = storage.join(s3_bucket, "store")
    overrides = [f"storage.root={root}", f"model.name_or_path={tiny_model_path}", f"storage.endpoint_url={s3_opts.endpoint_url}", "name=resume", *SMALL,
                 "train.steps=40", f"ray.address={ray_cluster.get_runtime_context().gcs_address}"]
    cmd = [sys.executable, "-m", "raytrain.cli", "train", "--config", "jobs/tiny/shapes.yaml", *overrides]
    cfg = config_mod.load("jobs/tiny/shapes.yaml", overrides)
    hist_uri = job.history_uri(cfg)

    # 1) start the job and stop it (Ctrl-C) once a checkpoint exists
    log = tmp_path / "first.log"
    with open(log, "wb") as sink:
        first = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    stopped_at = None
    while time.time() < deadline and first.poll() is None:
        rows = read_history(hist_uri, s3_opts)
        ckpts = [r for r in rows if r.get("checkpoint")]
        if ckpts and ckpts[-1]["step"] < 40:
            stopped_at = ckpts[-1]["step"]
            first.send_signal(signal.SIGINT)
            break
        time.sleep(0.5)
    assert stopped_at is not None, ("no checkpoint within 300 s (or the run ended before it could be stopped); its output:\n"
                                    + log.read_text(errors="replace")[-3000:])
    try:
        first.wait(90)
    except subprocess.TimeoutExpired:
        first.kill()
        first.wait()
    assert max(r["step"] for r in read_history(hist_uri, s3_opts)) < 40, "first run was not stopped mid-way"

    # 2) rerun with the same name: continues from the latest checkpoint and finishes
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    metrics_uri = second.stdout.strip().splitlines()[-1]
    assert metrics_uri.startswith("s3://") and metrics_uri.endswith("metrics.json")
    metrics = storage.read_json(metrics_uri, s3_opts)
    assert metrics["run"]["final_step"] == 40

    rows = read_history(hist_uri, s3_opts)
    resumed = [r for r in rows if r["resumed_from"] >= 0]
    assert resumed, "the rerun did not resume from a checkpoint"
    assert resumed[0]["resumed_from"] >= stopped_at
    assert resumed[0]["step"] > resumed[0]["resumed_from"]  # continued, not restarted from 0
    assert rows[-1]["step"] == 40

    # checkpoints hold no credentials (the fake secret is the env var the S3 fixture set)
    fs = storage.fsspec_fs(root, s3_opts)
    files = fs.find(storage.strip_scheme(metrics["run"]["checkpoint"]), detail=True)
    # pyarrow leaves zero-byte "dir/" marker keys that s3fs lists without their slash: skip them
    files = [path for path, info in files.items() if info["type"] == "file" and info["size"] > 0]
    assert files
    for path in files:
        assert b"AWS_SECRET" not in fs.cat(path)


def test_injected_worker_failure_is_retried(tmp_path, ray_cluster, tiny_model_path):
    cfg = _cfg(str(tmp_path), "failure", tiny_model_path, "train.fail_at_step=12", "scale.max_failures=1")
    out = launch_train.main(cfg)
    metrics = json.loads(Path(out).read_text())
    assert metrics["run"]["final_step"] == 24
    rows = read_history(job.history_uri(cfg))
    assert any(r["resumed_from"] == 8 for r in rows), "the retry did not restore the step-8 checkpoint"
    assert rows[0]["loss"] > rows[-1]["loss"]  # it learns across the restart
    assert metrics["trained"]["n"] == metrics["trained"]["examples"] // 2 > 0  # every test example scored


def test_lora_trains_an_adapter(tmp_path, ray_cluster, tiny_model_path):
    # one epoch: 180 train images x 2 tasks = 360 examples / (8 per worker x 2 workers) -> 23 steps
    cfg = _cfg(str(tmp_path), "lora", tiny_model_path, "train.strategy=lora", "lora.r=8", "lora.alpha=16", "train.lr=5e-3", "train.epochs=1",
               "model.freeze_vision=true", "model.train_projector=false")  # adapters only: the tower stays frozen
    out = launch_train.main(cfg)
    metrics = json.loads(Path(out).read_text())
    rows = read_history(job.history_uri(cfg))
    assert rows[0]["loss"] > rows[-1]["loss"]
    # LoRA trains a small fraction of the model
    assert 0 < rows[-1]["trainable_params"] < 0.2 * 596544

    ckpt = Path(metrics["run"]["checkpoint"])
    assert (ckpt / "adapter" / "adapter_model.safetensors").exists()
    assert (ckpt / "adapter" / "adapter_config.json").exists()
    assert not (ckpt / "model").exists()  # an adapter checkpoint never carries the base weights
    blob = torch.load(ckpt / checkpointing.TRAINER_STATE, weights_only=True)
    assert blob["optimizer"]["state"], "optimizer state missing"
    state = checkpointing.read_state(ckpt)
    assert state["step"] == 23 and state["strategy"] == "lora"
    assert metrics["trained"]["examples"] > 0


def test_qwen_trains_through_the_same_recipe_and_parses_in_source_frame(tmp_path, ray_cluster, tiny_qwen_path):
    qwen = tiny_qwen_path
    cfg = config_mod.load("jobs/tiny/shapes_qwen.yaml", [f"storage.root={tmp_path}", f"model.name_or_path={qwen}", *SMALL,
                                                         "train.micro_batch_size=4", "train.lr=3e-3", "eval.batch_size=8"])
    out = launch_train.main(cfg)
    metrics = json.loads(Path(out).read_text())
    rows = read_history(job.history_uri(cfg))
    assert rows[0]["loss"] > rows[-1]["loss"] + 0.5
    assert metrics["run"]["final_step"] == 24 and metrics["trained"]["examples"] > 0
    ckpt = Path(metrics["run"]["checkpoint"])
    assert (ckpt / "model" / "raytrain_resize.json").exists()  # inference resizes as training did
    # every parsed object is in SOURCE pixels (64x64 images), not the 112x112 model frame
    preds = [json.loads(line) for line in (Path(out).parent / "predictions_test.jsonl").read_text().splitlines()]
    for p in preds:
        for o in p["objects"]:
            xs = [o[k] for k in ("x", "x1", "x2") if k in o]
            assert all(0 <= x <= 64 for x in xs), o
