"""PaliGemma <loc> codec: big_vision agreement, round trips, both decode divisors, a parser that never raises."""

import dataclasses
import math
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raytrain.formats.annotations import Box, ParseResult, Point, box_iou
from raytrain.formats.paligemma import (
    NUM_LOC,
    NUM_SEG,
    PARSE_REASONS,
    decode_bin,
    encode_bin,
    loc_token,
    parse,
    render_objects,
    render_prefix,
    seg_token,
)



def fast(n: int = 100) -> settings:
    """n examples, no per-example deadline (the machine is shared and slow)."""
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------- strategies

label_st = st.from_regex(r"[a-z][a-z0-9 _-]{0,14}[a-z]|[a-z]", fullmatch=True)
# the two PaliGemma input sizes used here, and arbitrary source images up to 4000x3000
size_st = st.one_of(
    st.sampled_from([(64, 64), (224, 224)]),
    st.tuples(st.integers(1, 4000), st.integers(1, 3000)),
)


@st.composite
def image_and_points(draw, max_n=5):
    w, h = draw(size_st)
    n = draw(st.integers(1, max_n))
    pts = [Point(draw(st.floats(0, w)), draw(st.floats(0, h)), draw(label_st)) for _ in range(n)]
    return w, h, pts


@st.composite
def image_and_boxes(draw, max_n=5):
    w, h = draw(size_st)
    n = draw(st.integers(1, max_n))
    boxes = []
    for _ in range(n):
        x1, x2 = sorted([draw(st.floats(0, w)), draw(st.floats(0, w))])
        y1, y2 = sorted([draw(st.floats(0, h)), draw(st.floats(0, h))])
        boxes.append(Box(x1, y1, x2, y2, draw(label_st)))
    return w, h, boxes


def bv_bins(yx, sizes):
    """Independent transcription of big_vision's op: clip(round(v / size * 1023), 0, 1023)."""
    v_norm = np.array(yx, dtype=np.float64) / np.array(sizes, dtype=np.float64)
    return np.clip(np.round(v_norm * 1023), 0, 1023).astype(int)


def bv_render(o, w, h):
    if isinstance(o, Point):
        bins = bv_bins([o.y, o.x], [h, w])
    else:
        bins = bv_bins([o.y1, o.x1, o.y2, o.x2], [h, w, h, w])
    return "".join(f"<loc{b:04d}>" for b in bins) + " " + o.label


def check_invariants(res, text, w, h, kind, allowed=None):
    """What must hold for ANY text: the parser's contract."""
    assert isinstance(res, ParseResult)
    assert res.objects or res.errors  # nothing is dropped without a counted reason
    for e in res.errors:
        assert e.reason in PARSE_REASONS, e
        assert isinstance(e.text, str)
        if e.reason != "empty_output":
            assert e.text.strip(), e  # every rejection points at a fragment
    if "empty_output" in [e.reason for e in res.errors]:
        assert res.objects == [] and len(res.errors) == 1
    if not text.strip():
        assert [e.reason for e in res.errors] == ["empty_output"]
    for o in res.objects:
        assert isinstance(o, Point if kind == "point" else Box)
        assert o.label and o.label == o.label.strip() and ";" not in o.label
        if allowed is not None:
            assert o.label in allowed
        xs, ys = ([o.x], [o.y]) if kind == "point" else ([o.x1, o.x2], [o.y1, o.y2])
        assert all(0 <= x <= w for x in xs) and all(0 <= y <= h for y in ys)
        if kind == "box":
            assert o.x1 <= o.x2 and o.y1 <= o.y2
    assert res.valid == (bool(res.objects) and not res.errors)


# ---------------------------------------------------------------------------- tokens and bins


def test_tokens():
    assert (NUM_LOC, NUM_SEG) == (1024, 128)
    assert loc_token(0) == "<loc0000>" and loc_token(7) == "<loc0007>" and loc_token(1023) == "<loc1023>"
    assert seg_token(0) == "<seg000>" and seg_token(127) == "<seg127>"
    for bad in (-1, 1024):
        with pytest.raises(ValueError):
            loc_token(bad)
    for bad in (-1, 128):
        with pytest.raises(ValueError):
            seg_token(bad)


