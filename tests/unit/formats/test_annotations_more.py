"""Masks (COCO RLE), captions and regions: construction, JSON round trip, validation."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_utils

from raytrain.formats.annotations import (
    ALL_REASONS_INVALID_OBJECTS,
    Box,
    Caption,
    Mask,
    Point,
    Region,
    check_objects,
    objects_from_json,
    objects_to_json,
)

# ---------------------------------------------------------------------------- masks


def test_mask_from_array_round_trip_box_and_area():
    arr = np.zeros((6, 9), bool)
    arr[1:4, 2:7] = True  # rows 1..3, columns 2..6
    arr[5, 8] = True
    m = Mask.from_array(arr, "cat")
    assert m.size == (6, 9) and (m.height, m.width) == (6, 9)
    assert (m.to_array() == arr).all()
    assert m.area == 16
    # continuous convention: the last set column 8 covers [8, 9)
    assert m.box == Box(2.0, 1.0, 9.0, 6.0, "cat")
    assert m.rle == {"size": [6, 9], "counts": m.counts}
    assert mask_utils.area(m._coco()) == 16  # pycocotools agrees


def test_mask_from_polygons_matches_pycocotools():
    poly = [10.0, 10.0, 30.0, 10.0, 30.0, 20.0, 10.0, 20.0]  # a 20x10 rectangle
    m = Mask.from_polygons([poly], height=40, width=50, label="door")
    ref = mask_utils.merge(mask_utils.frPyObjects([poly], 40, 50))
    assert (m.to_array() == mask_utils.decode(ref).astype(bool)).all()
    b = m.box
    assert b.label == "door" and b.x1 == pytest.approx(10, abs=1) and b.x2 == pytest.approx(31, abs=1)
    assert m.area == pytest.approx(20 * 10, rel=0.15)


@pytest.mark.parametrize("bad", [[1, 2, 3, 4], [1, 2, 3, 4, 5], [], [1, 2, 3, 4, 5, float("nan")]])
def test_mask_from_polygons_rejects_non_polygons(bad):
    # pycocotools would read a 4-number list as a bbox: refuse it instead
    with pytest.raises(ValueError):
        Mask.from_polygons([bad], 10, 10)
    with pytest.raises(ValueError):
        Mask.from_polygons([], 10, 10)


def test_mask_from_uncompressed_and_compressed_rle():
    # COCO iscrowd annotations: uncompressed counts, column-major, zeros first
    un = {"size": [4, 5], "counts": [5, 2, 2, 2, 9]}
    m = Mask.from_rle(un, "crowd")
    expected = np.zeros((4, 5), bool)
    expected[1:3, 1:2] = True
    expected[1:3, 2:3] = True
    assert (m.to_array() == expected).all()
    assert Mask.from_rle(m.rle, "crowd") == m
    assert Mask.from_rle({"size": [4, 5], "counts": m.counts.encode()}, "crowd") == m  # bytes, as pycocotools returns
    for bad in (
        {"size": [4, 5], "counts": [5, 2]},  # does not cover 20 pixels
        {"size": [4, 5], "counts": "!!"},  # invalid characters
        {"size": [4, 5], "counts": "9"},  # 9 != 20
        {"size": [4], "counts": "9"},
        {"size": [4, 5]},
        {"size": [4, 5], "counts": 3},
    ):
        with pytest.raises(ValueError):
            Mask.from_rle(bad)


def test_empty_mask():
    m = Mask.from_array(np.zeros((3, 4), bool), "x")
    assert m.area == 0 and m.box == Box(0, 0, 0, 0, "x")
    assert check_objects([m], 4, 3) == "empty_mask"


# ---------------------------------------------------------------------------- captions / regions


def test_caption_and_region_properties():
    r = Region(1, 2, 11, 7, "a red kite")
    assert r.box == Box(1, 2, 11, 7, "a red kite") and r.label == "a red kite"
    assert Caption("two dogs").label == ""


# ---------------------------------------------------------------------------- JSON

texts = st.text(max_size=30)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@st.composite
def masks(draw):
    h = draw(st.integers(0, 12))
    w = draw(st.integers(0, 12))
    arr = draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w))
    return Mask.from_array(np.array(arr, bool).reshape(h, w), draw(texts))


objects = st.one_of(
    st.builds(Point, finite, finite, texts),
    st.builds(Box, finite, finite, finite, finite, texts),
    st.builds(Region, finite, finite, finite, finite, texts),
    st.builds(Caption, texts),
    masks(),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(objects, max_size=6))
def test_json_round_trip_all_types(objs):
    back = objects_from_json(objects_to_json(objs))
    assert back == objs
    assert [type(o) for o in back] == [type(o) for o in objs]


def test_json_schema_new_types():
    m = Mask.from_array(np.eye(3, dtype=bool), "diag")
    s = objects_to_json([Caption("a cat"), Region(1, 2, 3, 4, "ear"), m])
    assert json.loads(s) == [
        {"type": "caption", "text": "a cat"},
        {"type": "region", "x1": 1.0, "y1": 2.0, "x2": 3.0, "y2": 4.0, "phrase": "ear"},
        {"type": "mask_rle", "size": [3, 3], "counts": m.counts, "label": "diag"},
    ]
    # a mask's label is optional, like a box's
    assert objects_from_json(json.dumps([{"type": "mask_rle", "size": [3, 3], "counts": m.counts}])) == [
        Mask((3, 3), m.counts, "")
    ]


@pytest.mark.parametrize(
    "obj, match",
    [
        ({"type": "caption"}, "missing field 'text'"),
        ({"type": "caption", "text": 3}, "text must be a string"),
        ({"type": "caption", "text": "a", "label": "b"}, "unexpected fields"),
        ({"type": "region", "x1": 1, "y1": 1, "x2": 2, "y2": 2}, "missing field 'phrase'"),
        ({"type": "region", "x1": 1, "y1": 1, "x2": 2, "phrase": "p"}, "missing field 'y2'"),
        ({"type": "region", "x1": 1, "y1": 1, "x2": 2, "y2": "2", "phrase": "p"}, "must be a number"),
        ({"type": "mask_rle", "counts": "9"}, "missing field 'size'"),
        ({"type": "mask_rle", "size": [3, 3]}, "missing field 'counts'"),
        ({"type": "mask_rle", "size": [3, 3], "counts": "8"}, "cover 8 pixels"),
        ({"type": "mask_rle", "size": [3, 3], "counts": "\u00ff"}, "invalid character"),
        ({"type": "mask_rle", "size": [3, True], "counts": "9"}, "mask size"),
        ({"type": "mask_rle", "size": [3, -3], "counts": "9"}, "mask size"),
        ({"type": "mask_rle", "size": [3, 3], "counts": [9]}, "counts must be a string"),
        ({"type": "mask", "x": 1}, "unknown type"),
    ],
)
def test_json_malformed_new_types(obj, match):
    with pytest.raises(ValueError, match=match):
        objects_from_json(json.dumps([obj]))


# ---------------------------------------------------------------------------- validation


def test_check_objects_new_reasons():
    w, h = 20, 10
    good = Mask.from_array(np.pad(np.ones((2, 2), bool), ((3, 5), (4, 14))), "m")
    assert good.size == (10, 20)
    assert check_objects([good, Caption("a dog"), Region(0, 0, 20, 10, "all of it")], w, h) is None
    assert check_objects([Mask.from_array(np.ones((20, 10), bool))], w, h) == "mask_size_mismatch"  # transposed
    assert check_objects([Caption("  ")], w, h) == "empty_text"
    assert check_objects([Region(1, 1, 5, 5, "")], w, h) == "empty_text"
    assert check_objects([Region(5, 1, 5, 5, "p")], w, h) == "degenerate_box"
    assert check_objects([Region(1, 1, 21, 5, "p")], w, h) == "coords_out_of_range"
    # first failing object decides, as for points and boxes
    assert check_objects([Caption(""), Point(-1, 0)], w, h) == "empty_text"
    reasons = {check_objects([o], w, h) for o in (Caption(""), Region(5, 1, 5, 5, "p"), Mask.from_array(np.zeros((10, 20))))}
    assert reasons <= set(ALL_REASONS_INVALID_OBJECTS)
