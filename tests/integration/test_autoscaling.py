"""Autoscaling with cluster.yaml's GPU worker types on Ray's fake multi-node provider.

The head advertises CPU 0, as in cluster.yaml. The worker types carry cluster.yaml's names and
its GPU / accelerator_type resources, with CPU cut to 1 so they fit on a laptop. One task asks
for an H100 and one for an A100 (`accelerator_type=`, as ScalingConfig(accelerator_type=...)
would). The test checks that the autoscaler launches one node of each matching type, runs each
task on the right one, and removes both nodes once they have been idle for idle_timeout_minutes.

Isolation: this test runs only with RAYTRAIN_RUN_AUTOSCALING=1, and it skips when any other Ray
is running on the machine. That keeps it a separate CI step: it starts several raylets, which is
heavy on small machines. It does not use ray.cluster_utils.AutoscalingCluster. That helper's
start and shutdown run `ray stop --force`, which kills every Ray process on the machine, and in
Ray 2.60's wheel it also fails because fake_multi_node/example.yaml is missing. Instead it starts
a head with `ray start --block` on free loopback ports, in its own temp dir and with its own
token, and shuts down only the processes whose command lines name that temp dir.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.autoscaling,
    pytest.mark.skipif(
        os.environ.get("RAYTRAIN_RUN_AUTOSCALING") != "1",
        reason="starts several raylets; opt in with RAYTRAIN_RUN_AUTOSCALING=1 (run it as its own CI step)",
    ),
    pytest.mark.timeout(300),
]

IDLE_TIMEOUT_MIN = 0.1  # 6 s: fractional minutes are allowed (the schema says "number")
FAKE_HEAD_TYPE = "ray.head.default"  # the fake provider tags its head node with this type name


def _other_ray_processes() -> list[str]:
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            name = p.info["name"] or ""
            exe = os.path.basename((p.info["cmdline"] or [""])[0])
        except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
            continue
        if name in ("raylet", "gcs_server") or exe in ("raylet", "gcs_server"):
            found.append(f"{name or exe} (pid {p.info['pid']})")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # the kernel's ephemeral range: clear of Ray's worker ports 10002-19999
        return s.getsockname()[1]


def _fake_config(gcs_port: int) -> dict:
    """Autoscaler config for the fake provider, with worker types taken from cluster.yaml."""
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    node_types: dict = {FAKE_HEAD_TYPE: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}}
    for name, t in cluster["available_node_types"].items():
        if name == cluster["head_node_type"]:
            continue
        res = {k: v for k, v in t["resources"].items() if k != "CPU"}  # GPU, accelerator_type:*
        res.update(CPU=1, object_store_memory=100 * 1024 * 1024)  # laptop-sized
        node_types[name] = {"resources": res, "node_config": {}, "min_workers": 0, "max_workers": 1}
    return {
        "cluster_name": "raytrain-fake",
        "max_workers": len(node_types) - 1,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": f"127.0.0.1:{gcs_port}",  # else the fake nodes look for a GCS on 6379
        },
        "auth": {},
        "docker": {},
        "available_node_types": node_types,
        "head_node_type": FAKE_HEAD_TYPE,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def _kill_ours(marker: str) -> None:
    """SIGKILL processes whose command line names our temp dir, by pid, and nothing else."""
    import psutil

    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.info["pid"] != os.getpid() and any(marker in a for a in (p.info["cmdline"] or [])):
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


@pytest.fixture
def fake_cluster(request):
    others = _other_ray_processes()
    if others:
        pytest.skip(f"another Ray is running on this machine ({', '.join(others[:3])}); this test needs it alone")

    from ray.autoscaler._private.util import validate_config

    state = Path(tempfile.mkdtemp(prefix="rtas-", dir="/tmp"))  # short: Ray's unix socket paths
    temp_dir = state / "ray"
    token = state / "auth_token"
    token.write_text(os.urandom(32).hex())
    token.chmod(0o600)
    gcs_port, client_port = _free_port(), _free_port()
    config = _fake_config(gcs_port)
    validate_config(config)  # the same schema check as cluster.yaml's
    (state / "autoscaler.yaml").write_text(json.dumps(config))

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "RAY_AUTH"))}
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # every node (head and fake workers) on 127.0.0.1
        RAY_USAGE_STATS_ENABLED="0",
        RAY_FAKE_CLUSTER="1",  # FakeMultiNodeProvider refuses to run without it
        AUTOSCALER_UPDATE_INTERVAL_S="1",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
    )
    cleanup = False
    log = open(state / "head.log", "w")
    head = subprocess.Popen(
        [
            "ray", "start", "--head", "--block",
            "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
            f"--ray-client-server-port={client_port}",
            f"--autoscaling-config={state / 'autoscaler.yaml'}",
            "--num-cpus=0",  # as in cluster.yaml: nothing runs on the head
            f"--object-store-memory={100 * 1024 * 1024}",
            "--include-dashboard=false", "--dashboard-agent-listen-port=0",
            f"--temp-dir={temp_dir}", "--disable-usage-stats",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert head.poll() is None, (state / "head.log").read_text()[-3000:]
            try:
                socket.create_connection(("127.0.0.1", gcs_port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the head's GCS never came up"
                time.sleep(1)
        failed_before = request.session.testsfailed
        yield {"address": f"127.0.0.1:{gcs_port}", "env": env, "state": state, "config": config}
        if request.session.testsfailed == failed_before:
            cleanup = True  # keep the logs (head.log, ray/session_*/logs/monitor.*) only on failure
        else:
            print(f"autoscaling test state and Ray logs kept in {state}")
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops its own node's processes
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
        _kill_ours(str(temp_dir))  # fake worker nodes, if the test failed before they idled out
        log.close()
        if cleanup:
            shutil.rmtree(state, ignore_errors=True)


DRIVER = r"""
import json, sys, time
import ray

