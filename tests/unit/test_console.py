"""raytrain's console lines (launch/console.py) and the tracking module's pure parts (launch/tracking.py)."""

import logging
import sys

import pytest

from raytrain.launch import console, tracking


class Clock:
    def __init__(self, t=100.0):
        self.t = t

    def __call__(self):
        return self.t


def test_progress_line_has_step_of_total_loss_throughput_and_eta():
    clock = Clock()
    p = console.TrainProgress(1000, clock=clock)
    first = p.line({"step": 100, "loss": 2.5, "ce": 2.4, "lr": 1e-3, "samples_per_s": 320.0})
    assert first.startswith("train step 100/1000 | loss 2.5000 | ce 2.4000 | lr 1.00e-03 | 320.0 samples/s")
    assert first.endswith("ETA -")  # one report: no rate yet
    clock.t += 60.0  # 100 steps a minute -> 800 steps left = 8 minutes
    line = p.line({"step": 200, "loss": 2.0, "samples_per_s": 330.0, "val_norm_distance_all": 0.12345})
    assert "train step 200/1000" in line and "val_norm_distance_all 0.1235" in line
    assert line.endswith("ETA 8m00s")


def test_progress_of_a_resumed_run_counts_from_its_first_report():
    clock = Clock()
    p = console.TrainProgress(400, clock=clock)
    p.line({"step": 300})  # resumed at 300
    clock.t += 10.0
    assert p.line({"step": 350}).endswith("ETA 10s")  # 5 steps/s, 50 left


def test_periodic_progress_yields_every_row_and_reports(caplog):
    clock = Clock()
    rows = []

    def source():
        for i in range(10):
            clock.t += 3.0  # one row every 3 s
            yield i

    with caplog.at_level(logging.INFO, logger="raytrain.console"):
        for r in console.progress(source(), total=10, label="eval trained", every_s=10.0, clock=clock):
            rows.append(r)
    assert rows == list(range(10))
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("eval trained 4/10 (40%)")  # first line after >= 10 s
    assert lines[-1].startswith("eval trained 10/10 done in 30s")
    assert len(lines) == 3  # at 12 s, 24 s, and done


@pytest.mark.parametrize("s, text", [(5, "5s"), (65, "1m05s"), (7260, "2h01m"), (float("nan"), "-"), (-1, "-")])
def test_duration(s, text):
    assert console.duration(s) == text


def test_noise_filter_drops_known_noise_only():
    f = console.NoiseFilter()
    rec = lambda msg: logging.LogRecord("ray", logging.WARNING, __file__, 1, msg, None, None)  # noqa: E731
    assert not f.filter(rec("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled ..."))
    assert f.filter(rec("Ray is using /tmp instead of /dev/shm: the object store will be slow"))


@pytest.fixture
def restore_logging(monkeypatch):
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    monkeypatch.setattr(console, "_VERBOSE", console._VERBOSE)
    for k in console.QUIET_ENV:
        monkeypatch.delenv(k, raising=False)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_quiet_setup_prints_raytrain_info_and_other_warnings_only(restore_logging, capsys):
    console.setup(verbose=False)
    assert not console.verbose()
    logging.getLogger("raytrain.launch.train").info("train step 1/2")
    logging.getLogger("transformers.modeling_utils").info("Loading weights")
    logging.getLogger("somelib").warning("disk almost full")
    logging.getLogger("ray.data").warning("Progress bars disabled. To enable, set ...")  # propagates to root here
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2
    assert out[0].endswith(" train step 1/2") and "raytrain" not in out[0]
    assert out[1].endswith("WARNING [somelib] disk almost full")


def test_verbose_setup_leaves_libraries_at_info(restore_logging, capsys):
    console.setup(verbose=True)
    assert console.verbose()
    # a library logger that sets no level of its own (transformers, once imported, holds its library
    # logger at WARNING by itself: that is its own verbosity, not raytrain's)
    logging.getLogger("somelibrary.module").info("Loading weights")
    assert "Loading weights" in capsys.readouterr().out


def test_without_setup_a_process_keeps_ray_output(monkeypatch):
    # tests, notebooks and `raytrain serve` never call setup(): Ray's worker logs still reach them
    monkeypatch.setattr(console, "_VERBOSE", None)
    assert console.verbose()


# ---------------------------------------------------------------------------- tracking's pure parts


def test_config_becomes_dotted_params_with_lists_as_json():
    params = tracking.flat_params({"train": {"lr": 0.002, "steps": 20}, "data": {"tasks": ["point", "detect"], "splits": {}},
                                   "name": "shapes", "ray": {"address": None}})
    assert params == {"train.lr": "0.002", "train.steps": "20", "data.tasks": '["point", "detect"]', "data.splits": "{}",
                      "name": "shapes", "ray.address": "null"}


def test_report_metrics_keep_curves_and_drop_bookkeeping():
    m = tracking.report_metrics({"step": 5, "loss": 1.5, "ce": 1.4, "lr": 1e-3, "samples_per_s": 90.0, "node_ip": "127.0.0.1",
                                 "trainable_params": 10, "resumed_from": -1, "early_stopped": False, "val_box_f1": float("nan")})
    assert m == {"loss": 1.5, "ce": 1.4, "lr": 1e-3, "samples_per_s": 90.0, "early_stopped": 0.0}


def test_eval_results_flatten_to_paths_of_numbers():
    m = tracking.flat_metrics({"trained": {"valid_rate": 1.0, "boxes": {"f1": 0.5}, "parse_errors": {"bad <loc>": 2}, "note": "x"}},
                              "eval/test")
    assert m == {"eval/test/trained/valid_rate": 1.0, "eval/test/trained/boxes/f1": 0.5, "eval/test/trained/parse_errors/bad _loc_": 2.0}


def test_mlflow_true_is_a_sqlite_store_under_the_storage_root(tmp_path):
    from raytrain import config as config_mod

    cfg = config_mod.load(None, [f"storage.root={tmp_path}", "track.mlflow=true"])
    assert tracking.mlflow_uri(cfg) == f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    assert tracking.mlflow_uri(config_mod.load(None, ["track.mlflow=http://127.0.0.1:5000"])) == "http://127.0.0.1:5000"
    assert tracking.mlflow_uri(config_mod.load(None, [])) is None
    with pytest.raises(ValueError, match="track.mlflow=true keeps an MLflow store under storage.root"):
        config_mod.load(None, ["track.mlflow=true", "storage.root=s3://bucket/x"])
    with pytest.raises(ValueError, match="track.wandb_mode"):
        config_mod.load(None, ["track.wandb_mode=sometimes"])


def test_tracking_cannot_be_swept():
    from raytrain import config as config_mod
    from raytrain.launch import tune

    cfg = config_mod.load("jobs/tiny/shapes_sweep.yaml")
    sweep = cfg.tune
    sweep.space = {"track.experiment": {"choice": ["a", "b"]}}
    with pytest.raises(ValueError, match="fixed for a sweep"):
        tune.check_sweep(cfg, sweep)


def test_stdout_is_not_replaced(restore_logging):
    console.setup(verbose=False)
    assert logging.getLogger().handlers[0].stream is sys.stdout
