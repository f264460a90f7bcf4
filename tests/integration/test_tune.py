"""`raytrain tune` on real Ray Tune + Ray Train (tiny preset, CPU): a 3-trial ASHA + Optuna sweep
whose objective is the validation grounding metric, interrupted (Ctrl-C) once its first trial finished
(the second one then in flight) and resumed by rerunning the same command, which finishes the
remaining trials only (the interrupted one restarted, the last one proposed by the restored searcher)
and records the best trial (overrides, metric, checkpoint) in best.json.

30 steps are too few for the random-init tiny model to answer in the <loc> format, so its trials
usually tie at the worst value (1.0); which trial wins under min / max, and how errored trials and
checkpoints are handled, is checked on constructed results (`test_best_trial_follows_the_mode...`).

A trial is built like `raytrain train`'s run (launch/trainer.py): on a two-node cluster whose only
trainer node has a custom resource, a zero2 job's trial and a full job's trial run THEIR recipe on
workers that asked for the job's scale.resources_per_worker, placed as scale.placement_strategy says
(`test_trials_run_the_jobs_recipe_with_the_jobs_resources`)."""

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from raytrain.launch import tune as launch_tune
from raytrain.training import checkpointing, zero_checkpoint

pytestmark = pytest.mark.integration

JOB = "jobs/tiny/shapes_sweep.yaml"
# Why these sizes: a trial's cost is almost all Ray start-up (a Tune trial actor, a TorchTrainer's
# controller, workers and dataset actors: ~10 fresh processes), not its 30 steps, so the sweep runs
# as few trials as the check needs (3: one finished before the cut, one interrupted, one proposed
# after the resume), and each trial trains ONE epoch (126 train rows >= 30 steps x 4): every epoch
# boundary starts the next epoch's data stage in new worker processes (seconds on 2 cores). The
# train split is written as 2 shards (one per CPU of the test cluster): whole-file read blocks that
# fuse with the next stage (data/pipeline.py read_blocks); every block is one more Ray task, often a
# fresh worker process, in the tokenization and again in each trial's epoch stage.
SMALL = [
    "name=sweep",
    "data.num_images=140",
    "data.rows_per_shard=63",
    "train.steps=30",
    "train.micro_batch_size=4",
    "train.log_every=10",
    "train.checkpoint_every=10",
    "train.val_every=10",
    "train.val_examples=16",
    "eval.batch_size=16",
    "scale.cpus_per_worker=1",
    "tune.num_samples=3",
    "tune.max_concurrent=1",  # one trial at a time: "one finished" is a clean cut
    "tune.scheduler.grace_period=10",  # ASHA rungs at steps 10 and 20
    "tune.search.n_startup_trials=2",
]


def test_job_yaml_and_sweep_section_load():
    cfg, sweep = launch_tune.load_job(JOB, ["tune.num_samples=3", "train.steps=500"])
    assert sweep.num_samples == 3 and cfg.train.steps == 500
    assert cfg.train.val_every > 0, "the sweep's objective comes from the recipe's periodic validation"
    assert sweep.metric.startswith("val_") and sweep.scheduler.type == "asha" and sweep.search.type == "optuna"
    assert Path(JOB).read_text().startswith("# ray job submit")
    space = launch_tune.param_space(sweep)
    assert set(space) == set(sweep.space)
    for bad in (["tune.mode=best"], ["tune.scheduler.type=hyperband"],
                ["train.steps=450"]):  # the last step must be a validation step (val_every=100)
        with pytest.raises(ValueError):
            launch_tune.load_job(JOB, bad)


def test_sweep_space_is_checked_against_the_schema(tmp_path):
    text = Path(JOB).read_text()
    for space, what in (
        ("    train.lrr: {loguniform: [1.0e-4, 1.0e-3]}\n", "unknown key"),
        ("    lora.r: {loguniform: [4, 16]}\n", "float into an int field"),
        ("    data.num_images: {choice: [100, 200]}\n", "data is fixed for a sweep"),
        ("    train.lr: {between: [1, 2]}\n", "unknown domain"),
    ):
        job = tmp_path / "job.yaml"
        job.write_text(text.split("  space:\n")[0] + "  space:\n" + space)
        with pytest.raises(ValueError):
            launch_tune.load_job(job)


