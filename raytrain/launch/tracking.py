"""Experiment tracking (the job's `track:` section): MLflow and / or Weights & Biases, called directly
from the process that runs fit() (the driver; a Tune trial's actor), never from Train workers.

    tracker = open_run(cfg, run_dir, name=cfg.name)   # None when track: is off
    tracker.log_report(metrics)                       # each training report (x axis: its "step")
    tracker.log_eval(results, files)                  # evaluation metrics, report files as artifacts
    tracker.finish(ok=True)

One tracking run per raytrain run: the ids are kept in `<run dir>/tracking.json`, so a rerun that
resumes the Train run continues the same MLflow run / W&B run (reports after the resumed checkpoint
are logged again at their steps: both tools keep every value, so the curve shows the replayed span).
The whole config is logged as params (dotted keys, lists and mappings as JSON). A Tune sweep is a
parent run (kind "sweep", in the sweep directory) and each trial a child run (MLflow: the
`mlflow.parentRunId` tag; W&B: the sweep name as the run group).

`track.mlflow: true` is a SQLite store under the storage root (`<root>/mlflow/mlflow.db`, artifacts in
`<root>/mlflow/artifacts`): MLflow 3 refuses its plain file store unless told otherwise and names
SQLite as the local store to use. A tracking failure (server down) is logged and tracking stops for
that run; training is never failed by it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import uuid
from typing import Any

from raytrain import storage
from raytrain.config import Experiment
from raytrain.launch import job

log = logging.getLogger("raytrain.tracking")

RECORD = "tracking.json"
"""The run directory's record of its tracking runs (ids, tracking URI)."""
# Report keys that are bookkeeping, not curves.
NOT_METRICS = {"step", "node_ip", "node_ips", "checkpoint", "resumed_from", "trainable_params"}
_KEY_OK = re.compile(r"[^A-Za-z0-9_\-. /]")  # what MLflow accepts in a metric / param name
MAX_PARAM_CHARS = 6000  # MLflow 3's limit on a param value


def mlflow_uri(cfg: Experiment) -> str | None:
    """The MLflow tracking URI of the job: track.mlflow as given, or the local SQLite store under
    storage.root for `true`; None when off."""
    m = cfg.track.mlflow
    if m is False:
        return None
    if m is True:
        return "sqlite:///" + os.path.join(mlflow_root(cfg), "mlflow.db")
    return str(m)


def mlflow_root(cfg: Experiment) -> str:
    """`<storage.root>/mlflow` as an absolute local path (the `track.mlflow: true` store)."""
    return os.path.join(os.path.abspath(cfg.storage.root), "mlflow")


def flat_params(tree: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 0.002}} -> {"train.lr": "0.002"}; lists and mappings stay whole as JSON (an empty
    section is a param "{}"), strings as they are, values capped at MLflow's length limit."""
    out: dict[str, str] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat_params(v, key + "."))
        else:
            text = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
            out[key] = text[:MAX_PARAM_CHARS]
    return out


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v)
    return None


def report_metrics(report: dict) -> dict[str, float]:
    """The curves of a training report: every finite number but the bookkeeping keys (loss, ce, lr,
    samples_per_s, grad_norm, epoch, val_* ...)."""
    return {_KEY_OK.sub("_", k): x for k, v in report.items() if k not in NOT_METRICS and (x := _number(v)) is not None}


def flat_metrics(tree: dict, prefix: str) -> dict[str, float]:
    """Every finite number of a nested result, keyed by its path: {"trained": {"boxes": {"f1": 0.7}}}
    with prefix "eval/test" -> {"eval/test/trained/boxes/f1": 0.7}."""
    out: dict[str, float] = {}
    for k, v in tree.items():
        key = f"{prefix}/{_KEY_OK.sub('_', str(k))}"
        if isinstance(v, dict):
            out.update(flat_metrics(v, key))
        elif (x := _number(v)) is not None:
            out[key] = x
    return out


# ----------------------------------------------------------------------------------------------
# backends


