"""The Qwen3-VL family without a model: registry and interface, target text and parsing for every
task in 0-1000 relative coordinates, the number-loss spans, the answer grammar (random walks through
it always parse; every rendered answer is accepted token by token on the tiny tokenizer),
confidences, freezing / components on the meta device, and the dense / MoE class choice."""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest

from raytrain.formats import qwen3_vl as codec
from raytrain.formats.annotations import Box, Caption, ParseResult, Point, Region
from raytrain.models import FAMILIES, answer_formats, family, parse_family_spec
from raytrain.models import tiny_qwen3

LABELS = ["red circle", "blue square", "traffic light"]


@pytest.fixture(scope="module")
def tok():
    return tiny_qwen3.build_tokenizer()


@pytest.fixture(scope="module")
def proc(tok):
    return SimpleNamespace(tokenizer=tok)  # the grammar reads the processor's tokenizer only


# ---------------------------------------------------------------------------- registry, interface


def test_discovered_spec_and_text_binding():
    # every member of the interface, with the protocol's parameter names: tests/unit/test_architecture.py
    assert FAMILIES["qwen3_vl"] == ("raytrain.models.qwen3_vl", "Qwen3_VL")
    fam = family("qwen3_vl")
    assert fam.spec == "qwen3_vl" and family(fam.spec) is fam and answer_formats("qwen3_vl") == ("relative",)
    assert parse_family_spec("qwen3_vl+relative") == ("qwen3_vl", "relative")
    with pytest.raises(ValueError, match="absolute"):
        parse_family_spec("qwen3_vl+absolute")  # no pixel format: Qwen3-VL writes relative coordinates
    bound = fam.with_text(prompts={"detect": "Find {query}."}, system_prompt="Be brief.", empty_answer="None.", multi_label=True)
    assert bound.spec == "qwen3_vl" and bound != fam and (bound.system_prompt, bound.multi_label) == ("Be brief.", True)
    assert fam.TASKS == ("point", "detect", "caption", "dense_caption") and fam.RESIZE_MODES[0] == "native"


# ---------------------------------------------------------------------------- target text and parsing


@pytest.mark.parametrize("size", [(64, 64), (640, 480), (333, 1001)])
def test_grounding_answers_are_relative_and_round_trip(size):
    """The same object gives the same answer whatever the model input (image_hw plays no part), and
    parses back within half a thousandth of each side."""
    w, h = size
    fam = family("qwen3_vl")
    box, pt = Box(0.1 * w, 0.25 * h, 0.6 * w, 0.9 * h, "red circle"), Point(0.5 * w, 0.75 * h, "red circle")
    for task, obj, key, want in (("detect", box, "bbox_2d", [100, 250, 600, 900]), ("point", pt, "point_2d", [500, 750])):
        prompt, answer = fam.render_example(task, "red circle", [obj], w, h, (128, 96))
        assert (prompt, answer) == fam.render_example(task, "red circle", [obj], w, h, None)
        assert "red circle" in prompt and "JSON" in prompt
        assert json.loads(answer.split("```json")[1].split("```")[0]) == [{key: want, "label": "red circle"}]
        res = fam.parse_output(answer, task, w, h, (128, 96))
        assert not res.errors and len(res.objects) == 1
        got = res.objects[0]
        coords = [got.x, got.y] if task == "point" else [got.x1, got.y1, got.x2, got.y2]
        ref = [obj.x, obj.y] if task == "point" else [obj.x1, obj.y1, obj.x2, obj.y2]
        for v, r, side in zip(coords, ref, [w, h, w, h]):
            assert abs(v - r) <= 0.5 * side / 1000 + 1e-9


