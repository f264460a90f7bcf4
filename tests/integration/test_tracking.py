"""Experiment tracking (launch/tracking.py) against real MLflow stores (SQLite under the storage root,
read back with MLflow's client) and W&B in offline mode (read back from its run file), and the main
job run as a new user would: what its console prints, and what its MLflow run holds."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raytrain import config as config_mod
from raytrain import storage
from raytrain.launch import job, tracking

pytestmark = pytest.mark.integration
mlflow = pytest.importorskip("mlflow")
REPO = Path(__file__).resolve().parents[2]


def _client(cfg):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking.mlflow_uri(cfg))


def _history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One storage root (one SQLite store: creating its tables takes seconds) for the module."""
    return tmp_path_factory.mktemp("track")


def test_mlflow_run_holds_config_curve_eval_files_and_a_rerun_continues_it(store, tmp_path):
    cfg = config_mod.load("jobs/tiny/shapes.yaml", [f"storage.root={store}", "name=curve", "track.mlflow=true", "train.steps=30"])
    run_dir = str(tmp_path / "runs" / "curve")
    t = tracking.open_run(cfg, run_dir, name=cfg.name)
    for step, loss in ((1, 7.5), (10, 5.0), (20, 3.0)):
        t.log_report({"step": step, "loss": loss, "ce": loss, "lr": 1e-3, "samples_per_s": 100.0, "node_ip": "127.0.0.1"})
    (tmp_path / "m.json").write_text("{}")
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "index.html").write_text("<html></html>")
    t.log_eval({"trained": {"mean_norm_distance": 0.03, "boxes": {"f1": 0.7}}, "centre_baseline": {"mean_norm_distance": 0.2}},
               {"eval/metrics.json": str(tmp_path / "m.json"), "report": str(tmp_path / "report")}, split="test", step=20)
    t.finish(ok=True)

    record = json.loads((Path(run_dir) / tracking.RECORD).read_text())["mlflow"]
    client = _client(cfg)
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "curve"
    assert client.get_experiment(run.info.experiment_id).name == "raytrain"
    params = run.data.params
    assert params["train.steps"] == "30" and params["train.lr"] == "0.002" and params["data.tasks"] == '["point", "detect"]'
    assert len(params) == len(tracking.flat_params(cfg.to_dict()))  # the whole config
    assert _history(client, run.info.run_id, "loss") == [(1, 7.5), (10, 5.0), (20, 3.0)]
    assert "node_ip" not in run.data.metrics
    assert run.data.metrics["eval/test/trained/mean_norm_distance"] == pytest.approx(0.03)
    assert run.data.metrics["eval/test/trained/boxes/f1"] == pytest.approx(0.7)
    assert {f.path for f in client.list_artifacts(run.info.run_id, "eval")} == {"eval/metrics.json"}
    assert {f.path for f in client.list_artifacts(run.info.run_id, "report")} == {"report/index.html"}
    assert run.info.artifact_uri.startswith(f"file://{store}/mlflow/artifacts/")

    # the rerun (a resumed raytrain run) continues the same MLflow run, with a changed setting noted
    cfg2 = config_mod.load("jobs/tiny/shapes.yaml", [f"storage.root={store}", "name=curve", "track.mlflow=true", "train.steps=40"])
    t2 = tracking.open_run(cfg2, run_dir, name=cfg2.name)
    assert t2.mlflow_run_id == record["run_id"]
    assert client.get_run(record["run_id"]).info.status == "RUNNING"
    t2.log_report({"step": 30, "loss": 2.0})
    t2.finish(ok=False)
    run = client.get_run(record["run_id"])
    assert run.info.status == "FAILED"
    assert _history(client, run.info.run_id, "loss")[-1] == (30, 2.0)
    assert run.data.params["train.steps"] == "30" and run.data.tags["raytrain.changed_on_resume.train.steps"] == "40"


