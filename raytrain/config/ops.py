"""Config sections of experiment operations: tracking (`track:`) and sweeps (`tune:`).

Part of the typed experiment configuration (`raytrain.config` re-exports every class here, so
`from raytrain.config import TrackConfig, SweepConfig` is the way to import them); split off only to
keep config/__init__.py under the 600-line bound. Defaults live here as in the rest of raytrain/config/; each field's string
literal is its help text (`raytrain config --help-fields`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

WANDB_MODES = ("", "online", "offline", "disabled")
"""track.wandb_mode values ("" = W&B's own choice: WANDB_MODE, else online)."""


@dataclass
class TrackConfig:
    """Experiment tracking (raytrain/launch/tracking.py): one tracking run per raytrain run (a resumed
    run continues it; the ids are kept in the run directory's tracking.json), holding the whole config
    as params, every training report as metrics (by optimizer step), the evaluation's metrics and the
    report files. Tune trials are child runs of the sweep's run. Both backends may be on at once."""

    mlflow: bool | str = False
    """MLflow: a tracking URI (http://host:5000, sqlite:///abs/path/mlflow.db, databricks, ...), or true
    for a local store under storage.root (<root>/mlflow/mlflow.db, artifacts in <root>/mlflow/artifacts;
    `mlflow ui --backend-store-uri sqlite:///<root>/mlflow/mlflow.db` shows it); false = off.
    Needs `pip install raytrain[track]` (mlflow-skinny)."""
    experiment: str = "raytrain"
    """MLflow experiment the runs go to (created when missing)."""
    wandb: str = ""
    """Weights & Biases project; "" = off. Needs `pip install wandb`."""
    wandb_entity: str = ""
    """W&B entity (team or user); "" = the account's default."""
    wandb_mode: str = ""
    """online | offline (no network needed; `wandb sync <run dir>/wandb/offline-run-*` uploads later) |
    disabled; "" = W&B's own choice (WANDB_MODE, else online)."""
    artifacts: bool = True
    """Upload the run's report files at the end: metrics JSON, history.jsonl, predictions, the HTML report."""

    def __post_init__(self):
        if isinstance(self.mlflow, str) and not self.mlflow.strip():
            raise ValueError("track.mlflow is a tracking URI or true/false, not an empty string")
        if self.wandb_mode not in WANDB_MODES:
            raise ValueError(f"track.wandb_mode must be one of {list(WANDB_MODES)}, got {self.wandb_mode!r}")
        if self.mlflow is not False and not self.experiment:
            raise ValueError("track.experiment (the MLflow experiment) must not be empty")

    @property
    def enabled(self) -> bool:
        return self.mlflow is not False or bool(self.wandb)


@dataclass
class SchedulerConfig:
    type: str = "asha"
    """asha (async successive halving: stop the worse trials at rungs) | fifo (no early stopping)."""
    time_attr: str = "step"
    """The reported counter rungs are measured in (optimizer steps)."""
    grace_period: int = 100
    """Steps every trial runs before it can be stopped; the first rung."""
    reduction_factor: float = 2.0
    """Rungs at grace_period * reduction_factor**k; at each, only the best 1/reduction_factor go on."""
    max_t: int = 0
    """Last rung (steps); 0 = train.steps of the job."""

    def __post_init__(self):
        if self.type not in ("asha", "fifo"):
            raise ValueError(f"tune.scheduler.type must be asha | fifo, not {self.type!r}")
        if self.type == "asha" and self.grace_period < 1:
            raise ValueError("tune.scheduler.grace_period must be >= 1 step")


@dataclass
class SearchConfig:
    type: str = "optuna"
    """optuna (Bayesian: TPE over the finished trials) | random."""
    seed: int = 0
    n_startup_trials: int = 4
    """optuna: random trials before TPE starts modelling the objective."""

    def __post_init__(self):
        if self.type not in ("optuna", "random"):
            raise ValueError(f"tune.search.type must be optuna | random, not {self.type!r}")


@dataclass
class SweepConfig:
    """`raytrain tune`'s sweep (launch/tune.py); `raytrain train` ignores it."""

    metric: str = "val_norm_distance_all"
    """Objective: a metric in the recipe's reports (val_* come from train.val_every validation)."""
    mode: str = "min"
    """min | max."""
    num_samples: int = 8
    """Trials in the sweep."""
    max_concurrent: int = 1
    """Trials running at once (each holds scale.num_workers workers)."""
    trial_cpus: float = 0.01
    """CPUs reserved for each trial's driver function: a sliver (Tune refuses 0), as it only waits on
    its TorchTrainer, whose workers reserve scale.cpus_per_worker (+ scale.resources_per_worker) each."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    space: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Dotted experiment key -> domain: {loguniform: [lo, hi]} | {uniform: [lo, hi]} |
    {quniform: [lo, hi, q]} | {randint: [lo, hi)} | {choice: [v, ...]}. Empty: no sweep."""

    def __post_init__(self):
        if self.mode not in ("min", "max"):
            raise ValueError(f"tune.mode must be min | max, not {self.mode!r}")
        if self.num_samples < 1 or self.max_concurrent < 1:
            raise ValueError("tune.num_samples and tune.max_concurrent must be >= 1")