def test_encode_bin_rounds_half_to_even_and_clips():
    assert [encode_bin(v / 1023) for v in (0.5, 1.5, 2.5, 1021.5)] == [0, 2, 2, 1022]
    assert encode_bin(0.49 / 1023) == 0 and encode_bin(0.51 / 1023) == 1
    assert encode_bin(-0.3) == 0 and encode_bin(1.7) == 1023 and encode_bin(1.0) == 1023
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError):
            encode_bin(bad)


def test_decode_bin_divisors():
    assert decode_bin(0) == 0.0 and decode_bin(1023) == 1.0 and decode_bin(512) == 512 / 1023
    assert decode_bin(1023, divisor=1024) == 1023 / 1024 and decode_bin(512, divisor=1024) == 0.5
    with pytest.raises(ValueError):
        decode_bin(5, divisor=1000)


# ---------------------------------------------------------------------------- big_vision agreement


def test_render_exact_example():
    box = Box(200 / 1023 * 640, 100 / 1023 * 480, 400 / 1023 * 640, 300 / 1023 * 480, "red circle")
    objs = [box, Point(320, 240, "blue square")]  # 0.5 * 1023 = 511.5 rounds to the even 512
    assert render_objects(objs, 640, 480) == (
        "<loc0100><loc0200><loc0300><loc0400> red circle ; <loc0512><loc0512> blue square"
    )
    assert render_objects([], 640, 480) == ""


@fast()
@given(
    st.tuples(st.integers(1, 4000), st.integers(1, 3000)),
    st.lists(st.tuples(*[st.floats(-0.3, 1.3)] * 4), min_size=1, max_size=4),
    st.booleans(),
)
def test_render_matches_big_vision_including_clipping(size, rel, as_points):
    # coordinates up to 30% outside the image on every side: the clip must match too
    w, h = size
    if as_points:
        objs = [Point(a * w, b * h, "obj") for a, b, _, _ in rel]
    else:
        objs = [Box(a * w, b * h, c * w, d * h, "obj") for a, b, c, d in rel]
    assert render_objects(objs, w, h) == " ; ".join(bv_render(o, w, h) for o in objs)


@pytest.mark.parametrize("size, pixel_of_k", [(2046, lambda k: 2 * k + 1), (1023, lambda k: k + 0.5)])
def test_render_matches_big_vision_at_exact_half_bins(size, pixel_of_k):
    # pixel / size * 1023 is exactly k + 0.5 here (asserted): round half to even decides
    checked = 0
    for k in range(0, 1023):
        p = pixel_of_k(k)
        assert p / size * 1023 == k + 0.5
        expected_bin = k if k % 2 == 0 else k + 1
        assert bv_bins([p], [size])[0] == expected_bin  # the reference itself rounds half to even
        box = Box(p, p, p, p, "x")
        assert render_objects([box], size, size) == bv_render(box, size, size) == loc_token(expected_bin) * 4 + " x"
        checked += 1
    assert checked == 1023
    # half-up rounding (floor(v + 0.5)) would give bin 1 here, not 0
    assert render_objects([Point(pixel_of_k(0), pixel_of_k(0), "x")], size, size) == "<loc0000><loc0000> x"


def test_render_is_y_before_x():
    # a point at the right edge, top row: x bin 1023, y bin 0
    assert render_objects([Point(100, 0, "p")], 100, 50) == "<loc0000><loc1023> p"
    assert render_objects([Box(0, 10, 100, 50, "b")], 100, 50) == "<loc0205><loc0000><loc1023><loc1023> b"


@pytest.mark.parametrize("label", ["", " cat", "cat ", "a;b", "a <loc0001>", "x<eos>", 3])
def test_render_rejects_labels_that_would_not_parse_back(label):
    with pytest.raises(ValueError, match="cannot be rendered"):
        render_objects([Point(1, 1, label)], 10, 10)


