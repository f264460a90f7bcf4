"""Ray start-up for every raytrain subcommand: join the cluster (or start a local one on 127.0.0.1)
with the job's runtime_env, and raytrain's Ray Data settings.

    init_ray(cfg.ray)        train, tune, eval, prepare, serve
    runtime_env()            what every process of a raytrain job gets (env vars + a setup hook)
    configure_ray_data()     this process's Ray Data settings (the tests and benches call it too)
"""

from __future__ import annotations

import logging
import os

from raytrain.config import RayConfig


def runtime_env_vars() -> dict[str, str]:
    """Environment of every process of a raytrain job (the job's runtime_env)."""
    return {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "TOKENIZERS_PARALLELISM": "false",
        # Ray Train V2's controller collects worker reports when it polls them, every 2 s by default,
        # and a worker's result queue holds ONE report: a worker reporting more often than every
        # 2 s blocks in ray.train.report until the next poll. Measured on bench/train_overhead.py
        # (tiny model, a report every 25 steps = ~2 s): 0.61x the plain loop's steps/s at 2 s,
        # 1.04x at 0.5 s. An operator's own value wins.
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"),
    }


def runtime_env() -> dict:
    """The runtime_env of a raytrain job: its environment variables, and a setup hook that gives
    every worker process (Ray Train's dataset split coordinators run the training pipeline's
    executor) the process-level Ray Data setting of tune_ray_data_process."""
    return {"env_vars": runtime_env_vars(), "worker_process_setup_hook": "raytrain.launch.ray_runtime.tune_ray_data_process"}


# How often Ray Data's streaming executor refreshes the CPUs it may use (Ray 2.60: every 1 s). Its
# first answer comes from Ray's autoscaling-coordinator actor, asynchronously, so for the first
# refresh interval of EVERY execution the limits are zero and one task runs alone: on 2 CPUs one
# slot idled for a second per pass (bench/data_pipeline.py, 20,000 rows: 1.42x -> ~1.55x the plain
# loop at 0.1 s). The refresh is a non-blocking RPC at most every 0.1 s per running execution.
LIMITS_REFRESH_S = 0.1


def tune_ray_data_process() -> None:
    """Process-level Ray Data setting (a class attribute, not a DataContext field, so it does not
    travel with a dataset): the executor's resource-limit refresh interval (LIMITS_REFRESH_S).
    A Ray without that attribute (another version) is left as it is."""
    try:
        from ray.data._internal.execution.resource_manager import ResourceManager
    except ImportError:
        return
    current = getattr(ResourceManager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S", None)
    if isinstance(current, (int, float)) and current > LIMITS_REFRESH_S:
        ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S = LIMITS_REFRESH_S


def configure_ray_data() -> None:
    """raytrain's Ray Data settings, on this process's DataContext (datasets built here carry it
    to their tasks) and, for this process, tune_ray_data_process (runtime_env's setup hook does
    that in the job's workers). init_ray applies them; so do the test fixture and the benches,
    which start Ray themselves."""
    import ray.data

    from raytrain.data import pipeline

    tune_ray_data_process()

    # Progress bars and per-dataset execution banners drown the job's own output.
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Evaluation pools: start every predictor before dispatching (otherwise the first actor to load
    # its model takes every queued batch of a small split), then keep two batches queued per actor
    # so it never waits for its next block (1 in flight: 90-102 samples/s on the eval bench's 2,000
    # examples; 4 in flight: 119-137).
    ctx.wait_for_min_actors_s = 600
    ctx.max_tasks_in_flight_per_actor = 2
    # Ray 2.60's Parquet datasource V2 starts 32 footer-reader actors per read and bin-packs row
    # groups into 128 MiB read tasks, so a split of a few thousand images became ONE read task and
    # one preprocessing task (one busy core). The V1 reader splits by file/row group and honours
    # override_num_blocks: measured 2.8-4.3x the images/s (bench/README.md, bottleneck 1).
    if hasattr(ctx, "use_datasource_v2"):
        ctx.use_datasource_v2 = False
    # Output blocks of 16 MiB rather than Ray's 128 MiB: a training task (read + prepare_block over
    # ~5 shards) then hands its examples over as it goes instead of in one block at its end
    # (bench/data_pipeline.py: first batch after 5.2 s -> see bench/README.md), and the object
    # store holds a few small blocks per task rather than one large one (pipeline.BLOCK_BYTES).
    ctx.target_max_block_size = pipeline.BLOCK_BYTES


def init_ray(ray_cfg: RayConfig):
    """Join the cluster named by ray.address / RAY_ADDRESS, or start a local one on 127.0.0.1, with
    the job environment (runtime_env) and raytrain's Ray Data settings (configure_ray_data).
    Every subcommand that needs Ray (train, tune, eval, prepare, serve) starts it here.

    Quiet unless the command runs with --verbose (launch/console.py): the driver does not receive its
    workers' output (their logs stay in Ray's session log directory, printed once), and Ray's own
    driver-side loggers print warnings only."""
    # Bind a local cluster to loopback rather than the machine's external address.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from raytrain.launch import console

    configure_ray_data()
    if ray.is_initialized():
        return ray
    console.quiet_ray_loggers()  # before ray.init too: it warns through the handlers that import made
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    env = runtime_env()
    quiet = {} if console.verbose() else {"log_to_driver": False, "logging_level": logging.WARNING}
    if address:
        ray.init(address=address, runtime_env=env, **{"log_to_driver": True, **quiet})
    else:
        # One machine is never drained for preemption: Ray Train's preemption watcher would be one
        # more actor process per training run and Tune trial (started two at a time on 2 cores).
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        ray.init(
            address="local",  # a fresh local cluster, never silently joining another one
            num_cpus=ray_cfg.num_cpus,
            object_store_memory=ray_cfg.object_store_mb * 1024 * 1024,
            include_dashboard=False,
            runtime_env=env,
            **quiet,
        )
    console.quiet_ray_loggers()
    if quiet:
        logging.getLogger("raytrain.launch").info("Ray worker logs: %s (--verbose prints them here)", session_logs_dir())
    return ray


def session_logs_dir() -> str:
    """This node's log directory of the Ray session the driver joined (where every worker's output goes)."""
    import ray

    ctx = ray.get_runtime_context()
    return os.path.join(ctx.get_temp_dir(), ctx.get_session_name(), "logs")
