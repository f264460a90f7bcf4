"""Driver for test_multinode.py, run in its own process (it owns a whole multi-node Ray cluster).

A head (127.0.0.1, data + evaluation) and two trainer nodes (127.0.0.2, 127.0.0.3). Training runs
2 workers spread over the trainer nodes; once a checkpoint exists the node of one worker is killed
and a replacement (127.0.0.4) joins. Prints one JSON line with what happened.
"""

import json
import os
import sys
import threading
import time

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from raytrain import config as config_mod  # noqa: E402
from raytrain.launch import ray_runtime  # noqa: E402
from raytrain.launch import job  # noqa: E402
from raytrain.launch import train as launch_train  # noqa: E402
from raytrain.training.metrics import read_history  # noqa: E402


def main(root: str, model_path: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False, "object_store_memory": 300 * 1024**2})
    nodes = {ip: cluster.add_node(num_cpus=1, node_ip_address=ip, resources={"trainer": 1}, object_store_memory=100 * 1024**2)
             for ip in ("127.0.0.2", "127.0.0.3")}
    # joined the way `raytrain train` joins a cluster: with the job's environment
    # the driver on the head's raylet, as `ray job submit` runs it (with every node on this machine, Ray
    # could attach it to a trainer node's raylet, and the run's driver-side actors would die with it)
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False, runtime_env=ray_runtime.runtime_env())
    cfg = config_mod.load("jobs/tiny/shapes.yaml", [
        f"storage.root={root}", "name=multinode", f"model.name_or_path={model_path}", "data.num_images=200",
        "train.steps=40", "train.micro_batch_size=8", "train.checkpoint_every=10", "train.log_every=5", "train.warmup_steps=4",
        "scale.num_workers=2", "scale.cpus_per_worker=1", "scale.resources_per_worker={trainer: 1}",
        "scale.placement_strategy=STRICT_SPREAD", "scale.max_failures=3", "eval.baselines=false", "eval.cpus_per_actor=0.5"])
    events, result = {}, {}

    def run():
        try:
            result["out"] = launch_train.main(cfg)
        except BaseException as e:  # noqa: BLE001 - reported to the test below
            import traceback

            result["error"] = f"{e!r}: {e}\n{traceback.format_exc()}"  # Ray's reprs alone say nothing ("ActorDiedError()")

    # the job runs in a thread; the main thread plays chaos (Ray nodes must be added from it)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    hist = job.history_uri(cfg)
    deadline = time.time() + 500
    while time.time() < deadline and t.is_alive():
        rows = read_history(hist)
        if any(r.get("checkpoint") for r in rows):
            victim = rows[-1]["node_ips"][0]
            events.update(killed=victim, killed_after_step=rows[-1]["step"], replacement="127.0.0.4")
            cluster.remove_node(nodes[victim], allow_graceful=False)
            cluster.add_node(num_cpus=1, node_ip_address="127.0.0.4", resources={"trainer": 1}, object_store_memory=100 * 1024**2)
            break
        time.sleep(0.3)
    t.join(600)
    if "out" not in result:
        ray.shutdown()
        cluster.shutdown()
        raise SystemExit(f"job failed: {result.get('error', 'timeout')}")
    out = result["out"]
    metrics = json.load(open(out))
    rows = read_history(job.history_uri(cfg))
    ray.shutdown()
    cluster.shutdown()
    print(json.dumps({"events": events, "final_step": metrics["run"]["final_step"], "history": rows,
                      "examples": metrics["trained"]["examples"]}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
