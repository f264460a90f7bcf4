"""`raytrain eval` covers every example of the split with a pool of >= 2 predictor actors, streams
its predictions to the run's eval directory, and its metrics (every block: pointing, boxes, COCO,
point P/R/F1, calibration) equal a single-process reference run over the same checkpoint and data.
The COCO files it writes load in pycocotools, whose COCOeval gives the same mAP; supervision gets
one Detections per image. The run trains with seed 004's edge blend and is evaluated with a config
that has none: eval must apply the preprocessing recorded in the checkpoint, not the config's.
Also: eval.limit (first N, seeded random N), the decoding grid, and streaming to S3."""

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from raytrain import config as config_mod
from raytrain import predict
from raytrain.config import Preprocess
from raytrain.data import pipeline, shards
from raytrain.eval.aggregate import aggregate
from raytrain.launch import eval as launch_eval
from raytrain.launch import job
from raytrain.launch import train as launch_train
from raytrain.models import family
from raytrain.training import checkpointing

pytestmark = pytest.mark.integration

OVERRIDES = ["name=evalrun", "data.num_images=240", "train.steps=60", "train.micro_batch_size=8", "train.checkpoint_every=60",
             "train.log_every=20", "train.warmup_steps=5", "eval.baselines=false", "eval.cpus_per_actor=0.25"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_cluster, tiny_model_path):
    root = tmp_path_factory.mktemp("evalrun")
    over = [f"storage.root={root}", f"model.name_or_path={tiny_model_path}", *OVERRIDES]
    launch_train.main(config_mod.load("jobs/tiny/shapes.yaml", over + ["data.preprocess.edge_blend=0.3"]))
    return over


