"""Coordinates written as digits: spans recorded while rendering, place weights per token, and the
encoders' `num_place` lined up with the labels, for every digit format."""

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raytrain.formats import molmo
from raytrain.formats import qwen as fmt
from raytrain.formats.annotations import Box, Point
from raytrain.formats.numbers import NumberSpan, digit_places, digit_token_ids, token_place_weights
from raytrain.models import family


def test_digit_places():
    assert digit_places("112") == [(0, 100.0), (1, 10.0), (2, 1.0)]
    assert digit_places("0.125") == [(0, 1.0), (2, 0.1), (3, 0.01), (4, 0.001)]
    assert digit_places("7") == [(0, 1.0)]
    assert digit_places("39.04") == [(0, 10.0), (1, 1.0), (3, 0.1), (4, 0.01)]


coord = st.floats(min_value=-5, max_value=205, allow_nan=False)
labels = st.sampled_from(["cat", "red circle", "cat 2", 'a "b"', "café 9"])


@st.composite
def objects(draw):
    out = []
    for _ in range(draw(st.integers(0, 3))):
        if draw(st.booleans()):
            out.append(Point(draw(coord), draw(coord) / 2, draw(labels)))
        else:
            x1, y1 = draw(st.floats(0, 150)), draw(st.floats(0, 70))
            out.append(Box(x1, y1, x1 + draw(st.floats(0, 50)), y1 + draw(st.floats(0, 30)), draw(labels)))
    return out


@settings(max_examples=200, deadline=None)
@given(objects(), st.sampled_from(fmt.REPRESENTATIONS), st.booleans())
def test_qwen_spans_are_the_rendered_coordinates(objs, rep, fenced):
    text, spans = fmt.render_objects_spans(objs, 200, 100, 112, 56, rep, fenced)
    assert text == fmt.render_objects(objs, 200, 100, 112, 56, rep, fenced)
    if rep == "tokens":
        assert spans == []
        return
    n_coords = sum(2 if isinstance(o, Point) else 4 for o in objs)
    assert len(spans) == n_coords
    # the spans read back, in order, the coordinates the parser reads: in model-frame units
    values = [float(text[s.start : s.end]) for s in spans]
    ranges = [s.range for s in spans]
    assert ranges == ([1.0] * n_coords if rep == "normalized" else [112.0 if i % 2 == 0 else 56.0 for i in range(n_coords)])
    # parsed in a source frame equal to the model frame, objects come back in the spans' units
    if objs and all(isinstance(o, type(objs[0])) for o in objs):
        parsed = fmt.parse(text, "point" if isinstance(objs[0], Point) else "box", 112, 56, 112, 56, rep)
        assert not parsed.errors
        flat = [v for o in parsed.objects for v in ((o.x, o.y) if isinstance(o, Point) else (o.x1, o.y1, o.x2, o.y2))]
        unit = [112.0, 56.0] * (n_coords // 2) if rep == "normalized" else [1.0] * n_coords
        assert np.allclose(flat, [v * u for v, u in zip(values, unit)], atol=1e-6), (text, flat, values)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(coord, coord), min_size=0, max_size=6), st.integers(0, 3))
def test_molmo_spans_are_the_percent_numbers(pts, decimals):
    points = [Point(x, y / 2, "sky") for x, y in pts]
    text, spans = molmo.render_points_spans(points, 200, 100, decimals=decimals)
    assert text == molmo.render_points(points, 200, 100, decimals=decimals)
    assert len(spans) == 2 * len(points) and all(s.range == 100.0 for s in spans)
    parsed = molmo.parse(text, 100, 100)  # a 100x100 frame: pixels are percent
    got = sorted(v for p in parsed.objects for v in (p.x, p.y))
    assert np.allclose(got, sorted(float(text[s.start : s.end]) for s in spans))


@pytest.fixture(scope="module")
def qwen_tok(tiny_qwen_path):
    return family("qwen2_5_vl").load_processor(tiny_qwen_path).tokenizer


