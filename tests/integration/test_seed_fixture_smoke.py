"""Every seed job (jobs/paligemma, jobs/qwen2_5_vl, jobs/qwen3_vl) in smoke mode on its seed's own
data format (tests/assets/: real photographs, true annotations), not on synthetic shapes.

`smoke(job, data=fixture)` keeps the job's data section and converts the fixture with the job's
converter (prepare's own code, Ray-free); the run trains the tiny preset of the job's family on
every example for a few steps, then decodes examples with the job's decoding settings and reads
them back with the family's parser for the job's task. Every row of a fixture goes to one split
that is trained on and decoded (3-10 rows: a hashed split would leave the evaluation empty).
"""

import functools
import json
import math
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from raytrain import config as config_mod
from raytrain import storage, tasks
from raytrain.launch import job as job_mod
from raytrain.launch import smoke as smoke_mod

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "tests" / "assets"
PIXMO_ORIGIN = "http://images.fixture.test"  # tests/assets/make_fixtures.py: the PixMo rows name this host
STEPS = 6

# job -> (fixture, rows the job's converter keeps, drop reasons, examples rendered from them)
SEED_JOBS = {
    "jobs/paligemma/2-3b_qlora_pixmo_points.yaml":  # count-0 "dog" row: a negative the job drops (keep_negatives false)
        ("seed000_pixmo_points", 8, {"download_failed": 1, "negative_dropped": 1}, 8),
    "jobs/paligemma/1-3b_full_jsonl_caption.yaml": ("seed001_datature_jsonl/caption.jsonl", 5, {}, 5),
    # multi_label: "detect cup ; spoon ; cat ; camera" rows are one example each, the quokka's a negative
    "jobs/paligemma/1-3b_full_jsonl_detect.yaml": ("seed001_datature_jsonl/detect.jsonl", 4, {}, 4),
    "jobs/paligemma/1-3b_full_jsonl_segment.yaml": ("seed001_datature_jsonl/segment.jsonl", 3, {}, 3),
    "jobs/qwen2_5_vl/3b_qlora_dense_captioning_visual_genome.yaml": ("seed002_visual_genome", 5, {}, 5),
    "jobs/qwen3_vl/4b_qlora_dense_captioning_visual_genome.yaml": ("seed002_visual_genome", 5, {}, 5),
    # the folder as it is: 4 edge-case rows name images it does not hold / miss a field
    "jobs/paligemma/1-3b_qlora_risc_captions_conf1.yaml": ("risc_mini", 3, {"image_missing": 3, "missing_field": 1}, 3),
    "jobs/paligemma/1-3b_qlora_risc_captions_conf2.yaml": ("risc_mini", 3, {"image_missing": 3, "missing_field": 1}, 3),
    "jobs/paligemma/1-3b_qlora_risc_captions_eval.yaml": ("risc_mini", 3, {"image_missing": 3, "missing_field": 1}, 3),
    # the 2 "Normal" rows are negatives (data.text.empty_answer: Normal)
    "jobs/paligemma/2-3b_full_shoulder_fracture.yaml": ("seed004_fracture_jsonl", 5, {}, 5),
    "jobs/paligemma/2-10b_qlora_shoulder_fracture.yaml": ("seed004_fracture_jsonl", 5, {}, 5),
    "jobs/paligemma/2-28b_qlora_shoulder_fracture.yaml": ("seed004_fracture_jsonl", 5, {}, 5),
}


def test_every_seed_job_has_a_fixture():
    seed_jobs = {str(p.relative_to(REPO)) for p in REPO.glob("jobs/**/*.yaml") if p.parent.name != "tiny"}
    assert seed_jobs == set(SEED_JOBS)


@pytest.fixture(scope="module")
def preset_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("presets"))


@pytest.fixture(scope="module")
def pixmo_rows(tmp_path_factory):
    """seed000's rows.jsonl with its image URLs on a local HTTP server (the rows name a host that
    never resolves); gone.jpg stays a dead URL (HTTP 404)."""
    folder = ASSETS / "seed000_pixmo_points"
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder / "images")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = tmp_path_factory.mktemp("pixmo") / "rows.jsonl"
    out.write_text((folder / "rows.jsonl").read_text().replace(PIXMO_ORIGIN, f"http://127.0.0.1:{server.server_port}"))
    yield out
    server.shutdown()


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _prompt(job: config_mod.Experiment, task: str, query: str) -> str:
    """The prompt the job's data.text asks for (its template with the query), or the task's default."""
    template = job.data.text.prompts.get(task)
    return template.replace("{query}", query) if template else ""


