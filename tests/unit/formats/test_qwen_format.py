"""Qwen2.5-VL codec: smart_resize as transformers does it, frames, round trips in every representation,
truncated answers, agreement with supervision's Qwen2.5-VL parser, and a parser that never raises."""

import json
import math
import random
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raytrain.formats.annotations import Box, ParseResult, Point, box_iou
from raytrain.formats.qwen import (
    LOC_TOKENS,
    MAX_PIXELS,
    MIN_PIXELS,
    NUM_BINS,
    PARSE_REASONS,
    REPRESENTATIONS,
    chat_messages,
    decode_bin,
    encode_bin,
    loc_token,
    order_objects,
    parse,
    render_objects,
    render_prompt,
    smart_resize,
    to_model_frame,
    to_source_frame,
)


def fast(n: int = 100) -> settings:
    """n examples, no per-example deadline (the machine is shared and slow)."""
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


label_st = st.from_regex(r"[a-z][a-z0-9 _'\"-]{0,14}[a-z]|[a-z]", fullmatch=True)
# source sizes with an aspect ratio smart_resize accepts
size_st = st.tuples(st.integers(1, 4000), st.integers(1, 4000)).filter(lambda wh: max(wh) / min(wh) <= 200)


def frame(w, h):
    rh, rw = smart_resize(h, w)
    return rw, rh


@st.composite
def image_and_boxes(draw, max_n=4, min_frac=0.0):
    w, h = draw(size_st)
    boxes = []
    for _ in range(draw(st.integers(1, max_n))):
        fw = draw(st.floats(min_frac, 1.0))
        fh = draw(st.floats(min_frac, 1.0))
        x1 = draw(st.floats(0, 1 - fw)) * w
        y1 = draw(st.floats(0, 1 - fh)) * h
        boxes.append(Box(x1, y1, min(x1 + fw * w, w), min(y1 + fh * h, h), draw(label_st)))
    return w, h, boxes


@st.composite
def image_and_points(draw, max_n=4):
    w, h = draw(size_st)
    pts = [Point(draw(st.floats(0, w)), draw(st.floats(0, h)), draw(label_st)) for _ in range(draw(st.integers(1, max_n)))]
    return w, h, pts


def check_invariants(res, w, h):
    """What must hold for ANY text: the parser's contract."""
    assert isinstance(res, ParseResult)
    assert res.objects or res.errors  # nothing is dropped without a counted reason
    for e in res.errors:
        assert e.reason in PARSE_REASONS, e
        assert isinstance(e.text, str)
    for o in res.objects:
        coords = [o.x, o.y] if isinstance(o, Point) else [o.x1, o.y1, o.x2, o.y2]
        assert all(math.isfinite(v) for v in coords)
        assert all(-1e-6 <= v <= lim + 1e-6 for v, lim in zip(coords, [w, h, w, h]))  # clipped into the image
        assert o.label and o.label == o.label.strip()
        if isinstance(o, Box):
            assert o.x1 <= o.x2 and o.y1 <= o.y2


# ---------------------------------------------------------------------------- smart_resize and frames


@fast(200)
@given(st.integers(1, 20000), st.integers(1, 20000), st.sampled_from([(MIN_PIXELS, MAX_PIXELS), (3136, 12845056), (12544, 12544), (784, 50000)]))
def test_smart_resize_matches_transformers(h, w, bounds):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    lo, hi = bounds
    try:
        want = hf_smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=hi)
    except ValueError:
        with pytest.raises(ValueError):
            smart_resize(h, w, 28, lo, hi)
        return
    got = smart_resize(h, w, 28, lo, hi)
    assert got == want
    assert got[0] % 28 == 0 and got[1] % 28 == 0


def test_smart_resize_examples():
    assert smart_resize(112, 112, min_pixels=112 * 112, max_pixels=112 * 112) == (112, 112)
    assert smart_resize(448, 448, 28, 112 * 112, 112 * 112) == (112, 112)  # the tiny preset pins 112x112
    assert smart_resize(480, 640) == (476, 644)
    assert smart_resize(64, 64) == (56, 56)  # round(64/28) = 2 -> 56, above min_pixels (3136)
    with pytest.raises(ValueError):
        smart_resize(1, 300)


