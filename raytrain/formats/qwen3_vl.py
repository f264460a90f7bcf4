"""Qwen3-VL grounding codec on strings only (no tokenizer, no torch).

Qwen3-VL answers grounding queries with the same JSON as Qwen2.5-VL,
``{"bbox_2d": [x1, y1, x2, y2], "label": "cat"}`` / ``{"point_2d": [x, y], "label": "cat"}``,
but its integers are RELATIVE coordinates on a 0-1000 scale of the image it was given, whatever
its size: ``x_pixel = v / 1000 * width`` (not Qwen2.5-VL's absolute pixels of the resized image).
Sources: Qwen's own ODinW-13 evaluation (QwenLM/Qwen3-VL ``evaluation/ODinW-13/run_odinw.py``,
relative mode: ``bbox / 1000 * [w, h, w, h]``, answer taken after the last ``</think>``), the
cookbook "2d_grounding" ("relative position coordinates"), and supervision's
``Detections.from_vlm(VLM.QWEN_3_VL)`` (Qwen2.5-VL's parser with ``input_wh=(1000, 1000)``).
The divisor is 1000, not 999: 1000 is the image's right / bottom edge.

So the codec is Qwen2.5-VL's ``absolute`` representation in a 1000 x 1000 frame: it reuses
``formats.qwen`` (same JSON scanning, fences, truncation recovery, reasons ``PARSE_REASONS``):

* render: ``round(clip(v / side * 1000, 0, 1000))`` as integers, canonical order (y, then x);
* parse: values clipped to [0, 1000] then ``v * side / 1000``; never raises on model text.

Differences from Qwen2.5-VL: the reasoning of a Thinking model (everything up to the last
``</think>``) is skipped, and an empty list (``[]``, fenced or not) is the "nothing found" answer:
zero objects and NO error, so negatives (images without the object) can be trained and scored.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence

from raytrain.formats import qwen
from raytrain.formats.annotations import Obj, ParseResult
from raytrain.formats.numbers import NumberSpan

SCALE = 1000  # coordinates are 0..SCALE along each side of the image
KINDS = qwen.KINDS
PARSE_REASONS = qwen.PARSE_REASONS
NOTHING_FOUND = "[]"  # unfenced; render_objects([]) gives the fenced form

_THINK_END = "</think>"
# An answer that is an empty list and nothing else (fences, Qwen's end tokens and whitespace aside).
_EMPTY_LIST = re.compile(r"\s*(?:```[ \t]*(?:json)?\s*)?\[\s*\]\s*(?:```\s*)?(?:(?:<\|im_end\|>|<\|endoftext\|>)[\s\S]*)?", re.IGNORECASE)


def render_objects(objs: Sequence[Obj], width: int, height: int, fenced: bool = True, shuffle: bool = False, seed: int = 0) -> str:
    """Target text for source-pixel points or boxes of a ``width`` x ``height`` image, as Qwen3-VL
    writes it (a ```json fence, one object per line, when ``fenced``). No objects: the empty list.
    Coordinates outside the image are clipped to its edge. Raises ValueError / TypeError as
    ``qwen.render_objects`` does (non-finite coordinates, unrenderable labels, bad sizes)."""
    return render_objects_spans(objs, width, height, fenced=fenced, shuffle=shuffle, seed=seed)[0]


def render_objects_spans(objs: Sequence[Obj], width: int, height: int, fenced: bool = True, shuffle: bool = False,
                         seed: int = 0) -> tuple[str, list[NumberSpan]]:
    """``render_objects``' text and the span of every coordinate number in it, each with range
    ``SCALE`` (formats/numbers.py: what the distance-aware number loss weighs)."""
    return qwen.render_objects_spans(objs, width, height, SCALE, SCALE, "absolute", fenced=fenced, shuffle=shuffle, seed=seed)


def strip_reasoning(text: str) -> str:
    """The answer of a Thinking model's output: the text after the last ``</think>`` (all of it when
    there is none), as Qwen's own evaluation reads it; "" for a non-string."""
    body = text if isinstance(text, str) else ""
    think = body.rfind(_THINK_END)
    return body[think + len(_THINK_END) :] if think >= 0 else body


def parse(text: str, kind: str, width: int, height: int, allowed_labels: Collection[str] | None = None) -> ParseResult:
    """Read ``kind`` ("point" or "box") objects from Qwen3-VL output; objects in SOURCE pixels.

    Never raises on any ``text``; raises ValueError only for an unknown kind or a non-positive
    size. Tolerates a ```json fence, text around the answer, a single object without a list,
    objects one after another, extra keys, and a cut: every object complete before it is kept
    ("truncated_object" for the rest), as ``qwen.parse``. Coordinates outside 0-1000 are clipped
    to the image edge, as ``qwen.parse`` does for Qwen2.5-VL. ``[]`` is a valid empty answer.
    """
    body = strip_reasoning(text)
    res = qwen.parse(body, kind, width, height, SCALE, SCALE, "absolute", allowed_labels=allowed_labels, clip=True)
    if not res.objects and [e.reason for e in res.errors] == ["empty_output"] and _EMPTY_LIST.fullmatch(body):
        return ParseResult([], [])
    return res