def test_lora_space_keys_map_onto_the_schema(tmp_path):
    # the keys a sweep over a pretrained base uses (the tiny job trains from scratch, fully)
    text = Path(JOB).read_text()
    job = tmp_path / "lora.yaml"
    job.write_text(text.split("  space:\n")[0] + "  space:\n" + "".join(
        f"    {k}: {v}\n" for k, v in {
            "lora.r": "{choice: [8, 16, 32]}", "lora.alpha": "{choice: [16, 32]}", "lora.dropout": "{uniform: [0.0, 0.1]}",
            "model.unfreeze_vision_layers": "{randint: [0, 3]}", "train.lr": "{loguniform: [1.0e-5, 1.0e-3]}",
            "train.warmup_steps": "{choice: [0, 100]}", "loss.loc_sigma": "{choice: [0, 60]}"}.items()))
    cfg, sweep = launch_tune.load_job(job, ["train.strategy=lora"])
    assert len(launch_tune.param_space(sweep)) == 7
    trial = launch_tune.trial_config(cfg.to_dict(), {"lora.r": 16, "lora.dropout": 0.05, "model.unfreeze_vision_layers": 2, "loss.loc_sigma": 0})
    assert (trial.lora.r, trial.lora.dropout, trial.model.unfreeze_vision_layers, trial.loss.loc_sigma) == (16, 0.05, 2, 0.0)
    assert trial.train.strategy == "lora" and trial.train.lr == cfg.train.lr  # untouched keys keep the job's values


def _result(trial_id, value, step, error=None, ckpt_steps=()):
    import pandas as pd

    rows = [{"step": s, "checkpoint_path": f"/ck/{trial_id}/{s}" if s in ckpt_steps else None} for s in range(10, step + 1, 10)]
    return types.SimpleNamespace(
        metrics={"trial_id": trial_id, "step": step, "val_norm_distance_all": value,
                 "checkpoint_path": rows[-1]["checkpoint_path"]},
        config={"train.lr": 1e-3}, error=error, metrics_dataframe=pd.DataFrame(rows))


@pytest.mark.parametrize("mode", ["min", "max"])
def test_best_trial_follows_the_mode_and_skips_errored_trials(mode):
    cfg, sweep = launch_tune.load_job(JOB, [f"tune.mode={mode}", "storage.root=/nonexistent"])
    grid = [_result("a", 0.30, 30, ckpt_steps=(10, 20, 30)), _result("b", 0.10, 10, ckpt_steps=(10,)),
            _result("c", 0.60, 20, ckpt_steps=(10,)), _result("d", 0.95, 20, error=RuntimeError("boom"))]
    best = launch_tune.summarize(cfg, sweep, grid)
    assert best["trial_id"] == ("b" if mode == "min" else "c")  # errored "d" never wins
    assert best["value"] == (0.10 if mode == "min" else 0.60)
    if mode == "max":  # its last validated report carried no checkpoint: the latest before it
        assert (best["checkpoint"], best["checkpoint_step"], best["step"]) == ("/ck/c/10", 10, 20)
    assert [t["status"] for t in best["trials"]] == ["TERMINATED", "TERMINATED", "TERMINATED", "ERROR"]


