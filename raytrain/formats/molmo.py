"""Molmo / PixMo-Points pointing codec on strings only (no tokenizer, no torch).

Format (Molmo's ``DataFormatter.points_to_text`` in allenai/molmo ``olmo/data/data_formatter.py``,
the targets seed 000 trained on), coordinates in PERCENT of the image width / height (0-100)::

    <point x="39.0" y="39.2" alt="sky">sky</point>                       one point
    <points x1="10.5" y1="20.1" x2="61.0" y2="20.4" alt="men">men</points>   several
    There are none.                                                      no point

Rendering follows Molmo: ``percent = pixel * 100 / side``, rounded to ``decimals`` (Molmo: 1;
seed 000 kept PixMo's 2, ``"39.04"``) and printed with exactly that many; points sorted by
(x, y) of the rounded values; ``x`` before ``y``, then ``alt``; the label both as ``alt`` and as
the element's text; zero points as ``NOTHING_FOUND``. Molmo prints labels raw; here ``&``, ``<``,
``>`` and ``"`` are written as entities so any label reads back (other labels are unchanged).
Points of several labels become one element per label, separated by a space.

Parsing never raises on model text: ``parse`` returns every point it could read (in source
pixels) and a ``ParseError`` (reason from ``PARSE_REASONS``) per element or point it rejected.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Collection, Sequence

from raytrain.formats.annotations import (
    Obj,
    ParseError,
    ParseResult,
    Point,
    answer_body,
)
from raytrain.formats.numbers import NumberSpan, SpanWriter

DECIMALS = 1  # Molmo's `{x:0.1f}`
NOTHING_FOUND = "There are none."  # Molmo's answer to a pointing question with no point
# Answers without points that say "nothing found" (not a format failure): Molmo's, and the one its
# pointing prompt templates ask for ("Please say 'This isn't in the image.' if it is not in the image.")
NOTHING_FOUND_ANSWERS = (NOTHING_FOUND, "This isn't in the image.")

PARSE_REASONS = (
    "truncated_object",  # the text stops inside an element (its complete (x_i, y_i) pairs are kept) or a tag
    "malformed_tag",  # an element broken otherwise: junk in its tag, or an end token inside it
    "bad_coordinates",  # x_i / y_i not a number, without its partner, given twice, or no coordinate at all
    "out_of_range",  # a coordinate outside 0-100 percent
    "missing_label",  # a complete element with neither alt nor text
    "unknown_label",  # neither alt nor text in allowed_labels
    "garbage",  # an answer with no point element that is not a "nothing found" answer
    "empty_output",  # nothing but whitespace and special-token remnants
)

# ---------------------------------------------------------------------------- rendering


def _escape(label: str) -> str:
    # The minimal XML set, so quotes cannot end `alt` and `<` cannot open a tag; apostrophes stay
    # as Molmo writes them ("man's hat" is common, html.escape would turn it into &#x27;).
    return label.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _check_label(label: str) -> None:
    # the parser strips labels and reads an empty one as missing: refuse targets it would change
    if not isinstance(label, str) or not label or label != label.strip():
        raise ValueError(f"label {label!r} cannot be rendered: it must be a non-empty string without surrounding whitespace")


def _element(pcts: list[tuple[float, float]], label: str, decimals: int, out: SpanWriter) -> None:
    """One element's text, its percent numbers' spans recorded by `out`."""
    esc = _escape(label)
    if len(pcts) == 1:
        x, y = pcts[0]
        out.put('<point x="'), out.number(f"{x:.{decimals}f}", 100.0), out.put('" y="'), out.number(f"{y:.{decimals}f}", 100.0)
        out.put(f'" alt="{esc}">{esc}</point>')
        return
    out.put("<points")
    for i, (x, y) in enumerate(pcts, start=1):
        out.put(f' x{i}="'), out.number(f"{x:.{decimals}f}", 100.0), out.put(f'" y{i}="'), out.number(f"{y:.{decimals}f}", 100.0)
        out.put('"')
    out.put(f' alt="{esc}">{esc}</points>')


def render_points(
    points: Sequence[Point],
    width: int,
    height: int,
    label: str | None = None,
    decimals: int = DECIMALS,
    nothing_found: str = NOTHING_FOUND,
) -> str:
    """Target text for points in source pixels (see `render_points_spans`)."""
    return render_points_spans(points, width, height, label, decimals, nothing_found)[0]


def render_points_spans(
    points: Sequence[Point],
    width: int,
    height: int,
    label: str | None = None,
    decimals: int = DECIMALS,
    nothing_found: str = NOTHING_FOUND,
) -> tuple[str, list[NumberSpan]]:
    """Target text for points in source pixels of a ``width`` x ``height`` image, and the span of
    every percent number in it (formats/numbers.py: what the distance-aware number loss weighs).

    ``label`` names them all (one element); without it each point's own label is used, one
    element per label in label order. Coordinates outside the image are clipped to its edge
    (0 / 100 percent). No points: ``nothing_found``. Raises ValueError for non-finite
    coordinates, unrenderable labels, a bad size or ``decimals``; TypeError for non-points.
    """
    if not (width > 0 and height > 0):
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if isinstance(decimals, bool) or not isinstance(decimals, int) or not 0 <= decimals <= 6:
        raise ValueError(f"decimals must be an int in 0..6, got {decimals!r}")
    groups: dict[str, list[tuple[float, float]]] = {}
    for p in points:
        if not isinstance(p, Point):
            raise TypeError(f"expected Point, got {type(p).__name__}")
        if not (math.isfinite(p.x) and math.isfinite(p.y)):
            raise ValueError(f"cannot render non-finite coordinates of {p}")
        name = p.label if label is None else label
        _check_label(name)
        # v * 100 / side (not v * (100 / side)): the image edge is exactly 100
        pct = tuple(round(min(max(v * 100 / side, 0.0), 100.0), decimals) for v, side in ((p.x, width), (p.y, height)))
        groups.setdefault(name, []).append(pct)
    if not groups:
        return nothing_found, []
    out = SpanWriter()
    for i, name in enumerate(sorted(groups)):
        out.put(" " if i else "")
        _element(sorted(groups[name]), name, decimals, out)
    return out.text(), out.spans


# ---------------------------------------------------------------------------- parsing
# Lexing, after cutting at the first end token and dropping <pad> / <bos> / <|im_start|>:
#   element := "<point" | "<points"  attr* ( ">" text ( "</point>" | "</points>" )? | "/>" )
#   attr    := name = "value" | name = 'value'      x / y / xN / yN / alt; others are ignored
# Text outside elements is ignored (Molmo answers "Counting the <points ...>men</points> shows a
# total of 3."), so fences and prose around an answer cost nothing.

_END = re.compile(r"<eos>|</s>|<\|im_end\|>|<\|endoftext\|>")
_REMNANTS = re.compile(r"<pad>|<bos>|<\|im_start\|>")
_OPEN = re.compile(r"<points?(?=[\s/>]|$)")
_ATTR = re.compile(r"""\s*([A-Za-z_][A-Za-z0-9_-]{0,40})\s*=\s*(?:"([^"<>]{0,2000})"|'([^'<>]{0,2000})')""")
_TAG_END = re.compile(r"\s*(/?>)")
# what an attribute looks like when the text was cut inside it: `x3`, `x3=`, `x3="12.`, `alt="sk`
_PARTIAL_ATTR = re.compile(r"""\s*(?:[A-Za-z_][A-Za-z0-9_-]{0,40}\s*(?:=\s*(?:"[^"<>]*|'[^'<>]*)?)?\s*|/)?""")
_NEXT_TAG = re.compile(r"\s*<")
_JUNK = re.compile(r"\s*[^\s<>]+")
_CLOSE = re.compile(r"</points?\s*>")
_PARTIAL_CLOSE = re.compile(r"<(?:/(?:p(?:o(?:i(?:n(?:t(?:s)?)?)?)?)?)?)?\s*")
_PARTIAL_OPEN = re.compile(r"<(?:p(?:o(?:i(?:n)?)?)?)?")  # "<point" itself is an (empty, cut) element
_COORD = re.compile(r"([xy])([0-9]{0,6})")
# A strict number: no "nan", "inf", "1_000", exponents; Molmo's own reader allows spaces inside quotes
_NUMBER = re.compile(r"\s*(-?(?:[0-9]{1,20}(?:\.[0-9]{0,20})?|\.[0-9]{1,20}))\s*")


