"""`raytrain eval` covers every example of the split with a pool of >= 2 predictor actors, and its
metrics equal a single-process reference run over the same checkpoint and data. The run trains with
seed 004's edge blend and is evaluated with a config that has none: eval must apply the
preprocessing recorded in the checkpoint, not the config's."""

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from raytrain import config as config_mod
from raytrain.data import pipeline, shards
from raytrain.config import Preprocess
from raytrain.data import preprocess
from raytrain.eval import batch as eval_batch
from raytrain.formats.annotations import objects_from_json
from raytrain.launch import eval as launch_eval
from raytrain.launch import job
from raytrain.launch import train as launch_train
from raytrain.models import paligemma
from raytrain.training import checkpointing
from raytrain import predict
from raytrain.models import family

pytestmark = pytest.mark.integration


def test_eval_full_split_matches_single_process_reference(tmp_path, ray_cluster, tiny_model_path, capsys):
    overrides = [f"storage.root={tmp_path}", "name=evalrun", f"model.name_or_path={tiny_model_path}",
                 "data.num_images=240", "train.steps=60", "train.micro_batch_size=8", "train.checkpoint_every=60",
                 "train.log_every=20", "train.warmup_steps=5", "eval.baselines=false", "eval.cpus_per_actor=0.25"]
    cfg = config_mod.load("jobs/tiny/shapes.yaml", overrides + ["data.preprocess.edge_blend=0.3"])
    launch_train.main(cfg)

    cfg = config_mod.load("jobs/tiny/shapes.yaml", overrides + ["eval.num_actors=2", "eval.batch_size=4"])
    assert cfg.data.preprocess.edge_blend == 0.0  # the eval config disagrees with the training run
    capsys.readouterr()
    out = Path(launch_eval.main(cfg))
    metrics = json.loads(out.read_text())
    ckpt = metrics["run"]["checkpoint"]
    assert ckpt == launch_eval.latest_checkpoint(cfg)
    recorded = Preprocess.from_dict(checkpointing.recorded_preprocess(ckpt))
    assert recorded == Preprocess("stretch", edge_blend=0.3)  # the family default, resolved when the run loaded
    assert f"eval preprocessing: {recorded.to_dict()}" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out.parent / "predictions_test.jsonl").read_text().splitlines()]

    # every example of the split, scored by at least two actors
    table = shards.read_split(job.data_uri(cfg), "test")
    assert len(rows) == 2 * table.num_rows  # point + detect per image
    assert {(r["id"], r["task"]) for r in rows} == {(i, t) for i in table["id"].to_pylist() for t in ("point", "detect")}
    assert len({r["worker"] for r in rows}) >= 2

    # single-process reference: same checkpoint, same examples, one model, no Ray
    torch.set_num_threads(1)
    model, proc = checkpointing.load_for_inference(ckpt, tiny_model_path, family("paligemma"))
    ref_rows = []
    for rid, data, w, h, objs in zip(*(table[c].to_pylist() for c in ("id", "image", "width", "height", "objects"))):
        src = Image.open(io.BytesIO(data)).convert("RGB")
        img = Image.fromarray(preprocess.apply(recorded, src, preprocess.geometry(recorded, w, h, (64, 64))))  # 0.7 * image + 0.3 * edges
        for ex in pipeline.examples_for(objects_from_json(objs), ["point", "detect"], w, h, "paligemma"):
            text = predict.decode(model, proc, family("paligemma"), [img], [ex["prefix"]], max_new_tokens=cfg.eval.max_new_tokens)[0].text
            res = paligemma.parse_output(text, ex["task"], w, h)
            score = predict.score_example(ex["task"], res.objects or None, ex["targets"], w, h)
            ref_rows.append({"task": ex["task"], "score": json.dumps(score), "errors": json.dumps([[e.reason, e.text] for e in res.errors])})
    reference = eval_batch.aggregate(ref_rows)
    got = {k: v for k, v in metrics["trained"].items() if k != "eval_seconds"}
    assert got == json.loads(json.dumps(reference))
    assert (out.parent / "coco_results_test.json").exists()