ray.init(address=sys.argv[1], log_to_driver=False)
wanted = json.loads(sys.argv[2])  # {node type: accelerator type}

def workers():
    return [n for n in ray.nodes() if n["Alive"] and "node:__internal_head__" not in n["Resources"]]

report = {"workers_at_start": len(workers())}

@ray.remote(num_cpus=1, num_gpus=1)
def probe():
    time.sleep(2)
    return ray.get_runtime_context().get_node_id()

t0 = time.monotonic()
refs = {nt: probe.options(accelerator_type=acc).remote() for nt, acc in wanted.items()}
ran_on = dict(zip(refs, ray.get(list(refs.values()), timeout=150)))
report["up_s"] = round(time.monotonic() - t0, 1)
by_id = {n["NodeID"]: n for n in ray.nodes()}
report["ran_on"] = {nt: sorted(k for k in by_id[nid]["Resources"] if k.startswith("accelerator_type:")) for nt, nid in ran_on.items()}
report["distinct_nodes"] = len(set(ran_on.values()))
report["workers_peak"] = len(workers())

t1 = time.monotonic()
while workers() and time.monotonic() - t1 < 120:
    time.sleep(1)
report["down_s"] = round(time.monotonic() - t1, 1)
report["workers_at_end"] = len(workers())
print("REPORT " + json.dumps(report), flush=True)
"""


def test_gpu_nodes_scale_up_on_demand_and_down_when_idle(fake_cluster):
    cfg = fake_cluster["config"]
    wanted = {
        name: next(k.split(":", 1)[1] for k in t["resources"] if k.startswith("accelerator_type:"))
        for name, t in cfg["available_node_types"].items()
        if name != FAKE_HEAD_TYPE
    }
    assert sorted(wanted.values()) == ["A100", "H100"]

    t = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, fake_cluster["address"], json.dumps(wanted)],
        env=fake_cluster["env"], capture_output=True, text=True, timeout=240,
    )
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("REPORT ")), None)
    assert line, out.stdout[-2000:] + out.stderr[-3000:]
    report = json.loads(line[len("REPORT "):])
    report["total_s"] = round(time.monotonic() - t, 1)
    print(report)

    assert report["workers_at_start"] == 0  # min_workers 0: no GPU node without demand
    # one node of each requested type came up and ran exactly the task that asked for it
    assert report["distinct_nodes"] == 2 and report["workers_peak"] == 2
    for node_type, acc in wanted.items():
        assert report["ran_on"][node_type] == [f"accelerator_type:{acc}"], report
    # ...and went away after the idle timeout
    assert report["workers_at_end"] == 0, report
    assert report["down_s"] >= IDLE_TIMEOUT_MIN * 60 * 0.5
