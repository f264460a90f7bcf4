"""Captioning and dense captioning end to end on the synthetic set: targets render in each family's
format, the recipe trains on them, and evaluation scores them with pycocoevalcap / region matching."""

import io
import json

import pytest
import torch
from PIL import Image

from raytrain import config as config_mod
from raytrain import predict
from raytrain.data import pipeline, synthetic
from raytrain.eval import batch as eval_batch
from raytrain.models import family as model_family
from raytrain.recipes import ddp
from raytrain.training.session import Session

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("family", ["paligemma", "qwen2_5_vl"])
def test_caption_and_dense_caption_train(family, request, tiny_model_path):
    torch.set_num_threads(1)
    path = tiny_model_path if family == "paligemma" else request.getfixturevalue("tiny_qwen_path")
    fam = model_family(family)
    proc = fam.load_processor(path)
    hw = fam.image_size(proc)
    max_len = 48 if family == "paligemma" else 160
    batches = []
    for start in range(0, 24, 6):
        items = []
        for i in range(start, start + 6):
            ex = synthetic.make_example(i, seed=9, image_size=64, shapes_per_image=2)
            img = Image.open(io.BytesIO(ex["image"])).convert("RGB").resize((hw[1], hw[0]))
            for e in pipeline.examples_for(ex["objects"], ["caption", "dense_caption"], 64, 64, family, hw):
                items.append((img, e["prefix"], e["suffix"]))
        enc = fam.encode_train(proc, [x[0] for x in items], [x[1] for x in items], [x[2] for x in items], max_len)
        assert (enc.pop("length") <= max_len).all()
        batches.append({k: torch.from_numpy(v) for k, v in enc.items()})
    cfg = config_mod.load(None, [f"model.family={family}", "model.freeze_vision=false", "train.steps=16", "train.micro_batch_size=12",
                                 "train.warmup_steps=1", "train.log_every=1", "train.checkpoint_every=100", "train.lr=3e-3"])
    reports = []
    session = Session(rank=0, world_size=1, checkpoint_dir=lambda: None, report=lambda m, d: reports.append(m),
                      epoch_batches=lambda e, m: batches)
    ddp.train(cfg, path, session, torch.device("cpu"), wrap_ddp=lambda m: m)
    losses = [r["loss"] for r in reports]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses


def test_caption_metrics_in_evaluation():
    ex = synthetic.make_example(0, seed=1, image_size=64, shapes_per_image=2)
    exs = pipeline.examples_for(ex["objects"], ["caption", "dense_caption"], 64, 64, "paligemma")
    batch = {k: [e[k] for e in exs] for k in exs[0]}
    batch.update(id=["a", "a"], width=[64, 64], height=[64, 64])
    # perfect outputs: the rendered targets themselves
    rows = predict.texts_to_rows(model_family("paligemma"), batch, [e["suffix"] for e in exs], (64, 64))
    rows = [{k: rows[k][i] for k in rows} for i in range(2)]
    out = eval_batch.aggregate(rows)
    assert out["captions"]["bleu_4"] > 0.99 and out["captions"]["valid_rate"] == 1.0
    dense = out["dense_captions"]
    assert dense["recall_50"] == 1.0 and dense["meteor_50"] > 0.9
    # a wrong caption scores lower
    rows[0]["score"] = json.dumps(dict(json.loads(rows[0]["score"]), hyp="a purple star"))
    assert eval_batch.aggregate(rows)["captions"]["bleu_1"] < 0.6
