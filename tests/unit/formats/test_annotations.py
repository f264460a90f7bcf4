"""Canonical annotations: JSON round trip, validation reasons, IoU."""

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raytrain.formats.annotations import (
    REASONS_INVALID_OBJECTS,
    Box,
    ParseError,
    ParseResult,
    Point,
    box_iou,
    check_objects,
    objects_from_json,
    objects_to_json,
)

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
labels = st.text(max_size=20)
points = st.builds(Point, finite, finite, labels)
boxes = st.builds(Box, finite, finite, finite, finite, labels)


# ---------------------------------------------------------------------------- geometry


def test_box_properties():
    b = Box(10, 20, 40, 30, "cat")
    assert (b.width, b.height, b.area) == (30, 10, 300)
    assert b.center == Point(25, 25, "cat")
    assert Box(5, 5, 1, 9).area == 0  # inverted: no area, not a negative one
    assert Box(5, 5, 1, 1).area == 0  # inverted on both axes: not a positive product


@pytest.mark.parametrize(
    "a, b, iou",
    [
        (Box(0, 0, 10, 10), Box(0, 0, 10, 10), 1.0),
        (Box(0, 0, 10, 10), Box(5, 0, 15, 10), 50 / 150),  # half overlap along x
        (Box(0, 0, 10, 10), Box(5, 5, 15, 15), 25 / 175),  # quarter overlap
        (Box(0, 0, 10, 10), Box(2, 2, 4, 4), 4 / 100),  # contained
        (Box(0, 0, 10, 10), Box(10, 0, 20, 10), 0.0),  # touching edges
        (Box(0, 0, 10, 10), Box(20, 20, 30, 30), 0.0),  # disjoint
        (Box(0, 0, 4, 2), Box(1, 1, 3, 5), 2 / 14),  # 8 + 8 - 2
        (Box(1, 1, 1, 1), Box(1, 1, 1, 1), 0.0),  # empty union
    ],
)
def test_box_iou_hand_computed(a, b, iou):
    assert box_iou(a, b) == pytest.approx(iou, abs=1e-12)
    assert box_iou(b, a) == pytest.approx(iou, abs=1e-12)


# ---------------------------------------------------------------------------- validation


def test_check_objects_reasons():
    assert REASONS_INVALID_OBJECTS == ("empty_annotations", "coords_out_of_range", "degenerate_box")
    w, h = 100, 50
    assert check_objects([], w, h) == "empty_annotations"
    assert check_objects([Point(0, 0), Point(100, 50), Box(0, 0, 100, 50)], w, h) is None  # edges are inside
    for bad in [Point(-0.1, 1), Point(1, 50.01), Point(100.5, 1), Box(0, 0, 101, 10), Box(0, -1, 10, 10)]:
        assert check_objects([bad], w, h) == "coords_out_of_range", bad
    for v in (math.nan, math.inf, -math.inf):
        assert check_objects([Point(v, 1)], w, h) == "coords_out_of_range"
        assert check_objects([Box(1, 1, 5, v)], w, h) == "coords_out_of_range"
    for bad in [Box(5, 1, 5, 9), Box(1, 5, 9, 5), Box(9, 1, 5, 9), Box(1, 9, 5, 1)]:
        assert check_objects([bad], w, h) == "degenerate_box", bad
    # one reason: the first failing object decides
    assert check_objects([Box(5, 1, 5, 9), Point(-1, 0)], w, h) == "degenerate_box"
    assert check_objects([Point(-1, 0), Box(5, 1, 5, 9)], w, h) == "coords_out_of_range"
    assert check_objects([Point(1, 1), Box(5, 1, 5, 9)], w, h) == "degenerate_box"


# ---------------------------------------------------------------------------- JSON


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(points, boxes), max_size=8))
def test_json_round_trip(objs):
    s = objects_to_json(objs)
    back = objects_from_json(s)
    assert back == objs
    assert [type(o) for o in back] == [type(o) for o in objs]


def test_json_schema():
    s = objects_to_json([Point(1, 2.5, "a"), Box(1, 2, 3, 4, "b")])
    assert json.loads(s) == [
        {"type": "point", "x": 1.0, "y": 2.5, "label": "a"},
        {"type": "box", "x1": 1.0, "y1": 2.0, "x2": 3.0, "y2": 4.0, "label": "b"},
    ]
    # ints and a missing label are read
    assert objects_from_json('[{"type": "point", "x": 1, "y": 2}]') == [Point(1.0, 2.0, "")]
    assert objects_from_json("[]") == []


def test_json_rejects_non_finite():
    with pytest.raises(ValueError):
        objects_to_json([Point(math.nan, 1)])


@pytest.mark.parametrize(
    "s, match",
    [
        ("not json", "not valid JSON"),
        ("", "not valid JSON"),
        ('{"type": "point"}', "must be a JSON list"),
        ("[1]", "expected a JSON object"),
        ('[{"type": "mask", "x": 1}]', "unknown type"),
        ('[{"x": 1, "y": 2}]', "unknown type"),
        ('[{"type": "point", "x": 1}]', "missing field 'y'"),
        ('[{"type": "box", "x1": 1, "y1": 2, "x2": 3}]', "missing field 'y2'"),
        ('[{"type": "point", "x": 1, "y": 2, "z": 3}]', "unexpected fields"),
        ('[{"type": "point", "x": "1", "y": 2}]', "must be a number"),
        ('[{"type": "point", "x": true, "y": 2}]', "must be a number"),
        ('[{"type": "point", "x": null, "y": 2}]', "must be a number"),
        ('[{"type": "point", "x": 1, "y": 2, "label": 3}]', "label must be a string"),
        ('[{"type": "point", "x": NaN, "y": 2}]', "non-finite"),
        ('[{"type": "point", "x": 1e999, "y": 2}]', "not a finite number"),
        ('[{"type": "point", "x": 1' + "0" * 400 + ', "y": 2}]', "not a finite number"),
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    ],
)
def test_json_malformed_raises_value_error(s, match):
    with pytest.raises(ValueError, match=match):
        objects_from_json(s)


# ---------------------------------------------------------------------------- parse result


def test_parse_result_valid():
    assert not ParseResult([], []).valid
    assert ParseResult([Point(1, 1)], []).valid
    assert not ParseResult([Point(1, 1)], [ParseError("garbage", "x")]).valid
    assert not ParseResult([], [ParseError("empty_output", "")]).valid
