"""PaliGemma ``<loc>`` codec, big_vision conventions, on strings only (no tokenizer, no torch).

Encoding (what training targets look like), as big_vision's
``pp/proj/paligemma/segmentation.py`` does it::

    v_norm = pixel / image_size_along_that_axis          # in [0, 1] for in-image values
    bin    = clip(round_half_to_even(v_norm * 1023), 0, 1023)

``tf.round`` / ``np.round`` round half to even, and so does Python's built-in ``round`` on
floats, which is what ``encode_bin`` uses (exact on the float64 value, no epsilon). big_vision
computes in float32 from float32 normalised boxes; we compute in float64, so a value within
~1e-4 bin of a half-way point can land one bin apart from big_vision. Coordinates are
written y before x: a point is ``<locY><locX>``, a box ``<locY1><locX1><locY2><locX2>``.

Decoding (what ``parse`` returns): ``pixel = decode_bin(bin, divisor) * image_size``.

* ``divisor=1023`` (default) is big_vision's evaluator (``tokens / 1023``), the exact
  inverse of the encoder: round-trip error is at most half a bin, bin 1023 maps to the
  image edge.
* ``divisor=1024`` is what ``supervision`` (``Detections.from_vlm`` / ``from_paligemma``) and
  Google's demo parser do. It reads every coordinate up to one bin towards the origin
  (bin 1023 -> 1023/1024 of the image), so on targets rendered here the round-trip error
  is up to 0.5/1023 + 1/1024 of the image size. Use it only to reproduce those tools.

Detection targets: objects joined by ``" ; "``, each its loc tokens, a space and its label:
``<loc0100><loc0200><loc0300><loc0400> red circle ; <loc0500>... blue square``.
"""

from __future__ import annotations

import math
import re
from typing import Collection, Sequence

from raytrain.formats.annotations import Box, Obj, ParseError, ParseResult, Point

NUM_LOC = 1024
NUM_SEG = 128
MASK_ANSWER_MIN_TOKENS = 4 + 16 + 1 + 1
"""The shortest answer holding one mask: 4 <loc>, 16 <seg>, a one-token label, <eos>. With a smaller
max_new_tokens constrained decoding can only answer "nothing found" (a cut answer is not valid)."""
DIVISORS = (1023, 1024)
KINDS = ("point", "box")
TASKS = ("point", "detect")

PARSE_REASONS = (
    "wrong_token_count",  # an object whose loc run is not exactly 2 (point) / 4 (box) valid <locDDDD>
    "truncated_object",  # the text ends inside an object (locs but no label yet, or a partial "<loc")
    "missing_label",  # locs followed by nothing before ";" or <eos>
    "unknown_label",  # label not in allowed_labels
    "invalid_box",  # y2 < y1 or x2 < x1 (a zero-size box is returned, not rejected)
    "garbage",  # non-empty text with no loc token (a whole ";" segment, or text before the first loc)
    "empty_output",  # nothing but whitespace, ";" and special-token remnants
)

_N_LOCS = {"point": 2, "box": 4}


def loc_token(i: int) -> str:
    """``<locDDDD>`` for bin ``i`` in 0..1023."""
    if not 0 <= i < NUM_LOC:
        raise ValueError(f"loc bin {i} out of range 0..{NUM_LOC - 1}")
    return f"<loc{i:04d}>"


def seg_token(i: int) -> str:
    """``<segDDD>`` for codebook index ``i`` in 0..127."""
    if not 0 <= i < NUM_SEG:
        raise ValueError(f"seg index {i} out of range 0..{NUM_SEG - 1}")
    return f"<seg{i:03d}>"


def encode_bin(v_norm: float) -> int:
    """Bin of a normalised coordinate: ``clip(round_half_even(v_norm * 1023), 0, 1023)``."""
    if not math.isfinite(v_norm):
        raise ValueError(f"cannot encode non-finite coordinate {v_norm}")
    return min(max(round(v_norm * (NUM_LOC - 1)), 0), NUM_LOC - 1)  # round(): half to even