def test_render_rejects_bad_input():
    with pytest.raises(ValueError):
        render_objects([Point(math.nan, 1, "a")], 10, 10)
    with pytest.raises(ValueError):
        render_objects([Box(1, 1, math.inf, 2, "a")], 10, 10)
    with pytest.raises(ValueError):
        render_objects([Point(1, 1, "a")], 0, 10)
    with pytest.raises(TypeError):
        render_objects([(1, 1)], 10, 10)


def test_render_prefix():
    assert render_prefix("point", "red circle") == "point to red circle"
    assert render_prefix("detect", "red circle") == "detect red circle"
    with pytest.raises(ValueError):
        render_prefix("segment", "red circle")


# ---------------------------------------------------------------------------- round trips


@fast(200)
@given(image_and_points())
def test_points_round_trip(case):
    w, h, pts = case
    res = parse(render_objects(pts, w, h), w, h, "point", allowed_labels={p.label for p in pts})
    assert res.valid, res
    assert [p.label for p in res.objects] == [p.label for p in pts]
    for got, want in zip(res.objects, pts):
        # half a bin (the encoder rounds to nearest), well inside the one-bin budget
        assert abs(got.x - want.x) <= 0.5 * w / 1023 + 1e-9
        assert abs(got.y - want.y) <= 0.5 * h / 1023 + 1e-9


@fast(200)
@given(image_and_boxes())
def test_boxes_round_trip(case):
    w, h, boxes = case
    res = parse(render_objects(boxes, w, h), w, h, "box")
    assert res.valid, res
    assert [b.label for b in res.objects] == [b.label for b in boxes]
    for got, want in zip(res.objects, boxes):
        for g, v, size in [(got.x1, want.x1, w), (got.y1, want.y1, h), (got.x2, want.x2, w), (got.y2, want.y2, h)]:
            assert abs(g - v) <= 0.5 * size / 1023 + 1e-9
        # every edge moves at most half a bin, so with sides of bw x bh bins
        # IoU >= (bw-1)(bh-1) / ((bw+1)(bh+1)); >= 0.99 once both sides are >= 400 bins
        bw, bh = want.width / w * 1023, want.height / h * 1023
        if bw >= 1 and bh >= 1:
            assert box_iou(got, want) >= (bw - 1) * (bh - 1) / ((bw + 1) * (bh + 1)) - 1e-9
        if bw >= 400 and bh >= 400:
            assert box_iou(got, want) >= 0.99


@fast(150)
@given(image_and_boxes())
def test_round_trip_with_divisor_1024_is_biased_towards_origin(case):
    w, h, boxes = case
    text = render_objects(boxes, w, h)
    r1023 = parse(text, w, h, "box", divisor=1023)
    r1024 = parse(text, w, h, "box", divisor=1024)
    assert r1024.valid
    for a, b, want in zip(r1023.objects, r1024.objects, boxes):
        for f, size in [("x1", w), ("y1", h), ("x2", w), ("y2", h)]:
            ca, cb, v = getattr(a, f), getattr(b, f), getattr(want, f)
            assert cb == pytest.approx(ca * 1023 / 1024, rel=1e-12, abs=1e-12)
            assert abs(cb - v) <= size * (0.5 / 1023 + 1 / 1024) + 1e-9


def test_known_tokens_under_each_divisor():
    text = "<loc0512><loc0256> cat ; <loc0000><loc0000><loc1023><loc1023> all"
    pts = parse("<loc0512><loc0256> cat", 640, 480, "point")
    assert pts.objects == [Point(256 / 1023 * 640, 512 / 1023 * 480, "cat")]
    pts = parse("<loc0512><loc0256> cat", 640, 480, "point", divisor=1024)
    assert pts.objects == [Point(160.0, 240.0, "cat")]
    boxes = parse(text.split(" ; ")[1], 640, 480, "box")
    assert boxes.objects == [Box(0.0, 0.0, 640.0, 480.0, "all")]
    boxes = parse(text.split(" ; ")[1], 640, 480, "box", divisor=1024)
    assert boxes.objects == [Box(0.0, 0.0, 639.375, 479.53125, "all")]
    with pytest.raises(ValueError):
        parse(text, 640, 480, "box", divisor=1000)


