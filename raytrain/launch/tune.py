"""Driver side of `raytrain tune`: a Ray Tune sweep whose trials are Ray Train runs.

    job YAML = an experiment (the Experiment schema) + a top-level `tune:` section
    -> connect/start Ray -> prepare data and tokenize the train split ONCE (shared by every trial)
    -> Tuner(trial function: builds and fits a TorchTrainer; Train's reports reach Tune through a
       TuneReportCallback) with ASHA early stopping and an Optuna (TPE) or random searcher
    -> `<storage.root>/tune/<name>/best.json`: best trial's overrides, metric, checkpoint URI
       (its path is the last line printed)

This is Ray Train V2's pattern for Tune: the trainable is a plain function that runs a whole
TorchTrainer; the trainer is never passed to the Tuner.

The sweep section (`raytrain.config.SweepConfig`, listed by `raytrain config --help-fields`):

    tune:
      metric: val_norm_distance_all     # a validation grounding metric the recipe reports (train.val_every)
      mode: min
      num_samples: 8                    # trials
      max_concurrent: 2
      scheduler: {type: asha, grace_period: 100, reduction_factor: 2, max_t: 0}   # steps; max_t 0 = train.steps
      search: {type: optuna, seed: 0, n_startup_trials: 4}                        # or {type: random}
      space:                            # dotted experiment keys -> one domain each
        train.lr: {loguniform: [1.0e-4, 3.0e-3]}
        lora.r: {choice: [4, 8, 16]}
        loss.loc_sigma: {choice: [0.0, 60.0]}

Every trial is built by launch/trainer.py, as `raytrain train` builds its run: the recipe of the
trial's train.strategy (ZeRO included) on the job's scale (resources_per_worker, placement).

A rerun with the same name and storage root resumes the sweep (`Tuner.restore`, unfinished
trials only): finished trials are kept, an interrupted trial restarts and its TorchTrainer resumes
from that trial's latest Train checkpoint, the searcher continues where it stopped.

With `track:` on, the sweep is a tracking run and every trial a child run of it (launch/tracking.py);
without --verbose the console shows one line per validated trial report and per finished trial
instead of Tune's status tables.

Layout under `<storage.root>/tune/<name>/`: Tune's experiment state and trial dirs, `sweep.json`
(the sweep as first started), `runs/<trial_id>/` (each trial's Train run: checkpoints,
history.jsonl), `trials.jsonl` (one line per finished trial), `best.json`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from raytrain import config as config_mod
from raytrain import storage
from raytrain.config import Experiment, SweepConfig
from raytrain.launch import console, job, trainer
from raytrain.launch.prepare import prepare_data
from raytrain.launch.ray_runtime import init_ray

log = logging.getLogger("raytrain.launch.tune")


# ----------------------------------------------------------------------------------------------
# the sweep section of a job YAML (config.SweepConfig)


DOMAINS = ("loguniform", "uniform", "quniform", "randint", "choice")
# Keys a trial cannot change: the data and the model are prepared once for the whole sweep,
# and the storage layout is the sweep's.
FIXED_PREFIXES = ("data.", "storage.", "ray.", "tune", "track", "name", "model.family", "model.name_or_path", "model.box_format")


def load_job(path: str | Path, overrides: list[str] | None = None) -> tuple[Experiment, SweepConfig]:
    """A job YAML with a `tune:` section -> (base experiment, its sweep), checked. Dotted overrides
    apply to both (`train.steps=30`, `tune.num_samples=4`, `tune.scheduler.grace_period=10`); the
    search space is edited in the YAML."""
    cfg = config_mod.load(path, overrides)
    if not cfg.tune.space:
        raise ValueError(f"{path}: no `tune.space` (the sweep: metric, mode, space, ...)")
    check_sweep(cfg, cfg.tune)
    return cfg, cfg.tune


def check_sweep(cfg: Experiment, sweep: SweepConfig) -> None:
    """Fail before any trial starts: unknown or fixed keys, values the schema rejects, an objective
    that is never measured at the last step (mode, scheduler and searcher types: the config checks them)."""
    if not sweep.space:
        raise ValueError("tune.space is empty: nothing to sweep")
    base = cfg.to_dict()
    for key, dom in sweep.space.items():
        if key.startswith(FIXED_PREFIXES):
            raise ValueError(f"tune.space.{key}: data, model and storage are fixed for a sweep (prepared once)")
        if not isinstance(dom, dict) or len(dom) != 1 or next(iter(dom)) not in DOMAINS:
            raise ValueError(f"tune.space.{key}: expected one of {{{' | '.join(DOMAINS)}: ...}}, got {dom!r}")
        kind, args = next(iter(dom.items()))
        if not isinstance(args, list) or not args:
            raise ValueError(f"tune.space.{key}.{kind}: expected a list, got {args!r}")
        if kind != "choice" and len(args) != (3 if kind == "quniform" else 2):
            raise ValueError(f"tune.space.{key}.{kind}: expected [lo, hi{', q' if kind == 'quniform' else ''}], got {args!r}")
        # every value the domain can produce at its ends must pass the schema (types included)
        if kind == "choice":
            ends = list(args)
        elif kind == "randint":
            ends = [int(args[0]), int(args[1]) - 1]  # hi is exclusive
        else:
            ends = [float(args[0]), float(args[1])]  # continuous domains sample floats
        for v in ends:
            trial_config(base, {key: v})
    if sweep.metric.startswith("val_"):
        # the recipe validates at multiples of train.val_every: the last step must be one, or a
        # finished trial's final result would carry no objective
        every, steps = cfg.train.val_every, cfg.train.steps
        if every <= 0 or steps % every:
            raise ValueError(f"tune.metric {sweep.metric} comes from in-training validation: set train.val_every > 0 "
                             f"dividing train.steps ({steps}), not {every}")
        if "train.steps" in sweep.space or "train.val_every" in sweep.space:
            raise ValueError("tune.space cannot sweep train.steps / train.val_every (they fix when the objective is measured)")


def param_space(sweep: SweepConfig) -> dict:
    """Tune domains keyed by the dotted experiment keys (a trial's config IS its overrides)."""
    from ray import tune

    make = {
        "loguniform": lambda a: tune.loguniform(float(a[0]), float(a[1])),
        "uniform": lambda a: tune.uniform(float(a[0]), float(a[1])),
        "quniform": lambda a: tune.quniform(float(a[0]), float(a[1]), float(a[2])),
        "randint": lambda a: tune.randint(int(a[0]), int(a[1])),
        "choice": lambda a: tune.choice(list(a)),
    }
    return {key: make[kind](args) for key, dom in sweep.space.items() for kind, args in dom.items()}


def _plain(v: Any) -> Any:
    # searchers hand back numpy scalars; the schema checks exact Python types
    return v.item() if hasattr(v, "item") and not isinstance(v, (list, dict, str)) else v


def trial_config(base: dict, overrides: dict) -> Experiment:
    """The base experiment dict with a trial's dotted overrides applied, checked by the schema."""
    return config_mod.override(base, {k: _plain(v) for k, v in overrides.items()})


# ----------------------------------------------------------------------------------------------
# paths


def tune_root(cfg: Experiment) -> str:
    """Tune's storage_path: `<storage.root>/tune` (absolute locally: Ray requires it)."""
    root = storage.join(cfg.storage.root, "tune")
    return root if storage.is_s3(root) else os.path.abspath(root)


def sweep_dir(cfg: Experiment) -> str:
    return storage.run_dir(tune_root(cfg), cfg.name)


def best_uri(cfg: Experiment) -> str:
    return storage.join(sweep_dir(cfg), "best.json")


def trials_uri(cfg: Experiment) -> str:
    return storage.join(sweep_dir(cfg), "trials.jsonl")


def trial_runs_root(cfg: Experiment) -> str:
    """Train's storage_path for the trials: one Train run per trial, named by its trial id."""
    return storage.join(sweep_dir(cfg), "runs")


def _checkpoint_uri(path: str | None, root: str) -> str | None:
    # Train reports checkpoint paths without the scheme on S3
    if not path:
        return None
    return ("s3://" + path.lstrip("/")) if storage.is_s3(root) and not path.startswith("s3://") else path


# ----------------------------------------------------------------------------------------------
# the trial: one TorchTrainer run


# The Tune/Train callback classes are defined on first use: importing ray.tune at module import
# would slow every `raytrain` command down.


def _forward_to_tune_cls():
    from ray.tune.integration.ray_train import TuneReportCallback

    class ForwardToTune(TuneReportCallback):
        """TuneReportCallback for the reports that carry the objective only: Tune requires the
        metric in every result it gets, and the recipe validates less often than it logs. The
        other reports still reach history.jsonl."""

        def __init__(self, metric: str):
            super().__init__()
            self.metric = metric

        def after_report(self, run_context, metrics, checkpoint):
            if metrics and self.metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return ForwardToTune


def run_trial(overrides: dict, *, base: dict, model_path: str, datasets: dict, metric: str, parent: dict | None = None) -> None:
    """Tune function trainable (runs in the trial's actor): fit the trial's TorchTrainer, built as
    `raytrain train` builds its own (launch/trainer.py: the recipe of the trial's strategy, the
    job's resources and placement). Its Train run is named by the trial id, so a restarted trial
    (sweep resumed) continues from that run's latest checkpoint, and its tracking run (track:, a
    child of the sweep's run `parent`) with it."""
    import contextlib

    from ray import tune

    from raytrain.launch import console, tracking

    from raytrain.training.metrics import HistoryCallback

    cfg = trial_config(base, overrides)
    trial_id = tune.get_context().get_trial_id()
    runs = trial_runs_root(cfg)
    history = HistoryCallback(storage.join(storage.run_dir(runs, trial_id), "history.jsonl"), job.storage_opts(cfg))
    tracker = tracking.open_run(cfg, storage.run_dir(runs, trial_id), name=trial_id, kind="trial", parent=parent, group=cfg.name)
    callbacks = [_forward_to_tune_cls()(metric), history]
    with console.ReportStream([tracker.log_report]) if tracker else contextlib.nullcontext() as reports:
        result = trainer.build_trainer(cfg, model_path=model_path, data_uri=cfg.data.uri, datasets=datasets, name=trial_id,
                                       runs_root=runs, callbacks=callbacks + ([reports.callback()] if reports else [])).fit()
    if tracker is not None:
        tracker.finish(ok=result.error is None)
    if metric not in (result.metrics or {}):
        raise RuntimeError(
            f"trial {trial_id} finished without reporting {metric!r}: the objective must be in the recipe's "
            f"final report (val_* metrics need train.val_every > 0; see raytrain/training/validation.py)")


# ----------------------------------------------------------------------------------------------
# Tune pieces


def _scheduler(cfg: Experiment, sweep: SweepConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = sweep.scheduler
    if s.type == "fifo":
        return FIFOScheduler()
    max_t = s.max_t or cfg.train.steps
    return ASHAScheduler(
        time_attr=s.time_attr,
        # One past the last rung: ASHA stops a trial on the result that reaches max_t, killing it
        # while its TorchTrainer is still shutting down; a trial that reaches the end of its run
        # should instead finish on its own (graceful Train shutdown). The rungs stay the same.
        max_t=max_t + 1 if max_t >= cfg.train.steps else max_t,
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
    )


def _searcher(sweep: SweepConfig):
    if sweep.search.type == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=sweep.search.seed)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from raytrain.launch import console

    if not console.verbose():
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory" and per-trial INFO lines

    sampler = optuna.samplers.TPESampler(seed=sweep.search.seed, n_startup_trials=sweep.search.n_startup_trials)
    return OptunaSearch(sampler=sampler)


def reap_orphaned_placement_groups(job_id: str) -> int:
    """Remove this job's placement groups whose creating actor is dead; returns how many.

    Why: a trial that Tune stops early (ASHA) is killed with its Train controller, which never
    removes its worker placement group. Ray 2.60 leaves the group to a PlacementGroupCleaner
    that asks the state API (the dashboard) whether the controller died: on a cluster started
    without the dashboard (raytrain's local clusters, the tests) it never learns, and GCS keeps
    an actor-created group until the whole JOB ends, so every stopped trial would hold its
    workers' CPUs/GPUs for the rest of the sweep. Groups created by the driver (Tune's own trial
    groups) and by live actors are left alone. Uses Ray internals; a failure only logs."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    accessor = ray._private.state.state._global_state_accessor
    removed = 0
    for pg_hex, info in ray.util.placement_group_table().items():
        if info.get("state") == "REMOVED":
            continue
        pg_id = PlacementGroupID(bytes.fromhex(pg_hex))
        data = gcs_pb2.PlacementGroupTableData.FromString(accessor.get_placement_group_info(pg_id))
        by_actor = set(data.creator_actor_id) != {0xFF}  # nil actor id: created by the driver
        if data.creator_job_id.hex() == job_id and by_actor and data.creator_actor_dead and not data.is_detached:
            remove_placement_group(PlacementGroup(pg_id))
            removed += 1
    return removed


def _sweep_callback_cls():
    import time

    from ray.tune import Callback

    class SweepCallback(Callback):
        """Driver side: appends one JSON line per finished (or errored) trial to trials.jsonl (its
        overrides, last objective value and step, latest checkpoint; rewritten whole as S3 objects
        cannot be appended to; a resumed sweep keeps the earlier lines), and reaps the worker
        placement groups of stopped trials (`reap_orphaned_placement_groups`)."""

        def __init__(self, uri: str, opts, metric: str, runs_root: str, reap_every_s: float = 2.0):
            # Tune pickles its callbacks with the experiment state and restores THEM on resume:
            # keep nothing here that belongs to one driver process (the job id is looked up live).
            self.uri, self.opts, self.metric, self.runs_root = uri, opts, metric, runs_root
            self.reap_every_s, self._last_reap, self._reap = reap_every_s, 0.0, True

        def on_step_begin(self, iteration, trials, **info):
            import ray

            if self._reap and time.monotonic() - self._last_reap > self.reap_every_s:
                self._last_reap = time.monotonic()
                try:
                    n = reap_orphaned_placement_groups(ray.get_runtime_context().get_job_id())
                    if n:
                        log.info("removed %d placement group(s) of stopped trials", n)
                except Exception as e:  # noqa: BLE001  internals moved: warn once, keep the sweep going
                    log.warning("cannot reap placement groups of stopped trials (%s); stopped trials may hold "
                                "their resources until the sweep ends unless the Ray dashboard runs", e)
                    self._reap = False

        def _write(self, trial, status: str) -> None:
            last = trial.last_result or {}
            row = {
                "trial_id": trial.trial_id,
                "status": status,
                "overrides": {k: _plain(v) for k, v in trial.config.items()},
                "step": last.get("step"),
                self.metric: last.get(self.metric),
                "checkpoint": _checkpoint_uri(last.get("checkpoint_path"), self.runs_root),
            }
            rows = read_jsonl(self.uri, self.opts) + [row]
            _write_jsonl(self.uri, rows, self.opts)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            log.info("trial %s step %s %s %.4g", trial.trial_id, result.get("step"), self.metric, result.get(self.metric, float("nan")))

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._write(trial, "TERMINATED")
            self._close(trial, ok=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._write(trial, "ERROR")
            self._close(trial, ok=False)

        def _close(self, trial, ok: bool) -> None:
            from raytrain.launch import tracking

            log.info("trial %s %s: %s %s", trial.trial_id, "finished" if ok else "FAILED", self.metric, (trial.last_result or {}).get(self.metric))
            # a trial that ASHA stopped was killed before it could end its own tracking run
            tracking.close_trial(storage.run_dir(self.runs_root, trial.trial_id), self.opts, ok=ok)

    return SweepCallback


def read_jsonl(uri: str, opts=None) -> list[dict]:
    if not storage.exists(uri, opts):
        return []
    with storage.fsspec_fs(uri, opts).open(storage.strip_scheme(uri), "r") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(uri: str, rows: list[dict], opts=None) -> None:
    fs = storage.fsspec_fs(uri, opts)
    path = storage.strip_scheme(uri)
    if not storage.is_s3(uri):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _record_or_check_sweep(cfg: Experiment, sweep: SweepConfig, opts, resuming: bool) -> None:
    """sweep.json: the job a sweep was started with. A resumed sweep restores its search space
    and searcher from Tune's state while the trial function would get the NEW base experiment:
    refuse a changed job rather than mix the two."""
    uri = storage.join(sweep_dir(cfg), "sweep.json")
    now = json.loads(json.dumps({"tune": dataclasses.asdict(sweep),
                                 "experiment": {k: v for k, v in cfg.to_dict().items() if k not in ("ray", "tune", "track")}}))
    if resuming and storage.exists(uri, opts):
        if storage.read_json(uri, opts) != now:
            raise ValueError(f"sweep {cfg.name!r} under {tune_root(cfg)} was started with a different job (see {uri}); "
                             "resume it with the same YAML and overrides, or give the new sweep another name")
        return
    if not storage.is_s3(uri):
        os.makedirs(os.path.dirname(uri), exist_ok=True)
    storage.write_json(uri, now, opts)


def _restore_args(cfg: Experiment, opts) -> tuple[str, Any]:
    """(path, filesystem) of the sweep's Tune experiment as Tuner.restore/can_restore take them."""
    path = sweep_dir(cfg)
    if storage.is_s3(path):
        return storage.strip_scheme(path), storage.pyarrow_fs(path, opts)[0]
    return path, None


def can_resume(cfg: Experiment, opts) -> bool:
    from ray import tune

    path, fs = _restore_args(cfg, opts)
    return tune.Tuner.can_restore(path, storage_filesystem=fs)


def tuner(cfg: Experiment, sweep: SweepConfig, trainable, opts, resuming: bool):
    """A new Tuner, or the restored one (resume unfinished trials only: finished ones are kept,
    errored ones are not retried)."""
    from ray import tune

    if resuming:
        path, fs = _restore_args(cfg, opts)
        print(f"resuming sweep {cfg.name} from {sweep_dir(cfg)} (unfinished trials only)", flush=True)
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                  restart_errored=False, storage_filesystem=fs)
    root = tune_root(cfg)
    fs, fs_path = storage.pyarrow_fs(root, opts)
    s3 = storage.is_s3(root)
    return tune.Tuner(
        trainable,
        param_space=param_space(sweep),
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode=sweep.mode,
            num_samples=sweep.num_samples,
            max_concurrent_trials=sweep.max_concurrent,
            search_alg=_searcher(sweep),
            scheduler=_scheduler(cfg, sweep),
        ),
        run_config=tune.RunConfig(
            name=cfg.name,
            storage_path=fs_path if s3 else root,
            storage_filesystem=fs if s3 else None,
            callbacks=[_sweep_callback_cls()(trials_uri(cfg), opts, sweep.metric, trial_runs_root(cfg))],
            verbose=1 if console.verbose() else 0,  # quiet: the sweep callback's lines instead of Tune's tables
        ),
    )