def decode_bin(b: int, divisor: int = 1023) -> float:
    """Normalised coordinate of bin ``b``: ``b / divisor`` (1023: big_vision, 1024: supervision)."""
    if divisor not in DIVISORS:
        raise ValueError(f"divisor must be one of {DIVISORS}, got {divisor}")
    return b / divisor


# ---------------------------------------------------------------------------- rendering


def _check_label(label: str) -> None:
    # A label that the parser would read back differently is a data bug; say so here
    # instead of training on a target whose meaning changed.
    if not isinstance(label, str) or not label or label != label.strip() or ";" in label or "<" in label:
        raise ValueError(
            f"label {label!r} cannot be rendered: it must be a non-empty string without "
            "surrounding whitespace, ';' (object separator) or '<' (start of special tokens)"
        )


def render_objects(objs: Sequence[Obj], width: int, height: int) -> str:
    """Target text for objects in source pixels of a ``width`` x ``height`` image.

    Out-of-image coordinates are clipped to the edge bins, as big_vision does. Raises
    ValueError for non-finite coordinates or labels that would not parse back.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    parts = []
    for o in objs:
        if isinstance(o, Point):
            yx = (o.y / height, o.x / width)
        elif isinstance(o, Box):
            yx = (o.y1 / height, o.x1 / width, o.y2 / height, o.x2 / width)
        else:
            raise TypeError(f"expected Point or Box, got {type(o).__name__}")
        _check_label(o.label)
        parts.append("".join(loc_token(encode_bin(v)) for v in yx) + " " + o.label)
    return " ; ".join(parts)


def render_prefix(task: str, query: str) -> str:
    """Prompt text: ``"point to <query>"`` or ``"detect <query>"``."""
    if task == "point":
        return f"point to {query}"
    if task == "detect":
        return f"detect {query}"
    raise ValueError(f"unknown task {task!r}, expected one of {TASKS}")


# ---------------------------------------------------------------------------- parsing
# Grammar read by `parse`, after cutting at the first <eos> / </s> and dropping <pad> / <bos>:
#   text    := segment (";" segment)*
#   segment := [garbage] (locrun label)*        a new loc run starts a new object even without ";"
#   locrun  := <locD+> (ws* <locD+>)* (ws* <segDDD>)*   seg tokens of a mask answer are skipped
#   label   := any text up to the next loc run / ";" / end, stripped

_REMNANTS = re.compile(r"<pad>|<bos>")
_END = re.compile(r"<eos>|</s>")
# [0-9], not \d: \d also matches other scripts' digits, which int() would happily read.
_RUN = re.compile(r"<loc[0-9]+>(?:\s*<loc[0-9]+>)*(?:\s*<seg[0-9]{3}>)*")
_LOC = re.compile(r"<loc([0-9]+)>")
# What a loc token looks like when the text was cut inside it: "<", "<l", ..., "<loc1023".
_PARTIAL = re.compile(r"<(?:l(?:o(?:c[0-9]{0,4})?)?)?")


class Fragment:
    """One object-shaped piece of model output: a run of tokens and the label text after it."""

    __slots__ = ("at_end", "label", "text", "tokens")

    def __init__(self, tokens: str, label: str, text: str, at_end: bool):
        self.tokens = tokens  # the run of <loc>/<seg> tokens
        self.label = label  # the text after the run, up to the next run or ";" (stripped)
        self.text = text  # the whole fragment, for error reports
        self.at_end = at_end  # the output stops right after these tokens: no label, no <eos>


def scan(text: str, run: re.Pattern = _RUN, partial: re.Pattern = _PARTIAL):
    """Split model output into Fragments and ParseErrors, in text order (the lexing every
    PaliGemma parser shares; each parser then judges its fragments).

    Drops ``<pad>``/``<bos>``, stops at the first ``<eos>``/``</s>``, yields "empty_output" for
    output with no content, "garbage" for text before the first run of a segment, and
    "truncated_object" for a cut-off token at the very end (``<loc01``), which is merged into
    the last fragment when that one has no label yet (one cut-off object, not two problems).
    ``run`` / ``partial`` match a run of tokens and a token cut short (segmentation adds segs).
    """
    body = _REMNANTS.sub("", text)
    end = _END.search(body)
    terminated = end is not None
    if end is not None:
        body = body[: end.start()]
    if not body.replace(";", "").strip():  # " ; " alone says nothing either
        yield ParseError("empty_output", text)
        return
    cut = ""
    if not terminated:
        lt = body.rfind("<")
        if lt >= 0 and partial.fullmatch(body, lt):
            cut, body = body[lt:], body[:lt]
    segments = body.split(";")
    for si, seg in enumerate(segments):
        runs = list(run.finditer(seg))
        lead = seg[: runs[0].start()] if runs else seg
        if lead.strip():
            yield ParseError("garbage", lead.strip())
        for ri, r in enumerate(runs):
            stop = runs[ri + 1].start() if ri + 1 < len(runs) else len(seg)
            label = seg[r.end() : stop].strip()
            frag = seg[r.start() : stop].strip()
            at_end = si == len(segments) - 1 and ri == len(runs) - 1 and not terminated and not label
            if at_end and cut:
                frag, cut = frag + cut, ""
            yield Fragment(r.group(), label, frag, at_end)
    if cut:
        yield ParseError("truncated_object", cut)


def _bins(run: str) -> list[int] | None:
    """Bins of a loc run, or None if any token is not a real one (<loc0000>..<loc1023>)."""
    digits = _LOC.findall(run)
    # check the length before int(): int() refuses strings over 4300 digits
    if any(len(d) != 4 for d in digits):
        return None
    bins = [int(d) for d in digits]
    return bins if all(b < NUM_LOC for b in bins) else None


def parse(
    text: str,
    width: int,
    height: int,
    kind: str,
    allowed_labels: Collection[str] | None = None,
    divisor: int = 1023,
) -> ParseResult:
    """Read ``kind`` ("point" or "box") objects from model output, in source pixels.

    Never raises on any ``text``: returns every object it could read and a ``ParseError``
    (reason from ``PARSE_REASONS``) for each fragment it rejected. Raises ValueError only
    for bad arguments (unknown kind / divisor, non-positive size): programmer errors.

    Tolerates surrounding whitespace, ``<pad>`` / ``<bos>`` anywhere, a missing space
    between locs and label, and a missing ";" between objects. Text after the first
    ``<eos>`` / ``</s>`` is ignored. Locs without a label at the very end are
    "truncated_object" when the text just stops (generation hit its token limit), but
    "missing_label" when an ``<eos>`` says the model ended there on purpose.
    Boxes with equal start and end bins are returned (zero size); ``check_objects`` flags them.
    """
    if kind not in _N_LOCS:
        raise ValueError(f"unknown kind {kind!r}, expected one of {KINDS}")
    if divisor not in DIVISORS:
        raise ValueError(f"divisor must be one of {DIVISORS}, got {divisor}")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    n_locs = _N_LOCS[kind]

    objects: list[Obj] = []
    errors: list[ParseError] = []
    for f in scan(text):
        if isinstance(f, ParseError):
            errors.append(f)
            continue
        bins = _bins(f.tokens)
        if f.at_end:
            # no label yet: cut off, unless it already has more locs than an object can
            reason = "truncated_object" if bins is not None and len(bins) <= n_locs else "wrong_token_count"
        elif bins is None or len(bins) != n_locs:
            reason = "wrong_token_count"
        elif not f.label:
            reason = "missing_label"
        elif allowed_labels is not None and f.label not in allowed_labels:
            reason = "unknown_label"
        elif kind == "box" and (bins[2] < bins[0] or bins[3] < bins[1]):
            reason = "invalid_box"
        else:
            y = [decode_bin(b, divisor) * height for b in bins[0::2]]
            x = [decode_bin(b, divisor) * width for b in bins[1::2]]
            objects.append(Point(x[0], y[0], f.label) if kind == "point" else Box(x[0], y[0], x[1], y[1], f.label))
            continue
        errors.append(ParseError(reason, f.text))
    return ParseResult(objects, errors)