# ---------------------------------------------------------------------------- parser: each reason

L = loc_token
P = L(100) + L(200)  # a point: y bin 100, x bin 200
B = L(100) + L(200) + L(300) + L(400)  # a box


@pytest.mark.parametrize(
    "kind, text, allowed, n_objects, reasons",
    [
        # empty_output
        ("point", "", None, 0, ["empty_output"]),
        ("point", " \n\t ", None, 0, ["empty_output"]),
        ("box", "<eos>", None, 0, ["empty_output"]),
        ("box", "<pad><pad> </s>", None, 0, ["empty_output"]),
        ("box", " ; ;; ", None, 0, ["empty_output"]),  # separators alone: still a counted reason
        ("point", "<eos>" + P + " cat", None, 0, ["empty_output"]),  # nothing before the end of output
        # wrong_token_count
        ("point", L(100) + " cat", None, 0, ["wrong_token_count"]),
        ("point", L(1) + L(2) + L(3) + " cat", None, 0, ["wrong_token_count"]),
        ("box", L(1) + L(2) + L(3) + " cat", None, 0, ["wrong_token_count"]),
        ("box", B + L(5) + " cat", None, 0, ["wrong_token_count"]),
        ("box", P + " cat", None, 0, ["wrong_token_count"]),
        ("point", B + " cat", None, 0, ["wrong_token_count"]),
        ("point", "<loc5000><loc0001> cat", None, 0, ["wrong_token_count"]),  # no such token
        ("point", "<loc012><loc0001> cat", None, 0, ["wrong_token_count"]),
        ("point", "<loc00012><loc0001> cat", None, 0, ["wrong_token_count"]),
        ("point", "<loc" + "9" * 5000 + "><loc0001> cat", None, 0, ["wrong_token_count"]),
        ("point", L(1) + L(2) + L(3), None, 0, ["wrong_token_count"]),  # too many even if cut off
        ("point", L(1) + " ; " + P + " cat", None, 1, ["wrong_token_count"]),
        # truncated_object
        ("box", L(1) + L(2) + L(3), None, 0, ["truncated_object"]),
        ("box", B, None, 0, ["truncated_object"]),
        ("box", B + "  ", None, 0, ["truncated_object"]),
        ("point", P + " cat ; " + L(5), None, 1, ["truncated_object"]),
        ("point", P + " cat ; " + L(5) + "<loc00", None, 1, ["truncated_object"]),
        ("point", P + " cat ; <lo", None, 1, ["truncated_object"]),
        ("point", P + " cat ; <", None, 1, ["truncated_object"]),
        ("point", "<loc1023", None, 0, ["truncated_object"]),
        ("point", P + " cat <loc0", None, 1, ["truncated_object"]),  # a new object was starting
        ("point", P + " cat <lo<eos>", {"cat"}, 0, ["unknown_label"]),  # <eos>: not cut, "<lo" is label text
        # missing_label
        ("point", P + " ; " + P + " cat", None, 1, ["missing_label"]),
        ("point", P + ";" + P + " cat", None, 1, ["missing_label"]),
        ("point", P + "<eos>", None, 0, ["missing_label"]),  # ended on purpose: not cut off
        ("box", B + " </s><pad>", None, 0, ["missing_label"]),
        # unknown_label
        ("point", P + " dog", {"cat"}, 0, ["unknown_label"]),
        ("point", P + " cat ; " + P + " Cat", {"cat"}, 1, ["unknown_label"]),
        ("box", B + " cats", ("cat", "dog"), 0, ["unknown_label"]),
        # invalid_box
        ("box", L(300) + L(200) + L(100) + L(400) + " cat", None, 0, ["invalid_box"]),  # y2 < y1
        ("box", L(100) + L(400) + L(300) + L(200) + " cat", None, 0, ["invalid_box"]),  # x2 < x1
        ("box", L(5) + L(5) + L(5) + L(5) + " dot", None, 1, []),  # zero size is returned, not rejected
        # garbage
        ("point", "hello", None, 0, ["garbage"]),
        ("point", "I see no cat.", None, 0, ["garbage"]),
        ("point", "the answer ; " + P + " cat", None, 1, ["garbage"]),
        ("point", "junk " + P + " cat", None, 1, ["garbage"]),
        ("point", P + " cat ; and more", None, 1, ["garbage"]),
        ("point", "<seg001><seg002> cat", None, 0, ["garbage"]),
        # several at once, in text order
        ("point", "x ; " + L(1) + " a ; " + P + " ; " + P + " b ; " + P + " c ; " + L(1) + L(2), {"b"}, 1,
         ["garbage", "wrong_token_count", "missing_label", "unknown_label", "truncated_object"]),
    ],
)
def test_parse_reasons(kind, text, allowed, n_objects, reasons):
    res = parse(text, 640, 480, kind, allowed_labels=allowed)
    assert [e.reason for e in res.errors] == reasons, res
    assert len(res.objects) == n_objects, res
    check_invariants(res, text, 640, 480, kind, allowed)