def _absolute_local(cfg: Experiment) -> Experiment:
    # Tune runs each trial with its trial dir as working directory: relative paths would move.
    if storage.is_s3(cfg.storage.root):
        return cfg
    return dataclasses.replace(cfg, storage=dataclasses.replace(cfg.storage, root=os.path.abspath(cfg.storage.root)))


def summarize(cfg: Experiment, sweep: SweepConfig, grid) -> dict:
    """best.json's content from the ResultGrid: the best finished trial by the objective's LAST
    reported value (an early-stopped trial counts with the value it was stopped at)."""
    sign = 1.0 if sweep.mode == "min" else -1.0
    trials, best = [], None
    runs = trial_runs_root(cfg)
    for res in grid:
        m = res.metrics or {}
        trial_id = m.get("trial_id")
        row = {
            "trial_id": trial_id,
            "status": "ERROR" if res.error is not None else "TERMINATED",
            "overrides": {k: _plain(v) for k, v in (res.config or {}).items()},
            "step": m.get("step"),
            "value": m.get(sweep.metric),
            "checkpoint": _checkpoint_uri(m.get("checkpoint_path"), runs),
        }
        if row["checkpoint"] is None and res.metrics_dataframe is not None and "checkpoint_path" in res.metrics_dataframe:
            # the last validated report carried no checkpoint: the latest one before it
            df = res.metrics_dataframe.dropna(subset=["checkpoint_path"])
            if len(df):
                row["checkpoint"] = _checkpoint_uri(df["checkpoint_path"].iloc[-1], runs)
                row["checkpoint_step"] = int(df["step"].iloc[-1])
        trials.append(row)
        if res.error is None and row["value"] is not None and (best is None or sign * row["value"] < sign * best["value"]):
            best = row
    if best is None:
        raise RuntimeError(f"no trial of sweep {cfg.name} finished with {sweep.metric!r}; see {trials_uri(cfg)}")
    return {
        "name": cfg.name,
        "metric": sweep.metric,
        "mode": sweep.mode,
        "value": best["value"],
        "trial_id": best["trial_id"],
        "overrides": best["overrides"],
        "step": best["step"],
        "checkpoint": best["checkpoint"],
        "checkpoint_step": best.get("checkpoint_step", best["step"]),
        "config": trial_config(cfg.to_dict(), best["overrides"]).to_dict(),
        "trials": sorted(trials, key=lambda r: str(r["trial_id"])),
        "experiment": sweep_dir(cfg),
    }