def test_token_place_weights_on_a_byte_level_tokenizer(qwen_tok):
    text = '{"bbox_2d": [12, 34, 105, 7], "label": "cat 2"}'
    seven = text.index(" 7]") + 1
    spans = [NumberSpan(text.index(v), text.index(v) + len(v), 112.0) for v in ("12", "34", "105")] + [NumberSpan(seven, seven + 1, 56.0)]
    enc = qwen_tok(text, add_special_tokens=False, return_offsets_mapping=True)
    w = token_place_weights(text, spans, enc["offset_mapping"])
    got = [(text[a:b], float(x)) for (a, b), x in zip(enc["offset_mapping"], w) if x]
    want = [("1", -10 / 112), ("2", 1 / 112), ("3", -10 / 112), ("4", 1 / 112), ("1", -100 / 112), ("0", 10 / 112),
            ("5", 1 / 112), ("7", -1 / 56)]
    assert [g[0] for g in got] == [x[0] for x in want] and np.allclose([g[1] for g in got], [x[1] for x in want])
    assert np.count_nonzero(w) == 2 + 2 + 3 + 1 and (w < 0).sum() == 4  # the label's "2" has no weight
    ids = digit_token_ids(qwen_tok)
    assert [qwen_tok.decode([i]) for i in ids] == list("0123456789")


def test_merged_digits_get_no_weights():
    text = "[105, 7]"
    spans = [NumberSpan(1, 4, 112.0), NumberSpan(6, 7, 112.0)]
    offsets = [(0, 1), (1, 3), (3, 4), (4, 6), (6, 7), (7, 8)]  # "10" as one token
    w = token_place_weights(text, spans, offsets)
    assert w.tolist() == [0, 0, 0, 0, pytest.approx(-1 / 112), 0]


@pytest.mark.parametrize("spec", ["qwen2_5_vl", "qwen2_5_vl+normalized", "qwen2_5_vl+pairs", "qwen2_5_vl+molmo", "paligemma+molmo"])
def test_encoders_put_place_weights_on_the_digit_labels(spec, tiny_qwen_path, tiny_model_path):
    from PIL import Image

    fam = family(spec)
    proc = fam.load_processor(tiny_qwen_path if spec.startswith("qwen") else tiny_model_path)
    hw = fam.image_size(proc)
    rng = random.Random(0)
    rows = []
    for _ in range(4):
        pts = [Point(rng.uniform(0, 64), rng.uniform(0, 64), "red circle") for _ in range(rng.randint(1, 3))]
        task, objs = ("point", pts) if rng.random() < 0.5 or spec.endswith("molmo") else ("detect", [Box(5, 6, 40, 50, "red circle")])
        prompt, answer = fam.render_example(task, "red circle", objs, 64, 64, hw)
        rows.append((prompt, answer, fam.answer_numbers(task, "red circle", objs, 64, 64, hw)))
    enc = fam.encode_train(proc, [Image.new("RGB", (hw[1], hw[0]))] * 4, [r[0] for r in rows], [r[1] for r in rows], 200,
                           [r[2] for r in rows])
    digits = set(fam.digit_token_ids(proc.tokenizer).tolist())
    tok = proc.tokenizer
    for i, (_, answer, spans) in enumerate(rows):
        pos = np.nonzero(enc["num_place"][i])[0]
        assert len(pos) == sum(len(digit_places(answer[s.start : s.end])) for s in spans) > 0
        assert all(int(enc["labels"][i, p]) in digits for p in pos)
        assert (enc["num_place"][i] < 0).sum() == len(spans)
        # the weighted positions spell the rendered numbers, digit by digit
        spelled = "".join(tok.decode([int(enc["labels"][i, p])]) for p in pos)
        assert spelled == "".join(c for s in spans for c in answer[s.start : s.end] if c.isdigit())
    plain = fam.encode_train(proc, [Image.new("RGB", (hw[1], hw[0]))] * 4, [r[0] for r in rows], [r[1] for r in rows], 200)
    assert "num_place" not in plain and np.array_equal(plain["labels"], enc["labels"])


def test_loc_formats_have_no_numbers(tiny_model_path, tiny_qwen_path):
    for spec in ("paligemma", "qwen2_5_vl+tokens"):
        fam = family(spec)
        assert fam.answer_numbers("point", "x", [Point(3, 4, "x")], 64, 64, (112, 112)) == []
