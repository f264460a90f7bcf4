"""Molmo / PixMo-Points codec: Molmo's rendering conventions, round trips at the render precision,
every prefix of a cut answer, the "nothing found" answer, model-output quirks, and a parser that
never raises."""

import math
import random
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raytrain.formats.annotations import ParseResult, Point
from raytrain.formats.molmo import NOTHING_FOUND, PARSE_REASONS, parse, render_points


def fast(n: int = 100) -> settings:
    """n examples, no per-example deadline (the machine is shared and slow)."""
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# labels with the characters that need care: quotes, apostrophes, &, <, >, entities-lookalikes, unicode
label_st = st.from_regex(r"[a-zé犬][a-z0-9 _'\"&<>;#é犬-]{0,14}[a-z犬]|[a-z]", fullmatch=True)
size_st = st.tuples(st.integers(1, 5000), st.integers(1, 5000))


def check_invariants(res, w, h):
    """What must hold for ANY text: the parser's contract."""
    assert isinstance(res, ParseResult)
    for e in res.errors:
        assert e.reason in PARSE_REASONS, e
        assert isinstance(e.text, str)
    for o in res.objects:
        assert isinstance(o, Point)
        assert math.isfinite(o.x) and math.isfinite(o.y)
        assert 0 <= o.x <= w and 0 <= o.y <= h  # 0-100 percent only
        assert o.label == o.label.strip()


def pct(v, side, d):
    """The percent value Molmo writes for pixel v (independent of the code under test)."""
    return round(min(max(v * 100 / side, 0.0), 100.0), d)


# ---------------------------------------------------------------------------- rendering


def test_render_is_molmos_format():
    # one point: <point x y alt>label</point>, one decimal (Molmo's `{x:0.1f}`)
    assert render_points([Point(78.08, 39.16, "sky")], 200, 100) == '<point x="39.0" y="39.2" alt="sky">sky</point>'
    # seed 000's targets: PixMo's two decimals
    assert render_points([Point(78.08, 39.16, "sky")], 200, 100, decimals=2) == '<point x="39.04" y="39.16" alt="sky">sky</point>'
    # several: x1 y1 x2 y2 ..., sorted by x then y, then alt
    pts = [Point(50, 20, "men"), Point(10, 20, "men"), Point(10, 5, "men")]
    assert render_points(pts, 100, 100) == (
        '<points x1="10.0" y1="5.0" x2="10.0" y2="20.0" x3="50.0" y3="20.0" alt="men">men</points>'
    )
    # the edge is exactly 100; outside the image clips to 0 / 100
    assert render_points([Point(-5, 150, "a")], 100, 100) == '<point x="0.0" y="100.0" alt="a">a</point>'
    assert render_points([Point(640, 480, "a")], 640, 480, decimals=0) == '<point x="100" y="100" alt="a">a</point>'


def test_render_nothing_found_labels_and_groups():
    assert render_points([], 100, 100) == NOTHING_FOUND == "There are none."
    assert render_points([], 100, 100, nothing_found="Normal") == "Normal"
    # `label` names every point; without it, one element per label, in label order
    assert render_points([Point(1, 2, "x"), Point(3, 4, "y")], 100, 100, label="dog").count("<") == 2  # one element
    two = render_points([Point(30, 40, "dog"), Point(10, 20, "cat")], 100, 100)
    assert two == '<point x="10.0" y="20.0" alt="cat">cat</point> <point x="30.0" y="40.0" alt="dog">dog</point>'
    # apostrophes as Molmo writes them; only & < > " become entities
    assert 'alt="man\'s hat">man\'s hat<' in render_points([Point(1, 1, "man's hat")], 10, 10)
    assert 'alt="a &quot;b&quot; &amp; &lt;c&gt;"' in render_points([Point(1, 1, 'a "b" & <c>')], 10, 10)


@pytest.mark.parametrize("label", ["", " padded", "trailing ", None, 3])
def test_render_rejects_unreadable_labels(label):
    with pytest.raises((ValueError, TypeError)):
        render_points([Point(1, 1, label)], 10, 10)