class _Element:
    """One ``<point>`` / ``<points>`` element as lexed from the text."""

    __slots__ = ("attrs", "broken", "cut", "inner", "junk", "text", "unfinished")

    def __init__(self) -> None:
        self.attrs: list[tuple[str, str, str]] = []  # (name, raw value, source)
        self.junk: list[str] = []  # text in the tag that is not an attribute
        self.cut = False  # the text ends before the element does (no end token): truncated
        self.unfinished = False  # the text or an end token ends inside its tag (before ">")
        self.broken = False  # the tag never closed: another "<" came first, or an end token
        self.inner: str | None = None  # its text, when complete
        self.text = ""  # source, for error reports


def _lex_element(s: str, i: int, j: int, terminated: bool) -> tuple[_Element, int]:
    """The element whose open tag starts at s[i] (``<point``/``<points`` ends at j); (element, end)."""
    e, n = _Element(), len(s)
    while True:
        m = _ATTR.match(s, j)
        if m:
            e.attrs.append((m.group(1), m.group(2) if m.group(2) is not None else m.group(3), m.group().strip()))
            j = m.end()
            continue
        t = _TAG_END.match(s, j)
        if t:
            j = t.end()
            if t.group(1) == "/>":
                e.text = s[i:j]
                return e, j
            break
        if _PARTIAL_ATTR.fullmatch(s, j):  # the text ends inside the tag
            e.cut, e.broken, e.unfinished = not terminated, terminated, True
            e.text = s[i:].strip()
            return e, n
        if _NEXT_TAG.match(s, j):  # another tag opens before this one closed
            e.broken = True
            e.text = s[i:j].strip()
            return e, j
        m = _JUNK.match(s, j)
        e.junk.append(m.group().strip())
        j = m.end()
    # the element's text: up to its close tag, or to the next "<" / the end when it has none
    k = s.find("<", j)
    if k < 0:
        e.cut = not terminated
        e.inner = None if e.cut else s[j:]  # complete only if an end token says the model stopped here
        e.text = s[i:].strip()
        return e, n
    e.inner = s[j:k]
    c = _CLOSE.match(s, k)
    if c:
        e.text = s[i : c.end()]
        return e, c.end()
    if _PARTIAL_CLOSE.fullmatch(s, k):  # cut inside "</points>" (or before an end token)
        e.cut = not terminated
        e.text = s[i:].strip()
        return e, n
    e.text = s[i:k].strip()  # no close tag: the element ends where the next tag starts
    return e, k


