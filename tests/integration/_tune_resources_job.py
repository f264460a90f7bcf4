"""Driver for test_tune.py's resources test, run in its own process (it owns a two-node Ray cluster).

A head (127.0.0.1, 2 CPUs: Tune, Ray Data) and one trainer node (127.0.0.2, 1 CPU, the custom
resource {"trainer": 2}). Two one-trial sweeps of jobs/tiny/shapes_sweep.yaml, both asking for
scale.resources_per_worker={trainer: 1}: a zero2 job on 2 workers placed SPREAD, and a full job on
1 worker. Prints one JSON line: per sweep, best.json, the trial's history rows, and the placement
groups whose bundles asked for the trainer resource.
"""

import json
import os
import sys

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from raytrain.launch import ray_runtime  # noqa: E402
from raytrain.launch import tune as launch_tune  # noqa: E402
from raytrain.training.metrics import read_history  # noqa: E402

JOB = "jobs/tiny/shapes_sweep.yaml"
# data.rows_per_shard: the 54 train rows as 3 shards, one per CPU of the cluster: whole-file read blocks
# that fuse with the next stage (data/pipeline.py read_blocks); every read task is a worker process, and
# process start-up is most of a trial's time on 2 cores.
SMALL = ["data.num_images=60", "data.rows_per_shard=18", "train.steps=4", "train.micro_batch_size=4", "train.warmup_steps=0", "train.log_every=2",
         "train.checkpoint_every=4", "train.val_every=4", "train.val_examples=4", "model.freeze_vision=false",
         "scale.cpus_per_worker=0.5", "scale.max_failures=0", "scale.resources_per_worker={trainer: 1}",
         "tune.num_samples=1", "tune.max_concurrent=1", "tune.scheduler.type=fifo", "tune.search.type=random"]
JOBS = {
    "zero2": ["train.strategy=zero2", "scale.num_workers=2", "scale.placement_strategy=SPREAD"],
    "full": ["train.strategy=full", "scale.num_workers=1", "scale.placement_strategy=PACK"],
}


def trainer_groups() -> list[dict]:
    """Placement groups (removed ones included) with a bundle that asked for the trainer resource."""
    out = []
    for pg_id, info in ray.util.placement_group_table().items():
        bundles = [dict(b) for b in info.get("bundles", {}).values()]
        if any("trainer" in b for b in bundles):
            out.append({"id": pg_id, "strategy": info.get("strategy"), "bundles": bundles})
    return out


def main(root: str, model_path: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False, "object_store_memory": 300 * 1024**2})
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.2", resources={"trainer": 2}, object_store_memory=100 * 1024**2)
    ray.init(address=cluster.address, log_to_driver=False, runtime_env=ray_runtime.runtime_env())
    result = {}
    try:
        for strategy, extra in JOBS.items():
            before = {g["id"] for g in trainer_groups()}
            cfg, sweep = launch_tune.load_job(JOB, [f"name=res_{strategy}", f"storage.root={root}", f"model.name_or_path={model_path}",
                                                    *SMALL, *extra])
            best_uri = launch_tune.main(cfg, sweep)
            best = json.load(open(best_uri))
            history = read_history(os.path.join(launch_tune.trial_runs_root(cfg), best["trial_id"], "history.jsonl"))
            result[strategy] = {"best": best, "history": history,
                                "groups": [g for g in trainer_groups() if g["id"] not in before]}
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
