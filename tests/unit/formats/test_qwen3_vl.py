"""Qwen3-VL codec: 0-1000 relative coordinates (not Qwen2.5-VL's pixels), round trips, the empty
"nothing found" list, Thinking models' reasoning, truncation, and agreement with supervision's
``Detections.from_vlm(VLM.QWEN_3_VL)``."""

import json
import math
import random
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raytrain.formats.annotations import Box, ParseResult, Point
from raytrain.formats.qwen import order_objects
from raytrain.formats.qwen3_vl import (
    NOTHING_FOUND,
    PARSE_REASONS,
    SCALE,
    parse,
    render_objects,
)


def fast(n: int = 100) -> settings:
    """n examples, no per-example deadline (the machine is shared and slow)."""
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


label_st = st.from_regex(r"[a-z][a-z0-9 _'\"-]{0,14}[a-z]|[a-z]", fullmatch=True)
size_st = st.tuples(st.integers(1, 8000), st.integers(1, 8000))


@st.composite
def image_and_objects(draw, kind, max_n=4):
    w, h = draw(size_st)
    objs = []
    for _ in range(draw(st.integers(1, max_n))):
        if kind == "point":
            objs.append(Point(draw(st.floats(0, w)), draw(st.floats(0, h)), draw(label_st)))
        else:
            x1, x2 = sorted((draw(st.floats(0, w)), draw(st.floats(0, w))))
            y1, y2 = sorted((draw(st.floats(0, h)), draw(st.floats(0, h))))
            objs.append(Box(x1, y1, x2, y2, draw(label_st)))
    return w, h, objs


def check_invariants(res, w, h):
    """What must hold for ANY text: the parser's contract."""
    assert isinstance(res, ParseResult)
    for e in res.errors:
        assert e.reason in PARSE_REASONS, e
    for o in res.objects:
        coords = [o.x, o.y] if isinstance(o, Point) else [o.x1, o.y1, o.x2, o.y2]
        assert all(math.isfinite(v) for v in coords)
        assert all(0 <= v <= lim for v, lim in zip(coords, [w, h, w, h]))  # clipped into the image
        assert o.label and o.label == o.label.strip()
        if isinstance(o, Box):
            assert o.x1 <= o.x2 and o.y1 <= o.y2


# ---------------------------------------------------------------------------- rendering


def test_render_is_relative_0_1000():
    boxes = [Box(100, 50, 300, 150, "red circle"), Box(0, 0, 640, 480, "all")]
    # 100/640*1000 = 156.25 -> 156, 150/480*1000 = 312.5 -> 312 (half to even), the edge is 1000
    assert render_objects(boxes, 640, 480) == (
        "```json\n[\n"
        '\t{"bbox_2d": [0, 0, 1000, 1000], "label": "all"},\n'
        '\t{"bbox_2d": [156, 104, 469, 312], "label": "red circle"}\n'
        "]\n```"
    )
    pts = render_objects([Point(320, 240, "dog"), Point(-5, 900, "cat")], 640, 480, fenced=False)
    assert json.loads(pts) == [{"point_2d": [500, 500], "label": "dog"}, {"point_2d": [0, 1000], "label": "cat"}]
    # the same relative answer for the same object on any image size (Qwen2.5-VL's would differ)
    assert render_objects([Box(10, 10, 20, 20, "a")], 100, 100) == render_objects([Box(100, 100, 200, 200, "a")], 1000, 1000)


def test_render_nothing_found_and_bad_input():
    assert render_objects([], 640, 480) == "```json\n[]\n```"
    assert render_objects([], 640, 480, fenced=False) == NOTHING_FOUND == "[]"
    with pytest.raises(ValueError):
        render_objects([Point(math.inf, 1, "a")], 10, 10)
    with pytest.raises(ValueError):
        render_objects([Point(1, 1, " a")], 10, 10)
    with pytest.raises(ValueError):
        render_objects([Point(1, 1, "a")], 0, 10)


# ---------------------------------------------------------------------------- round trips


