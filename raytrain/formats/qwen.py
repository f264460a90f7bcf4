"""Qwen2.5-VL grounding codec on strings only (no tokenizer, no torch).

Frames. Qwen2.5-VL reads an image after ``smart_resize`` (both sides multiples of ``factor`` = 28 px,
area within ``[min_pixels, max_pixels]``) and answers grounding queries in ABSOLUTE PIXELS OF THAT
RESIZED IMAGE. Annotations are stored in source pixels, so every render and parse takes both sizes
and converts explicitly (``to_model_frame`` / ``to_source_frame``: a per-axis scale, which is exactly
what a resize does). Training and inference must use the same resize settings, or every coordinate
means something else; ``raytrain.models.qwen2_5_vl`` records and checks them.

Representations (``REPRESENTATIONS``), the ones seed 002 compared, all ``x`` before ``y``:

* ``absolute`` (Qwen2.5-VL's native format): JSON objects with integer coordinates in resized pixels,
  ``{"bbox_2d": [x1, y1, x2, y2], "label": "red circle"}`` / ``{"point_2d": [x, y], "label": ...}``.
* ``normalized``: the same JSON with floats in [0, 1] (3 decimals), fractions of the image size.
* ``tokens``: the same JSON with the coordinates as one string of discretised location tokens added to
  the vocabulary, ``"bbox_2d": "<|loc_0102|><|loc_0230|><|loc_0400|><|loc_0511|>"``. 1024 bins with
  PaliGemma's convention: ``bin = clip(round(v_norm * 1023), 0, 1023)``, decoded as ``bin / 1023``.
* ``pairs``: seed 002's ``(phrase, [x1, y1, x2, y2])`` list, Python literal syntax, absolute resized
  pixels: ``[('red circle', [12, 34, 56, 78]), ('blue square', [...])]``.

JSON answers are written the way Qwen2.5-VL writes them when ``fenced`` (a ```json fence, one object
per line) and as one compact line otherwise. Objects are rendered in canonical order (sorted by y1,
then x1; points by y, x) unless ``shuffle`` asks for a seeded random order.

``qwen_grammar.answer_grammar`` describes exactly the answers ``render_objects`` writes (``text_grammar``), for
grammar-constrained decoding and per-object confidences; ``qwen_grammar.region_grammar`` the dense-caption
answers (boxes labelled with free phrases).

Parsing never raises on model text: ``parse`` returns every object it could read (in source pixels)
and a ``ParseError`` with a reason from ``PARSE_REASONS`` for everything it rejected.
"""

from __future__ import annotations

import ast
import json
import math
import random
import re
import warnings
from collections.abc import Collection, Sequence

from raytrain.formats.annotations import (
    Box,
    Obj,
    ParseError,
    ParseResult,
    Point,
    answer_body,
)
from raytrain.formats.numbers import NumberSpan, SpanWriter

# transformers' smart_resize defaults (Qwen2-VL / Qwen2.5-VL image processors):
# patch 14 x merge 2 = 28 px per LM token side; 56*56 .. 28*28*1280 pixels.
FACTOR = 28
MIN_PIXELS = 56 * 56
MAX_PIXELS = 14 * 14 * 4 * 1280

NUM_BINS = 1024
REPRESENTATIONS = ("absolute", "normalized", "tokens", "pairs")
KINDS = ("point", "box")
TASKS = ("point", "detect")
NORMALIZED_DECIMALS = 3

PARSE_REASONS = (
    "truncated_object",  # the text stops inside an object or an unclosed list (generation hit its limit)
    "malformed_json",  # an object that is not valid JSON / not a valid (phrase, [...]) tuple
    "bad_coordinates",  # bbox_2d / point_2d missing, wrong arity, non-numeric, non-finite, bad loc token
    "missing_label",  # no "label", or not a non-empty string
    "unknown_label",  # label not in allowed_labels
    "invalid_box",  # x2 < x1 or y2 < y1 (a zero-size box is returned, not rejected)
    "garbage",  # text outside the answer, items that are not objects, text with no answer at all
    "empty_output",  # nothing but whitespace and special-token remnants, or an empty list
)

_KEY = {"point": "point_2d", "box": "bbox_2d"}
_N = {"point": 2, "box": 4}


