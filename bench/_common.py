"""Shared plumbing of the bench/ scripts: loopback S3, Ray on 127.0.0.1, machine/load facts,
memory sampling, timing helpers and the result JSON.

Nothing here talks to anything but 127.0.0.1: moto binds 127.0.0.1 with fake credentials, Ray is
started as a fresh local cluster with `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (loopback, as in
tests/conftest.py) and usage stats off.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

# Read by Ray at import time: loopback node, no usage stats. Set before anything imports ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded; bitsandbytes would look a CPU kernel up on huggingface.co

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Fake credentials for moto on loopback: the one definition tests/conftest.py uses too.
from raytrain.storage import LOOPBACK_S3_ENV as S3_ENV  # noqa: E402
from raytrain.storage import LOOPBACK_S3_ENV_UNSET as S3_ENV_UNSET  # noqa: E402


# ---------------------------------------------------------------------------------------------
# loopback S3


_MOTO_CHILD = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
host, port = server.get_host_and_port()
print(f"http://{host}:{port}", flush=True)
sys.stdin.read()  # serve until the parent closes our stdin (or dies)
server.stop()
"""


@contextlib.contextmanager
def moto_s3():
    """(endpoint, StorageOptions, bucket uri, pid) of a moto S3 server on 127.0.0.1.

    moto runs in its own process (the API tests/conftest.py uses, ThreadedMotoServer on
    127.0.0.1, port 0): in-process it would compete for the driver's GIL with Ray Data's
    consumer thread, which real S3 never does, and its memory (it holds every object) would
    count as pipeline memory. The fake credentials go into os.environ BEFORE Ray starts, so Ray
    workers inherit them."""
    import subprocess

    from raytrain.storage import StorageOptions

    for k, v in S3_ENV.items():
        os.environ[k] = v
    for k in S3_ENV_UNSET:
        os.environ.pop(k, None)
    proc = subprocess.Popen([sys.executable, "-c", _MOTO_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        endpoint = proc.stdout.readline().strip()
        if not endpoint.startswith("http://127.0.0.1:"):
            raise RuntimeError(f"moto did not start on 127.0.0.1: {endpoint!r}")
        import boto3

        bucket = f"raytrain-bench-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
        yield endpoint, StorageOptions(endpoint_url=endpoint, region="us-east-1"), f"s3://{bucket}", proc.pid
    finally:
        with contextlib.suppress(Exception):
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()  # our own child, by its handle
            proc.wait()


# ---------------------------------------------------------------------------------------------
# Ray


def init_ray(num_cpus: int, object_store_mb: int = 1024):
    """A fresh local Ray cluster on 127.0.0.1 with `num_cpus` logical CPUs (quiet Ray Data)."""
    import logging

    import ray
    import ray.data

    from raytrain.launch import ray_runtime

    for attempt in range(3):
        try:
            ray.init(
                address="local",
                num_cpus=num_cpus,
                object_store_memory=object_store_mb * 1024**2,
                include_dashboard=False,
                log_to_driver=False,
                runtime_env=ray_runtime.runtime_env(),  # what `raytrain train` gives its job
            )
            break
        except Exception as e:
            # Ray waits a fixed 30 s for its raylet to register; on 2 cores shared with a load
            # average of 30+ that is not always enough. Clean up our half-started node and retry.
            ray.shutdown()
            if attempt == 2:
                raise
            print(f"ray.init failed ({e}); retrying", file=sys.stderr, flush=True)
    assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1", ray.nodes()[0]["NodeManagerAddress"]
    # The launcher's Ray Data settings (quiet output, Parquet reader, block size, eval-pool dispatch)
    ray_runtime.configure_ray_data()
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return ray


class ObjectStoreProbe:
    """Bytes in THIS cluster's plasma store, asked of our own raylet by its address (Ray's
    address-less helpers pick "the latest cluster" on a machine, which may be someone else's)."""

    def __init__(self):
        import ray
        from ray._private.grpc_utils import init_grpc_channel
        from ray.core.generated import node_manager_pb2, node_manager_pb2_grpc

        node = ray._private.worker.global_worker.node
        address = f"{node.node_ip_address}:{node.node_manager_port}"
        assert address.startswith("127.0.0.1:"), address
        self._req = node_manager_pb2.FormatGlobalMemoryInfoRequest(include_memory_info=False)
        self._stub = node_manager_pb2_grpc.NodeManagerServiceStub(init_grpc_channel(address))

    def used_bytes(self) -> int | None:
        try:
            return int(self._stub.FormatGlobalMemoryInfo(self._req, timeout=5).store_stats.object_store_bytes_used)
        except Exception:  # noqa: BLE001 - a bench must not die for a stats RPC
            return None


# ---------------------------------------------------------------------------------------------
# process tree: memory and CPU time


def tree(exclude=frozenset()) -> list:
    """This process and its descendants (the Ray cluster it started), minus `exclude` pids (moto)."""
    import psutil

    me = psutil.Process()
    procs = [me]
    with contextlib.suppress(psutil.Error):
        procs += me.children(recursive=True)
    return [p for p in procs if p.pid not in exclude]


def tree_cpu(exclude=frozenset()) -> dict[int, float]:
    """{pid: user+system CPU seconds} over the tree; diff two snapshots with `cpu_delta`."""
    import psutil

    out = {}
    for p in tree(exclude):
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
    return out


class _Sampler:
    """Calls `_sample()` on entry, every `interval` s from a daemon thread, and once more on exit."""

    def __init__(self, interval: float):
        self.interval = interval
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._sample()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self._sample()
        return False


class CpuSampler(_Sampler):
    """Background thread: cumulative CPU-seconds of the process tree (minus `exclude`) every
    `interval` s, as (time.time(), cumulative) pairs. Per-pid deltas are accumulated, so a process
    that exits keeps what it used. `between(t0, t1)` interpolates the CPU used in a window."""

    def __init__(self, interval: float = 0.5, exclude=frozenset()):
        super().__init__(interval)
        self.exclude = set(exclude)
        self.points: list[tuple[float, float]] = []
        self._last: dict[int, float] = {}
        self._total = 0.0

    def _sample(self) -> None:
        now = tree_cpu(self.exclude)
        for pid, v in now.items():
            self._total += max(0.0, v - self._last.get(pid, 0.0 if self.points else v))
        self._last.update(now)
        self.points.append((time.time(), self._total))


    def at(self, t: float) -> float:
        import bisect

        ts = [p[0] for p in self.points]
        i = bisect.bisect_left(ts, t)
        if i <= 0:
            return self.points[0][1]
        if i >= len(ts):
            return self.points[-1][1]
        (t0, c0), (t1, c1) = self.points[i - 1], self.points[i]
        return c0 + (c1 - c0) * (t - t0) / max(t1 - t0, 1e-9)

    def between(self, t0: float, t1: float) -> float:
        return self.at(t1) - self.at(t0)


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two snapshots (processes born in between count in full)."""
    return sum(v - before.get(pid, 0.0) for pid, v in after.items())


class MemorySampler(_Sampler):
    """Background thread: every `interval` s, RSS of this process + all its descendants (Ray's
    gcs/raylet/workers are children of the driver that called ray.init; other people's Ray
    clusters on the machine are not), and the object store bytes in use. Records the peaks.

    RSS sums double-count pages shared between processes (the plasma mmap is counted in every
    worker that touched it), so the figure is an upper bound; it is the flatness with dataset
    size that matters."""

    def __init__(self, interval: float = 0.25, object_store: bool = True, exclude: set[int] = frozenset()):
        import psutil

        super().__init__(interval)
        self._psutil = psutil
        self.exclude = set(exclude)
        self.object_store = object_store
        self.peak_rss = 0
        self.peak_driver_rss = 0
        self.peak_store = 0
        self.samples = 0
        self._probe = None
        if object_store:
            import ray

            self._probe = ObjectStoreProbe() if ray.is_initialized() else None

    def _sample(self) -> None:
        psutil = self._psutil
        me = psutil.Process()
        total = 0
        for p in tree(self.exclude):
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        with contextlib.suppress(psutil.Error):
            self.peak_driver_rss = max(self.peak_driver_rss, me.memory_info().rss)
        self.peak_rss = max(self.peak_rss, total)
        if self._probe is not None:
            used = self._probe.used_bytes()
            if used is not None:
                self.peak_store = max(self.peak_store, used)
        self.samples += 1


    def result(self) -> dict:
        mib = 1024**2
        return {
            "peak_rss_sum_mib": round(self.peak_rss / mib, 1),
            "peak_driver_rss_mib": round(self.peak_driver_rss / mib, 1),
            "peak_object_store_mib": round(self.peak_store / mib, 1) if self.object_store else None,
            "samples": self.samples,
        }


# ---------------------------------------------------------------------------------------------
# facts and results


def machine() -> dict:
    import psutil

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count_logical": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_total_gib": round(psutil.virtual_memory().total / 1024**3, 1),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    versions = {}
    for mod in ("ray", "torch", "transformers", "pyarrow", "moto", "peft"):
        with contextlib.suppress(Exception):
            versions[mod] = __import__(mod).__version__
    info["versions"] = versions
    return info


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def git_rev() -> str | None:
    import subprocess

    with contextlib.suppress(Exception):
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    return None


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0
        return False


def summary(values: list[float]) -> dict:
    """median / min / max / all of a list of rates."""
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "runs": [round(v, 3) for v in values],
    }


def write_result(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"bench": name, "git_rev": git_rev(), "machine": machine(), **result}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def tiny_model_path(cache: str | None = None, image_size: int = 64) -> str:
    """The offline tiny PaliGemma preset (at `image_size` px), built once into bench/results/presets
    (git-ignored)."""
    from raytrain.models import ensure_preset

    return str(ensure_preset("tiny:paligemma", cache or str(RESULTS / "presets"), image_size=image_size))