@fast(200)
@given(st.sampled_from(["box", "point"]).flatmap(lambda k: st.tuples(st.just(k), image_and_objects(k))), st.booleans())
def test_round_trip_within_half_a_unit(data, fenced):
    """Error per coordinate at most half a 1/1000 of the side (the integer rounding)."""
    kind, (w, h, objs) = data
    res = parse(render_objects(objs, w, h, fenced=fenced), kind, w, h)
    assert not res.errors and len(res.objects) == len(objs)
    tx, ty = 0.5 / SCALE * w * (1 + 1e-9) + 1e-9, 0.5 / SCALE * h * (1 + 1e-9) + 1e-9
    for want, got in zip(order_objects(objs), res.objects):
        assert got.label == want.label
        if kind == "point":
            assert abs(got.x - want.x) <= tx and abs(got.y - want.y) <= ty
        else:
            assert abs(got.x1 - want.x1) <= tx and abs(got.x2 - want.x2) <= tx
            assert abs(got.y1 - want.y1) <= ty and abs(got.y2 - want.y2) <= ty


@fast(50)
@given(size_st, st.booleans(), st.sampled_from(["box", "point"]))
def test_nothing_found_round_trip(size, fenced, kind):
    """Negatives: the empty list, fenced or not, is zero objects and NO error."""
    w, h = size
    assert parse(render_objects([], w, h, fenced=fenced), kind, w, h) == ParseResult([], [])


# ---------------------------------------------------------------------------- parser behaviour


def _read(text, kind="box", w=2000, h=500, allowed=None):
    res = parse(text, kind, w, h, allowed_labels=allowed)
    check_invariants(res, w, h)
    coords = [[o.x, o.y] if isinstance(o, Point) else [o.x1, o.y1, o.x2, o.y2] for o in res.objects]
    return coords, [o.label for o in res.objects], [e.reason for e in res.errors]


@pytest.mark.parametrize(
    "text, coords, reasons",
    [
        # relative: 1000 is the far edge of the SOURCE image, whatever its size
        ('[{"bbox_2d": [0, 0, 1000, 1000], "label": "a"}]', [[0, 0, 2000, 500]], []),
        ('[{"bbox_2d": [250, 100, 500, 900], "label": "a"}]', [[500, 50, 1000, 450]], []),
        ('{"bbox_2d": [250, 100, 500, 900], "label": "a"}', [[500, 50, 1000, 450]], []),  # no list
        ('[{"bbox_2d": [250, 100, 500, 900], "label": "a", "score": 0.9, "desc": "x"}]', [[500, 50, 1000, 450]], []),
        ('Here you go:\n```json\n[{"bbox_2d": [250, 100, 500, 900], "label": "a"}]\n```\nDone.', [[500, 50, 1000, 450]], ["garbage", "garbage"]),
        ('[{"bbox_2d": [-20, 0, 1100, 1000], "label": "a"}]', [[0, 0, 2000, 500]], []),  # clipped to the edge
        ('[{"bbox_2d": [10.5, 0, 20, 10], "label": "a"}]', [[21, 0, 40, 5]], []),  # floats read too
        ('[{"bbox_2d": [500, 0, 100, 10], "label": "a"}]', [], ["invalid_box"]),
        ('[{"bbox_2d": [1, 2, 3], "label": "a"}]', [], ["bad_coordinates"]),
        ('[{"bbox_2d": [1, 2, 3, 4]}]', [], ["missing_label"]),
        ('[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6', [[2, 1, 6, 2]], ["truncated_object"]),
        ("[]", [], []),
        ("```json\n[]\n```", [], []),
        ("```json\n[ ]\n```<|im_end|>", [], []),
        ("", [], ["empty_output"]),
        ("<|im_end|>", [], ["empty_output"]),
        ("There are no cats.", [], ["garbage"]),
        # Thinking models: the answer is what follows the last </think>, as Qwen's own eval reads it
        ('The cat is at [1, 2]... </think>\n\n```json\n[{"bbox_2d": [0, 0, 500, 500], "label": "a"}]\n```', [[0, 0, 1000, 250]], []),
        ("Nothing like that here.</think>\n[]", [], []),
    ],
)
def test_parse_cases(text, coords, reasons):
    got, _, got_reasons = _read(text)
    assert got_reasons == reasons
    np.testing.assert_allclose(np.array(got, dtype=float).reshape(-1, 4), np.array(coords, dtype=float).reshape(-1, 4))


