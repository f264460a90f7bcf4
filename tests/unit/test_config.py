"""Config schema: every shipped job YAML loads; overrides are typed; mistakes are loud."""

import dataclasses
import json
from pathlib import Path

import pytest

from raytrain import cli
from raytrain import config as config_mod

JOBS = sorted(Path(__file__).resolve().parents[2].glob("jobs/**/*.yaml"))


def test_there_are_jobs():
    assert JOBS


@pytest.mark.parametrize("path", JOBS, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_every_job_loads_and_starts_with_its_submit_line(path):
    cfg = config_mod.load(path)
    assert isinstance(cfg, config_mod.Experiment)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ray job submit"), "each job YAML starts with its exact `ray job submit` line"
    assert "Hardware:" in path.read_text().split("\n\n")[0] or "hardware" in path.read_text().lower()


def test_overrides_are_typed():
    cfg = config_mod.load(None, ["train.steps=7", "train.lr=2e-3", "data.tasks=[point]", "storage.endpoint_url=http://127.0.0.1:9"])
    assert cfg.train.steps == 7 and cfg.train.lr == pytest.approx(2e-3)
    assert cfg.data.tasks == ["point"]
    assert cfg.storage.endpoint_url == "http://127.0.0.1:9"


@pytest.mark.parametrize("bad", ["train.stepz=1", "train.steps=many", "train=3", "nosuchsection.x=1", "train.steps"])
def test_bad_overrides_fail_clearly(bad):
    with pytest.raises(ValueError):
        config_mod.load(None, [bad])


def test_defaults_round_trip_through_dict():
    cfg = config_mod.load(None)
    assert config_mod.from_dict(cfg.to_dict()) == cfg


def test_every_field_has_help_in_the_listing(capsys):
    assert cli.main(["config", "--help-fields"]) == 0
    out = capsys.readouterr().out
    for name, _, _ in config_mod.field_help():
        assert name in out
    assert "train.steps" in out and "loss.loc_sigma" in out


def test_cli_reports_config_errors(capsys):
    assert cli.main(["config", "train.nope=1"]) == 2
    assert "unknown config key" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# the sections that used to live outside config.py: tune, zero, data.preprocess, serve, prepare

NEW_SECTIONS_YAML = """
name: sections
data:
  preprocess: {resize: letterbox, pad_color: [114, 114, 114], edge_blend: 0.3, edge_sigma: 1.5}
train: {strategy: zero3, val_every: 10, steps: 20, early_stop_metric: val_box_f1, early_stop_mode: max}
zero: {offload_optimizer: true, offload_param: true}
tune:
  metric: val_box_f1
  mode: max
  num_samples: 3
  scheduler: {type: fifo}
  search: {type: random, seed: 7}
  space:
    train.lr: {loguniform: [1.0e-4, 1.0e-3]}
"""


def test_new_sections_load_from_yaml_and_round_trip(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(NEW_SECTIONS_YAML)
    cfg = config_mod.load(path, ["tune.scheduler.grace_period=5", "zero.offload_optimizer=false"])
    assert cfg.data.preprocess == config_mod.Preprocess("letterbox", (114, 114, 114), 0.3, 1.5)
    assert (cfg.zero.offload_optimizer, cfg.zero.offload_param) == (False, True)
    assert (cfg.tune.metric, cfg.tune.mode, cfg.tune.num_samples) == ("val_box_f1", "max", 3)
    assert (cfg.tune.scheduler.type, cfg.tune.scheduler.grace_period, cfg.tune.search.seed) == ("fifo", 5, 7)
    assert cfg.tune.space == {"train.lr": {"loguniform": [1.0e-4, 1.0e-3]}}
    # through the dict Ray ships to workers and back, and through JSON (checkpoint records)
    assert config_mod.from_dict(cfg.to_dict()) == cfg
    assert config_mod.from_dict(json.loads(config_mod.dumps(cfg))) == cfg


@pytest.mark.parametrize("bad", ["tune.nope=1", "tune.scheduler.nope=1", "zero.offload=true", "data.preprocess.clahe=true",
                                 "tune.mode=best", "tune.scheduler.type=hyperband", "tune.search.type=grid", "tune.num_samples=0",
                                 "train.strategy=deepspeed", "scale.placement_strategy=RANDOM", "data.preprocess.pad_color=[1,2]",
                                 "train.early_stop_mode=lowest", "train.early_stop_metric=val_box_f1"])
def test_new_sections_reject_unknown_keys_and_bad_values(bad):
    with pytest.raises(ValueError):
        config_mod.load(None, [bad])


def test_zero_options_need_a_zero_strategy():
    assert config_mod.load(None, ["train.strategy=zero2", "zero.offload_optimizer=true"]).zero.offload_optimizer
    with pytest.raises(ValueError, match="offload_param needs train.strategy=zero3"):
        config_mod.load(None, ["train.strategy=zero2", "zero.offload_param=true"])
    with pytest.raises(ValueError, match="DeepSpeed options"):
        config_mod.load(None, ["train.strategy=lora", "zero.offload_optimizer=true"])
    with pytest.raises(ValueError, match="quant.bits needs train.strategy=lora"):
        config_mod.load(None, ["train.strategy=zero2", "quant.bits=4"])


def test_old_flat_preprocessing_keys_say_where_they_moved():
    with pytest.raises(ValueError, match=r"edge_blend is now data\.preprocess\.edge_blend"):
        config_mod.load(None, ["data.edge_blend=0.3"])


def test_help_fields_lists_the_new_sections_and_serve(capsys):
    assert cli.main(["config", "--help-fields"]) == 0
    out = capsys.readouterr().out
    for name in ("data.preprocess.resize", "data.preprocess.edge_blend", "zero.offload_optimizer", "zero.offload_param",
                 "tune.metric", "tune.space", "tune.scheduler.grace_period", "tune.search.n_startup_trials", "data.prepare.max_side"):
        assert f"\n{name} = " in out, name
    serve_part = out.split("# raytrain serve settings")[1]
    for f in dataclasses.fields(config_mod.ServeConfig):
        assert f"\n{f.name} = " in serve_part, f.name
    assert "Keep fp32 master weights and Adam moments in CPU memory" in out  # help text, not just names


def test_serve_config_loads_from_its_own_yaml(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("model: tiny:paligemma\nadapters: {a: /x/ckpt}\nmax_batch_size: 4\n")
    cfg = config_mod.load_section(config_mod.ServeConfig, path, ["port=8001"])
    assert (cfg.port, cfg.max_batch_size, cfg.adapters) == (8001, 4, {"a": "/x/ckpt"})
    for bad in (["prot=1"], ["adapters={../x: /y}"], ["max_batch_size=64"]):  # unknown, bad adapter id, > max_ongoing_requests
        with pytest.raises(ValueError):
            config_mod.load_section(config_mod.ServeConfig, path, bad)


def test_a_trial_config_is_the_job_with_dotted_overrides():
    base = config_mod.load("jobs/tiny/shapes_sweep.yaml").to_dict()
    trial = config_mod.override(base, {"train.lr": 1e-3, "loss.loc_sigma": 0.0})
    assert trial.train.lr == 1e-3 and trial.loss.loc_sigma == 0.0 and trial.train.steps == base["train"]["steps"]
    assert base["train"]["lr"] != 1e-3  # the base is not modified
    with pytest.raises(ValueError):
        config_mod.override(base, {"train.lrr": 1e-3})