@fast(200)
@given(size_st, size_st, st.floats(0, 1), st.floats(0, 1))
def test_frames_are_inverse_scales(src, resized, fx, fy):
    (sw, sh), (rw, rh) = src, resized
    p = Point(fx * sw, fy * sh, "a")
    m = to_model_frame(p, sw, sh, rw, rh)
    assert m.x == pytest.approx(fx * rw, abs=1e-9 * rw) and m.y == pytest.approx(fy * rh, abs=1e-9 * rh)
    back = to_source_frame(m, sw, sh, rw, rh)
    assert back.x == pytest.approx(p.x, rel=1e-9, abs=1e-9) and back.y == pytest.approx(p.y, rel=1e-9, abs=1e-9)
    b = Box(0, 0, sw, sh, "all")
    assert to_model_frame(b, sw, sh, rw, rh) == Box(0, 0, rw, rh, "all")


def test_loc_tokens():
    assert len(LOC_TOKENS) == NUM_BINS == 1024 and LOC_TOKENS[512] == "<|loc_0512|>" == loc_token(512)
    assert [encode_bin(v) for v in (0.0, 0.5, 1.0, -3.0, 7.0)] == [0, 512, 1023, 0, 1023]  # 511.5 -> 512 (half to even)
    assert decode_bin(1023) == 1.0
    with pytest.raises(ValueError):
        loc_token(1024)


# ---------------------------------------------------------------------------- rendering


def test_render_absolute_is_qwen_native_json():
    boxes = [Box(100, 50, 300, 150, "red circle"), Box(10, 20, 30, 40, "blue square")]
    text = render_objects(boxes, 640, 480, 644, 476)  # a 640x480 image as Qwen2.5-VL sees it
    assert text == (
        "```json\n[\n"
        '\t{"bbox_2d": [10, 20, 30, 40], "label": "blue square"},\n'
        '\t{"bbox_2d": [101, 50, 302, 149], "label": "red circle"}\n'
        "]\n```"
    )
    assert json.loads(render_objects(boxes, 640, 480, 644, 476, fenced=False))[0] == {"bbox_2d": [10, 20, 30, 40], "label": "blue square"}
    pts = render_objects([Point(320, 240, "dog")], 640, 480, 644, 476, fenced=False)
    assert json.loads(pts) == [{"point_2d": [322, 238], "label": "dog"}]


def test_render_other_representations():
    b = [Box(0, 0, 32, 64, "red circle")]
    assert render_objects(b, 64, 64, 112, 112, "pairs") == "[('red circle', [0, 0, 56, 112])]"
    assert json.loads(render_objects(b, 64, 64, 112, 112, "normalized", fenced=False)) == [{"bbox_2d": [0.0, 0.0, 0.5, 1.0], "label": "red circle"}]
    tok = json.loads(render_objects(b, 64, 64, 112, 112, "tokens", fenced=False))[0]["bbox_2d"]
    assert tok == "<|loc_0000|><|loc_0000|><|loc_0512|><|loc_1023|>"
    # out-of-image coordinates are clipped to the edge, in every representation
    out = [Box(-10, -10, 100, 100, "x")]
    assert render_objects(out, 64, 64, 112, 112, "pairs") == "[('x', [0, 0, 112, 112])]"


def test_render_order_and_shuffle():
    objs = [Box(5, 30, 9, 40, "c"), Box(1, 10, 2, 12, "b"), Box(0, 10, 3, 11, "a")]
    assert [o.label for o in order_objects(objs)] == ["a", "b", "c"]  # by y1, then x1
    many = [Box(i, 2 * i, i + 1, 2 * i + 1, f"o{i}") for i in range(12)]
    s1 = render_objects(many, 100, 100, 112, 112, shuffle=True, seed=3)
    assert s1 == render_objects(list(reversed(many)), 100, 100, 112, 112, shuffle=True, seed=3)  # seeded, input-order free
    assert s1 != render_objects(many, 100, 100, 112, 112)
    assert s1 != render_objects(many, 100, 100, 112, 112, shuffle=True, seed=4)
    assert sorted(o.label for o in parse(s1, "box", 100, 100, 112, 112).objects) == sorted(o.label for o in many)


