"""Shared fixtures. Nothing here talks to anything but 127.0.0.1."""

from __future__ import annotations

import os
import uuid

# Read by Ray at import time, so set before anything imports ray:
# bind Ray's node to 127.0.0.1 instead of the address of the default route,
# and never send usage stats home.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Nothing is downloaded in tests, and bitsandbytes 0.50 on CPU otherwise looks up a kernel on
# huggingface.co the first time a 4-bit layer runs (a DNS query off loopback); offline it falls
# back to its own CPU code at once. Ray's workers inherit it from this process.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray Train 2.60 starts a PreemptionWatcher actor for every TorchTrainer run (it watches Ray Core's
# node-drain state, which these single-machine clusters never enter): one more worker process per
# run, started while the run's workers and data stage wait for the raylet's 2 start-up slots.
# Off, the tune test's sweep took 117 s instead of 162 s (3 trials; one run each, 2 shared cores).
# Set before any Ray starts: every test cluster and `raytrain` subprocess of a test inherits it.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

import pytest  # noqa: E402

# ---------------------------------------------------------------------------- S3 on loopback

from raytrain.storage import LOOPBACK_S3_ENV as _S3_ENV  # noqa: E402
from raytrain.storage import LOOPBACK_S3_ENV_UNSET as _S3_ENV_UNSET  # noqa: E402


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL (``http://127.0.0.1:<port>``) of an in-process moto S3 server.

    Sets fake AWS credentials in the environment for the whole session (Ray workers started
    afterwards inherit them) and restores the previous environment afterwards.
    """
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        for k, v in _S3_ENV.items():
            mp.setenv(k, v)
        for k in _S3_ENV_UNSET:
            mp.delenv(k, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture
def s3_opts(s3_server):
    """``raytrain.storage.StorageOptions`` pointing at the moto server."""
    from raytrain.storage import StorageOptions

    return StorageOptions(endpoint_url=s3_server, region="us-east-1")


@pytest.fixture
def s3_bucket(s3_server):
    """``s3://<fresh bucket>`` on the moto server; a new unique bucket for every test."""
    import boto3

    name = f"raytrain-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    yield f"s3://{name}"
    # Nothing to clean up: the bucket lives in the server's memory and dies with the session.


# ---------------------------------------------------------------------------- Ray on loopback


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One local Ray instance (127.0.0.1, 2 CPUs, capped object store) shared by the session's
    integration tests. Started after `s3_server` so that workers inherit its fake credentials."""
    import ray

    from raytrain.launch import ray_runtime

    if not ray.is_initialized():
        ray.init(
            address="local",  # never join another Ray on this machine
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=400 * 1024**2,
            log_to_driver=False,
            runtime_env=ray_runtime.runtime_env(),  # the job environment `raytrain train` sets
        )
    # The launcher's Ray Data settings (Parquet reader, eval-pool dispatch), so every test runs the
    # pipeline as `raytrain train` does, whichever test happens to call the launcher first.
    ray_runtime.configure_ray_data()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module: the tiny models' matmuls and convolutions run several
    times (up to ~20x) slower with two threads fighting over the 2 shared cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_qwen_path(tmp_path_factory):
    """The offline tiny Qwen2.5-VL preset (<|loc|> tokens in its vocabulary, tied lm_head, like
    the 3B), built once per session into a temp cache."""
    from raytrain.models import ensure_preset

    return str(ensure_preset("tiny:qwen2_5_vl", tmp_path_factory.mktemp("qwen-presets")))


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """The offline tiny PaliGemma preset, built once per session into a temp cache."""
    from raytrain.models import ensure_preset

    return str(ensure_preset("tiny:paligemma", tmp_path_factory.mktemp("presets")))


@pytest.fixture(scope="module")
def tiny_paligemma(tiny_model_path, one_torch_thread):
    """(model, processor) of the tiny PaliGemma preset in eval mode, one per test module, decoding on
    one torch thread (restored after the module)."""
    from raytrain.models import paligemma as pg

    model, processor = pg.load(tiny_model_path)
    model.eval()
    return model, processor


@pytest.fixture(scope="session")
def shape_batches():
    """Builder of tokenized PaliGemma micro-batches from the synthetic shapes (64 px, one task), as
    the recipe loop takes them: `shape_batches(model_path, task="point", n=32, micro=8, seed=2)`."""
    import io

    import torch
    from PIL import Image

    from raytrain.data import pipeline, synthetic
    from raytrain.models import paligemma

    def build(model_path: str, task: str = "point", n: int = 32, micro: int = 8, seed: int = 2, max_len: int = 48) -> list[dict]:
        proc = paligemma.load_processor(model_path)
        items = []
        for i in range(n):
            ex = synthetic.make_example(i, seed=seed, image_size=64)
            (e,) = pipeline.examples_for(ex["objects"], [task], 64, 64, "paligemma")
            items.append((Image.open(io.BytesIO(ex["image"])).convert("RGB"), e["prefix"], e["suffix"]))
        out = []
        for i in range(0, n, micro):
            c = items[i : i + micro]
            enc = paligemma.encode_train(proc, [x[0] for x in c], [x[1] for x in c], [x[2] for x in c], max_len)
            enc.pop("length")
            out.append({k: torch.from_numpy(v) for k, v in enc.items()})
        return out

    return build


@pytest.fixture(scope="session")
def run_until(tmp_path_factory):
    """`run_until(cfg, model_path, batches, resume_dir=None, stop_after=None) -> (losses by step, saved
    checkpoint dirs)`: recipes.ddp.train without Ray on fixed batches (fresh dicts every epoch: the
    loop takes keys off), every checkpoint copied out as Ray Train would persist it; stop_after
    raises inside the report of that step: the "crash" after which nothing runs. The copies live
    under pytest's temporary root (pruned by pytest), never loose in /tmp."""
    import contextlib
    import shutil

    import torch

    from raytrain.recipes import ddp
    from raytrain.training.session import Session

    class Stop(Exception):
        pass

    def run(cfg, model_path: str, batches: list[dict], resume_dir=None, stop_after: int | None = None):
        losses, saved = {}, []

        def report(metrics, ckpt_dir):
            losses[metrics["step"]] = metrics["loss"]
            if ckpt_dir:
                keep = tmp_path_factory.mktemp("ckpt")
                shutil.copytree(ckpt_dir, keep, dirs_exist_ok=True)
                saved.append(keep)
            if stop_after is not None and metrics["step"] >= stop_after:
                raise Stop()

        session = Session(rank=0, world_size=1, report=report, epoch_batches=lambda epoch, micro: [dict(b) for b in batches],
                          checkpoint_dir=lambda: contextlib.nullcontext(str(resume_dir)) if resume_dir else None)
        with contextlib.suppress(Stop):
            ddp.train(cfg, model_path, session, torch.device("cpu"), wrap_ddp=lambda m: m)
        return losses, saved

    return run