def test_captions_dense_captions_and_negatives():
    fam = family("qwen3_vl")
    prompt, answer = fam.render_example("caption", "", [Caption(" a red circle on grey ")], 64, 64)
    assert answer == "a red circle on grey"
    assert fam.parse_output("<think>\nround, red\n</think>\n" + answer, "caption", 64, 64).objects == [Caption(answer)]
    assert fam.parse_output("  ", "caption", 64, 64).errors[0].reason == "empty_output"
    regions = [Region(0, 0, 32, 16, "sky"), Region(16, 32, 64, 64, "a red circle")]
    prompt, answer = fam.render_example("dense_caption", "", regions, 64, 64)
    assert "bbox_2d" in prompt and '"bbox_2d": [0, 0, 500, 250]' in answer
    assert fam.parse_output(answer, "dense_caption", 64, 64) == ParseResult(sorted(regions, key=lambda r: r.y1), [])
    # a negative (nothing of the label in the image): the empty list, read back as no objects and no error
    prompt, answer = fam.render_example("detect", "cat", [], 64, 64)
    assert answer == "```json\n[]\n```" and fam.parse_output(answer, "detect", 64, 64) == ParseResult([], [])
    bound = fam.with_text(prompts={"point": "Where is the {query}?"}, empty_answer="There is none.")
    assert bound.render_example("point", "cat", [], 64, 64) == ("Where is the cat?", "There is none.")
    assert bound.parse_output("there is none", "point", 64, 64) == ParseResult([], [])
    assert bound.parse_output("<think>\nno cat\n</think>\nThere is none.", "point", 64, 64) == ParseResult([], [])


def test_answer_numbers_are_the_answers_digits():
    fam = family("qwen3_vl")
    objs = [Box(3, 4, 50, 60, "red circle"), Box(10, 5, 64, 30, "red circle")]
    _, answer = fam.render_example("detect", "red circle", objs, 64, 64)
    spans = fam.answer_numbers("detect", "red circle", objs, 64, 64)
    assert [int(answer[s.start:s.end]) for s in spans] == [47, 62, 781, 938, 156, 78, 1000, 469]
    assert all(s.range == 1000.0 for s in spans) and fam.answer_numbers("caption", "", [Caption("x")], 64, 64) == []


def test_parsing_never_raises():
    fam = family("qwen3_vl")
    rng = random.Random(0)
    pieces = ["{", "}", "[", "]", '"bbox_2d"', '"point_2d"', ": ", ", ", '"label"', '"a"', "1000", "-3", "```json\n", "<think>", "</think>"]
    for _ in range(500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 25)))
        for task in fam.TASKS:
            res = fam.parse_output(text, task, 50, 70)
            assert isinstance(res, ParseResult)
            for o in res.objects:
                if isinstance(o, Point):
                    assert 0 <= o.x <= 50 and 0 <= o.y <= 70
                elif not isinstance(o, Caption):
                    assert 0 <= o.x1 <= o.x2 <= 50 and 0 <= o.y1 <= o.y2 <= 70


# ---------------------------------------------------------------------------- grammar, confidences


def _walk(g, rng, limit=400):
    ids: list[int] = []
    for _ in range(limit):
        t = rng.choice(list(g.allowed(ids).tokens))
        ids.append(t)
        if t in g.end_ids:
            return ids
    raise AssertionError("no end token reached")


@pytest.mark.parametrize("kind", ["point", "box"])
def test_random_walks_through_the_grammar_always_parse(proc, tok, kind):
    """What constrained decoding can write: 0-1000 integers, x2 >= x1, the query's labels, the empty
    list; whatever the image size (image_hw does not enter the relative frame)."""
    fam = family("qwen3_vl")
    g = fam.grammar(proc, kind, LABELS, (96, 128), max_objects=3)
    assert g is fam.grammar(proc, kind, LABELS, (480, 640), max_objects=3)  # one grammar for every frame
    assert fam.grammar(proc, "caption", [], (96, 128)) is None and fam.grammar(proc, kind, [], (96, 128)) is None
    rng = random.Random(1)
    n_objects = 0
    for _ in range(40):
        ids = _walk(g, rng)
        text = tok.decode(ids, skip_special_tokens=True)
        res = codec.parse(text, kind, 1000, 1000, allowed_labels=set(LABELS))
        assert not res.errors, (text, res.errors)
        assert len(res.objects) <= 3
        for o in res.objects:
            coords = [o.x, o.y] if kind == "point" else [o.x1, o.y1, o.x2, o.y2]
            assert all(float(v).is_integer() and 0 <= v <= 1000 for v in coords)
        n_objects += len(res.objects)
    assert n_objects > 10