@pytest.mark.parametrize("label", ["", " padded", "trailing ", None, 3])
def test_render_rejects_unreadable_labels(label):
    with pytest.raises((ValueError, TypeError)):
        render_objects([Box(0, 0, 1, 1, label)], 10, 10, 28, 28)


def test_render_rejects_non_finite_and_bad_representation():
    with pytest.raises(ValueError):
        render_objects([Point(math.nan, 1, "a")], 10, 10, 28, 28)
    with pytest.raises(ValueError):
        render_objects([Point(1, 1, "a")], 10, 10, 28, 28, representation="polar")
    with pytest.raises(ValueError):
        render_objects([Point(1, 1, "a")], 0, 10, 28, 28)


def test_chat_messages():
    assert chat_messages("find it") == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "find it"}]}]
    msgs = chat_messages("find it", "[]", system="sys")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"] and msgs[2]["content"][0]["text"] == "[]"


def test_prompts():
    assert render_prompt("detect", "red circle") == "Locate every red circle in the image and output bbox_2d coordinates in JSON format."
    assert render_prompt("point", "dog") == "Point to every dog in the image and output point_2d coordinates in JSON format."
    for rep in REPRESENTATIONS:
        assert "dog" in render_prompt("detect", "dog", rep)
    with pytest.raises(ValueError):
        render_prompt("segment", "dog")


# ---------------------------------------------------------------------------- round trips

# worst-case error of one coordinate, as a fraction of the resized side, per representation
_ERR = {"absolute": lambda r: 0.5 / r, "pairs": lambda r: 0.5 / r, "normalized": lambda r: 0.0005, "tokens": lambda r: 0.5 / 1023}


@fast(150)
@given(image_and_boxes(), st.sampled_from(REPRESENTATIONS), st.booleans())
def test_box_round_trip_error_bounds(data, rep, fenced):
    w, h, boxes = data
    rw, rh = frame(w, h)
    res = parse(render_objects(boxes, w, h, rw, rh, rep, fenced=fenced), "box", w, h, rw, rh, rep)
    assert not res.errors and len(res.objects) == len(boxes)
    tol_x, tol_y = _ERR[rep](rw) * w + 1e-9 * w, _ERR[rep](rh) * h + 1e-9 * h
    for want, got in zip(order_objects(boxes), res.objects):
        assert got.label == want.label
        assert abs(got.x1 - want.x1) <= tol_x and abs(got.x2 - want.x2) <= tol_x
        assert abs(got.y1 - want.y1) <= tol_y and abs(got.y2 - want.y2) <= tol_y


@fast(150)
@given(image_and_boxes(min_frac=0.25), st.sampled_from(REPRESENTATIONS))
def test_box_round_trip_iou_at_source_size(data, rep):
    """IoU >= 0.99 in source pixels for boxes of at least 200 model-frame pixels a side (half a
    pixel of rounding per edge costs 1% IoU at that size)."""
    w, h, boxes = data
    rw, rh = frame(w, h)
    boxes = [b for b in boxes if (b.x2 - b.x1) * rw / w >= 200 and (b.y2 - b.y1) * rh / h >= 200]
    if not boxes:
        return
    res = parse(render_objects(boxes, w, h, rw, rh, rep), "box", w, h, rw, rh, rep)
    for want, got in zip(order_objects(boxes), res.objects):
        assert box_iou(want, got) >= 0.99


