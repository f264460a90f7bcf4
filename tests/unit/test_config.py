"""Config schema: every shipped job YAML loads; overrides are typed; mistakes are loud."""

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