def test_parse_error_fragments():
    res = parse("hi ; " + L(1) + " a ; " + P + " cat ; " + L(3) + "<lo", 640, 480, "point")
    assert [(e.reason, e.text) for e in res.errors] == [
        ("garbage", "hi"),
        ("wrong_token_count", L(1) + " a"),
        ("truncated_object", L(3) + "<lo"),
    ]
    assert [o.label for o in res.objects] == ["cat"]
    assert parse("  ", 64, 64, "point").errors[0].text == "  "


def test_parse_covers_every_reason():
    # keep the reason table above in step with PARSE_REASONS
    assert set(PARSE_REASONS) == {
        "wrong_token_count", "truncated_object", "missing_label", "unknown_label",
        "invalid_box", "garbage", "empty_output",
    }


# ---------------------------------------------------------------------------- parser: tolerance

WANT = [Point(200 / 1023 * 640, 100 / 1023 * 480, "cat")]


@pytest.mark.parametrize(
    "text",
    [
        P + " cat",
        "  " + P + " cat \n",
        P + "cat",  # no space between locs and label
        P + " cat<eos>",
        P + " cat<eos><pad><pad>",
        "<pad><pad>" + P + " cat </s>",
        "<bos>" + P + " cat",
        L(100) + " " + L(200) + "  cat",  # whitespace between locs
        P + " cat ;",  # trailing separator
        " ; " + P + " cat",
        P + " cat<eos> anything after the end is not output " + L(3),
    ],
)
def test_parse_tolerates_remnants_and_spacing(text):
    res = parse(text, 640, 480, "point", allowed_labels={"cat"})
    assert res.valid, res
    assert res.objects == WANT


def test_parse_missing_separator_and_mask_tokens():
    res = parse(P + " cat" + L(300) + L(400) + " dog", 640, 480, "point")
    assert res.valid and [o.label for o in res.objects] == ["cat", "dog"]
    segs = "".join(seg_token(i) for i in range(16))
    res = parse(B + segs + " cat ; " + B + " dog", 640, 480, "box")
    assert res.valid and [o.label for o in res.objects] == ["cat", "dog"]
    assert res.objects[0] == dataclasses.replace(res.objects[1], label="cat")


def test_parse_rejects_bad_arguments():
    for kwargs in ({"kind": "mask"}, {"kind": "point", "divisor": 1000}, {"kind": "point", "width": 0}):
        args = {"text": P + " cat", "width": 64, "height": 64, **kwargs}
        with pytest.raises(ValueError):
            parse(**args)


# ---------------------------------------------------------------------------- parser: never raises


