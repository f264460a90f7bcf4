"""Dense captioning through `raytrain.predict` with UNTRAINED tiny Qwen2.5-VL (the seed's `pairs`
format) and Qwen3-VL (0-1000 JSON): decoded freely their answers do not parse; constrained by the
region grammar (the default decoding) every answer parses with zero errors into regions inside
the image, ends with <|im_end|> within the budget, and every region has a confidence."""

import pytest
from PIL import Image

from raytrain import predict
from raytrain.formats.annotations import Region
from raytrain.models import ensure_preset, family

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_NEW = 40


@pytest.fixture(scope="module")
def tiny_qwen3_path(tmp_path_factory):
    return str(ensure_preset("tiny:qwen3_vl", tmp_path_factory.mktemp("qwen3-presets")))


def _images():
    return [Image.new("RGB", (112, 112), c) for c in ((200, 30, 30), (20, 90, 200), (240, 240, 240))] + [Image.new("RGB", (140, 84), (0, 0, 0))]


@pytest.mark.parametrize("spec", ["qwen2_5_vl+pairs", "qwen3_vl"])
def test_untrained_model_answers_valid_regions_under_the_grammar(spec, request):
    path = request.getfixturevalue("tiny_qwen_path" if spec.startswith("qwen2_5") else "tiny_qwen3_path")
    fam = family(spec)
    model, proc = fam.load(path)
    model.eval()
    images = _images()
    n = len(images)
    prefix = fam.render_example("dense_caption", "", [], 112, 112)[0]
    geoms = [predict.identity_geometry(*im.size) for im in images]
    args = (model, proc, fam, images, ["dense_caption"] * n, [""] * n, [prefix] * n, geoms)

    free = predict.predict(*args, predict.DecodeOptions(max_new_tokens=MAX_NEW, constrained=False))
    assert any(p.errors or not p.objects for p in free), [p.text for p in free]  # what the grammar is for

    sampled = {"do_sample": True, "top_k": 0, "temperature": 1.5}  # wilder answers: long phrases, many regions
    for generate in ({}, sampled, {"num_beams": 2}):
        preds = predict.predict(*args, predict.DecodeOptions(max_new_tokens=MAX_NEW, generate=generate, seed=3))
        for p, im in zip(preds, images):
            assert p.errors == [] and p.objects, (generate, p.text, p.errors)
            w, h = im.size
            for r in p.objects:
                assert isinstance(r, Region) and r.phrase.strip()
                assert 0 <= r.x1 <= r.x2 <= w and 0 <= r.y1 <= r.y2 <= h
            assert len(p.scores) == len(p.objects) and all(s is not None and 0 < s <= 1 for s in p.scores), p.scores
        rows = predict.score_rows({"id": [str(i) for i in range(n)], "task": ["dense_caption"] * n, "query": [""] * n,
                                   "targets": ["[]"] * n, "width": [im.size[0] for im in images],
                                   "height": [im.size[1] for im in images]}, preds)
        assert all('"valid": 1' in s for s in rows["score"]), list(rows["score"])