def test_points_and_allowed_labels():
    text = '```json\n[\n\t{"point_2d": [500, 250], "label": "cat"},\n\t{"point_2d": [1000, 0], "label": "dog"}\n]\n```'
    coords, labels, reasons = _read(text, "point", allowed={"cat"})
    assert coords == [[1000.0, 125.0]] and labels == ["cat"] and reasons == ["unknown_label"]
    # a point answer read as boxes has no bbox_2d: rejected, not misread
    assert _read(text, "box")[2] == ["bad_coordinates", "bad_coordinates"]
    with pytest.raises(ValueError):
        parse("[]", "mask", 10, 10)
    with pytest.raises(ValueError):
        parse("[]", "box", 0, 10)


def test_truncated_answer_keeps_complete_objects():
    """Every prefix of a rendered answer returns exactly the objects complete before the cut."""
    w, h = 1280, 720
    boxes = [Box(10, 10, 400, 300, "red circle"), Box(20, 360, 500, 700, "blue square"), Box(5, 500, 60, 720, "green cross")]
    for fenced in (True, False):
        full = render_objects(boxes, w, h, fenced=fenced)
        full_objs = parse(full, "box", w, h).objects
        singles = [render_objects([b], w, h, fenced=False).strip("[]") for b in boxes]
        for k in range(len(full) + 1):
            res = parse(full[:k], "box", w, h)
            check_invariants(res, w, h)
            n_complete = sum(1 for s in singles if full.find(s) + len(s) <= k)
            assert res.objects == full_objs[:n_complete], full[:k]
            assert {e.reason for e in res.errors} <= {"truncated_object", "empty_output"}, (full[:k], res.errors)


# ---------------------------------------------------------------------------- supervision agreement


def _sv(text, w, h, classes=None):
    import supervision as sv

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = {"classes": classes} if classes is not None else {}
        det = sv.Detections.from_vlm(sv.VLM.QWEN_3_VL, text, resolution_wh=(w, h), **kwargs)
    names = [str(n) for n in det.data.get("class_name", [])] if len(det) else []
    return det.xyxy.reshape(-1, 4), names


def _mine(text, w, h, allowed=None):
    res = parse(text, "box", w, h, allowed_labels=allowed)
    return np.array([[o.x1, o.y1, o.x2, o.y2] for o in res.objects], dtype=float).reshape(-1, 4), [o.label for o in res.objects]


QWEN3_OUTPUTS = [
    # the cookbook's layout: a ```json fence, one object per line
    '```json\n[\n\t{"bbox_2d": [139, 768, 315, 954], "label": "cat"},\n\t{"bbox_2d": [366, 679, 536, 849], "label": "dog"}\n]\n```',
    '```json\n[\n  {"bbox_2d": [0, 0, 1000, 1000], "label": "person"}\n]\n```',
    '[{"bbox_2d": [12, 34, 560, 780], "label": "car"}, {"bbox_2d": [600, 100, 999, 400], "label": "car"}]',
    'Here are the detections:\n```json\n[{"bbox_2d": [10, 20, 30, 40], "label": "cat"}]\n```',
    '```json\n[\n\t{"bbox_2d": [100, 200, 300, 400], "label": "bird", "sub_label": "flying"}\n]\n```',
    '```json\n[\n\t{"bbox_2d": [100, 200, 300, 400], "label": "a \\"quoted\\" label"},\n\t{"bbox_2d": [5, 6, 7, 8], "label": "犬"}\n]\n```',
    # cut by max_new_tokens: the complete objects before the cut
    '```json\n[\n\t{"bbox_2d": [139, 768, 315, 954], "label": "cat"},\n\t{"bbox_2d": [366, 679, 536',
    '```json\n[\n\t{"bbox_2d": [139, 768, 315, 954], "label": "cat"},\n\t{"bbox_2d": [366, 679, 536, 849], "label": "do',
    "```json\n[]\n```",
]