# ---------------------------------------------------------------------------- resize and frames


def smart_resize(height: int, width: int, factor: int = FACTOR, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(height, width) Qwen2.5-VL's image processor resizes an image to; a transcription of
    ``transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize`` (round half to even,
    as Python's ``round``). Raises ValueError for an aspect ratio above 200, as transformers does."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _scale(o: Obj, num_x: float, den_x: float, num_y: float, den_y: float) -> Obj:
    # v * num / den (not v * (num / den)): the image edge maps exactly onto the other image's edge
    if isinstance(o, Point):
        return Point(o.x * num_x / den_x, o.y * num_y / den_y, o.label)
    if isinstance(o, Box):
        return Box(o.x1 * num_x / den_x, o.y1 * num_y / den_y, o.x2 * num_x / den_x, o.y2 * num_y / den_y, o.label)
    raise TypeError(f"expected Point or Box, got {type(o).__name__}")


def _check_sizes(*sizes: float) -> None:
    if any(not (isinstance(s, (int, float)) and s > 0) for s in sizes):
        raise ValueError(f"image sizes must be positive, got {sizes}")


def to_model_frame(obj: Obj, src_w: float, src_h: float, resized_w: float, resized_h: float) -> Obj:
    """Source-pixel object -> the same object in pixels of the resized (model input) image."""
    _check_sizes(src_w, src_h, resized_w, resized_h)
    return _scale(obj, resized_w, src_w, resized_h, src_h)


def to_source_frame(obj: Obj, src_w: float, src_h: float, resized_w: float, resized_h: float) -> Obj:
    """Resized-image-pixel object -> the same object in source pixels (inverse of to_model_frame)."""
    _check_sizes(src_w, src_h, resized_w, resized_h)
    return _scale(obj, src_w, resized_w, src_h, resized_h)


# ---------------------------------------------------------------------------- location tokens


def loc_token(i: int) -> str:
    """``<|loc_DDDD|>`` for bin ``i`` in 0..1023."""
    if not 0 <= i < NUM_BINS:
        raise ValueError(f"loc bin {i} out of range 0..{NUM_BINS - 1}")
    return f"<|loc_{i:04d}|>"


LOC_TOKENS = tuple(loc_token(i) for i in range(NUM_BINS))


def encode_bin(v_norm: float) -> int:
    """``clip(round_half_even(v_norm * 1023), 0, 1023)`` (PaliGemma's convention)."""
    if not math.isfinite(v_norm):
        raise ValueError(f"cannot encode non-finite coordinate {v_norm}")
    return min(max(round(v_norm * (NUM_BINS - 1)), 0), NUM_BINS - 1)


def decode_bin(b: int) -> float:
    """Normalised coordinate of bin ``b``: ``b / 1023`` (exact inverse of encode_bin up to half a bin)."""
    return b / (NUM_BINS - 1)


# ---------------------------------------------------------------------------- rendering


def _check_label(label: str) -> None:
    # JSON and Python literals can carry any string, but a label the parser would read back
    # differently (stripped) or not at all (empty) is a data bug: say so instead of training on it.
    if not isinstance(label, str) or not label or label != label.strip():
        raise ValueError(f"label {label!r} cannot be rendered: it must be a non-empty string without surrounding whitespace")


def _sort_key(o: Obj) -> tuple:
    # same-length keys, so a list that mixes points and boxes sorts too (points first on a tie)
    return (o.y, o.x, 0, 0.0, 0.0, o.label) if isinstance(o, Point) else (o.y1, o.x1, 1, o.y2, o.x2, o.label)


def order_objects(objs: Sequence[Obj], shuffle: bool = False, seed: int = 0) -> list[Obj]:
    """Canonical order (top to bottom, then left to right), or a seeded random order."""
    out = sorted(objs, key=_sort_key)
    if shuffle:
        random.Random(seed).shuffle(out)
    return out


def _model_coords(o: Obj, src_w, src_h, resized_w, resized_h) -> list[float]:
    m = to_model_frame(o, src_w, src_h, resized_w, resized_h)
    return [m.x, m.y] if isinstance(m, Point) else [m.x1, m.y1, m.x2, m.y2]


def _clip(v: float, hi: float) -> float:
    return min(max(v, 0.0), hi)


def render_objects(
    objs: Sequence[Obj],
    src_w: int,
    src_h: int,
    resized_w: int,
    resized_h: int,
    representation: str = "absolute",
    fenced: bool = True,
    shuffle: bool = False,
    seed: int = 0,
) -> str:
    """Target text for source-pixel objects; coordinates outside the image are clipped to its edge.

    Raises ValueError for non-finite coordinates, unrenderable labels or unknown representations
    (``pairs`` is never fenced: seed 002 writes the bare list)."""
    return render_objects_spans(objs, src_w, src_h, resized_w, resized_h, representation, fenced, shuffle, seed)[0]


def render_objects_spans(
    objs: Sequence[Obj],
    src_w: int,
    src_h: int,
    resized_w: int,
    resized_h: int,
    representation: str = "absolute",
    fenced: bool = True,
    shuffle: bool = False,
    seed: int = 0,
) -> tuple[str, list[NumberSpan]]:
    """`render_objects`' text and, recorded while writing it, the span and range of every coordinate
    number (formats/numbers.py: what the distance-aware number loss weighs; none for `tokens`)."""
    if representation not in REPRESENTATIONS:
        raise ValueError(f"unknown representation {representation!r}, expected one of {REPRESENTATIONS}")
    _check_sizes(src_w, src_h, resized_w, resized_h)
    items = []
    for o in order_objects(objs, shuffle, seed):
        if not isinstance(o, (Point, Box)):
            raise TypeError(f"expected Point or Box, got {type(o).__name__}")
        _check_label(o.label)
        coords = _model_coords(o, src_w, src_h, resized_w, resized_h)
        if not all(math.isfinite(v) for v in coords):
            raise ValueError(f"cannot render non-finite coordinates of {o}")
        lims = [resized_w, resized_h] * (len(coords) // 2)
        if representation in ("absolute", "pairs"):
            value = [round(_clip(v, hi)) for v, hi in zip(coords, lims)]  # round(float) -> int
            ranges = [float(hi) for hi in lims]
        elif representation == "normalized":
            value = [round(_clip(v / hi, 1.0), NORMALIZED_DECIMALS) for v, hi in zip(coords, lims)]
            ranges = [1.0] * len(lims)
        else:  # tokens
            value = "".join(loc_token(encode_bin(v / hi)) for v, hi in zip(coords, lims))
            ranges = []
        items.append((o, value, ranges))

    out = SpanWriter()
    if representation == "pairs":  # str() of a list of (label, [numbers]) tuples, as seed 002 writes it
        out.put("[")
        for i, (o, value, ranges) in enumerate(items):
            out.put(", " if i else "")
            out.put("(" + repr(o.label) + ", ")
            out.numbers(value, ranges)
            out.put(")")
        out.put("]")
        return out.text(), out.spans
    dicts = [(_KEY["point" if isinstance(o, Point) else "box"], value, ranges, o.label) for o, value, ranges in items]

    def put_dict(key, value, ranges, label):  # json.dumps of {key: value, "label": label}, spans kept
        out.put("{" + json.dumps(key) + ": ")
        if isinstance(value, str):
            out.put(json.dumps(value))
        else:
            out.numbers(value, ranges)
        out.put(", " + json.dumps("label") + ": " + json.dumps(label, ensure_ascii=False) + "}")

    if not fenced:
        out.put("[")
        for i, d in enumerate(dicts):
            out.put(", " if i else "")
            put_dict(*d)
        out.put("]")
        return out.text(), out.spans
    out.put("```json\n[\n" if dicts else "```json\n[]\n```")
    for i, d in enumerate(dicts):
        out.put(",\n\t" if i else "\t")
        put_dict(*d)
    if dicts:
        out.put("\n]\n```")
    return out.text(), out.spans


def render_prompt(task: str, query: str, representation: str = "absolute") -> str:
    """User-turn text asking for ``query`` (Qwen2.5-VL's grounding phrasing for ``absolute``)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}, expected one of {TASKS}")
    if representation not in REPRESENTATIONS:
        raise ValueError(f"unknown representation {representation!r}, expected one of {REPRESENTATIONS}")
    key = "point_2d" if task == "point" else "bbox_2d"
    verb = "Point to" if task == "point" else "Locate"
    if representation == "pairs":
        shape = "[x, y]" if task == "point" else "[x1, y1, x2, y2]"
        return f"{verb} every {query} in the image and output a list of (phrase, {shape}) pairs."
    how = {
        "absolute": f"output {key} coordinates in JSON format.",
        "normalized": f"output {key} coordinates normalised to 0-1 in JSON format.",
        "tokens": f"output {key} location tokens in JSON format.",
    }[representation]
    return f"{verb} every {query} in the image and {how}"


def chat_messages(prompt: str, answer: str | None = None, system: str | None = None) -> list[dict]:
    """One image + prompt user turn (and the assistant's answer when given) in the messages format
    Qwen2.5-VL's chat template reads (seed 002's layout). Without ``system`` the template adds its
    default "You are a helpful assistant."; the image placeholder is expanded by the processor."""
    msgs: list[dict] = []
    if system is not None:
        msgs.append({"role": "system", "content": [{"type": "text", "text": system}]})
    msgs.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]})
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


# ---------------------------------------------------------------------------- answer grammar


# ---------------------------------------------------------------------------- parsing

# Qwen's control tokens that may survive decoding; the first end-of-turn ends the answer.
_END = re.compile(r"<\|im_end\|>|<\|endoftext\|>")
_REMNANTS = re.compile(r"<\|(?!loc_)[a-z_]{1,32}\|>")
_FENCE_OPEN = re.compile(r"```[ \t]*(?:json)?[ \t]*\r?\n?", re.IGNORECASE)
_PARTIAL_FENCE = re.compile(r"\s*`{1,3}(?:j(?:s(?:o(?:n)?)?)?)?\s*", re.IGNORECASE)
_LOC = re.compile(r"<\|loc_([0-9]{4})\|>")
# A strict number: no "1_000", "nan", "inf" (Python's float would read those).
_NUMBER = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
# One (phrase, [numbers]) tuple of the pairs representation; the phrase is a Python string literal.
_PAIR = re.compile(r"""\(\s*(?P<label>'(?:[^'\\\n]|\\.){0,500}'|"(?:[^"\\\n]|\\.){0,500}")\s*,\s*\[(?P<nums>[^\[\]()]{0,400})\]\s*\)""")
_DECODER = json.JSONDecoder()


def _match_close(s: str, i: int) -> int:
    """Index just past the bracket closing the one at s[i] ('{' or '['), skipping JSON strings;
    -1 when the text ends first."""
    depth, in_str, esc = 0, False, False
    for j in range(i, len(s)):
        c = s[j]
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return j + 1
    return -1


def _decode(s: str, i: int):
    """(value, end) of the JSON value at s[i], or None. Never raises."""
    try:
        return _DECODER.raw_decode(s, i)
    except (ValueError, RecursionError):  # JSONDecodeError, int digit limit, deep nesting
        return None


def _scan_json(s: str, terminated: bool, errors: list[ParseError]) -> list[tuple[object, str]]:
    """Items (decoded value, source fragment) of a JSON answer: a list of objects, a single object,
    or objects one after another. Recovers every complete object before a cut or a broken one."""
    start = min((p for p in (s.find("["), s.find("{")) if p >= 0), default=-1)
    if start < 0:
        if s.strip():
            errors.append(ParseError("garbage", s.strip()))
        return []
    if s[:start].strip():
        errors.append(ParseError("garbage", s[:start].strip()))

    whole = _decode(s, start)  # the common case: one well-formed list or object
    if whole is not None:
        value, end = whole
        trailing = s[end:].strip()
        if isinstance(value, list) or not trailing.lstrip(", \t\r\n").startswith("{"):
            if trailing:
                errors.append(ParseError("garbage", trailing))
            if isinstance(value, dict):
                return [(value, s[start:end])]
            if isinstance(value, list) and value and any(isinstance(v, dict) for v in value):
                return [(v, json.dumps(v, ensure_ascii=False)) for v in value]
            if value != []:  # a bare value, or a list without objects (e.g. bare coordinates)
                errors.append(ParseError("garbage", s[start:end]))
            return []
        # else: objects one after another without a list: read them one by one below

    items: list[tuple[object, str]] = []
    in_list = s[start] == "["
    i, n = start + (1 if in_list else 0), len(s)
    prev = i  # end of the last item read: the start of what a cut leaves behind
    while True:
        while i < n and (s[i].isspace() or s[i] == ","):
            i += 1
        if i >= n:
            if in_list and not terminated:  # the list never closed: generation was cut, more may have followed
                errors.append(ParseError("truncated_object", s[prev:].strip()))
            return items  # (a list left open right before an end token lost nothing)
        c = s[i]
        if c == "]" and in_list:
            if s[i + 1 :].strip():
                errors.append(ParseError("garbage", s[i + 1 :].strip()))
            return items
        if c == "{":
            got = _decode(s, i)
            if got is not None:
                items.append((got[0], s[i : got[1]]))
                i = prev = got[1]
                continue
            j = _match_close(s, i)
            if j < 0:  # the object runs to the end of the text
                errors.append(ParseError("truncated_object" if not terminated else "malformed_json", s[i:].strip()))
                return items
            errors.append(ParseError("malformed_json", s[i:j]))
            i = prev = j
            continue
        got = _decode(s, i) if c in '"[-0123456789tfnNI' else None
        if got is not None:  # a JSON value that is not an object
            errors.append(ParseError("garbage", s[i : got[1]]))
            i = prev = got[1]
            continue
        j = i + 1
        while j < n and s[j] not in ",{]":
            j += 1
        errors.append(ParseError("garbage", s[i:j].strip()))
        i = prev = j


def _scan_pairs(s: str, terminated: bool, errors: list[ParseError]) -> list[tuple[object, str]]:
    """Items ((label literal, numbers text), fragment) of a pairs answer."""
    items: list[tuple[object, str]] = []
    pos = 0
    for m in _PAIR.finditer(s):
        gap = s[pos : m.start()]
        if gap.strip(" \t\r\n,[]"):
            errors.append(ParseError("malformed_json" if "(" in gap else "garbage", gap.strip(" \t\r\n,")))
        items.append(((m.group("label"), m.group("nums")), m.group()))
        pos = m.end()
    tail = s[pos:]
    rest = tail.strip(" \t\r\n,[]")
    if rest:
        if not terminated and rest.startswith("(") and ")" not in rest:  # cut inside the last tuple
            errors.append(ParseError("truncated_object", rest))
        else:
            errors.append(ParseError("malformed_json" if "(" in rest else "garbage", rest))
    elif not terminated and s.lstrip().startswith("[") and "]" not in tail:  # cut between tuples
        errors.append(ParseError("truncated_object", tail.strip()))
    return items


def _numbers(values, n: int) -> list[float] | None:
    """n finite numbers (JSON ints/floats, not bools), or None."""
    if not isinstance(values, list) or len(values) != n:
        return None
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
        try:
            f = float(v)
        except OverflowError:
            return None
        if not math.isfinite(f):
            return None
        out.append(f)
    return out


def _loc_bins(value, n: int) -> list[int] | None:
    """n location-token bins from "<|loc_0001|><|loc_0002|>..." or a list of such tokens, or None."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = "".join(value)
    if not isinstance(value, str) or _LOC.sub("", value).strip(" ,"):
        return None
    bins = [int(d) for d in _LOC.findall(value)]
    return bins if len(bins) == n and all(b < NUM_BINS for b in bins) else None


def parse(
    text: str,
    kind: str,
    src_w: int,
    src_h: int,
    resized_w: int,
    resized_h: int,
    representation: str = "absolute",
    allowed_labels: Collection[str] | None = None,
    clip: bool = True,
) -> ParseResult:
    """Read ``kind`` ("point" or "box") objects from model output; objects come back in SOURCE pixels.

    Never raises on any ``text``. Raises ValueError only for bad arguments (unknown kind or
    representation, non-positive sizes). Accepts fenced or bare JSON, a list or a single object
    (or objects one after another), and Qwen control tokens; text after the first ``<|im_end|>`` /
    ``<|endoftext|>`` is ignored. A cut inside an object is "truncated_object" when the text just
    stops (generation hit its token limit), "malformed_json" when an end token says the model
    stopped there. With ``clip`` (default), coordinates outside the image are clipped to its edge
    (the model frame's ``[0, resized]``, or ``[0, 1]`` for normalised values), as seed 002 does for
    boxes predicted across the border. Zero-size boxes are returned; ``check_objects`` flags them.
    """
    if kind not in _KEY:
        raise ValueError(f"unknown kind {kind!r}, expected one of {KINDS}")
    if representation not in REPRESENTATIONS:
        raise ValueError(f"unknown representation {representation!r}, expected one of {REPRESENTATIONS}")
    _check_sizes(src_w, src_h, resized_w, resized_h)
    n = _N[kind]

    read = answer_body(text, _END, _REMNANTS)
    if isinstance(read, ParseResult):
        return read
    body, terminated = read

    if not terminated and _PARTIAL_FENCE.fullmatch(body):  # cut inside the opening "```json"
        return ParseResult([], [ParseError("truncated_object", body.strip())])
    errors: list[ParseError] = []
    fence = _FENCE_OPEN.search(body)
    if fence is not None:
        if body[: fence.start()].strip():
            errors.append(ParseError("garbage", body[: fence.start()].strip()))
        inner = body[fence.end() :]
        close = inner.find("```")
        if close >= 0:
            if inner[close + 3 :].strip():
                errors.append(ParseError("garbage", inner[close + 3 :].strip()))
            inner = inner[:close]
            terminated = True  # the closed fence says the answer ended there
        elif not terminated:
            inner = re.sub(r"`{1,2}\s*$", "", inner)  # cut inside the closing fence: nothing lost
            if not inner.strip():  # cut right after the opening fence
                return ParseResult([], [ParseError("truncated_object", body.strip())])
    else:
        inner = body

    scan = _scan_pairs if representation == "pairs" else _scan_json
    items = scan(inner, terminated, errors)

    objects: list[Obj] = []
    lims = [resized_w, resized_h] * (n // 2)
    for value, frag in items:
        if representation == "pairs":
            label_lit, nums = value
            parts = [p.strip() for p in nums.split(",")] if nums.strip() else []
            coords = [float(p) for p in parts] if all(_NUMBER.fullmatch(p) for p in parts) else None
            if coords is not None and (len(coords) != n or not all(math.isfinite(v) for v in coords)):
                coords = None
            try:
                with warnings.catch_warnings():  # "\d"-style escapes warn; they still read as text
                    warnings.simplefilter("ignore")
                    label = ast.literal_eval(label_lit)  # a string literal only: never runs code
            except (ValueError, SyntaxError, MemoryError, RecursionError):  # e.g. a bad \N{...} escape
                errors.append(ParseError("malformed_json", frag))
                continue
        else:
            if not isinstance(value, dict):
                errors.append(ParseError("garbage", frag))
                continue
            raw = value.get(_KEY[kind])
            if representation == "tokens":
                bins = _loc_bins(raw, n)
                coords = None if bins is None else [decode_bin(b) for b in bins]
            else:
                coords = _numbers(raw, n)
            label = value.get("label")

        if coords is None:
            errors.append(ParseError("bad_coordinates", frag))
            continue
        if not isinstance(label, str) or not label.strip():
            errors.append(ParseError("missing_label", frag))
            continue
        label = label.strip()
        if allowed_labels is not None and label not in allowed_labels:
            errors.append(ParseError("unknown_label", frag))
            continue
        if kind == "box" and (coords[2] < coords[0] or coords[3] < coords[1]):
            errors.append(ParseError("invalid_box", frag))
            continue
        # to resized-image pixels
        if representation in ("normalized", "tokens"):
            if clip:
                coords = [_clip(v, 1.0) for v in coords]
            coords = [v * hi for v, hi in zip(coords, lims)]
        elif clip:
            coords = [_clip(v, hi) for v, hi in zip(coords, lims)]
        m = Point(coords[0], coords[1], label) if kind == "point" else Box(*coords, label=label)
        objects.append(to_source_frame(m, src_w, src_h, resized_w, resized_h))
    if not objects and not errors:  # "[]", "```json\n[]\n```": an answer with no objects in it
        errors.append(ParseError("empty_output", text))
    return ParseResult(objects, errors)