def test_box_round_trip_iou_large_images():
    """The property above on sizes that always reach it (hypothesis rarely draws them)."""
    rng = random.Random(0)
    for _ in range(300):
        w, h = rng.randint(900, 4000), rng.randint(900, 4000)
        rw, rh = frame(w, h)
        boxes = []
        for i in range(3):
            fw, fh = rng.uniform(0.3, 1), rng.uniform(0.3, 1)
            x1, y1 = rng.uniform(0, 1 - fw) * w, rng.uniform(0, 1 - fh) * h
            boxes.append(Box(x1, y1, x1 + fw * w, y1 + fh * h, f"obj {i}"))
        for rep in REPRESENTATIONS:
            res = parse(render_objects(boxes, w, h, rw, rh, rep), "box", w, h, rw, rh, rep)
            assert len(res.objects) == 3 and not res.errors
            assert all(box_iou(a, b) >= 0.99 for a, b in zip(order_objects(boxes), res.objects))


@fast(150)
@given(image_and_points(), st.sampled_from(REPRESENTATIONS), st.booleans())
def test_point_round_trip(data, rep, fenced):
    w, h, pts = data
    rw, rh = frame(w, h)
    res = parse(render_objects(pts, w, h, rw, rh, rep, fenced=fenced), "point", w, h, rw, rh, rep)
    assert not res.errors and len(res.objects) == len(pts)
    for want, got in zip(order_objects(pts), res.objects):
        assert got.label == want.label
        assert abs(got.x - want.x) <= _ERR[rep](rw) * w * (1 + 1e-9) + 1e-9
        assert abs(got.y - want.y) <= _ERR[rep](rh) * h * (1 + 1e-9) + 1e-9


@pytest.mark.parametrize("rep", REPRESENTATIONS)
def test_unicode_and_quoted_labels_round_trip(rep):
    objs = [Box(1, 2, 30, 40, 'l\'étiquette "q"'), Box(5, 50, 9, 60, "犬")]
    res = parse(render_objects(objs, 64, 64, 112, 112, rep), "box", 64, 64, 112, 112, rep)
    assert [o.label for o in res.objects] == ['l\'étiquette "q"', "犬"] and not res.errors


# ---------------------------------------------------------------------------- truncation


@pytest.mark.parametrize("rep", REPRESENTATIONS)
@pytest.mark.parametrize("fenced", [True, False])
def test_truncated_answer_keeps_complete_objects(rep, fenced):
    """Every prefix of a rendered answer (generation cut at any character) returns exactly the objects
    complete before the cut and says truncated_object when something was cut."""
    boxes = [Box(10, 10, 40, 40, "red circle"), Box(20, 60, 50, 90, "blue square"), Box(5, 100, 60, 120, "green cross")]
    w, h, rw, rh = 128, 128, 112, 112
    full = render_objects(boxes, w, h, rw, rh, rep, fenced=fenced)
    full_objs = parse(full, "box", w, h, rw, rh, rep).objects
    singles = [render_objects([b], w, h, rw, rh, rep, fenced=False).strip("[]") for b in boxes]
    for k in range(len(full) + 1):
        cut = full[:k]
        res = parse(cut, "box", w, h, rw, rh, rep)
        check_invariants(res, w, h)
        n_complete = sum(1 for s in singles if full.find(s) + len(s) <= k)
        assert res.objects == full_objs[:n_complete], (cut, res)
        reasons = {e.reason for e in res.errors}
        assert reasons <= {"truncated_object", "empty_output"}, (cut, res.errors)
        if 0 < n_complete < 3:
            assert "truncated_object" in reasons, cut


def test_truncated_then_end_token_is_malformed():
    text = '[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6<|im_end|>'
    res = parse(text, "box", 112, 112, 112, 112)
    assert [o.label for o in res.objects] == ["a"] and [e.reason for e in res.errors] == ["malformed_json"]


# ---------------------------------------------------------------------------- supervision agreement


def _sv_boxes(text, w, h, rw, rh):
    import supervision as sv

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = sv.Detections.from_vlm(sv.VLM.QWEN_2_5_VL, text, resolution_wh=(w, h), input_wh=(rw, rh))
    names = list(det.data.get("class_name", [])) if len(det) else []
    return det.xyxy.reshape(-1, 4), names