@pytest.mark.parametrize("text", QWEN3_OUTPUTS)
@pytest.mark.parametrize("size", [(640, 480), (1920, 1080), (333, 1001)])
def test_agrees_with_supervision_on_qwen3_outputs(text, size):
    pytest.importorskip("supervision")
    w, h = size
    xyxy, names = _sv(text, w, h)
    mine, labels = _mine(text, w, h)
    assert mine.shape == xyxy.shape, text
    np.testing.assert_allclose(mine, xyxy, rtol=1e-9, atol=1e-9)
    assert labels == names
    # supervision's `classes` filter is our allowed_labels
    xyxy, names = _sv(text, w, h, classes=["cat", "car"])
    mine, labels = _mine(text, w, h, allowed={"cat", "car"})
    np.testing.assert_allclose(mine, xyxy.reshape(-1, 4), rtol=1e-9, atol=1e-9)
    assert labels == names


def test_agrees_with_supervision_on_rendered_answers_and_every_prefix():
    """supervision reads the same boxes from our targets, and the same complete objects from every
    (third) prefix of them: training targets and model outputs mean the same thing to both."""
    pytest.importorskip("supervision")
    rng = random.Random(3)
    checked = 0
    for trial in range(12):
        w, h = rng.randint(50, 4000), rng.randint(50, 4000)
        boxes = []
        for _ in range(rng.randint(1, 3)):
            x1, x2 = sorted(rng.uniform(0, w) for _ in range(2))
            y1, y2 = sorted(rng.uniform(0, h) for _ in range(2))
            boxes.append(Box(x1, y1, x2, y2, rng.choice(["red circle", "dog", "a b c"])))
        text = render_objects(boxes, w, h, fenced=trial % 2 == 0)
        for k in list(range(0, len(text) + 1, 3)) + [len(text)]:
            xyxy, names = _sv(text[:k], w, h)
            mine, labels = _mine(text[:k], w, h)
            assert mine.shape == xyxy.shape, text[:k]
            np.testing.assert_allclose(mine, xyxy, rtol=1e-9, atol=1e-9)
            assert labels == names
            checked += 1
    assert checked > 200


def test_where_supervision_differs():
    """Cases supervision does not cope with, and what we do instead (documented, not accidental)."""
    pytest.importorskip("supervision")
    single = '{"bbox_2d": [0, 0, 500, 500], "label": "a"}'
    assert _sv(single, 100, 100)[0].shape == (0, 4) and _mine(single, 100, 100)[1] == ["a"]
    outside = '[{"bbox_2d": [-10, 0, 1200, 500], "label": "a"}]'
    assert _sv(outside, 100, 100)[0].tolist() == [[-1.0, 0.0, 120.0, 50.0]]  # supervision does not clip
    assert _mine(outside, 100, 100)[0].tolist() == [[0.0, 0.0, 100.0, 50.0]]
    points = '[{"point_2d": [500, 500], "label": "a"}]'  # supervision reads boxes only
    assert _sv(points, 100, 100)[0].shape == (0, 4)
    assert [(o.x, o.y) for o in parse(points, "point", 100, 100).objects] == [(50.0, 50.0)]


# ---------------------------------------------------------------------------- fuzz


@fast(300)
@given(st.text(max_size=200), st.sampled_from(["box", "point"]))
def test_fuzz_arbitrary_text(text, kind):
    check_invariants(parse(text, kind, 640, 480), 640, 480)