def test_render_rejects_bad_input():
    for kwargs in ({"width": 0}, {"height": -1}, {"decimals": -1}, {"decimals": 1.5}, {"decimals": True}):
        args = {"points": [Point(1, 1, "a")], "width": 10, "height": 10, **kwargs}
        with pytest.raises(ValueError):
            render_points(**args)
    with pytest.raises(ValueError):
        render_points([Point(math.nan, 1, "a")], 10, 10)
    with pytest.raises(TypeError):
        render_points([(1, 1)], 10, 10)


# ---------------------------------------------------------------------------- round trips


@st.composite
def image_and_points(draw, max_n=6):
    w, h = draw(size_st)
    labels = draw(st.lists(label_st, min_size=1, max_size=3))
    pts = [Point(draw(st.floats(0, w)), draw(st.floats(0, h)), draw(st.sampled_from(labels))) for _ in range(draw(st.integers(1, max_n)))]
    return w, h, pts


@fast(300)
@given(image_and_points(), st.sampled_from([1, 2, 3]))
def test_round_trip_within_render_precision(data, d):
    """parse(render(points)) gives every point back, label included, within half a unit of the last
    printed decimal of percent (0.05 % of the side at Molmo's 1 decimal, 0.005 % at seed 000's 2)."""
    w, h, pts = data
    res = parse(render_points(pts, w, h, decimals=d), w, h)
    assert not res.errors and len(res.objects) == len(pts)
    want = sorted(pts, key=lambda p: (p.label, pct(p.x, w, d), pct(p.y, h, d)))
    tol = 0.5 * 10**-d / 100 * (1 + 1e-9)
    for a, b in zip(want, res.objects):
        assert b.label == a.label
        assert abs(b.x - a.x) <= tol * w + 1e-9 and abs(b.y - a.y) <= tol * h + 1e-9
        assert b.x == pytest.approx(pct(a.x, w, d) * w / 100, abs=1e-9 * w)  # exactly what was printed


@fast(100)
@given(size_st, st.sampled_from([None, "nothing", "Normal"]))
def test_nothing_found_round_trip(size, text):
    """Negatives: the "nothing found" rendering parses to zero objects and NO error."""
    w, h = size
    rendered = render_points([], w, h) if text is None else render_points([], w, h, nothing_found=text)
    kwargs = {} if text is None else {"nothing_found": [text]}
    assert parse(rendered, w, h, **kwargs) == ParseResult([], [])


# ---------------------------------------------------------------------------- truncation


def _expected_prefix(full: str, k: int, w: int, h: int) -> list[Point]:
    """Points a parse of full[:k] must return: each pair whose x_i="..." and y_i="..." both end
    before the cut, labelled when the element's alt="..." ends before it (else "")."""
    out = []
    for el in re.finditer(r"<points?\b[^>]*>[^<]*</points?>", full):
        attrs = {m.group(1): (m.group(2), el.start() + m.end()) for m in re.finditer(r'(\w+)="([^"]*)"', el.group())}
        alt, alt_end = attrs["alt"]
        for name, (x, xe) in attrs.items():
            if name[0] == "x":
                y, ye = attrs["y" + name[1:]]
                if max(xe, ye) <= k:
                    label = alt.replace("&amp;", "&") if alt_end <= k else ""
                    out.append(Point(float(x) * w / 100, float(y) * h / 100, label))
    return out


@pytest.mark.parametrize("d", [1, 2])
def test_truncated_answer_keeps_every_complete_pair(d):
    """Every prefix of a rendered answer (generation cut at any character) returns exactly the pairs
    complete before the cut, labelled once their alt is complete, and says truncated_object."""
    pts = [Point(10, 20, "men"), Point(60, 20, "men"), Point(33.3, 90, "men"), Point(5, 5, "salt & pepper")]
    w, h = 640, 480
    full = render_points(pts, w, h, decimals=d)
    assert full.count("<point") == 2
    for k in range(len(full) + 1):
        cut = full[:k]
        res = parse(cut, w, h)
        check_invariants(res, w, h)
        want = _expected_prefix(full, k, w, h)
        assert [(o.label, round(o.x, 6), round(o.y, 6)) for o in res.objects] == [
            (o.label, round(o.x, 6), round(o.y, 6)) for o in want
        ], cut
        reasons = [e.reason for e in res.errors]
        assert set(reasons) <= {"truncated_object", "empty_output"}, (cut, res.errors)
        if 0 < k < len(full) and not cut.endswith(("</points>", "</point>", "</points> ", "</point> ")):
            assert "truncated_object" in reasons, cut
        if k == len(full):
            assert not reasons


