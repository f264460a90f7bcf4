"""The eval and serve config sections (raytrain/config/inference.py, re-exported by config.py):
defaults that make evaluation valid by construction, checks on the GPU pool settings, the decoding
grid from YAML (seed 003's 12 cells), and the Serve GPU field's old name."""

import pytest

from raytrain import config as config_mod
from raytrain.eval import grid


def test_eval_defaults_are_constrained_with_confidences_on_cpu():
    ev = config_mod.load(None).eval
    assert ev.constrained and ev.confidence and ev.dtype == "auto" and ev.gpus_per_actor == 0.0
    assert ev.pool_size == 2 and not ev.grid.active and ev.limit == 0


def test_pool_size_fixed_or_autoscaling():
    assert config_mod.load(None, ["eval.num_actors=3"]).eval.pool_size == 3
    assert config_mod.load(None, ["eval.max_actors=8"]).eval.pool_size == (1, 8)
    assert config_mod.load(None, ["eval.min_actors=2", "eval.max_actors=8"]).eval.pool_size == (2, 8)


@pytest.mark.parametrize("bad", ["eval.dtype=fp8", "eval.gpus_per_actor=-1", "eval.min_actors=4", "eval.min_actors=5 ",
                                 "eval.limit=-1", "eval.nms_iou=1.5", "eval.bucket_batches=0", "eval.calibration_bins=0",
                                 "eval.grid={decodings: {G: {beams: 4}}}", "eval.gpu=1"])
def test_eval_rejects_bad_values(bad):
    over = [bad] + (["eval.max_actors=2"] if bad.startswith("eval.min_actors=5") else [])
    with pytest.raises(ValueError):
        config_mod.load(None, over)


def test_seed003_eval_job_is_the_twelve_cell_grid():
    cfg = config_mod.load("jobs/paligemma/1-3b_qlora_risc_captions_eval.yaml")
    g = cfg.eval.grid
    assert g.active and g.prompts == grid.SEED003_PROMPTS
    decodings = [grid.DecodingConfig(name, **d) for name, d in g.decodings.items()]
    assert [d.generate_kwargs() for d in decodings] == [d.generate_kwargs() for d in grid.SEED003_DECODINGS]
    cells = grid.grid_cells(g.prompts, decodings, list(g.checkpoints))
    assert len(cells) == 12 and {c.checkpoint for c in cells} == {"conf1", "conf2"}
    assert all(spec.startswith("run:") for spec in g.checkpoints.values())
    assert cfg.eval.gpus_per_actor > 0 and not cfg.eval.cpu_fallback and cfg.eval.clip_path


def test_seed_jobs_evaluate_on_gpus():
    import glob

    for path in glob.glob("jobs/paligemma/*.yaml") + glob.glob("jobs/qwen2_5_vl/*.yaml"):
        ev = config_mod.load(path).eval
        assert ev.gpus_per_actor > 0 and not ev.cpu_fallback, path
        assert "GAP: eval" not in open(path).read() and "CPUs only" not in open(path).read(), path


def test_serve_gpus_per_replica_and_the_old_name():
    cfg = config_mod.load_section(config_mod.ServeConfig, None, ["gpus_per_replica=0.5"])
    assert cfg.gpus_per_replica == 0.5 and cfg.constrained and cfg.dtype == "auto"
    with pytest.raises(ValueError, match="num_gpus is now gpus_per_replica"):
        config_mod.load_section(config_mod.ServeConfig, None, ["num_gpus=1"])


def test_segment_eval_refuses_a_token_budget_that_holds_no_mask():
    """Constrained decoding cannot cut a mask answer, so below one mask's length every answer would
    be "nothing found": refused with a message naming the setting; the seed segment job fits."""
    from raytrain.launch.eval import decode_options

    cfg = config_mod.load(None, ["data.tasks=[segment]", "eval.max_new_tokens=16"])
    with pytest.raises(ValueError, match="eval.max_new_tokens"):
        decode_options(cfg)
    assert decode_options(config_mod.load(None, ["data.tasks=[segment]", "eval.max_new_tokens=22"])).max_new_tokens == 22
    assert decode_options(config_mod.load(None, ["data.tasks=[segment]", "eval.constrained=false"])).max_new_tokens == 16
    assert decode_options(config_mod.load("jobs/paligemma/1-3b_full_jsonl_segment.yaml")).max_new_tokens == 256


def test_train_refuses_a_segment_eval_budget_before_it_trains(tmp_path, monkeypatch):
    """`raytrain train` evaluates after training: its decoding settings are checked before Ray
    starts or any data is prepared, not after hours of training."""
    from raytrain.launch import train

    def started(*_a, **_k):
        raise AssertionError("Ray started before the eval settings were checked")

    monkeypatch.setattr(train, "init_ray", started)
    cfg = config_mod.load(None, ["data.tasks=[segment]", "eval.max_new_tokens=16", f"storage.root={tmp_path}"])
    with pytest.raises(ValueError, match="eval.max_new_tokens"):
        train.main(cfg)
