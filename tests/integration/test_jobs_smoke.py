"""Every job in jobs/ loads into the schema and trains in smoke mode.

Each jobs/tiny/ YAML is shrunk by `raytrain.launch.smoke.smoke` (tiny preset of the same family,
synthetic data, 8 steps, CPU) and run through its recipe without Ray (`recipes.ddp.train` with a plain
Session over batches encoded by the family's `encode_train`; `recipes.zero` for zero2/zero3): the
loss must be finite and fall, a checkpoint must be written in the strategy's layout, and it must
reload and generate with the job's eval decoding settings. The header of each file (its exact
`ray job submit` line, its hardware) and its entry in jobs/README.md are checked for every job.
The seed jobs (jobs/paligemma, jobs/qwen2_5_vl, jobs/qwen3_vl) train in smoke mode on their seed's
own data format instead: tests/integration/test_seed_fixture_smoke.py.
"""

import json
import math
import re
from pathlib import Path

import pytest

from raytrain import config as config_mod
from raytrain.launch import smoke as smoke_mod

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

REPO = Path(__file__).resolve().parents[2]
JOBS = sorted(REPO.glob("jobs/**/*.yaml"))
DEMO_JOBS = [p for p in JOBS if p.parent.name == "tiny"]  # the seed jobs smoke-train on their fixtures (test_seed_fixture_smoke.py)
SUBMIT = "# ray job submit --address http://127.0.0.1:8265 --working-dir . -- raytrain "


def _rel(p: Path) -> str:
    return str(p.relative_to(REPO))


def _load(path: Path) -> config_mod.Experiment:
    return config_mod.load(path)  # a `tune:` section is part of the schema (train ignores it)


@pytest.fixture(scope="module")
def preset_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("presets"))


def test_jobs_exist_for_every_family():
    families = {p.parent.name for p in JOBS}
    assert {"paligemma", "qwen2_5_vl", "tiny"} <= families, families


@pytest.mark.parametrize("path", JOBS, ids=_rel)
def test_job_header_names_itself_and_its_hardware(path):
    lines = path.read_text().splitlines()
    assert lines[0].startswith(SUBMIT), lines[0]
    sub, flag, conf = lines[0][len(SUBMIT):].split()[:3]
    assert sub in ("train", "tune", "eval") and flag == "--config"
    assert conf == _rel(path), "the submit line must name this very file"
    assert lines[1].startswith("# Hardware: "), lines[1]
    # the DESIGN name: jobs/<family>/<size>_<strategy>_<dataset>.yaml (tiny keeps its demo names)
    if path.parent.name != "tiny":
        size, strategy, _ = path.stem.split("_", 2)
        assert re.fullmatch(r"(\d-)?\d+b", size), size
        cfg = _load(path)
        expected = {"full": "full", "lora": "qlora" if cfg.quant.bits else "lora"}.get(cfg.train.strategy, cfg.train.strategy)
        assert strategy == expected, (strategy, cfg.train.strategy, cfg.quant.bits)
        assert cfg.model.family == path.parent.name


@pytest.mark.parametrize("path", JOBS, ids=_rel)
def test_job_is_listed_in_the_jobs_readme(path):
    readme = (REPO / "jobs" / "README.md").read_text()
    command = path.read_text().splitlines()[0][2:]  # without "# "
    assert command in readme, f"jobs/README.md lacks the command of {_rel(path)}"


def test_smoke_keeps_what_makes_the_job(tmp_path):
    cfg = _load(REPO / "jobs/paligemma/2-3b_qlora_pixmo_points.yaml")
    s = smoke_mod.smoke(cfg, root=str(tmp_path))
    assert (s.model.family, s.model.name_or_path, s.model.dtype) == ("paligemma", "tiny:paligemma", "float32")
    assert (s.quant.bits, s.quant.quant_type, s.quant.double_quant) == (4, "nf4", cfg.quant.double_quant)
    assert s.lora == cfg.lora and s.loss == cfg.loss
    assert (s.train.strategy, s.train.optimizer, s.train.schedule) == ("lora", "paged_adamw_8bit", cfg.train.schedule)
    assert (s.data.source, s.data.tasks, s.scale.num_workers, s.scale.use_gpu) == ("synthetic", ["point"], 1, False)
    assert s.storage.root == str(tmp_path) and cfg.storage.root != str(tmp_path)  # the job itself is untouched
    qwen = smoke_mod.smoke(_load(REPO / "jobs/qwen2_5_vl/3b_qlora_dense_captioning_visual_genome.yaml"))
    assert qwen.model.name_or_path == "tiny:qwen2_5_vl"
    # the budgets are measured on the smoke examples as training encodes them (the seed's system prompt included)
    from raytrain.models import ensure_preset

    longest, answer = smoke_mod.token_budget(qwen, qwen.model_family().load_processor(str(ensure_preset("tiny:qwen2_5_vl"))))
    assert (qwen.data.max_seq_len, qwen.eval.max_new_tokens) == (longest + smoke_mod.SEQ_MARGIN, answer + smoke_mod.SEQ_MARGIN)
    # the seed's system turn (~60 tokens) + user turn + image tokens; a (phrase, [x1, y1, x2, y2]) list
    assert longest >= 250 and answer >= 20, (longest, answer)
    assert qwen.quant.skip_modules == ["model.visual", "lm_head"]