def test_agrees_with_supervision_including_truncated_json():
    """supervision's Detections.from_vlm(QWEN_2_5_VL, input_wh=resized, resolution_wh=source) reads the
    same boxes from our answers, and recovers the same complete objects from every truncated prefix."""
    pytest.importorskip("supervision")
    rng = random.Random(1)
    checked = 0
    for trial in range(12):
        w, h = rng.randint(50, 3000), rng.randint(50, 3000)
        rw, rh = frame(w, h)
        boxes = []
        for _ in range(rng.randint(1, 3)):
            x1, x2 = sorted(rng.uniform(0, w) for _ in range(2))
            y1, y2 = sorted(rng.uniform(0, h) for _ in range(2))
            boxes.append(Box(x1, y1, x2, y2, rng.choice(["red circle", "dog", "a b c"])))
        text = render_objects(boxes, w, h, rw, rh, fenced=trial % 2 == 0)
        for k in list(range(0, len(text) + 1, 3)) + [len(text)]:
            res = parse(text[:k], "box", w, h, rw, rh)
            xyxy, names = _sv_boxes(text[:k], w, h, rw, rh)
            mine = np.array([[o.x1, o.y1, o.x2, o.y2] for o in res.objects]).reshape(-1, 4)
            assert mine.shape == xyxy.shape, text[:k]
            np.testing.assert_allclose(mine, xyxy, rtol=1e-9, atol=1e-9)
            assert names == [o.label for o in res.objects]
            checked += 1
    assert checked > 200


def test_agrees_with_supervision_on_qwen_style_outputs():
    pytest.importorskip("supervision")
    outputs = [
        '```json\n[\n\t{"bbox_2d": [139, 768, 315, 954], "label": "cat"},\n\t{"bbox_2d": [366, 679, 536, 849], "label": "dog"}\n]\n```',
        '[{"bbox_2d": [1, 2, 300, 400], "label": "cat"}]',
        'Here you go:\n```json\n[{"bbox_2d": [10, 20, 30, 40], "label": "cat"}]\n```',
    ]
    for text in outputs:
        res = parse(text, "box", 2000, 1000, 1000, 1000)
        xyxy, names = _sv_boxes(text, 2000, 1000, 1000, 1000)
        np.testing.assert_allclose(np.array([[o.x1, o.y1, o.x2, o.y2] for o in res.objects]), xyxy)
        assert names == [o.label for o in res.objects]


# ---------------------------------------------------------------------------- parser behaviour


def _reasons(text, kind="box", rep="absolute", allowed=None):
    res = parse(text, kind, 100, 100, 112, 112, rep, allowed_labels=allowed)
    return [o.label for o in res.objects], [e.reason for e in res.errors]


