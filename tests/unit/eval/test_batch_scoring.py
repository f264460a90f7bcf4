"""Per-example scoring in the predict path: confidences ride along without changing scores;
blind baselines answer every task without crashing."""

import json

import numpy as np

from raytrain import predict
from raytrain.data import pipeline, synthetic
from raytrain.eval import batch as eval_batch
from raytrain.models import family


def _batch(tasks):
    ex = synthetic.make_example(3, seed=0, image_size=64)
    exs = pipeline.examples_for(ex["objects"], tasks, 64, 64, "paligemma")
    b = {k: np.array([e[k] for e in exs], dtype=object) for k in exs[0]}
    b.update(id=np.array(["x"] * len(exs), dtype=object), width=np.full(len(exs), 64), height=np.full(len(exs), 64),
             image=np.zeros((len(exs), 64, 64, 3), np.uint8))
    return b, exs


def test_confidences_do_not_change_scores():
    b, exs = _batch(["point", "detect"])
    fam = family("paligemma")
    geoms = predict.batch_geometries(b)
    plain = [predict.read_answer(fam, None, t, e["query"], predict.Generation(e["suffix"], [], []), g, confidence=False)
             for t, e, g in zip(b["task"], exs, geoms)]
    scored = [predict.Prediction(p.text, p.objects, [c], p.errors) for p, c in zip(plain, [0.9, 0.4])]
    plain_rows, scored_rows = predict.score_rows(b, plain), predict.score_rows(b, scored)
    assert list(plain_rows["score"]) == list(scored_rows["score"])
    assert json.loads(scored_rows["score"][1])["tp"] == 1  # the perfect box is still a hit
    assert json.loads(scored_rows["objects"][1])[0]["score"] == 0.4 and "score" not in json.loads(plain_rows["objects"][1])[0]


def test_centre_baseline_answers_every_task():
    b, exs = _batch(["point", "detect", "caption", "dense_caption"])
    rows = eval_batch.centre_baseline(b, mean_box_wh=(0.3, 0.3), family="paligemma")
    assert list(rows["task"]) == ["point", "detect", "caption", "dense_caption"]
    assert json.loads(rows["score"][0])["valid"] == 1 and json.loads(rows["score"][2])["valid"] == 0
