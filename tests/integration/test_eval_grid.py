"""Prompt x decoding x checkpoint grids: seed 003's 12 runs as data, and a small grid run end to
end on the tiny preset with the pointing metrics."""

import io

import pytest
from PIL import Image

from raytrain.data.synthetic import make_example
from raytrain import predict
from raytrain.models import family
from raytrain.models import paligemma_decoding as dec
from raytrain.eval.grid import (
    SEED003_DECODINGS,
    DecodingConfig,
    beam,
    greedy,
    grid_cells,
    run_cells,
    run_grid,
    sampling,
    seed003_grid,
)
from raytrain.eval.metrics.pointing import aggregate_pointing, score_points
from raytrain.formats import paligemma as fmt
from raytrain.formats.annotations import Point


def test_seed003_grid_is_twelve_runs_with_table_iii_settings():
    cells = seed003_grid()
    assert len(cells) == 12
    assert {(c.checkpoint, c.prompt_name, c.decoding.name) for c in cells} == {
        (c, p, d) for c in ("conf1", "conf2") for p in "ABC" for d in ("G", "B+S")}
    assert {c.prompt for c in cells if c.prompt_name == "A"} == {"Describe this image in detail:"}
    g, bs = SEED003_DECODINGS
    assert g.generate_kwargs() == {"max_new_tokens": 16, "num_beams": 1, "do_sample": False}
    assert bs.generate_kwargs() == {
        "max_new_tokens": 16, "num_beams": 4, "do_sample": True, "top_p": 0.9, "top_k": 50, "temperature": 0.8,
        "early_stopping": True, "length_penalty": 1.0, "no_repeat_ngram_size": 2}


def test_decoding_configs_refuse_settings_generate_would_ignore():
    with pytest.raises(ValueError, match="do_sample"):
        DecodingConfig("x", temperature=0.7)
    with pytest.raises(ValueError, match="num_beams"):
        DecodingConfig("x", length_penalty=2.0)
    with pytest.raises(ValueError, match="top_p"):
        sampling(top_p=1.5)
    with pytest.raises(ValueError, match="unique"):
        grid_cells(["p"], [greedy(), greedy()], ["c"])
    assert beam(3, length_penalty=1.2).generate_kwargs()["num_beams"] == 3
    assert sampling(0.7, top_p=0.9, top_k=40).name == "sample_t0.7_p0.9_k40"


@pytest.mark.integration
def test_grid_on_tiny_preset_end_to_end(tiny_model_path):
    import torch

    from raytrain.models import paligemma as pg

    torch.set_num_threads(1)
    exs = [make_example(i, seed=5) for i in range(8)]
    images = [Image.open(io.BytesIO(e["image"])).convert("RGB") for e in exs]
    queries = [e["objects"][0].label for e in exs]
    gts = [[o for o in e["objects"] if isinstance(o, Point)] for e in exs]
    loaded = {}
    outputs = []

    def predict_fn(checkpoint, prompt, decoding):
        if checkpoint not in loaded:  # cells come checkpoint by checkpoint
            loaded.clear()
            model, processor = pg.load(checkpoint)
            loaded[checkpoint] = (model.eval(), processor, dec.PaliGemmaGrammars(processor))
        model, processor, grammars = loaded[checkpoint]
        gens = predict.decode(model, processor, family("paligemma"), images, [prompt.format(query=q) for q in queries],
                              grammars=grammars.for_queries("point", queries, max_objects=2), **decoding.generate_kwargs())
        texts = [g.text for g in gens]
        outputs.append(texts)
        return [fmt.parse(t, 64, 64, "point").objects for t in texts]

    def score_fn(preds):
        agg = aggregate_pointing(score_points(p, gt, 64, 64) for p, gt in zip(preds, gts))
        return {k: agg[k] for k in ("n", "valid_rate", "mean_norm_distance", "success_rate")}

    prompts = {"point": "point to {query}", "where": "where is the {query}"}
    decodings = [greedy(24), beam(2, max_new_tokens=24), sampling(1.5, top_k=100, seed=7, max_new_tokens=24)]
    rows = run_grid(predict_fn, prompts, decodings, [tiny_model_path], score_fn=score_fn)

    assert len(rows) == 6
    assert [(r["prompt"], r["decoding"]) for r in rows] == [(p, d.name) for p in prompts for d in decodings]
    for r in rows:
        assert set(r) == {"checkpoint", "prompt", "decoding", "n", "valid_rate", "mean_norm_distance", "success_rate"}
        assert r["checkpoint"] == tiny_model_path and r["n"] == 8
        assert r["valid_rate"] == 1.0  # constrained decoding: every output parses
        assert 0 <= r["mean_norm_distance"] <= 1.5

    # a sampled cell repeats exactly when run again on its own (it is seeded, not the grid)
    sampled = outputs[2]
    again = run_cells(predict_fn, grid_cells({"point": prompts["point"]}, [decodings[2]], [tiny_model_path]), score_fn)
    assert outputs[-1] == sampled and again[0] == rows[2]
    other = sampling(1.5, top_k=100, seed=8, max_new_tokens=24, name="other")
    run_cells(predict_fn, grid_cells({"point": prompts["point"]}, [other], [tiny_model_path]), score_fn)
    assert outputs[-1] != sampled  # and the seed is what makes it repeat