@fast(40)
@given(st.one_of(image_and_points(max_n=4), image_and_boxes(max_n=4)))
def test_truncation_at_every_position(case):
    # cut the rendered text at every character: objects before the cut come back exactly,
    # an object cut inside its label comes back with the label's prefix, an object cut
    # inside its locs is one "truncated_object" and nothing else
    w, h, objs = case
    kind = "point" if isinstance(objs[0], Point) else "box"
    n_chars_locs = 9 * (2 if kind == "point" else 4)  # len("<loc0000>") == 9
    full = parse(render_objects(objs, w, h), w, h, kind).objects
    parts = [render_objects([o], w, h) for o in objs]
    text = " ; ".join(parts)
    starts = [sum(len(p) + 3 for p in parts[:k]) for k in range(len(parts))]
    for i in range(len(text) + 1):
        res = parse(text[:i], w, h, kind)
        check_invariants(res, text[:i], w, h, kind)
        if i == 0:
            assert [e.reason for e in res.errors] == ["empty_output"]
            continue
        k = max(j for j, s in enumerate(starts) if s < i)  # the object the cut falls in or after
        label_start, end = starts[k] + n_chars_locs + 1, starts[k] + len(parts[k])
        if i <= label_start:  # no label character yet
            assert res.objects == full[:k] and [e.reason for e in res.errors] == ["truncated_object"], (i, res)
        elif i <= end:
            cut = dataclasses.replace(full[k], label=objs[k].label[: i - label_start].strip())
            assert res.objects == full[:k] + [cut] and res.errors == [], (i, res)
        else:  # inside the " ; " after object k
            assert res.objects == full[: k + 1] and res.errors == [], (i, res)


_SOUP = [L(0), L(5), L(1023), "<loc5000>", "<loc12>", "<loc", "<lo", "<", ">", "<seg005>", ";", " ; ", " ", "\n",
         "cat", "red circle", "<eos>", "</s>", "<pad>", "<bos>", "٣", "<loc٠١٢٣>", "\x00", "é"]


@fast(1000)
@given(
    st.one_of(
        st.text(max_size=200),
        st.lists(st.one_of(st.sampled_from(_SOUP), st.text(max_size=4)), max_size=40).map("".join),  # token soup
    ),
    st.sampled_from(["point", "box"]),
    st.sampled_from([None, {"cat"}]),
    st.sampled_from([1023, 1024]),
)
def test_parser_never_raises_on_random_text(text, kind, allowed, divisor):
    res = parse(text, 640, 480, kind, allowed_labels=allowed, divisor=divisor)
    check_invariants(res, text, 640, 480, kind, allowed)


_PIECE = re.compile(r"(<loc\d{4}>| ; |\s+)")


def mutate(text: str, rng) -> str:
    """1-4 random edits at token level: duplicate, delete, swap, or insert junk."""
    pieces = [p for p in _PIECE.split(text) if p]
    for _ in range(rng.randint(1, 4)):
        op = rng.choice(["dup", "del", "junk", "swap"])
        i = rng.randrange(len(pieces)) if pieces else 0
        if op == "dup" and pieces:
            pieces.insert(i, pieces[i])
        elif op == "del" and pieces:
            del pieces[i]
        elif op == "junk":
            junk = "".join(chr(rng.randrange(32, 0x3000)) for _ in range(3))
            junk = rng.choice(_SOUP) if rng.random() < 0.7 else junk
            pieces.insert(i, junk)
        elif op == "swap" and len(pieces) > 1:
            j = rng.randrange(len(pieces))
            pieces[i], pieces[j] = pieces[j], pieces[i]
    return "".join(pieces)


@fast(150)
@given(st.one_of(image_and_points(max_n=3), image_and_boxes(max_n=3)), st.randoms(use_true_random=False))
def test_parser_never_raises_on_mutated_outputs(case, rng):
    # 150 valid outputs x 20 mutants each: 3,000 parses, cheaper than 3,000 hypothesis examples
    w, h, objs = case
    kind = "point" if isinstance(objs[0], Point) else "box"
    labels = {o.label for o in objs}
    text = render_objects(objs, w, h)
    for n in range(20):
        bad = mutate(text, rng)
        allowed = labels if n % 2 else None
        res = parse(bad, w, h, kind, allowed_labels=allowed)
        check_invariants(res, bad, w, h, kind, allowed)
