"""Load generator for the raytrain Serve app: N requests from C concurrent clients, on loopback only.

    python bench/serve_load.py --url http://127.0.0.1:8000/predict --requests 1000 --concurrency 8 \
        --adapters a,b,- --max-new-tokens 4
    python bench/serve_load.py --self-host --requests 1000 --concurrency 8   # starts the tiny app itself

Each client thread keeps one HTTP/1.1 keep-alive connection and sends its share of the requests
back to back (a closed loop: at most C requests in flight). Payloads cycle through synthetic
64-px shape images and the given adapters ('-' = base model), pre-encoded so the client spends its
CPU on sending, not on PNG encoding. Prints a JSON report (throughput, p50/p90/p99 latency, status
counts), then the one-line headline LAST.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import math
import sys
import threading
import time
from collections import Counter
from urllib.parse import urlsplit

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def make_payloads(n_images: int = 16, image_size: int = 64, adapters=(None,), max_new_tokens: int = 4, task: str = "point") -> list[bytes]:
    """JSON bodies: every synthetic image x every adapter (None = base model)."""
    from raytrain.data import synthetic

    bodies = []
    for i in range(n_images):
        ex = synthetic.make_example(i, seed=7, image_size=image_size)
        img = base64.b64encode(ex["image"]).decode()
        for a in adapters:
            body = {"image": img, "task": task, "prompt": ex["objects"][0].label, "max_new_tokens": max_new_tokens}
            if a:
                body["adapter"] = a
            bodies.append(json.dumps(body).encode())
    return bodies


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def run_load(url: str, bodies: list[bytes], n_requests: int = 1000, concurrency: int = 8, timeout_s: float = 30.0,
             deadline_s: float = 300.0) -> dict:
    """Send `n_requests` POSTs to `url` from `concurrency` threads; returns the report dict.
    Stops early (and says so) when `deadline_s` passes. Refuses non-loopback URLs."""
    parts = urlsplit(url)
    if parts.hostname not in LOOPBACK:
        raise ValueError(f"load tests run against loopback only, not {parts.hostname!r}")
    if not 1 <= concurrency <= 64:
        raise ValueError("concurrency must be in 1..64")
    host, port, path = parts.hostname, parts.port or 80, parts.path or "/"
    lock = threading.Lock()
    next_i = [0]
    latencies: list[float] = []
    statuses: Counter = Counter()
    failures: Counter = Counter()
    samples: dict[int, str] = {}
    stop_at = time.monotonic() + deadline_s

    def take() -> int | None:
        with lock:
            if next_i[0] >= n_requests or time.monotonic() > stop_at:
                return None
            next_i[0] += 1
            return next_i[0] - 1

    def client():
        conn = None
        while (i := take()) is not None:
            body = bodies[i % len(bodies)]
            t0 = time.perf_counter()
            for attempt in (0, 1):  # one retry when the server closed an idle keep-alive connection
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
                    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    data = resp.read()
                    status = resp.status
                    break
                except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                    conn.close()
                    conn = None
                    if attempt:
                        status, data = None, repr(e).encode()
                except OSError as e:  # timeout, refused
                    if conn is not None:
                        conn.close()
                    conn = None
                    status, data = None, repr(e).encode()
                    break
            dt = time.perf_counter() - t0
            with lock:
                if status is None:
                    failures[data.decode()[:120]] += 1
                else:
                    statuses[status] += 1
                    latencies.append(dt)
                    if status != 200 and status not in samples:
                        samples[status] = data.decode(errors="replace")[:300]
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    done = sum(statuses.values())
    return {
        "url": url,
        "requests": n_requests,
        "completed": done,
        "concurrency": concurrency,
        "seconds": round(wall, 3),
        "throughput_rps": round(done / wall, 2) if wall > 0 else None,
        "latency_ms": {k: round(1000 * percentile(lat, q), 2) for k, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
        "status_counts": {str(k): v for k, v in sorted(statuses.items())},
        "http_5xx": sum(v for k, v in statuses.items() if k >= 500),
        "connection_failures": dict(failures),
        "non_200_samples": {str(k): v for k, v in samples.items()},
        "stopped_early": done + sum(failures.values()) < n_requests,
    }


def headline(rep: dict) -> str:
    lat = rep["latency_ms"]
    return (f"{rep['completed']}/{rep['requests']} requests, {rep['concurrency']} clients: {rep['throughput_rps']} req/s, "
            f"p50 {lat['p50']} ms, p99 {lat['p99']} ms, 5xx {rep['http_5xx']}, failures {sum(rep['connection_failures'].values())}")


def _self_host(args) -> tuple[str, dict]:
    """Start Ray + the tiny app with two random LoRA adapters in a temp dir; returns (url, info)."""
    import os
    import socket

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    import torch
    from peft import LoraConfig, get_peft_model

    from raytrain import tempdirs
    from raytrain.models import paligemma
    from raytrain.serve import app

    root = str(tempdirs.until_exit("raytrain-bench-adapters-"))  # the replicas read it until the bench exits
    path = paligemma.resolve("tiny:paligemma")
    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        base, _ = paligemma.load(path)
        lcfg = LoraConfig(r=8, lora_alpha=32, init_lora_weights=False,
                          target_modules=paligemma.lora_target_modules(["q_proj", "v_proj", "o_proj"]))
        get_peft_model(base, lcfg).save_pretrained(os.path.join(root, name, "adapter"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", include_dashboard=False, num_cpus=args.num_cpus, log_to_driver=False)
    cfg = app.ServeConfig(model=path, adapter_root=root, port=port, max_batch_size=args.max_batch_size,
                          batch_wait_timeout_s=args.batch_wait_ms / 1000, max_ongoing_requests=max(16, 2 * args.max_batch_size),
                          num_cpus=1.0)
    return app.run(cfg), {"adapter_root": root, "max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms}


def _serve_processes() -> list:
    import psutil

    procs = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "ServeReplica:" in cmd or "ProxyActor" in cmd:
            procs.append(p)
    return procs


def _cpu_seconds(procs) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except Exception:  # process gone
            pass
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000/predict")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--adapters", default="-", help="comma-separated adapter ids cycled through; '-' = base model")
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--task", default="point", choices=["point", "detect"])
    p.add_argument("--deadline-s", type=float, default=300.0)
    p.add_argument("--self-host", action="store_true", help="start a local Ray + the tiny app with adapters a, b and load it")
    p.add_argument("--max-batch-size", type=int, default=8, help="--self-host only")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="--self-host only: batch_wait_timeout_s in ms")
    p.add_argument("--num-cpus", type=int, default=2, help="--self-host only: CPUs of the local Ray")
    p.add_argument("--out", default=None, help="also write the JSON report here")
    args = p.parse_args(argv)

    info = {}
    adapters = [None if a in ("-", "") else a for a in args.adapters.split(",")]
    if args.self_host:
        args.url, info = _self_host(args)
        if args.adapters == "-":
            adapters = ["a", "b", None]
    bodies = make_payloads(image_size=args.image_size, adapters=adapters, max_new_tokens=args.max_new_tokens, task=args.task)
    server = _serve_processes() if args.self_host else []
    cpu0 = _cpu_seconds(server)
    rep = run_load(args.url, bodies, args.requests, args.concurrency, deadline_s=args.deadline_s)
    if server and rep["completed"]:
        # CPU the Serve processes (proxy + replicas) spent per request: unlike req/s, this does not
        # depend on what else the machine runs
        rep["server_cpu_ms_per_request"] = round(1000 * (_cpu_seconds(server) - cpu0) / rep["completed"], 2)
    rep.update({"adapters": [a or "-" for a in adapters], "max_new_tokens": args.max_new_tokens, **info})
    if args.self_host:
        from ray import serve

        stats = json.loads(http_get(args.url.rsplit("/", 1)[0] + "/stats"))
        rep["server_batch_sizes"] = stats.get("batch_sizes")
        serve.shutdown()
    text = json.dumps(rep, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    print(headline(rep), flush=True)
    return 0 if rep["http_5xx"] == 0 and not rep["connection_failures"] else 1


def http_get(url: str, timeout_s: float = 30.0) -> bytes:
    parts = urlsplit(url)
    if parts.hostname not in LOOPBACK:
        raise ValueError(f"loopback only, not {parts.hostname!r}")
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout_s)
    try:
        conn.request("GET", parts.path)
        return conn.getresponse().read()
    finally:
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
