"""GPU reservations on a machine without GPUs: a Ray cluster that declares 2 GPUs (its own, in a
subprocess) shows, through Ray's state API, that the evaluation's predictor actors reserve
eval.gpus_per_actor and a Serve replica gpus_per_replica, while both still run their model on CPU
(no CUDA here) and answer. On a cluster with no GPU at all, eval.cpu_fallback runs the pool on CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_predictors_and_replicas_reserve_declared_gpus_and_run_on_cpu(tmp_path, tiny_model_path):
    proc = subprocess.run([sys.executable, str(REPO / "tests/integration/_gpu_resources_job.py"), str(tmp_path), tiny_model_path],
                          capture_output=True, text=True, timeout=1500, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["cluster_gpus"] == 2.0
    actors = [a for k, a in out["actors"].items() if k != "_errors"]
    predictors = [a for a in actors if "Predictor" in a["class"]]
    replicas = [a for a in actors if "GroundingModel" in a["class"]]
    assert len(predictors) == 2, out["actors"]
    assert all(a["resources"].get("GPU") == 0.5 and a["resources"].get("CPU") == 0.5 for a in predictors), predictors
    assert replicas and all(a["resources"].get("GPU") == 0.5 for a in replicas), replicas
    # ... and still ran on CPU: every example scored, constrained (valid by construction). Both actors
    # started (above); how the split's few blocks spread over them is Ray Data's choice: since the
    # predict path got faster, the first actor up sometimes decodes them all.
    assert out["eval"]["devices"] == ["cpu"] and 1 <= out["eval"]["workers"] <= 2 and out["eval"]["examples"] > 0
    assert out["eval"]["valid_rate_by_task"] == {"detect": 1.0, "point": 1.0}
    assert out["serve"]["debug"]["device"] == "cpu"


def test_no_gpu_in_the_cluster_falls_back_to_cpu_predictors(ray_cluster, capsys):
    from raytrain import config as config_mod
    from raytrain.launch import eval as launch_eval

    assert not ray_cluster.cluster_resources().get("GPU")
    cfg = config_mod.load("jobs/tiny/shapes.yaml", ["eval.gpus_per_actor=1"])
    assert launch_eval.pool_gpus(cfg) == 0.0
    assert "no GPU" in capsys.readouterr().out
    cfg = config_mod.load("jobs/tiny/shapes.yaml", ["eval.gpus_per_actor=1", "eval.cpu_fallback=false"])
    assert launch_eval.pool_gpus(cfg) == 1.0  # waits for GPU nodes (an autoscaling cluster)