@pytest.mark.parametrize("path", list(SEED_JOBS))
def test_seed_job_smoke_on_its_fixture(path, tmp_path, preset_cache, pixmo_rows, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    fixture, kept, dropped, n_examples = SEED_JOBS[path]
    data = pixmo_rows if fixture.startswith("seed000") else ASSETS / fixture
    job = config_mod.load(REPO / path)
    cfg = smoke_mod.smoke(job, steps=STEPS, root=str(tmp_path / "root"), data=data, micro_batch=2)

    # what the smoke kept of the job: its converter, tasks and text, on the fixture
    assert cfg.data.source == f"{job.data.source.split(':')[0]}:{data}"
    assert (cfg.data.tasks, cfg.data.text, cfg.data.preprocess) == (job.data.tasks, job.data.text, job.data.preprocess)
    # the converter kept every valid row (negatives included where the job keeps them)
    report = storage.read_json(storage.join(job_mod.data_uri(cfg), "prep_report.json"))
    assert report["rows_written"] == {"train": kept}, report
    assert report["dropped"] == dropped, report

    res = smoke_mod.run_local(cfg, tmp_path / "ckpt", preset_cache=preset_cache, eval_examples=2)

    ex = res.examples
    assert len(ex["prefix"]) == n_examples, list(ex["prefix"])
    assert set(ex["task"]) == set(job.data.tasks)
    fam = cfg.model_family()
    for task, query, prefix in zip(ex["task"], ex["query"], ex["prefix"]):
        want = _prompt(job, str(task), str(query))
        if want:  # the seed's own prompt text
            assert want in str(prefix), prefix
    if job.data.text.system_prompt:  # the chat template puts the seed's system turn in front of every training input
        tok = fam.load_processor(res.model_path).tokenizer
        first = smoke_mod.fixture_batches(cfg, res.model_path)[0]["input_ids"]
        assert all(job.data.text.system_prompt in tok.decode(ids) for ids in first)
    _check_answers(path, job, ex)

    losses = res.losses
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, f"loss did not fall: {losses}"
    ckpt = res.checkpoints[-1]
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == STEPS
    assert config_mod.TextOptions.from_dict(state["text"]) == job.data.text  # eval / Serve apply the seed's text

    # decoded with the job's settings and read back by the family's parser for the task
    assert len(res.predictions) == 2 and len(res.generated) == 2
    assert all(isinstance(p.text, str) and isinstance(p.errors, list) for p in res.predictions)
    scores = [json.loads(s) for s in res.scores["score"]]
    assert len(scores) == 2 and all(isinstance(s, dict) for s in scores)
    # points, boxes and PaliGemma's masks (<loc>x4 <seg>x16 label) are valid by construction
    # (grammar-constrained), even from a barely trained model; captions are free text
    if cfg.eval.constrained and {tasks.get(str(t)).kind for t in ex["task"]} <= {"point", "box", "mask"}:
        assert all(not p.errors for p in res.predictions), [(p.text, p.errors) for p in res.predictions]
        assert all(s.get("valid") == 1 for s in scores), scores
    if cfg.eval.constrained and "visual_genome" in path:  # dense-caption regions: the region grammar (free phrases, valid boxes)
        assert all(not p.errors and p.objects for p in res.predictions), [(p.text, p.errors) for p in res.predictions]
        assert all(s.get("valid") == 1 for s in scores), scores
        assert all(len(p.scores) == len(p.objects) and None not in p.scores for p in res.predictions)  # per-region confidences


def _check_answers(path: str, job: config_mod.Experiment, ex: dict) -> None:
    """The training targets are in the seed's answer format."""
    suffixes = [str(s) for s in ex["suffix"]]
    if "pixmo" in path:  # Molmo's point text, percent coordinates
        assert all(s.startswith(("<point ", "<points ")) for s in suffixes), suffixes
        assert any('alt="coin"' in s and s.startswith("<points x1=") for s in suffixes)
    elif "segment" in path:  # the source's own <loc> + <seg> tokens, one example per row (multi-label)
        assert all(s.count("<seg") >= 16 and s.count("<seg") % 16 == 0 for s in suffixes), suffixes
        source = [json.loads(line)["suffix"] for line in (ASSETS / "seed001_datature_jsonl/segment.jsonl").read_text().splitlines()]
        assert sorted(s.count("<seg") for s in suffixes) == sorted(s.count("<seg") for s in source)  # every object of each row
    elif "jsonl_detect" in path:
        by_id = dict(zip(map(str, ex["id"]), zip(map(str, ex["prefix"]), suffixes)))
        assert by_id["coffee.jpg#1"][0].endswith("detect cup ; spoon") and by_id["coffee.jpg#1"][1].count("<loc") == 8
        assert by_id["quokka.jpg#4"][1] == ""  # no class present: PaliGemma's empty answer
    elif "fracture" in path:
        assert sorted(suffixes).count("Normal") == 2
        assert all(s == "Normal" or s.endswith("Fracture") for s in suffixes), suffixes
    elif "visual_genome" in path:
        assert all("[" in s for s in suffixes), suffixes  # (phrase, [x1, y1, x2, y2]) pairs / JSON boxes
    elif "risc" in path:
        assert all(s and "<loc" not in s for s in suffixes), suffixes
