"""Canonical grounding annotations, always in SOURCE-IMAGE PIXELS.

Coordinates are floats in the pixel frame of the original image (before any resize):
x to the right, y down, origin at the top-left corner of the image, so a valid
coordinate lies in ``[0, width]`` / ``[0, height]``. Every model format
(``paligemma.py``, ``qwen.py``, ...) renders from and parses back to these types.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass(frozen=True)
class Point:
    """A point in source-image pixels."""

    x: float
    y: float
    label: str = ""


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in source-image pixels, (x1, y1) top-left, (x2, y2) bottom-right."""

    x1: float
    y1: float
    x2: float
    y2: float
    label: str = ""

    @property
    def width(self) -> float:
        """x2 - x1 in pixels (negative for an inverted box)."""
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        """y2 - y1 in pixels (negative for an inverted box)."""
        return self.y2 - self.y1

    @property
    def area(self) -> float:
        """Area in square pixels; 0 for a degenerate or inverted box."""
        return max(self.width, 0.0) * max(self.height, 0.0)

    @property
    def center(self) -> Point:
        """Centre of the box, carrying the box's label."""
        return Point((self.x1 + self.x2) / 2, (self.y1 + self.y2) / 2, self.label)


Obj = Point | Box

# ---------------------------------------------------------------------------- JSON
# Shards store annotations as one JSON string per image, so the schema stays flat.

_FIELDS = {"point": ("x", "y"), "box": ("x1", "y1", "x2", "y2")}


def objects_to_json(objs: Sequence[Obj]) -> str:
    """JSON list of ``{"type": "point", "x", "y", "label"}`` / ``{"type": "box", "x1", ..., "label"}``.

    Raises ValueError on non-finite coordinates (NaN / inf are not JSON).
    """
    out: list[dict[str, Any]] = []
    for o in objs:
        if isinstance(o, Point):
            out.append({"type": "point", "x": float(o.x), "y": float(o.y), "label": o.label})
        elif isinstance(o, Box):
            xyxy = {"x1": float(o.x1), "y1": float(o.y1), "x2": float(o.x2), "y2": float(o.y2)}
            out.append({"type": "box", **xyxy, "label": o.label})
        else:
            raise TypeError(f"expected Point or Box, got {type(o).__name__}")
    return json.dumps(out, allow_nan=False)


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name} is not allowed")


def objects_from_json(s: str) -> list[Obj]:
    """Inverse of ``objects_to_json``. Raises ValueError saying what is wrong on malformed input.

    ``label`` may be absent (read as ""); any other missing, extra or non-numeric field
    is an error, as is NaN / Infinity.
    """
    try:
        data = json.loads(s, parse_constant=_reject_constant)
    except (TypeError, RecursionError, json.JSONDecodeError) as e:
        raise ValueError(f"annotations are not valid JSON: {type(e).__name__}: {e}") from None
    if not isinstance(data, list):
        raise ValueError(f"annotations must be a JSON list, got {type(data).__name__}")
    objs: list[Obj] = []
    for i, d in enumerate(data):
        if not isinstance(d, dict):
            raise ValueError(f"object {i}: expected a JSON object, got {type(d).__name__}")
        kind = d.get("type")
        if kind not in _FIELDS:
            raise ValueError(f"object {i}: unknown type {kind!r} (expected 'point' or 'box')")
        names = _FIELDS[kind]
        extra = set(d) - set(names) - {"type", "label"}
        if extra:
            raise ValueError(f"object {i}: unexpected fields {sorted(extra)}")
        coords = []
        for n in names:
            if n not in d:
                raise ValueError(f"object {i}: missing field {n!r}")
            v = d[n]
            # bool is an int subclass; true/false as a coordinate is a bug upstream
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"object {i}: field {n!r} must be a number, got {v!r}")
            try:
                f = float(v)
            except OverflowError:  # an int too large for a float
                f = math.inf
            if not math.isfinite(f):  # 1e999 parses to inf without going through parse_constant
                raise ValueError(f"object {i}: field {n!r} is not a finite number")
            coords.append(f)
        label = d.get("label", "")
        if not isinstance(label, str):
            raise ValueError(f"object {i}: label must be a string, got {label!r}")
        objs.append(Point(*coords, label=label) if kind == "point" else Box(*coords, label=label))
    return objs


# ---------------------------------------------------------------------------- validation

REASONS_INVALID_OBJECTS = ("empty_annotations", "coords_out_of_range", "degenerate_box")


def _coords(o: Obj) -> tuple[tuple[float, float], ...]:
    """(value, limit-axis) pairs: axis 0 is x, 1 is y."""
    if isinstance(o, Point):
        return ((o.x, 0), (o.y, 1))
    return ((o.x1, 0), (o.y1, 1), (o.x2, 0), (o.y2, 1))


def check_objects(objs: Sequence[Obj], width: int, height: int) -> str | None:
    """None if the objects are usable on a ``width`` x ``height`` pixel image, else one reason.

    Reasons (``REASONS_INVALID_OBJECTS``), first failing object wins, coordinates checked
    before geometry: "empty_annotations" (no objects), "coords_out_of_range" (a coordinate
    is non-finite, < 0, or > width / height), "degenerate_box" (x2 <= x1 or y2 <= y1).
    """
    if len(objs) == 0:
        return "empty_annotations"
    limits = (width, height)
    for o in objs:
        for v, axis in _coords(o):
            if not math.isfinite(v) or v < 0 or v > limits[axis]:
                return "coords_out_of_range"
        if isinstance(o, Box) and (o.x2 <= o.x1 or o.y2 <= o.y1):
            return "degenerate_box"
    return None


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (any common unit); 0.0 when the union is empty."""
    iw = min(a.x2, b.x2) - max(a.x1, b.x1)
    ih = min(a.y2, b.y2) - max(a.y1, b.y1)
    inter = max(iw, 0.0) * max(ih, 0.0)
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


# ---------------------------------------------------------------------------- parse results


@dataclass
class ParseError:
    """One fragment of model output that a parser rejected, and why."""

    reason: str
    text: str


@dataclass
class ParseResult:
    """What a parser read from one model output: objects in source pixels, plus rejections."""

    objects: list[Obj] = field(default_factory=list)
    errors: list[ParseError] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        """True when at least one object was read and nothing was rejected."""
        return bool(self.objects) and not self.errors