@pytest.mark.parametrize(
    "text, labels, reasons",
    [
        ('{"bbox_2d": [1, 2, 3, 4], "label": "a"}', ["a"], []),  # a single dict
        ('{"bbox_2d": [1, 2, 3, 4], "label": "a"}\n{"bbox_2d": [5, 6, 7, 8], "label": "b"}', ["a", "b"], []),
        ('{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6, 7, 8], "label": "b"}', ["a", "b"], []),
        ('[{"bbox_2d": [1, 2, 3], "label": "a"}]', [], ["bad_coordinates"]),
        ('[{"bbox_2d": [1, 2, 3, 4, 5], "label": "a"}]', [], ["bad_coordinates"]),
        ('[{"bbox_2d": ["1", 2, 3, 4], "label": "a"}]', [], ["bad_coordinates"]),
        ('[{"bbox_2d": [true, 2, 3, 4], "label": "a"}]', [], ["bad_coordinates"]),
        ('[{"bbox_2d": [NaN, 2, 3, 4], "label": "a"}]', [], ["bad_coordinates"]),
        ('[{"bbox_2d": [1e999, 2, 3, 4], "label": "a"}]', [], ["bad_coordinates"]),
        ('[{"point_2d": [1, 2], "label": "a"}]', [], ["bad_coordinates"]),  # asked for boxes
        ('[{"bbox_2d": [1, 2, 3, 4]}]', [], ["missing_label"]),
        ('[{"bbox_2d": [1, 2, 3, 4], "label": ""}]', [], ["missing_label"]),
        ('[{"bbox_2d": [1, 2, 3, 4], "label": 7}]', [], ["missing_label"]),
        ('[{"bbox_2d": [5, 2, 3, 4], "label": "a"}]', [], ["invalid_box"]),
        ('[{"bbox_2d": [1, 6, 3, 4], "label": "a"}]', [], ["invalid_box"]),
        ('[{"bbox_2d": [3, 4, 3, 4], "label": "a"}]', ["a"], []),  # zero-size: returned
        ("[{'bbox_2d': [1, 2, 3, 4], 'label': 'a'}, {\"bbox_2d\": [1, 2, 3, 4], \"label\": \"b\"}]", ["b"], ["malformed_json"]),
        ('[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, 5, "x"]', ["a"], ["garbage", "garbage"]),
        ('[1, 2, 3, 4]', [], ["garbage"]),
        ("There are no red circles.", [], ["garbage"]),
        ('Sure! [{"bbox_2d": [1, 2, 3, 4], "label": "a"}] Done.', ["a"], ["garbage", "garbage"]),
        ("[]", [], ["empty_output"]),
        ("```json\n[]\n```", [], ["empty_output"]),
        ("  <|im_end|>", [], ["empty_output"]),
        ("", [], ["empty_output"]),
        ("```json", [], ["truncated_object"]),
        ('[{"bbox_2d": [1, 2, 3, 4], "label": "a"}<|im_end|>', ["a"], []),  # list left open at the end token
        ('[{"bbox_2d": [1, 2, 3, 4], "label": "a"}]<|im_end|>junk after the end', ["a"], []),
        ('<|im_start|>[{"bbox_2d": [1, 2, 3, 4], "label": "a"}]<|endoftext|>', ["a"], []),
    ],
)
def test_parse_cases(text, labels, reasons):
    assert _reasons(text) == (labels, reasons)


def test_parse_allowed_labels_clipping_and_frames():
    text = '[{"bbox_2d": [-5, 2, 300, 56], "label": "a"}, {"bbox_2d": [0, 0, 56, 56], "label": "b"}]'
    res = parse(text, "box", 200, 100, 112, 112, allowed_labels={"a"})
    assert [e.reason for e in res.errors] == ["unknown_label"]
    # clipped to [0, 112] in the model frame, then scaled to the 200x100 source
    assert res.objects == [Box(0.0, 2 * 100 / 112, 200.0, 50.0, "a")]
    raw = parse(text, "box", 200, 100, 112, 112, clip=False).objects[0]
    assert raw.x1 == pytest.approx(-5 * 200 / 112) and raw.x2 == pytest.approx(300 * 200 / 112)


def test_parse_tokens_and_pairs_specifics():
    assert _reasons('[{"bbox_2d": "<|loc_0001|><|loc_0002|><|loc_0003|>", "label": "a"}]', rep="tokens") == ([], ["bad_coordinates"])
    assert _reasons('[{"bbox_2d": "<|loc_0001|><|loc_0002|><|loc_0003|><|loc_9999|>", "label": "a"}]', rep="tokens") == ([], ["bad_coordinates"])
    assert _reasons('[{"bbox_2d": "<|loc_0001|> x <|loc_0002|><|loc_0003|><|loc_0004|>", "label": "a"}]', rep="tokens") == ([], ["bad_coordinates"])
    toks = '["<|loc_0001|>", "<|loc_0002|>", "<|loc_0003|>", "<|loc_0004|>"]'
    assert _reasons('[{"bbox_2d": ' + toks + ', "label": "a"}]', rep="tokens") == (["a"], [])
    assert _reasons("[('a', [1, 2, 3])]", rep="pairs") == ([], ["bad_coordinates"])
    assert _reasons("[('a', [1, 2, 3, nan])]", rep="pairs") == ([], ["bad_coordinates"])
    assert _reasons("[('a', [1, 2, 3, 4]), ('b', 1, 2, 3, 4), ('c', [5, 6, 7, 8])]", rep="pairs") == (["a", "c"], ["malformed_json"])
    assert _reasons("[('', [1, 2, 3, 4])]", rep="pairs") == ([], ["missing_label"])
    assert _reasons("[('a\\N{nope}', [1, 2, 3, 4]), ('b', [1, 2, 3, 4])]", rep="pairs") == (["b"], ["malformed_json"])
    assert _reasons("[('a', [3, 2, 1, 4])]", rep="pairs") == ([], ["invalid_box"])
    assert _reasons("nothing here", rep="pairs") == ([], ["garbage"])
    assert _reasons("[('a', [1, 2])]", kind="point", rep="pairs") == (["a"], [])
    # normalised values are fractions of the image: 0.5 of a 100 px source is 50 px
    res = parse('[{"point_2d": [0.5, 0.25], "label": "a"}]', "point", 100, 100, 112, 112, "normalized")
    assert res.objects == [Point(50.0, 25.0, "a")]