def test_fuzz_mutated_answers():
    rng = random.Random(7)
    pieces = ["{", "}", "[", "]", ",", '"', "```", "```json\n", "</think>", "<think>", "<|im_end|>", "1e999", "-5", "1001", "null"]
    bases = [
        render_objects([Box(3, 4, 50, 60, "red circle"), Box(10, 70, 90, 99, "dog")], 100, 100),
        render_objects([Point(5, 6, "a b"), Point(80, 20, "c")], 100, 100, fenced=False),
    ]
    for _ in range(2000):
        s = rng.choice(bases)
        for _ in range(rng.randint(1, 3)):
            i = rng.randint(0, len(s))
            s = s[:i] if rng.random() < 0.3 else s[:i] + rng.choice(pieces) + s[i:]
        for kind in ("box", "point"):
            check_invariants(parse(s, kind, 100, 100), 100, 100)


# ---------------------------------------------------------------------------- Thinking models, number spans

THINKING_OUTPUTS = [
    # a Thinking checkpoint reasons first (with numbers and brackets of its own), then answers
    "<think>\nThe cat sits at the lower left, about [139, 768] to [315, 954]; the dog is right of it.\n</think>\n\n"
    '```json\n[\n\t{"bbox_2d": [139, 768, 315, 954], "label": "cat"},\n\t{"bbox_2d": [366, 679, 536, 849], "label": "dog"}\n]\n```',
    '<think>\nOnly one car {"bbox_2d": [1, 2, 3, 4]} ... no, look again.\n</think>\n[{"bbox_2d": [12, 34, 560, 780], "label": "car"}]',
    "<think>\nNothing of the kind.\n</think>\n\n```json\n[]\n```",
    # cut by max_new_tokens after the reasoning: the complete objects before the cut
    '<think>\nTwo.\n</think>\n```json\n[\n\t{"bbox_2d": [139, 768, 315, 954], "label": "cat"},\n\t{"bbox_2d": [366, 679',
]


@pytest.mark.parametrize("text", THINKING_OUTPUTS)
@pytest.mark.parametrize("size", [(640, 480), (333, 1001)])
def test_thinking_outputs_agree_with_supervision_on_the_answer(text, size):
    """supervision reads the whole text as the answer (the reasoning's brackets confuse it); Qwen's
    own evaluation drops everything up to the last </think> first. Our parse of the full output
    equals supervision's parse of that answer, box for box."""
    pytest.importorskip("supervision")
    from raytrain.formats.qwen3_vl import strip_reasoning

    w, h = size
    answer = strip_reasoning(text)
    assert "<think>" not in answer and "</think>" not in answer and answer.strip()
    xyxy, names = _sv(answer, w, h)
    mine, labels = _mine(text, w, h)
    assert mine.shape == xyxy.shape and mine.shape[0] >= (0 if "[]" in answer else 1)
    np.testing.assert_allclose(mine, xyxy, rtol=1e-9, atol=1e-9)
    assert labels == names
    assert strip_reasoning("no reasoning here") == "no reasoning here" and strip_reasoning(None) == ""


def test_thinking_points_are_relative_too():
    """supervision reads no points: the relative scale by hand (x = v / 1000 * width)."""
    text = '<think>\nAt [1, 2]?\n</think>\n```json\n[\n\t{"point_2d": [250, 750], "label": "a b"},\n\t{"point_2d": [1000, 0], "label": "c"}\n]\n```'
    res = parse(text, "point", 640, 480)
    assert not res.errors
    assert [(o.x, o.y, o.label) for o in res.objects] == [(160.0, 360.0, "a b"), (640.0, 0.0, "c")]


def test_number_spans_name_every_coordinate_of_the_text():
    from raytrain.formats.qwen3_vl import render_objects_spans

    objs = [Box(10, 20, 600, 470, "red circle"), Point(320, 240, "dog")]
    for fenced in (True, False):
        text, spans = render_objects_spans(objs, 640, 480, fenced=fenced)
        assert text == render_objects(objs, 640, 480, fenced=fenced)
        numbers = [int(text[s.start:s.end]) for s in spans]
        coords = [v for o in json.loads(text.split("```json")[-1].split("```")[0]) for v in o.get("bbox_2d", o.get("point_2d"))]
        assert numbers == coords and all(s.range == SCALE for s in spans)