@pytest.mark.parametrize("kind", ["point", "box"])
def test_rendered_answers_are_accepted_and_confidences_cover_each_object(proc, tok, kind):
    fam = family("qwen3_vl")
    g = fam.grammar(proc, kind, LABELS, (128, 128))
    rng = random.Random(2)
    for _ in range(20):
        w, h = rng.randint(20, 3000), rng.randint(20, 3000)
        objs = []
        for lb in rng.sample(LABELS, rng.randint(1, 3)):
            x1, x2 = sorted(rng.uniform(0, w) for _ in range(2))
            y1, y2 = sorted(rng.uniform(0, h) for _ in range(2))
            objs.append(Point(x1, y1, lb) if kind == "point" else Box(x1, y1, x2, y2, lb))
        _, answer = fam.render_example("point" if kind == "point" else "detect", " ; ".join(o.label for o in objs), objs, w, h)
        ids = tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        assert g.accepts(ids), answer
        for i, t in enumerate(ids):
            assert t in g.allowed(ids[:i]).tokens
        logprobs = [math.log(0.5)] * len(ids)
        conf = fam.object_confidences(logprobs, ids, proc, kind, LABELS, (128, 128))
        assert len(conf) == len(objs) and all(c == pytest.approx(0.5) for c in conf)
    assert fam.object_confidences([0.0], [1], proc, "caption", [], (128, 128)) == []


def test_token_sets(tok):
    fam = family("qwen3_vl")
    digits = fam.digit_token_ids(tok)
    assert [tok.decode([int(i)]) for i in digits] == [str(d) for d in range(10)]
    assert fam.loc_token_ids(tok).shape == (0,) and fam.new_token_ids(SimpleNamespace(tokenizer=tok)) == []
    end, eot = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert fam.stop_token_ids(tok) == [end, eot]
    assert [len(tok.tokenize(t)) for t in ("<think>", "</think>")] == [1, 1]


# ---------------------------------------------------------------------------- model classes, freezing


def test_freeze_policy_and_components_on_the_meta_device(tok):
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(tiny_qwen3.tiny_qwen3_config(tok))
    fam = family("qwen3_vl")
    names = [n for n, _ in model.named_parameters()]
    parts = {n: fam.component(n) for n in names}
    assert {n for n, c in parts.items() if c == "projector"} == {n for n in names if ".merger." in n or ".deepstack_merger_list." in n}
    assert all(parts[n] == "vision" for n in names if n.startswith("model.visual.blocks."))
    assert parts["model.language_model.embed_tokens.weight"] == "language"

    def trainable():
        return {c for n, p in model.named_parameters() if p.requires_grad for c in [parts[n]]}

    fam.apply_freeze_policy(model, freeze_vision=True, train_projector=True)
    assert trainable() == {"language", "projector"}
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("model.visual.pos_embed"))
    fam.apply_freeze_policy(model, freeze_vision=True, unfreeze_vision_layers=1, train_projector=False, train_language=False)
    on = {n for n, p in model.named_parameters() if p.requires_grad}
    assert on and all(n.startswith("model.visual.blocks.1.") for n in on)
    fam.apply_freeze_policy(model, freeze_vision=False)
    assert all(p.requires_grad for p in model.parameters())


def test_the_config_picks_dense_or_moe():
    import transformers

    from raytrain.models import presets

    cls = family("qwen3_vl").hf_model_class()
    assert cls.for_config(presets.build_config("qwen3-vl-4b")) is transformers.Qwen3VLForConditionalGeneration
    assert cls.for_config(presets.build_config("qwen3-vl-30b-a3b")) is transformers.Qwen3VLMoeForConditionalGeneration
    with pytest.raises(ValueError, match="qwen2_5_vl"):
        cls.for_config(presets.build_config("qwen2.5-vl-3b"))
    assert np.array_equal(family("qwen3_vl").loc_token_ids(None), np.zeros(0, np.int64))