def test_seed_000_parse_failure_is_recovered():
    """Seed 000 logged this output (its table 4) as "Could not parse model output"."""
    res = parse('<points x1="19.0" y1="50.0" x2="31.0" y2="50.0" ... x7', 200, 100)
    assert res.objects == [Point(38.0, 50.0, ""), Point(62.0, 50.0, "")]
    assert [e.reason for e in res.errors] == ["truncated_object"]


def test_cut_before_label_keeps_points_whatever_allowed_labels():
    text = '<points x1="10" y1="20" x2="30" y2="40" al'
    res = parse(text, 100, 100, allowed_labels={"men"})
    assert [(o.x, o.y, o.label) for o in res.objects] == [(10, 20, ""), (30, 40, "")]
    # once alt is complete it is checked
    res = parse('<points x1="10" y1="20" x2="30" y2="40" alt="dog">do', 100, 100, allowed_labels={"men"})
    assert res.objects == [] and [e.reason for e in res.errors] == ["unknown_label"]


# ---------------------------------------------------------------------------- parser behaviour


def _read(text, allowed=None, **kwargs):
    res = parse(text, 200, 100, allowed_labels=allowed, **kwargs)
    check_invariants(res, 200, 100)
    return [(o.x, o.y, o.label) for o in res.objects], [e.reason for e in res.errors]


