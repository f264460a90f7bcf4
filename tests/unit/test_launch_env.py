"""The environment `raytrain train` gives every process of its Ray job."""

from raytrain.launch import ray_runtime


def test_job_env_binds_loopback_and_lets_train_collect_reports_often(monkeypatch):
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    env = ray_runtime.runtime_env_vars()
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    # Ray Train V2's default (2 s) blocks a worker that reports more often than that
    # (bench/train_overhead.py: 0.61x the plain loop at 2 s, 1.04x at 0.5 s)
    assert float(env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]) <= 0.5


def test_operator_value_of_the_poll_interval_wins(monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")
    assert ray_runtime.runtime_env_vars()["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3"


def test_ray_data_limit_refresh_is_shortened_once_and_never_lengthened(monkeypatch):
    from ray.data._internal.execution.resource_manager import ResourceManager

    monkeypatch.setattr(ResourceManager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S", 1)
    ray_runtime.tune_ray_data_process()
    assert ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S == ray_runtime.LIMITS_REFRESH_S
    monkeypatch.setattr(ResourceManager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S", 0.05)  # already shorter: kept
    ray_runtime.tune_ray_data_process()
    assert ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S == 0.05


def test_job_runtime_env_carries_the_env_vars_and_the_worker_hook():
    env = ray_runtime.runtime_env()
    assert env["env_vars"] == ray_runtime.runtime_env_vars()
    module, _, name = env["worker_process_setup_hook"].rpartition(".")
    import importlib

    assert getattr(importlib.import_module(module), name) is ray_runtime.tune_ray_data_process