def _trials(root: Path) -> list[dict]:
    p = root / "tune" / "sweep" / "trials.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def test_sweep_interrupted_then_resumed_finishes_remaining_trials_and_records_best(tmp_path, ray_cluster, tiny_model_path):
    root = tmp_path / "store"
    overrides = [f"storage.root={root}", f"model.name_or_path={tiny_model_path}",
                 f"ray.address={ray_cluster.get_runtime_context().gcs_address}", *SMALL]
    cmd = [sys.executable, "-m", "raytrain.cli", "tune", "--config", JOB, *overrides]
    env = {**os.environ, "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0"}
    sweep_dir = root / "tune" / "sweep"

    # 1) start the sweep; Ctrl-C once one trial has finished (the next one is then running)
    t0 = time.time()
    log1 = tmp_path / "first.log"  # a file, not a pipe: nobody drains a pipe while we poll
    with log1.open("w") as out:
        first = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + 600  # generous: shared CI cores
        while time.time() < deadline and first.poll() is None and len(_trials(root)) < 1:
            time.sleep(0.5)
        assert len(_trials(root)) >= 1, f"no trial finished within 600 s:\n{log1.read_text()[-4000:]}"
        first.send_signal(signal.SIGINT)
        try:
            first.wait(120)
        except subprocess.TimeoutExpired:
            first.kill()
            first.wait()
    out1 = log1.read_text()
    finished_first = {r["trial_id"]: r for r in _trials(root)}
    assert len(finished_first) < 3, "the sweep finished before it could be interrupted"
    assert first.returncode == 130, out1[-4000:]
    assert "interrupted" in out1
    assert not (sweep_dir / "best.json").exists()
    histories = {t: (sweep_dir / "runs" / t / "history.jsonl").read_text() for t in finished_first}
    t_first = time.time() - t0

    # 2) the same command resumes: remaining trials only
    second = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900, env=env)
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    assert "resuming sweep" in second.stdout
    best_path = second.stdout.strip().splitlines()[-1]
    assert best_path == str(sweep_dir / "best.json")
    best = json.loads(Path(best_path).read_text())

    rows = _trials(root)
    ids = [r["trial_id"] for r in rows]
    assert len(set(ids)) == 3 and len(ids) == 3, f"each trial must finish exactly once: {ids}"
    assert ids[: len(finished_first)] == list(finished_first)  # earlier lines kept
    for t, text in histories.items():  # finished trials were not rerun: their Train runs are untouched
        assert (sweep_dir / "runs" / t / "history.jsonl").read_text() == text
    assert all(r["status"] == "TERMINATED" for r in rows)

    # the best trial by the grounding metric's final value, with min respected
    metric = best["metric"]
    assert metric == "val_norm_distance_all" and best["mode"] == "min"
    finals = {r["trial_id"]: r[metric] for r in rows}
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in finals.values())
    assert best["value"] == pytest.approx(min(finals.values()))
    assert finals[best["trial_id"]] == pytest.approx(best["value"])
    if len(set(finals.values())) > 1:  # min, not max, when the trials differ
        assert best["value"] < max(finals.values())
    assert {t["trial_id"] for t in best["trials"]} == set(finals)

    # Tune's own record agrees: 3 trials, all finished, the same final values
    from ray.tune import ExperimentAnalysis

    tune_trials = ExperimentAnalysis(str(sweep_dir)).trials
    assert sorted(t.trial_id for t in tune_trials) == sorted(finals)
    assert all(t.status == "TERMINATED" for t in tune_trials)
    assert {t.trial_id: t.last_result[metric] for t in tune_trials} == pytest.approx(finals)

    # ASHA: every trial ran to max_t or was stopped at a rung (grace_period * 2**k)
    steps = {r["trial_id"]: r["step"] for r in rows}
    assert all(s in (10, 20, 30) for s in steps.values()), steps
    assert best["step"] == steps[best["trial_id"]]

    # the best trial's overrides cover the space and rebuild its config; its checkpoint is the trial's
    _, sweep = launch_tune.load_job(JOB)
    assert set(best["overrides"]) == set(sweep.space)
    assert best["config"]["train"]["lr"] == pytest.approx(best["overrides"]["train.lr"])
    assert best["config"]["loss"]["loc_sigma"] == best["overrides"]["loss.loc_sigma"]
    ckpt = Path(best["checkpoint"])
    assert (ckpt / checkpointing.TRAINER_STATE).exists()
    assert checkpointing.read_state(ckpt)["step"] == best["checkpoint_step"] == best["step"]
    print(f"\nsweep: first run {t_first:.0f} s, resume {time.time() - t0 - t_first:.0f} s; steps {steps}; finals {finals}")


REPO = Path(__file__).resolve().parents[2]


def test_trials_run_the_jobs_recipe_with_the_jobs_resources(tmp_path, tiny_model_path):
    """One-trial sweeps of a zero2 job (2 workers, SPREAD) and a full job (1 worker, PACK), each with
    scale.resources_per_worker={trainer: 1}, on a head (2 CPUs) + one node holding the cluster's only
    `trainer` resource (_tune_resources_job.py owns that cluster in its own process)."""
    proc = subprocess.run([sys.executable, str(REPO / "tests/integration/_tune_resources_job.py"), str(tmp_path / "store"), tiny_model_path],
                          cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])

    for strategy, workers, placement in (("zero2", 2, "SPREAD"), ("full", 1, "PACK")):
        r = res[strategy]
        # the trial's Train workers asked for the job's resources and placement: its worker group's
        # placement group has one {CPU: 0.5, trainer: 1} bundle per worker, with the job's strategy
        (group,) = r["groups"]
        assert group["bundles"] == [{"CPU": 0.5, "trainer": 1.0}] * workers, group
        assert group["strategy"] == placement
        # ... so every rank ran on the only node that has the resource (the head has free CPUs too)
        assert r["history"] and all(h["node_ips"] == ["127.0.0.2"] * workers for h in r["history"]), r["history"]
        # the trial ran to the end and reported the objective (ZeRO validates in training too)
        best = r["best"]
        assert best["step"] == 4 and isinstance(best["value"], float) and 0.0 <= best["value"] <= 1.0
        assert best["config"]["train"]["strategy"] == strategy and best["config"]["scale"]["resources_per_worker"] == {"trainer": 1.0}
        ckpt = Path(best["checkpoint"])
        state = checkpointing.read_state(ckpt)
        assert state["strategy"] == strategy and state["step"] == 4
        if strategy == "zero2":  # recipes/zero.py's layout: both ranks' ZeRO-2 shards, no model/ or adapter/
            assert state["zero_stage"] == 2 and state["world_size"] == 2
            shards = zero_checkpoint.shard_files(ckpt)
            assert sorted(Path(f).name for f in shards if f.endswith("optim_states.pt")) == [
                f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)]
            assert not (ckpt / "model").exists() and not (ckpt / "adapter").exists()
        else:  # recipes/ddp.py's full fine-tuning layout
            assert "zero_stage" not in state and (ckpt / "model").is_dir() and not (ckpt / "zero").exists()