@pytest.mark.parametrize(
    "text, points, reasons",
    [
        # seed 000's successful output has no alt: the text is the label
        ('<point x="39.04" y="39.16">sky</point>', [(78.08, 39.16, "sky")], []),
        ('<point x="50" y="50" alt="sky">sky</point>', [(100.0, 50.0, "sky")], []),
        # pairs out of order: matched by index, returned in index order
        ('<points y2="20" x1="10" y1="30" x2="40" alt="a">a</points>', [(20.0, 30.0, "a"), (80.0, 20.0, "a")], []),
        ('<point y="10" x="20" alt="a">a</point>', [(40.0, 10.0, "a")], []),
        # a missing yN, a non-numeric value, a value given twice: that pair only
        ('<points x1="10" y1="20" x2="30" alt="a">a</points>', [(20.0, 20.0, "a")], ["bad_coordinates"]),
        ('<points x1="abc" y1="20" x2="30" y2="40" alt="a">a</points>', [(60.0, 40.0, "a")], ["bad_coordinates"]),
        ('<points x1="1" y1="2" x1="3" y2="4" x2="5" alt="a">a</points>', [(10.0, 4.0, "a")], ["bad_coordinates"]),
        ('<point x="nan" y="1" alt="a">a</point>', [], ["bad_coordinates"]),
        ('<point x="1e2" y="1" alt="a">a</point>', [], ["bad_coordinates"]),
        ('<point x="" y="1" alt="a">a</point>', [], ["bad_coordinates"]),
        ('<point alt="a">a</point>', [], ["bad_coordinates"]),
        (' <point x=" 12.5 " y="1." alt="a">a</point>', [(25.0, 1.0, "a")], []),  # Molmo's reader allows the spaces
        # outside 0-100 percent: rejected (Molmo's extract_points drops them too); the edges are in
        ('<points x1="100.5" y1="2" x2="0" y2="100" alt="a">a</points>', [(0.0, 100.0, "a")], ["out_of_range"]),
        ('<point x="-1" y="2" alt="a">a</point>', [], ["out_of_range"]),
        ('<point x="640" y="480" alt="a">a</point>', [], ["out_of_range"]),  # pixels, not percent
        # labels: alt first, else the text; entities decoded
        ('<point x="1" y="2" alt="dog">a dog</point>', [(2.0, 2.0, "dog")], []),
        ('<point x="1" y="2" alt="">dog</point>', [(2.0, 2.0, "dog")], []),
        ('<point x="1" y="2" alt="salt &amp; pepper">salt &amp; pepper</point>', [(2.0, 2.0, "salt & pepper")], []),
        ('<point x="1" y="2" alt="man&#39;s hat">x</point>', [(2.0, 2.0, "man's hat")], []),
        ('<point x="1" y="2" alt="a &quot;b&quot; &lt;c&gt;">x</point>', [(2.0, 2.0, 'a "b" <c>')], []),
        ('<point x="1" y="2" alt=" "> </point>', [], ["missing_label"]),
        ('<point x="1" y="2"></point>', [], ["missing_label"]),
        # several elements, text and fences around them
        (
            (
                'Counting the <points x1="10" y1="10" x2="20" y2="20" alt="men">men</points> and '
                '<point x="50" y="50" alt="dog">dog</point> shows a total of 3.'
            ),
            [(20.0, 10.0, "men"), (40.0, 20.0, "men"), (100.0, 50.0, "dog")],
            [],
        ),
        ('```html\n<point x="50" y="50" alt="a">a</point>\n```', [(100.0, 50.0, "a")], []),
        ('<point x="1" y="2" alt="a">a</point><point x="3" y="4" alt="b">b</point>', [(2.0, 2.0, "a"), (6.0, 4.0, "b")], []),
        # syntax variations
        ("<point x='1' y='2' alt='a'>a</point>", [(2.0, 2.0, "a")], []),
        ('<point x="1" y="2" alt="a"/>', [(2.0, 2.0, "a")], []),
        ('<point x = "1"  y= "2" alt="a" id="7">a</point >', [(2.0, 2.0, "a")], []),  # extra attributes ignored
        ('<point x="1" y="2" alt="a">a</points>', [(2.0, 2.0, "a")], []),  # close tag of the other form
        ('<points x1="1" y1="2" foo x2="3" y2="4" alt="a">a</points>', [(2.0, 2.0, "a"), (6.0, 4.0, "a")], ["malformed_tag"]),
        ('<point x="1" y="2" <point x="3" y="4" alt="b">b</point>', [(6.0, 4.0, "b")], ["missing_label"]),
        ('<point x="1" y="2" alt="a">a <point x="3" y="4" alt="b">b</point>', [(2.0, 2.0, "a"), (6.0, 4.0, "b")], []),
        # end tokens: the answer stops at the first one
        ('<point x="1" y="2" alt="a">a</point><eos><point x="3" y="4" alt="b">b</point>', [(2.0, 2.0, "a")], []),
        ('<bos><point x="1" y="2" alt="a">a<|im_end|>', [(2.0, 2.0, "a")], []),  # no close tag, but it ended there
        ('<points x1="1" y1="2" x2="3<eos>', [(2.0, 2.0, "")], ["malformed_tag"]),
        ('<point x="1" y="2" alt="a">a</point> <poi', [(2.0, 2.0, "a")], ["truncated_object"]),
        ('<point x="1" y="2" alt="a">a</point> <poi<eos>', [(2.0, 2.0, "a")], []),
        # answers without points
        ("There are none.", [], []),
        ("there are none", [], []),
        ("  There   are none!  <eos>", [], []),
        ("This isn\u2019t in the image.", [], []),
        ("```\nThere are none.\n```", [], []),
        ("Normal", [], ["garbage"]),
        ("I see a boat.", [], ["garbage"]),
        ("<pointer x=1>", [], ["garbage"]),
        ("", [], ["empty_output"]),
        ("  <eos> There are none.", [], ["empty_output"]),
        ("<pad><pad>", [], ["empty_output"]),
    ],
)
def test_parse_cases(text, points, reasons):
    got_points, got_reasons = _read(text)
    assert got_reasons == reasons
    assert [(pytest.approx(x), pytest.approx(y), lab) for x, y, lab in points] == got_points


