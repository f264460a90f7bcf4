"""Driver for test_gpu_resources.py, run in its own process: it owns a local Ray cluster that
DECLARES two GPUs (this machine has none; Ray only counts them). The evaluation pool and a Serve
replica are asked for fractions of them; what they reserved is read from Ray's state API while they
run, and what they did shows they still ran on CPU. Prints one JSON line."""

import json
import os
import socket
import sys
import threading
import time

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import ray  # noqa: E402

from raytrain import config as config_mod  # noqa: E402
from raytrain.launch import ray_runtime  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(root: str, model_path: str) -> None:
    from ray.util.state import list_actors

    ctx = ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
                   dashboard_port=_free_port(), object_store_memory=300 * 1024**2, log_to_driver=False,
                   runtime_env=ray_runtime.runtime_env())
    ray_runtime.configure_ray_data()
    gcs = ctx.address_info["gcs_address"]
    seen: dict[str, dict] = {}
    stop = threading.Event()

    def watch():  # the state API, polled while the pool and the replica live
        while not stop.is_set():
            try:
                for a in list_actors(address=gcs, detail=True, raise_on_missing_output=False):
                    if "Predictor" in a.class_name or "GroundingModel" in a.class_name:
                        seen[a.actor_id] = {"class": a.class_name, "resources": dict(a.required_resources or {}), "state": a.state}
            except Exception as e:  # noqa: BLE001 - the dashboard may still be starting
                seen.setdefault("_errors", {"n": 0})["n"] += 1
                seen["_errors"]["last"] = repr(e)[:200]
            stop.wait(0.5)

    t = threading.Thread(target=watch, daemon=True)
    t.start()

    from raytrain.data import pipeline
    from raytrain.eval.exports import read_predictions
    from raytrain.launch import eval as launch_eval
    from raytrain.launch import job
    from raytrain.launch.prepare import prepare_data

    cfg = config_mod.load("jobs/tiny/shapes.yaml", [
        f"storage.root={root}", "name=gpu", f"model.name_or_path={model_path}", "data.num_images=120", "eval.baselines=false",
        "eval.gpus_per_actor=0.5", "eval.cpus_per_actor=0.5", "eval.num_actors=2", "eval.batch_size=4", "eval.max_new_tokens=12"])
    uri = prepare_data(cfg)
    metrics, out_dir = launch_eval.evaluate(cfg, uri, job.model_path(cfg), None, pipeline.drop_counter())
    rows = list(read_predictions(metrics["trained"]["files"]["predictions"]))

    from ray import serve

    from raytrain.launch.serve import smoke_request
    from raytrain.serve import app

    scfg = app.ServeConfig(model=model_path, port=_free_port(), num_cpus=0.5, gpus_per_replica=0.5, max_new_tokens=8)
    url = app.run(scfg)
    answer = smoke_request(url)
    time.sleep(2)
    stop.set()
    t.join()
    serve.shutdown()
    print(json.dumps({
        "cluster_gpus": ray.cluster_resources().get("GPU"),
        "actors": seen,
        "eval": {"examples": len(rows), "devices": sorted({r["device"] for r in rows}), "workers": len({r["worker"] for r in rows}),
                 "valid_rate_by_task": metrics["trained"]["valid_rate_by_task"]},
        "serve": {"debug": answer.get("debug"), "objects": answer.get("objects")},
    }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