def test_sweep_trials_are_child_runs_and_a_killed_trial_is_closed(store, tmp_path):
    cfg = config_mod.load("jobs/tiny/shapes_sweep.yaml", [f"storage.root={store}", "name=sweep", "track.mlflow=true"])
    parent = tracking.open_run(cfg, str(tmp_path / "sweep"), name="sweep", kind="sweep")
    child_dir = str(tmp_path / "sweep" / "runs" / "trial_1")
    child = tracking.open_run(cfg, child_dir, name="trial_1", kind="trial", parent=parent.parent_info(), group="sweep")
    child.log_report({"step": 10, "val_norm_distance_all": 0.2})
    # the trial was stopped by ASHA (its actor killed): the sweep's driver closes its run
    tracking.close_trial(child_dir, job.storage_opts(cfg), ok=True)
    parent.log_results({"val_norm_distance_all": 0.2}, prefix="best", step=10)
    parent.finish(ok=True)
    client = _client(cfg)
    run = client.get_run(child.mlflow_run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.mlflow_run_id
    assert run.data.tags["raytrain.kind"] == "trial" and run.info.status == "FINISHED"
    assert client.get_run(parent.mlflow_run_id).data.metrics["best/val_norm_distance_all"] == pytest.approx(0.2)


def test_a_tracking_failure_does_not_stop_the_run(store, tmp_path, caplog):
    cfg = config_mod.load(None, [f"storage.root={store}", "name=fails", "track.mlflow=true"])
    t = tracking.open_run(cfg, str(tmp_path / "fails"), name="fails")
    t.backends[0].run_id = "no-such-run"  # as if the server lost it
    t.log_report({"step": 1, "loss": 1.0})
    t.log_report({"step": 2, "loss": 1.0})
    t.finish()
    assert t.backends == [] and sum("mlflow tracking stopped" in r.getMessage() for r in caplog.records) == 1


# ---------------------------------------------------------------------------- W&B, offline


def _wandb_records(path: Path) -> list:
    """The records of a W&B run file: a 7-byte header (":W&B", magic, version), then LevelDB-log-format
    records in 32 KiB blocks (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last), each a
    wandb_internal_pb2.Record (the layout wandb's datastore writes)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, out = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind in (2, 3):
            buf = (b"" if kind == 2 else buf) + chunk
        elif kind == 4:
            out.append(buf + chunk)
            buf = b""
        elif kind == 0:
            pos += left - 7 - length  # zero padding to the end of the block
    records = []
    for raw in out:
        r = pb.Record()
        r.ParseFromString(raw)
        records.append(r)
    return records


def test_wandb_offline_run_holds_config_curve_and_eval(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for k in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(k)
    cfg = config_mod.load("jobs/tiny/shapes.yaml", [f"storage.root={tmp_path}", "name=wb", "track.wandb=raytrain-test",
                                                    "track.wandb_mode=offline", "track.artifacts=false"])
    run_dir = str(tmp_path / "runs" / "wb")
    t = tracking.open_run(cfg, run_dir, name="wb")
    for step, loss in ((1, 7.5), (10, 5.0)):
        t.log_report({"step": step, "loss": loss})
    t.log_eval({"trained": {"valid_rate": 0.9}}, split="test", step=10)
    t.finish()
    record = json.loads((Path(run_dir) / tracking.RECORD).read_text())["wandb"]
    files = list((Path(run_dir) / "wandb").glob(f"offline-run-*-{record['id']}/run-{record['id']}.wandb"))
    assert len(files) == 1, list((Path(run_dir) / "wandb").iterdir())
    deadline = time.time() + 60  # W&B's service process writes the file: wait for the run's exit record
    while not any(r.WhichOneof("record_type") == "exit" for r in _wandb_records(files[0])) and time.time() < deadline:
        time.sleep(0.5)
    history, config = [], {}
    for r in _wandb_records(files[0]):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif kind in ("config", "run"):  # the config comes with the run record, later changes as config records
            items = r.config.update if kind == "config" else r.run.config.update
            config.update({i.key: json.loads(i.value_json) for i in items})
    curve = [(h["step"], h["loss"]) for h in history if "loss" in h]
    assert curve == [(1, 7.5), (10, 5.0)]
    assert any(h.get("eval/test/trained/valid_rate") == 0.9 for h in history)
    assert config["train.lr"] == "0.002" and config["name"] == "wb"
    # a rerun continues the same W&B run id
    t2 = tracking.open_run(cfg, run_dir, name="wb")
    assert t2.backends[0].id == record["id"]
    t2.finish()


# ---------------------------------------------------------------------------- the main job, as a user runs it


SHORT = ["data.num_images=200", "train.steps=20", "train.log_every=5", "train.checkpoint_every=10", "train.warmup_steps=2"]
MARK = "@raytrain@ "
MAX_FOREIGN = 10


def test_main_job_prints_few_lines_it_did_not_write_and_its_mlflow_run_holds_config_curve_eval(tmp_path):
    """`raytrain train --config jobs/tiny/shapes.yaml` (short) on a fresh cluster with track.mlflow=true:
    at most 10 console lines come from anything but raytrain's own code (tests/integration/_console_audit.py
    marks the lines raytrain's Python wrote), raytrain prints a progress line per report, and the MLflow
    run holds the config, the loss curve, the eval metrics and the report files."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(REPO / "tests" / "integration" / "_console_audit.py"), "train", "--config", "jobs/tiny/shapes.yaml",
           f"storage.root={tmp_path}", "track.mlflow=true", *SHORT]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 0, "\n".join(lines[-60:])
    ours = [ln[len(MARK):] for ln in lines if ln.startswith(MARK)]
    foreign = [ln for ln in lines if not ln.startswith(MARK) and ln.strip()]
    assert len(foreign) <= MAX_FOREIGN, "lines raytrain did not write:\n" + "\n".join(foreign)
    progress = [ln for ln in ours if " train step " in ln]
    assert [ln.split(" train step ")[1].split(" |")[0] for ln in progress] == ["1/20", "5/20", "10/20", "15/20", "20/20"]
    assert all(" loss " in ln and " samples/s " in ln and " ETA " in ln for ln in progress)
    assert proc.stdout.strip().splitlines()[-1].endswith("eval/metrics.json")  # still the last line

    cfg = config_mod.load("jobs/tiny/shapes.yaml", [f"storage.root={tmp_path}", "track.mlflow=true", *SHORT])
    run_dir = storage.run_dir(job.runs_root(cfg), cfg.name)
    record = storage.read_json(storage.join(run_dir, tracking.RECORD))["mlflow"]
    client = _client(cfg)
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "20" and run.data.params["data.num_images"] == "200"
    assert [s for s, _ in _history(client, run.info.run_id, "loss")] == [1, 5, 10, 15, 20]
    history = [json.loads(x) for x in Path(run_dir, "history.jsonl").read_text().splitlines()]
    assert [v for _, v in _history(client, run.info.run_id, "loss")] == pytest.approx([h["loss"] for h in history])
    metrics = json.loads(Path(run_dir, "eval", "metrics.json").read_text())
    for col in ("trained", "untrained", "centre_baseline"):
        assert run.data.metrics[f"eval/test/{col}/valid_rate"] == pytest.approx(metrics[col]["valid_rate"])
    assert {"eval/metrics.json", "eval/predictions_test.jsonl"} <= {f.path for f in client.list_artifacts(run.info.run_id, "eval")}
    assert "report/index.html" in {f.path for f in client.list_artifacts(run.info.run_id, "report")}
    assert "history.jsonl" in {f.path for f in client.list_artifacts(run.info.run_id)}