def _number(value: str) -> float | None:
    m = _NUMBER.fullmatch(value)
    return float(m.group(1)) if m else None


def _is_nothing_found(body: str, answers: Collection[str]) -> bool:
    def norm(t: str) -> str:
        t = t.replace("`", " ").replace("\u2019", "'").casefold()
        return " ".join(t.split()).rstrip(" .!")

    if isinstance(answers, str):
        answers = (answers,)
    text = norm(body)
    return any(text == norm(a) for a in answers)


def _points_of(e: _Element, width: int, height: int, errors: list[ParseError]) -> list[tuple[float, float]]:
    """Source-pixel (x, y) of the element's complete, valid pairs, in index order."""
    xs: dict[int, tuple[str, str]] = {}
    ys: dict[int, tuple[str, str]] = {}
    twice: set[int] = set()
    for name, value, src in e.attrs:
        m = _COORD.fullmatch(name)
        if m is None:
            continue
        idx = int(m.group(2)) if m.group(2) else 0
        side = xs if m.group(1) == "x" else ys
        if idx in side:
            twice.add(idx)
        side[idx] = (value, src)
    if not xs and not ys and not e.unfinished:
        errors.append(ParseError("bad_coordinates", e.text))
        return []
    out = []
    for idx in sorted(set(xs) | set(ys)):
        srcs = " ".join(a[1] for a in (xs.get(idx), ys.get(idx)) if a is not None)
        if idx in twice:
            errors.append(ParseError("bad_coordinates", srcs))
            continue
        if idx not in xs or idx not in ys:
            if not e.unfinished:  # a tag cut short may simply not have written it yet
                errors.append(ParseError("bad_coordinates", srcs))
            continue
        x, y = _number(xs[idx][0]), _number(ys[idx][0])
        if x is None or y is None:
            errors.append(ParseError("bad_coordinates", srcs))
        elif not (0.0 <= x <= 100.0 and 0.0 <= y <= 100.0):
            errors.append(ParseError("out_of_range", srcs))
        else:
            out.append((x * width / 100, y * height / 100))
    return out