def _numbers_close(got, want, path=""):
    """Equal structure; numbers equal to 1e-6 (batched vs one-by-one decoding moves confidences by ~1e-7)."""
    if isinstance(want, dict):
        assert set(got) == set(want), (path, sorted(set(got) ^ set(want)))
        for k in want:
            _numbers_close(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            _numbers_close(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-6), path
    else:
        assert got == want, path


def test_eval_full_split_matches_single_process_reference(trained, tiny_model_path, capsys):
    cfg = config_mod.load("jobs/tiny/shapes.yaml", trained + ["eval.num_actors=2", "eval.batch_size=4", "eval.bucket_batches=2"])
    assert cfg.data.preprocess.edge_blend == 0.0  # the eval config disagrees with the training run
    assert cfg.eval.constrained and cfg.eval.confidence  # the defaults: valid by construction, ranked by confidence
    capsys.readouterr()
    out = Path(launch_eval.main(cfg))
    printed = capsys.readouterr().out
    metrics = json.loads(out.read_text())
    ckpt = metrics["run"]["checkpoint"]
    assert ckpt == launch_eval.latest_checkpoint(cfg)
    recorded = Preprocess.from_dict(checkpointing.recorded_preprocess(ckpt))
    assert recorded == Preprocess("stretch", edge_blend=0.3)  # the family default, resolved when the run loaded
    assert f"eval preprocessing: {recorded.to_dict()}" in printed
    for title in ("COCO mAP @[.5:.95]", "COCO AP50", "point F1 (1:1)", "ECE (confidences)", "answers with objects: detect"):
        assert title in printed, title
    rows = [json.loads(line) for line in (out.parent / "predictions_test.jsonl").read_text().splitlines()]
    assert not (out.parent / "parts").exists()  # the streamed parts are gone once the file is whole

    # every example of the split, scored by at least two actors, valid by construction
    table = shards.read_split(job.data_uri(cfg), "test")
    assert len(rows) == 2 * table.num_rows  # point + detect per image
    assert {(r["id"], r["task"]) for r in rows} == {(i, t) for i in table["id"].to_pylist() for t in ("point", "detect")}
    assert len({r["worker"] for r in rows}) >= 2
    got = metrics["trained"]
    assert got["valid_rate_by_task"] == {"detect": 1.0, "point": 1.0}
    assert got["calibration"]["n"] > 0 and 0.0 <= got["calibration"]["ece"] <= 1.0 and len(got["calibration"]["bins"]) == 10

    # single-process reference: same checkpoint, same examples (decoded one by one), no Ray
    import torch

    torch.set_num_threads(1)
    fam = family("paligemma")
    model, proc = checkpointing.load_for_inference(ckpt, tiny_model_path, fam)
    batch = {c: np.array(table[c].to_pylist(), dtype=object) for c in ("id", "image", "width", "height", "objects")}
    ex = pipeline.decode_and_expand(batch, split="test", tasks=["point", "detect"], image_hw=(64, 64), family="paligemma",
                                    preprocess=recorded, counts=__import__("collections").Counter())
    ref_rows = []
    for i in range(len(ex["id"])):
        one = predict.predict_batch(model, proc, fam, {k: v[i:i + 1] for k, v in ex.items()}, launch_eval.decode_options(cfg))
        ref_rows.append({k: one[k][0] for k in one})
    reference = json.loads(json.dumps(aggregate(ref_rows)))
    skip = {"eval_seconds", "seconds", "files", "warnings"}
    _numbers_close({k: v for k, v in got.items() if k not in skip}, {k: v for k, v in reference.items() if k not in skip})

    # the COCO files: pycocotools loads them, and COCOeval over them gives raytrain's numbers
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_file, res_file = out.parent / "coco_gt_test.json", out.parent / "coco_results_test.json"
    assert got["files"]["coco_results"] == str(res_file)
    results = json.loads(res_file.read_text())
    assert results and all(isinstance(r["image_id"], int) and isinstance(r["category_id"], int) and len(r["bbox"]) == 4
                           and 0.0 < r["score"] <= 1.0 for r in results)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_file))
        ev = COCOeval(coco_gt, coco_gt.loadRes(str(res_file)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    for key, v in zip(("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100"), ev.stats):
        assert (got["coco"][key] is None and v == -1) or abs(got["coco"][key] - v) <= 1e-6, key
    assert len(coco_gt.getImgIds()) == table.num_rows  # one image per detect example

    # supervision: one Detections per source image, the predicted boxes and confidences
    from raytrain.eval.exports import detections

    dets = detections(str(out.parent / "predictions_test.jsonl"))
    some = next(r for r in rows if r["task"] == "detect" and r["objects"])
    d = dets[some["id"]]
    assert d.xyxy.shape == (len(some["objects"]), 4)
    np.testing.assert_allclose(d.xyxy[0], [some["objects"][0][k] for k in ("x1", "y1", "x2", "y2")], rtol=1e-5)
    assert d.confidence[0] == pytest.approx(some["objects"][0]["score"], rel=1e-5)
    assert list(d.data["class_name"]) == [o["label"] for o in some["objects"]]


def test_eval_limit_first_and_seeded_random_rows(trained, tmp_path):
    from raytrain.eval import inputs

    cfg = config_mod.load("jobs/tiny/shapes.yaml", trained)
    all_ids = shards.read_split(job.data_uri(cfg), "test")["id"].to_pylist()
    first = inputs.select_ids(job.data_uri(cfg), "test", 4)
    assert first == all_ids[:4]
    rand = inputs.select_ids(job.data_uri(cfg), "test", 4, seed=7)
    assert rand == inputs.select_ids(job.data_uri(cfg), "test", 4, seed=7) and len(set(rand)) == 4
    assert rand != inputs.select_ids(job.data_uri(cfg), "test", 4, seed=8)

    cfg = config_mod.load("jobs/tiny/shapes.yaml", trained + ["eval.limit=4", "eval.limit_random=true", "eval.seed=7", "eval.num_actors=1"])
    out = Path(launch_eval.main(cfg))
    rows = [json.loads(line) for line in (out.parent / "predictions_test.jsonl").read_text().splitlines()]
    assert sorted({r["id"] for r in rows}) == sorted(rand) and len(rows) == 8
    assert json.loads(out.read_text())["run"]["limit"] == 4


def test_decoding_grid_one_table(trained, capsys):
    """prompts x decodings x checkpoints from YAML: every cell evaluated with its own prompt, decoding
    and checkpoint, one table."""
    grid = ("eval.grid={prompts: {A: 'point to {query}', B: 'detect {query}'}, "
            "decodings: {G: {}, S: {do_sample: true, top_p: 0.9, seed: 3}}, checkpoints: {trained: '', base: base}}")
    cfg = config_mod.load("jobs/tiny/shapes.yaml", trained + ["eval.limit=3", "eval.num_actors=1", "eval.max_new_tokens=8", grid])
    capsys.readouterr()
    out = Path(launch_eval.main(cfg))
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["grid"]
    assert len(rows) == 8
    assert {(r["checkpoint"], r["prompt"], r["decoding"]) for r in rows} == {
        (c, p, d) for c in ("trained", "base") for p in "AB" for d in "GS"}
    assert "grid (test split): 8 cells" in printed
    table = printed.split("grid (test split): 8 cells")[1]
    assert all(f" {p} " in table for p in "AB") and "valid_rate_by_task.point" in table
    preds = {(r["checkpoint"], r["prompt"], r["decoding"]): [json.loads(line) for line in Path(r["files"]["predictions"]).read_text().splitlines()]
             for r in rows}
    for (ckpt, prompt, _), ps in preds.items():  # the prompt is what the model saw, for both tasks
        assert len(ps) == 6 and all(p["prompt"] == ("point to " if prompt == "A" else "detect ") + p["query"] for p in ps)
    texts = {k: sorted(p["text"] for p in v) for k, v in preds.items()}
    assert texts[("trained", "A", "G")] != texts[("base", "A", "G")]  # another checkpoint, another model


def test_streams_predictions_and_coco_files_to_s3(ray_cluster, s3_bucket, s3_opts, tmp_path):
    """A column written to an s3:// eval directory: parts by the Ray Data job, then one predictions
    file and the COCO files, the parts removed (the blind baseline: no model needed)."""
    from raytrain import storage
    from raytrain.eval import batch as eval_batch
    from raytrain.eval import inputs, streaming

    uri = str(tmp_path / "data")
    shards.prepare_synthetic(uri, n=30, seed=3, splits={"test": 1.0})
    ex = inputs.examples(uri, "test", tasks=["point", "detect"], image_hw=(64, 64), family="paligemma")
    ds = eval_batch.baseline_dataset(ex, mean_box_wh=(0.3, 0.3), batch_size=8, family="paligemma")
    out_dir = f"{s3_bucket}/runs/x/eval"
    m = streaming.evaluate_column(ds, out_dir, "test", "centre_baseline", s3_opts, main=True)
    assert m["examples"] == 60 and m["valid_rate_by_task"] == {"detect": 1.0, "point": 1.0}
    fs = storage.fsspec_fs(out_dir, s3_opts)
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(storage.strip_scheme(out_dir)))
    assert names == ["coco_gt_test.json", "coco_results_test.json", "predictions_test.jsonl"]
    rows = list(__import__("raytrain.eval.exports", fromlist=["x"]).read_predictions(m["files"]["predictions"], s3_opts))
    assert len(rows) == 60 and m["coco"]["n_images"] == 30
    assert json.loads(fs.cat(storage.strip_scheme(m["files"]["coco_results"])))[0]["score"] == 0.0  # no confidences: ranked last