def test_configurable_nothing_found_and_allowed_labels():
    assert _read("Normal", nothing_found=["Normal"]) == ([], [])
    assert _read("normal.", nothing_found="Normal") == ([], [])  # one string is one answer, not its letters
    assert _read("There are none.", nothing_found=["Normal"]) == ([], ["garbage"])
    both = '<point x="1" y="2" alt="the red car">car</point>'
    assert _read(both, allowed={"car"}) == ([(2.0, 2.0, "car")], [])  # the text when only it is allowed
    assert _read(both, allowed={"the red car", "car"}) == ([(2.0, 2.0, "the red car")], [])
    assert _read(both, allowed={"dog"}) == ([], ["unknown_label"])


def test_parse_rejects_bad_size():
    for w, h in ((0, 10), (10, -1)):
        with pytest.raises(ValueError):
            parse("There are none.", w, h)


# ---------------------------------------------------------------------------- fuzz

_PIECES = [
    "<", ">", "/", "=", '"', "'", " ", "\n", "<point", "<points", "</point>", "</points>", "/>", 'x="', 'y="',
    'x1="', 'y1="', 'x12="', ' alt="', "12.5", "100", "100.1", "-3", "nan", "&amp;", "&#39;", "&", "<eos>",
    "<|im_end|>", "<pad>", "There are none.", "```", "é", "犬", "\x00", "<<<<", '""""',
]


def _mutate(rng: random.Random, s: str) -> str:
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        i = rng.randint(0, len(s))
        if op == 0:
            s = s[:i]  # truncate
        elif op == 1 and s:
            s = s[:i] + s[min(len(s), i + rng.randint(1, 6)) :]  # delete a run
        elif op == 2:
            s = s[:i] + rng.choice(_PIECES) + s[i:]  # insert a structural piece
        elif op == 3 and s:
            s = s[:i] + chr(rng.randint(32, 0x2FF)) + s[i + 1 :]  # replace a character
        else:
            s = s + s[: rng.randint(0, len(s))]  # repeat (the model loops)
    return s


def test_fuzz_parser_never_raises():
    """Thousands of mutated answers and random strings: no exception, every rejection has a known
    reason, every point is finite and in the image, and nothing vanishes without a reason unless the
    text is a "nothing found" answer."""
    rng = random.Random(1234)
    bases = [
        render_points([Point(3, 4, "red circle"), Point(50, 60, "red circle"), Point(90, 10, "a \"b\" & c")], 100, 100, decimals=d)
        for d in (1, 2)
    ] + ['Counting the <points x1="1.0" y1="2.0" x2="3.0" y2="4.0" alt="men">men</points> shows a total of 2.']
    n = 0
    for _ in range(3000):
        if rng.random() < 0.85:
            text = _mutate(rng, rng.choice(bases))
        else:
            text = "".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 30)))
        res = parse(text, 100, 100, allowed_labels={"red circle", "men"} if rng.random() < 0.3 else None)
        check_invariants(res, 100, 100)
        if not res.objects and not res.errors:
            assert "none" in text.lower() or "in the image" in text.lower(), text
        n += 1
    assert n == 3000


@fast(300)
@given(st.text(max_size=200))
def test_fuzz_arbitrary_text(text):
    res = parse(text, 640, 480)
    check_invariants(res, 640, 480)


def test_parser_survives_pathological_inputs():
    texts = [
        "<point " * 20000,
        "<points x1=\"" * 5000,
        '<point x="' + "9" * 6000 + '" y="1" alt="a">a</point>',
        "<" * 20000,
        '"' * 20000,
        "<point x=" * 10000,
        '<points ' + " ".join(f'x{i}="1" y{i}="2"' for i in range(5000)) + ' alt="a">a</points>',
        "<point a " + "a= " * 10000,
    ]
    for text in texts:
        t0 = time.perf_counter()
        check_invariants(parse(text, 100, 100), 100, 100)
        assert time.perf_counter() - t0 < 5, text[:40]