def parse(
    text: str,
    width: int,
    height: int,
    allowed_labels: Collection[str] | None = None,
    *,
    nothing_found: Collection[str] = NOTHING_FOUND_ANSWERS,
) -> ParseResult:
    """Read Molmo points from model output; points come back in SOURCE pixels.

    Never raises on any ``text``; raises ValueError only for a non-positive size. Reads every
    ``<point>`` / ``<points>`` element anywhere in the text (prose, fences around it are ignored),
    entities in labels decoded. Text after the first ``<eos>`` / ``</s>`` / ``<|im_end|>`` /
    ``<|endoftext|>`` is ignored.

    * Coordinates are percent; a value outside 0-100 rejects its point ("out_of_range"), as Molmo's
      own reader (``olmo/util.py: extract_points``) drops it: such a value means another scale
      (pixels, 0-1000), and clipping would turn it into a confident point on the border.
    * Pairs are matched by index (``x2`` with ``y2``), in any attribute order, output in index order;
      a pair missing its partner, non-numeric or given twice is "bad_coordinates" (other pairs kept).
    * Label: ``alt``, else the element's text (seed 000's logged outputs have no ``alt``); with
      ``allowed_labels``, the first of the two that is allowed, "unknown_label" if neither.
    * Truncation: when the text stops inside an element, every complete (x_i, y_i) pair is kept and
      the element gets one "truncated_object"; its points carry the label if ``alt`` (or its text)
      was complete, else ``""`` (kept whatever ``allowed_labels`` says: a label never written cannot
      be checked). An end token inside an element makes it "malformed_tag" instead (pairs kept too).
    * No element at all: an answer in ``nothing_found`` (case, spaces, final "." ignored) is a valid
      "nothing found": zero objects, no error; any other text is "garbage"; none is "empty_output".
    """
    if not (width > 0 and height > 0):
        raise ValueError(f"image size must be positive, got {width}x{height}")
    read = answer_body(text, _END, _REMNANTS)
    if isinstance(read, ParseResult):
        return read
    body, terminated = read

    objects: list[Obj] = []
    errors: list[ParseError] = []
    pos, found = 0, False
    while True:
        m = _OPEN.search(body, pos)
        if m is None:
            break
        found = True
        e, pos = _lex_element(body, m.start(), m.end(), terminated)
        alt = next((html.unescape(v).strip() for k, v, _ in e.attrs if k == "alt"), None)
        inner = html.unescape(e.inner).strip() if e.inner is not None else None
        names = [c for c in (alt, inner) if c]
        if names and allowed_labels is not None:
            label = next((c for c in names if c in allowed_labels), None)
            if label is None:  # the whole element goes, as one rejection
                errors.append(ParseError("unknown_label", e.text))
                continue
        elif names:
            label = names[0]
        elif e.cut or e.unfinished:
            label = ""  # it stopped before its label: the pairs are still the model's answer
        else:
            errors.append(ParseError("missing_label", e.text))
            continue
        if e.cut:
            errors.append(ParseError("truncated_object", e.text))
        elif e.broken or e.junk:
            errors.append(ParseError("malformed_tag", e.text))
        objects.extend(Point(x, y, label) for x, y in _points_of(e, width, height, errors))

    if not terminated:
        tail = body.rfind("<")
        if tail >= pos and _PARTIAL_OPEN.fullmatch(body, tail):  # cut inside "<poi"
            errors.append(ParseError("truncated_object", body[tail:]))
            found = True
    if not found and not _is_nothing_found(body, nothing_found):
        errors.append(ParseError("garbage", body.strip()))
    return ParseResult(objects, errors)


# ---------------------------------------------------------------------------- answer grammar


def answer_grammars(label: str, decimals: int = DECIMALS, max_points: int | None = None, nothing_found: str | None = NOTHING_FOUND,
                    lead: str = ""):
    """The answers `render_points` writes for one label, as text grammars (formats/text_grammar.py):
    one point ``<point x="" y="" alt="L">L</point>`` (or `nothing_found`), or several
    ``<points x1="" y1="" x2="" ... alt="L">L</points>`` (at most `max_points`); percent values with
    `decimals` digits in 0..100. Combine them with formats.grammar.AnyOf. `lead`: what the
    tokenizer writes before an answer's first character (a sentencepiece "▁": " ")."""
    from raytrain.formats import text_grammar as tg

    _check_label(label)
    esc = _escape(label)
    num = tg.Num(0, 100 * 10**decimals, decimals, trim=False)
    one = tg.AnswerGrammar((tg.Lit(' x="'), num, tg.Lit('" y="'), num, tg.Lit('"')), lead + "<point", "",
                           f' alt="{esc}">{esc}</point>', None if nothing_found is None else lead + nothing_found, 1)
    many = tg.AnswerGrammar((tg.Lit(' x{i}="', indexed=True), num, tg.Lit('" y{i}="', indexed=True), num, tg.Lit('"')),
                            lead + "<points", "", f' alt="{esc}">{esc}</points>', None, max_points)
    return [one, many]


def piece_parser(label: str, width: int, height: int):
    """`parse_objects` for text_confidence.text_object_confidences: one grammar item (a pair of
    attributes) is read inside an element of `label`, any full answer as it is."""

    def parse_objects(text: str):
        t = text.strip()
        if not t.startswith("<"):
            esc = _escape(label)
            t = f'<points {t} alt="{esc}">{esc}</points>'
        return parse(t, width, height).objects

    return parse_objects