def main(cfg: Experiment, sweep: SweepConfig) -> str | None:
    """Run (or resume) the sweep; returns best.json's URI (also printed last), or None when the
    sweep was interrupted (Ctrl-C): rerun the same command to finish it."""
    from ray import tune

    from raytrain.data import pipeline
    from raytrain.launch import tracking

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = _absolute_local(cfg)
    check_sweep(cfg, sweep)
    opts = job.storage_opts(cfg)
    init_ray(cfg.ray)
    resuming = can_resume(cfg, opts)
    _record_or_check_sweep(cfg, sweep, opts, resuming)

    # ---- data and model, once for all trials -------------------------------------------------
    uri = prepare_data(cfg)
    base_path = job.model_path(cfg)
    train_ds = trainer.train_dataset(cfg, uri, base_path, pipeline.drop_counter())  # tokenized once for the whole sweep
    if cfg.train.epochs > 0:
        cfg = trainer.with_epoch_steps(cfg, train_ds, base_path)
        check_sweep(cfg, sweep)  # the objective must still be measured at the (computed) last step
    # trials read the prepared shards (validation subset included), never re-generate them
    base = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, uri=uri)).to_dict()

    # the sweep's tracking run (track:), parent of every trial's run; a resumed sweep continues it
    parent = tracking.open_run(cfg, sweep_dir(cfg), name=cfg.name, kind="sweep")
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, model_path=base_path, datasets={"train": train_ds}, metric=sweep.metric,
                             parent=parent.parent_info() if parent else None),
        {"CPU": sweep.trial_cpus},
    )
    try:
        grid = tuner(cfg, sweep, trainable, opts, resuming).fit()
    except BaseException:
        if parent is not None:
            parent.finish(ok=False)
        raise

    done = grid.num_terminated + grid.num_errors
    if len(grid) < sweep.num_samples or done < len(grid):
        print(f"sweep {cfg.name} interrupted: {done} of {sweep.num_samples} trials finished; "
              f"rerun the same command to finish the rest ({sweep_dir(cfg)})", flush=True)
        if parent is not None:
            parent.finish(ok=False)
        return None
    summary = summarize(cfg, sweep, grid)
    out = storage.write_json(best_uri(cfg), summary, opts)
    if parent is not None:
        with tempfile.TemporaryDirectory() as tmp:
            files = tracking.local_files({"best.json": out, "trials.jsonl": trials_uri(cfg)}, opts, tmp) if cfg.track.artifacts else None
            parent.log_results({sweep.metric: summary["value"]}, files, prefix="best", step=summary["step"])
        parent.finish(ok=True)
    print(json.dumps({k: summary[k] for k in ("metric", "mode", "value", "trial_id", "overrides", "checkpoint")}, indent=2))
    print(out, flush=True)
    return out


if __name__ == "__main__":
    # python -m raytrain.launch.tune JOB.yaml [a.b=v ...]   (what `raytrain tune --config JOB.yaml` runs)
    sys.exit(0 if main(*load_job(sys.argv[1], sys.argv[2:])) else 130)