class _MLflow:
    """One MLflow run through MlflowClient (no process-global active run: a trial actor, a test and
    the driver may each hold one)."""

    name = "mlflow"

    def __init__(self, uri: str, experiment: str, run_name: str, record: dict | None, *, params: dict[str, str],
                 tags: dict[str, str], artifact_root: str | None):
        from mlflow.entities import Param, RunStatus
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        run = None
        if record and record.get("tracking_uri") == uri:
            try:
                run = self.client.get_run(record["run_id"])
            except Exception as e:  # noqa: BLE001  deleted on the server: start a new one
                log.warning("MLflow run %s of this run directory is gone (%s): starting a new one", record["run_id"], e)
        if run is None:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(
                experiment, artifact_location=None if artifact_root is None else "file://" + os.path.join(artifact_root, experiment))
            run = self.client.create_run(exp_id, run_name=run_name, tags=tags)
            logged: dict[str, str] = {}
        else:
            self.client.update_run(run.info.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            logged = dict(run.data.params)
            self.client.set_tag(run.info.run_id, "raytrain.resumed_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
        # params are write-once in MLflow: a resumed run logs the new keys, and a changed value as a tag
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        for i in range(0, len(new), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=new[i:i + 100])
        for k, v in params.items():
            if k in logged and logged[k] != v:
                self.client.set_tag(self.run_id, f"raytrain.changed_on_resume.{k}", v[:5000])

    def record(self) -> dict:
        return {"tracking_uri": self.uri, "experiment_id": self.experiment_id, "run_id": self.run_id}

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, v, ts, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def files(self, files: dict[str, str]) -> None:
        for dest, local in files.items():
            if os.path.isdir(local):
                self.client.log_artifacts(self.run_id, local, dest)
                continue
            # MLflow keeps a file's own name: stage it under the artifact's name
            with tempfile.TemporaryDirectory() as tmp:
                staged = os.path.join(tmp, os.path.basename(dest))
                shutil.copyfile(local, staged)
                self.client.log_artifact(self.run_id, staged, os.path.dirname(dest) or None)

    def finish(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


class _WandB:
    """One W&B run (wandb.init with the recorded id and resume="allow"). Curves use the report's step
    as their x axis (define_metric), so a resumed run's replayed steps are kept, not refused."""

    name = "wandb"

    def __init__(self, project: str, entity: str, mode: str, run_name: str, record: dict | None, *, config: dict,
                 group: str | None, job_type: str, wandb_dir: str, quiet: bool):
        import wandb

        run_id = record["id"] if record and record.get("project") == project else uuid.uuid4().hex[:12]
        os.makedirs(wandb_dir, exist_ok=True)
        self.run = wandb.init(project=project, entity=entity or None, id=run_id, name=run_name, resume="allow", config=config,
                              group=group, job_type=job_type, dir=wandb_dir, mode=mode or None, reinit="create_new",
                              settings=wandb.Settings(silent=quiet))
        self.project, self.id = project, run_id
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def record(self) -> dict:
        return {"project": self.project, "id": self.id, "dir": self.run.dir}

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({**metrics, "step": step})

    def summary(self, values: dict[str, Any]) -> None:
        self.run.summary.update(values)

    def files(self, files: dict[str, str]) -> None:
        import wandb

        art = wandb.Artifact(name=re.sub(r"[^A-Za-z0-9_.-]", "-", f"{self.run.name}-report"), type="report")
        for dest, local in files.items():
            if os.path.isdir(local):
                art.add_dir(local, name=dest)
            else:
                art.add_file(local, name=dest)
        self.run.log_artifact(art)

    def finish(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


# ----------------------------------------------------------------------------------------------
# the tracker of one raytrain run


class Tracker:
    """The tracking runs of one raytrain run (MLflow and / or W&B). A backend that fails is logged
    once and dropped: tracking never fails the training."""

    def __init__(self, backends: list, *, kind: str):
        self.backends, self.kind = backends, kind

    def _each(self, what: str, fn) -> None:
        for b in list(self.backends):
            try:
                fn(b)
            except Exception as e:  # noqa: BLE001  the server went away, a quota: keep training
                log.warning("%s tracking stopped (%s failed: %s)", b.name, what, e)
                self.backends.remove(b)

    @property
    def mlflow_run_id(self) -> str | None:
        return next((b.run_id for b in self.backends if isinstance(b, _MLflow)), None)

    def parent_info(self) -> dict:
        """What a child run (a Tune trial) needs to find this run: picklable, plain."""
        return {"mlflow_run_id": self.mlflow_run_id}

    def log_report(self, report: dict) -> None:
        """A training report: its numbers as metrics at its step (ReportStream sink)."""
        step = int(report.get("step", 0))
        metrics = report_metrics(report)
        self._each("log_report", lambda b: b.log(metrics, step))

    def log_results(self, results: dict, files: dict[str, str] | None = None, *, prefix: str, step: int | None = None) -> None:
        """Nested results (numbers at any depth) as metrics `<prefix>/<path>` at `step` (0 if unknown),
        also the W&B run's summary; `files` {artifact path: local file or folder} as artifacts."""
        metrics = flat_metrics(results, prefix)
        self._each("log_results", lambda b: b.log(metrics, int(step or 0)))
        self._each("summary", lambda b: b.summary(metrics) if isinstance(b, _WandB) else None)
        if files:
            self._each("artifacts", lambda b: b.files(files))

    def log_eval(self, results: dict, files: dict[str, str] | None = None, *, split: str = "test", step: int | None = None) -> None:
        """Evaluation results (trained / untrained / centre_baseline -> metrics) as `eval/<split>/<column>/<metric>`
        at the checkpoint's step, and the report files."""
        self.log_results(results, files, prefix=f"eval/{split}", step=step)

    def finish(self, ok: bool = True) -> None:
        self._each("finish", lambda b: b.finish(ok))


def read_record(run_dir: str, opts) -> dict:
    uri = storage.join(run_dir, RECORD)
    return storage.read_json(uri, opts) if storage.exists(uri, opts) else {}


def _wandb_dir(cfg: Experiment, run_dir: str) -> str:
    # offline runs stay next to the run (`wandb sync` them later); an S3 run keeps them in a local cache
    if storage.is_s3(run_dir):
        return os.path.join(tempfile.gettempdir(), "raytrain-wandb", re.sub(r"[^A-Za-z0-9_.-]", "_", run_dir))
    return run_dir


def open_run(cfg: Experiment, run_dir: str, *, name: str, kind: str = "train", parent: dict | None = None,
             group: str | None = None) -> Tracker | None:
    """The tracker of the raytrain run in `run_dir` (local or s3://): continues the tracking runs its
    tracking.json names, else starts new ones and writes that record. kind: train | sweep | trial |
    eval (a tag). parent: a sweep's Tracker.parent_info() (MLflow child run). group: W&B run group
    (a sweep's name). None when track: is off."""
    from raytrain.launch import console

    if not cfg.track.enabled:
        return None
    opts = job.storage_opts(cfg)
    record = read_record(run_dir, opts)
    params = flat_params(cfg.to_dict())
    backends: list = []
    if (uri := mlflow_uri(cfg)) is not None:
        if cfg.track.mlflow is True:
            os.makedirs(mlflow_root(cfg), exist_ok=True)
        tags = {"raytrain.kind": kind, "raytrain.run_dir": run_dir}
        if parent and parent.get("mlflow_run_id"):
            tags["mlflow.parentRunId"] = parent["mlflow_run_id"]
        backends.append(_MLflow(uri, cfg.track.experiment, name, record.get("mlflow"), params=params, tags=tags,
                                artifact_root=os.path.join(mlflow_root(cfg), "artifacts") if cfg.track.mlflow is True else None))
    if cfg.track.wandb:
        backends.append(_WandB(cfg.track.wandb, cfg.track.wandb_entity, cfg.track.wandb_mode, name, record.get("wandb"),
                               config=params, group=group, job_type=kind, wandb_dir=_wandb_dir(cfg, run_dir),
                               quiet=not console.verbose()))
    new_record = {**record, **{b.name: b.record() for b in backends}}
    if new_record != record:
        if not storage.is_s3(run_dir):
            os.makedirs(run_dir, exist_ok=True)
        storage.write_json(storage.join(run_dir, RECORD), new_record, opts)
    tracker = Tracker(backends, kind=kind)
    for b in backends:
        where = f"run {b.run_id} at {b.uri}" if isinstance(b, _MLflow) else f"run {b.id} in project {b.project} ({b.run.settings.mode})"
        log.info("tracking %s: %s %s", name, b.name, where)
    return tracker


def local_files(files: dict[str, str], opts, tmp: str) -> dict[str, str]:
    """{artifact path: uri} -> {artifact path: local path}: local files as they are, S3 objects and
    folders copied into `tmp`; missing ones left out."""
    out = {}
    for dest, uri in files.items():
        if not storage.exists(uri, opts):
            continue
        if not storage.is_s3(uri):
            out[dest] = uri
            continue
        local = os.path.join(tmp, dest)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        storage.fsspec_fs(uri, opts).get(storage.strip_scheme(uri), local, recursive=True)
        out[dest] = local
    return out


def run_files(cfg: Experiment, run_dir: str, *, split: str) -> dict[str, str]:
    """The report files of a run directory, as artifact path -> URI: metrics JSON(s), history.jsonl,
    predictions, the HTML report folder."""
    return {
        "history.jsonl": storage.join(run_dir, "history.jsonl"),
        "eval/metrics.json": storage.join(run_dir, "eval", "metrics.json"),
        f"eval/metrics_{split}.json": storage.join(run_dir, "eval", f"metrics_{split}.json"),
        f"eval/predictions_{split}.jsonl": storage.join(run_dir, "eval", f"predictions_{split}.jsonl"),
        f"eval/coco_results_{split}.json": storage.join(run_dir, "eval", f"coco_results_{split}.json"),
        "report": storage.join(run_dir, "report"),
    }


def log_run_outputs(tracker: Tracker | None, cfg: Experiment, run_dir: str, results: dict, *, split: str, step: int | None) -> None:
    """Evaluation results and (track.artifacts) the run's report files, to `tracker`."""
    if tracker is None:
        return
    opts = job.storage_opts(cfg)
    with tempfile.TemporaryDirectory(prefix="raytrain-artifacts-") as tmp:
        files = local_files(run_files(cfg, run_dir, split=split), opts, tmp) if cfg.track.artifacts else None
        tracker.log_eval({k: v for k, v in results.items() if k != "run"}, files, split=split, step=step)


def log_evaluation(cfg: Experiment, results: dict, checkpoint: str | None = None) -> None:
    """`raytrain eval`'s results into the run's tracking run (the one its training wrote, continued;
    a new one when the run was trained untracked): metrics at the checkpoint's step, the eval files
    as artifacts. A no-op when track: is off."""
    if not cfg.track.enabled:
        return
    run_dir = storage.run_dir(job.runs_root(cfg), cfg.name)
    step = None
    if checkpoint:
        state = storage.join(checkpoint, "state.json")
        opts = job.storage_opts(cfg)
        step = storage.read_json(state, opts).get("step") if storage.exists(state, opts) else None
    tracker = open_run(cfg, run_dir, name=cfg.name, kind="eval")
    try:
        log_run_outputs(tracker, cfg, run_dir, results, split=cfg.eval.split, step=step)
    finally:
        tracker.finish(ok=True)


def close_trial(run_dir: str, opts, *, ok: bool) -> None:
    """Mark a Tune trial's MLflow run ended from the sweep's driver: a trial that ASHA stops is killed
    before it can say so itself. Runs already ended are left as they are."""
    record = read_record(run_dir, opts).get("mlflow")
    if not record:
        return
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=record["tracking_uri"])
        if client.get_run(record["run_id"]).info.status == "RUNNING":
            client.set_terminated(record["run_id"], "FINISHED" if ok else "FAILED")
    except Exception as e:  # noqa: BLE001  tracking never fails the sweep
        log.warning("could not close the MLflow run of %s: %s", run_dir, e)
