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


_PLACEMENT = """
import json, os
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
import ray
from ray.cluster_utils import Cluster
from raytrain.data import packing, pipeline
from raytrain.launch import console
c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1", "include_dashboard": False,
                                                  "object_store_memory": 200 * 1024**2})
for ip in ("127.0.0.2", "127.0.0.3"):
    c.add_node(num_cpus=1, node_ip_address=ip, object_store_memory=100 * 1024**2)
ray.init(address=c.address, _node_ip_address="127.0.0.1", log_to_driver=False)
where = lambda a: ray.get(a.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))
ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
got = {"filter": [], "counter": [], "queue": []}
for _ in range(6):
    got["filter"].append(ips[where(packing.epoch_filter())])
    got["counter"].append(ips[where(pipeline.drop_counter())])
    with console.ReportStream([]) as stream:
        got["queue"].append(ips[where(stream._queue.actor)])
ray.shutdown()
c.shutdown()
print(json.dumps(got))
"""


def test_driver_side_actors_stay_on_the_drivers_node():
    # A soft node affinity placed them on worker nodes about half the time (measured: 3 of 6 epoch
    # filters), and a lost worker node then failed the whole run instead of being replaced.
    proc = subprocess.run([sys.executable, "-c", _PLACEMENT], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(ip == "127.0.0.1" for ips in got.values() for ip in ips) and all(len(v) == 6 for v in got.values()), got
