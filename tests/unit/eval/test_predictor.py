"""The evaluation predictor (eval/batch.py Predictor) outside Ray: sampled decoding is seeded per
batch, length bucketing keeps every example and its answer together."""

import numpy as np
import torch


def _batch(n_images=4):
    from raytrain.data import pipeline, synthetic

    exs, images = [], []
    for i in range(n_images):
        ex = synthetic.make_example(i, seed=2, image_size=64)
        for e in pipeline.examples_for(ex["objects"], ["point", "detect"], 64, 64, "paligemma"):
            exs.append(dict(e, id=f"s{i}"))
            images.append(np.zeros((64, 64, 3), np.uint8) + i * 40)
    batch = {k: np.array([e[k] for e in exs], dtype=object) for k in ("id", "task", "query", "prefix", "targets")}
    batch.update(width=np.full(len(exs), 64), height=np.full(len(exs), 64), image=np.stack(images),
                 content_box=np.tile([0, 0, 64, 64], (len(exs), 1)))
    return batch


def test_sampled_decoding_is_seeded_per_batch(tiny_model_path):
    """A sampled batch decodes the same whichever actor takes it and whatever ran before: each batch
    is seeded from eval.seed and its first example (predict.batch_seed)."""
    from raytrain.eval.batch import Predictor
    from raytrain.predict import DecodeOptions

    batch = _batch()

    def texts(seed):
        opts = DecodeOptions(max_new_tokens=6, constrained=False, confidence=False, generate={"do_sample": True, "top_k": 0}, seed=seed)
        return list(Predictor(family="paligemma", model_path=tiny_model_path, options=opts, batch_size=2)(batch)["text"])

    first = texts(1)
    torch.manual_seed(12345)  # whatever the process did before
    assert texts(1) == first
    assert texts(2) != first


def test_bucketing_keeps_each_example_with_its_own_answer(tiny_model_path):
    """Bucketed (examples reordered by task and prompt length, decoded 3 at a time) or not, every
    example gets the answer it gets alone; a prompt override reaches the model and the rows."""
    from raytrain import predict
    from raytrain.eval.batch import Predictor
    from raytrain.models import family
    from raytrain.predict import DecodeOptions

    batch = _batch(3)
    opts = DecodeOptions(max_new_tokens=6)
    bucketed = Predictor(family="paligemma", model_path=tiny_model_path, options=opts, batch_size=3)(batch)
    fam = family("paligemma")
    model, proc = fam.load(tiny_model_path)
    alone = {}
    for i in range(len(batch["id"])):
        one = predict.predict_batch(model.eval(), proc, fam, {k: v[i:i + 1] for k, v in batch.items()}, opts)
        alone[(one["id"][0], one["task"][0], one["query"][0])] = one["text"][0]
    got = {(i, t, q): x for i, t, q, x in zip(bucketed["id"], bucketed["task"], bucketed["query"], bucketed["text"])}
    assert got == alone
    assert list(bucketed["task"]) == sorted(bucketed["task"])  # grouped by task
    out = Predictor(family="paligemma", model_path=tiny_model_path, options=opts, batch_size=3, prompt="where is {query}")(batch)
    assert sorted(out["prompt"]) == sorted(f"where is {q}" for q in batch["query"])
