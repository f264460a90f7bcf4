"""Multi-node training on a local Ray cluster whose nodes have distinct loopback addresses:
training spreads over nodes; a node killed mid-run is replaced, the run restores from the latest
checkpoint and completes; retries are bounded; nothing is left running afterwards."""

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _ray_procs_on(ips):
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(ip in cmd for ip in ips) and ("raylet" in cmd or "gcs_server" in cmd or "ray::" in cmd):
            out.append((p.info["pid"], cmd[:120]))
    return out


def test_node_loss_is_survived(tmp_path, tiny_model_path):
    ips = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
    assert not _ray_procs_on(ips)
    proc = subprocess.run([sys.executable, str(REPO / "tests/integration/_multinode_job.py"), str(tmp_path), tiny_model_path],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    hist = res["history"]

    # before the failure the two ranks ran on the two trainer nodes
    first = [r for r in hist if r["resumed_from"] < 0]
    assert sorted(first[0]["node_ips"]) == ["127.0.0.2", "127.0.0.3"]
    # a node was killed after a checkpoint; the run restored from a checkpoint and finished
    assert res["events"]["killed"] in ("127.0.0.2", "127.0.0.3")
    resumed = [r for r in hist if r["resumed_from"] >= 0]
    assert resumed, "no restore from checkpoint after the node loss"
    assert resumed[0]["resumed_from"] >= 10 and resumed[0]["resumed_from"] % 10 == 0
    assert "127.0.0.4" in resumed[-1]["node_ips"] and res["events"]["killed"] not in resumed[-1]["node_ips"]
    assert res["final_step"] == 40 and hist[-1]["step"] == 40
    assert res["examples"] > 0
    # bounded retries: one restore for one failure
    assert len({r["resumed_from"] for r in resumed}) == 1
    # no orphaned Ray processes on the test's addresses
    assert not _ray_procs_on(ips)