def test_parse_rejects_bad_arguments():
    for kwargs in ({"kind": "mask"}, {"representation": "polar"}, {"src_w": 0}, {"resized_h": -1}):
        args = {"text": "[]", "kind": "box", "src_w": 10, "src_h": 10, "resized_w": 28, "resized_h": 28, **kwargs}
        with pytest.raises(ValueError):
            parse(**args)


# ---------------------------------------------------------------------------- fuzz

_PIECES = [
    "{", "}", "[", "]", ",", ":", '"', "'", "(", ")", "```", "```json\n", "\n", " ", "\\", "bbox_2d", "point_2d",
    '"label"', '"bbox_2d": ', "<|im_end|>", "<|endoftext|>", "<|im_start|>", "<|loc_0512|>", "<|loc_99", "1e999",
    "NaN", "-3", "0.5", "1234", "true", "null", "é", "\x00", "犬", "}}}}", "[[[[", "'a'", "('x', [",
]


def _mutate(rng: random.Random, s: str) -> str:
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        i = rng.randint(0, len(s))
        if op == 0:
            s = s[:i]  # truncate
        elif op == 1 and s:
            j = min(len(s), i + rng.randint(1, 6))
            s = s[:i] + s[j:]  # delete a run
        elif op == 2:
            s = s[:i] + rng.choice(_PIECES) + s[i:]  # insert a structural piece
        elif op == 3 and s:
            s = s[:i] + chr(rng.randint(32, 0x2FF)) + s[i + 1 :]  # replace a character
        else:
            s = s + s[: rng.randint(0, len(s))]  # repeat (the model loops)
    return s


def test_fuzz_parser_never_raises():
    """Thousands of mutated answers and random strings, every representation and kind: no exception,
    every rejection has a known reason, every object is finite, in the image and well ordered."""
    rng = random.Random(1234)
    base = {}
    for rep in REPRESENTATIONS:
        for kind, objs in (("box", [Box(3, 4, 50, 60, "red circle"), Box(10, 70, 90, 99, "dog")]), ("point", [Point(5, 6, "a b"), Point(80, 20, "c")])):
            base[(rep, kind)] = [render_objects(objs, 100, 100, 112, 112, rep, fenced=f) for f in (True, False)]
    n = 0
    for (rep, kind), texts in base.items():
        for _ in range(500):
            if rng.random() < 0.85:
                text = _mutate(rng, rng.choice(texts))
            else:
                text = "".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 30)))
            for k in (kind, "box" if kind == "point" else "point"):
                check_invariants(parse(text, k, 100, 100, 112, 112, rep), 100, 100)
                n += 1
    assert n == 8000


@fast(300)
@given(st.text(max_size=200), st.sampled_from(REPRESENTATIONS), st.sampled_from(["box", "point"]))
def test_fuzz_arbitrary_text(text, rep, kind):
    check_invariants(parse(text, kind, 640, 480, 644, 476, rep), 640, 480)


def test_parser_survives_pathological_inputs():
    for text in ["[" * 20000, "{" * 20000, '[{"bbox_2d": [' + "9" * 6000 + ', 1, 2, 3], "label": "a"}]', "(" * 20000, '"' * 20000, "```" * 5000]:
        for rep in REPRESENTATIONS:
            check_invariants(parse(text, "box", 100, 100, 112, 112, rep), 100, 100)