def test_smoke_shortens_a_new_token_warmup_but_keeps_it():
    cfg = config_mod.load(str(REPO / "jobs/qwen2_5_vl/3b_qlora_dense_captioning_visual_genome.yaml"),
                          ["model.box_format=tokens", "train.new_token_warmup_steps=156"])  # the job's documented variant
    s = smoke_mod.smoke(cfg, steps=8)
    assert (s.model.box_format, s.train.steps, s.train.new_token_warmup_steps) == ("tokens", 8, 2)
    assert smoke_mod.smoke(_load(REPO / "jobs/tiny/shapes.yaml")).train.new_token_warmup_steps == 0


def test_smoke_runs_its_own_step_count_for_a_job_that_trains_by_epochs():
    job = _load(REPO / "jobs/paligemma/2-3b_full_shoulder_fracture.yaml")
    assert job.train.epochs == 50  # the seed's "50 epochs"; steps would come from the example count
    s = smoke_mod.smoke(job, steps=8)
    assert (s.train.epochs, s.train.steps) == (0.0, 8)


def test_smoke_keeps_the_task_head_at_the_tiny_token_count():
    cfg = _load(REPO / "jobs/paligemma/2-3b_full_shoulder_fracture.yaml")
    assert cfg.model.task_head_queries == 256  # seed 004's head, one query per SigLIP patch at 224 px
    assert smoke_mod.smoke(cfg).model.task_head_queries == 16  # the tiny preset's image tokens


def test_smoke_substitutes_tasks_the_synthetic_set_cannot_render():
    plan = smoke_mod.smoke_plan(["detect", "point"], "paligemma")
    assert plan.tasks == ["detect", "point"] and not plan.notes
    plan = smoke_mod.smoke_plan(["dense_caption"], "qwen2_5_vl")
    if smoke_mod.synthetic_supports("dense_caption", "qwen2_5_vl"):
        assert plan.tasks == ["dense_caption"]
    else:
        assert plan.tasks == ["detect"] and "dense_caption" in plan.notes[0]


@pytest.mark.parametrize("path", DEMO_JOBS, ids=_rel)
def test_job_trains_in_smoke_mode(path, tmp_path, preset_cache):
    job = _load(path)
    cfg = smoke_mod.smoke(job, root=str(tmp_path / "root"))
    try:
        res = smoke_mod.run_local(cfg, tmp_path / "ckpt", preset_cache=preset_cache)
    except smoke_mod.SmokeUnavailable as e:
        pytest.skip(f"{_rel(path)}: {e}")

    losses = res.losses
    assert len(losses) == cfg.train.steps and all(math.isfinite(x) for x in losses), losses
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < first, f"loss did not fall in {cfg.train.steps} steps: {losses}"

    # a checkpoint in the strategy's layout, at the last step
    assert res.checkpoints, "no checkpoint written"
    ckpt = res.checkpoints[-1]
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == cfg.train.steps
    # the image preprocessing the job trained with is recorded for eval and Serve to apply
    assert config_mod.Preprocess.from_dict(state["preprocess"]) == job.data.preprocess
    layout = {"full": "model", "lora": "adapter"}.get(cfg.train.strategy)
    if layout:
        assert (ckpt / layout).is_dir(), sorted(p.name for p in ckpt.iterdir())
    # it reloads and generates with the job's decoding settings (seed 003's beam + sampling cell)
    assert len(res.generated) == 2 and all(isinstance(t, str) for t in res.generated)
