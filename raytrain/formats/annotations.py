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


@dataclass(frozen=True)
class Mask:
    """A binary mask over the WHOLE source image, stored as COCO compressed RLE.

    ``size`` is ``(height, width)`` of the image in pixels (COCO's order), ``counts`` the
    compressed RLE string that ``pycocotools.mask.encode`` writes (column-major runs,
    starting with a run of zeros). Pixel ``(c, r)`` set means the object covers
    ``[c, c+1) x [r, r+1)``, the same continuous convention as :class:`Box`.
    """

    size: tuple[int, int]
    counts: str
    label: str = ""

    @property
    def height(self) -> int:
        return int(self.size[0])

    @property
    def width(self) -> int:
        return int(self.size[1])

    @property
    def rle(self) -> dict:
        """``{"size": [h, w], "counts": str}``: what ``pycocotools.mask`` functions take."""
        return {"size": [self.height, self.width], "counts": self.counts}

    @classmethod
    def from_rle(cls, rle: dict, label: str = "") -> Mask:
        """From a COCO RLE dict: compressed (``counts`` str/bytes) or uncompressed (a list of
        run lengths, as COCO stores ``iscrowd`` annotations). Raises ValueError if malformed."""
        from pycocotools import mask as mask_utils

        if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
            raise ValueError(f"RLE must be a dict with 'size' and 'counts', got {rle!r:.80}")
        h, w = _check_size(rle["size"])
        counts = rle["counts"]
        if isinstance(counts, list):
            if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts) or sum(counts) != h * w:
                raise ValueError(f"uncompressed RLE counts must be non-negative ints summing to {h}*{w}")
            counts = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)["counts"]
        if isinstance(counts, bytes):
            counts = counts.decode("ascii", errors="replace")
        if not isinstance(counts, str):
            raise ValueError(f"RLE counts must be a string or a list, got {type(counts).__name__}")
        _check_counts(counts, h, w)
        return cls((h, w), counts, label)

    @classmethod
    def from_array(cls, mask, label: str = "") -> Mask:
        """From a 2-D array (bool or 0/1), shape ``(height, width)``."""
        import numpy as np
        from pycocotools import mask as mask_utils

        arr = np.asarray(mask)
        if arr.ndim != 2:
            raise ValueError(f"mask must be 2-D (height, width), got shape {arr.shape}")
        rle = mask_utils.encode(np.asfortranarray(arr.astype(bool).astype(np.uint8)))
        return cls((int(arr.shape[0]), int(arr.shape[1])), rle["counts"].decode("ascii"), label)

    @classmethod
    def from_polygons(cls, polygons: Sequence[Sequence[float]], height: int, width: int, label: str = "") -> Mask:
        """Rasterise COCO polygons (each a flat ``[x1, y1, x2, y2, ...]`` in pixels) into one mask,
        the way COCO does (``pycocotools.mask.frPyObjects`` + ``merge``)."""
        from pycocotools import mask as mask_utils

        h, w = _check_size([height, width])
        polys = []
        for p in polygons:
            p = [float(v) for v in p]
            # frPyObjects reads a 4-number list as a bbox, not a polygon: demand >= 3 vertices
            if len(p) < 6 or len(p) % 2 or not all(math.isfinite(v) for v in p):
                raise ValueError(f"a polygon needs >= 3 finite (x, y) pairs, got {len(p)} numbers")
            polys.append(p)
        if not polys:
            raise ValueError("no polygons")
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
        return cls((h, w), rle["counts"].decode("ascii"), label)

    def to_array(self):
        """Boolean array of shape ``(height, width)``."""
        from pycocotools import mask as mask_utils

        _check_counts(self.counts, self.height, self.width)  # pycocotools decodes without bounds checks
        return mask_utils.decode(self._coco()).astype(bool)

    @property
    def area(self) -> int:
        """Number of pixels set."""
        counts = _check_counts(self.counts, self.height, self.width)
        return int(sum(counts[1::2]))

    @property
    def box(self) -> Box:
        """Tight box around the set pixels (continuous convention: x2 = last column + 1),
        carrying the mask's label; ``Box(0, 0, 0, 0)`` for an empty mask."""
        from pycocotools import mask as mask_utils

        if self.area == 0:
            return Box(0.0, 0.0, 0.0, 0.0, self.label)
        x, y, w, h = (float(v) for v in mask_utils.toBbox(self._coco()))
        return Box(x, y, x + w, y + h, self.label)

    def _coco(self) -> dict:
        return {"size": [self.height, self.width], "counts": self.counts.encode("ascii")}


@dataclass(frozen=True)
class Caption:
    """A caption of the whole image."""

    text: str

    @property
    def label(self) -> str:
        """Always "": a caption is not about one labelled object (kept so every object has ``label``)."""
        return ""


@dataclass(frozen=True)
class Region:
    """A described region (dense captioning, Visual Genome): a box in source pixels + a phrase."""

    x1: float
    y1: float
    x2: float
    y2: float
    phrase: str

    @property
    def box(self) -> Box:
        """The region's box, labelled with its phrase."""
        return Box(self.x1, self.y1, self.x2, self.y2, self.phrase)

    @property
    def label(self) -> str:
        """The phrase (so every object has ``label``)."""
        return self.phrase


@dataclass(frozen=True)
class CodedMask:
    """A mask given as PaliGemma's 16 VQ codes of the mask cropped to its box (big_vision's
    segmentation targets, as Datature-style JSONL ships them): the box in source pixels and the
    codes, learnable as written without the codec; pixels only through the codec's decoder."""

    x1: float
    y1: float
    x2: float
    y2: float
    label: str
    codes: tuple[int, ...]

    @property
    def box(self) -> Box:
        return Box(self.x1, self.y1, self.x2, self.y2, self.label)


@dataclass(frozen=True)
class Absent:
    """A negative: the image was checked for `label` and holds none (seed 004's "Normal" rows,
    PixMo-Points rows with count 0). It renders as the answer format's "nothing found" answer."""

    label: str


def _check_size(size) -> tuple[int, int]:
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in size)
    ):
        raise ValueError(f"mask size must be [height, width] as non-negative ints, got {size!r}")
    return int(size[0]), int(size[1])


def _check_counts(counts: str, h: int, w: int) -> list[int]:
    """Run lengths of a compressed COCO RLE string; ValueError unless they cover exactly h*w pixels.

    Same decoding as pycocotools' ``rleFrString`` (6-bit groups from chr(48), 0x20 = more,
    0x10 = sign, runs after the second stored as differences), done here first because
    pycocotools writes past its buffer on counts that do not add up to the size.
    """
    runs: list[int] = []
    p, n = 0, len(counts)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise ValueError("RLE counts string ends inside a number")
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"invalid character {counts[p]!r} in RLE counts")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            raise ValueError("negative run length in RLE counts")
        runs.append(x)
    if sum(runs) != h * w:
        raise ValueError(f"RLE runs cover {sum(runs)} pixels, size {h}x{w} has {h * w}")
    return runs


Obj = Point | Box | Mask | Caption | Region | Absent | CodedMask

# ---------------------------------------------------------------------------- JSON
# Shards store annotations as one JSON string per image, so the schema stays flat.

_FIELDS = {
    "point": ("x", "y"),
    "box": ("x1", "y1", "x2", "y2"),
    "region": ("x1", "y1", "x2", "y2"),
    "caption": (),
    "mask_rle": (),
    "absent": (),
    "mask_codes": ("x1", "y1", "x2", "y2"),
}
"""Numeric fields of each JSON ``type``."""
_STRINGS = {
    "point": {"label": False},
    "box": {"label": False},
    "region": {"phrase": True},
    "caption": {"text": True},
    "mask_rle": {"counts": True, "label": False},
    "absent": {"label": True},
    "mask_codes": {"label": False},
}
"""String fields of each JSON ``type``: name -> required (optional ones default to "")."""
_OTHER = {"mask_rle": ("size",), "mask_codes": ("codes",)}
_TYPES = ", ".join(repr(t) for t in _FIELDS)


def _to_dict(o: Obj) -> dict[str, Any]:
    if isinstance(o, Point):
        return {"type": "point", "x": float(o.x), "y": float(o.y), "label": o.label}
    if isinstance(o, Box):
        xyxy = {"x1": float(o.x1), "y1": float(o.y1), "x2": float(o.x2), "y2": float(o.y2)}
        return {"type": "box", **xyxy, "label": o.label}
    if isinstance(o, Region):
        xyxy = {"x1": float(o.x1), "y1": float(o.y1), "x2": float(o.x2), "y2": float(o.y2)}
        return {"type": "region", **xyxy, "phrase": o.phrase}
    if isinstance(o, Caption):
        return {"type": "caption", "text": o.text}
    if isinstance(o, Mask):
        return {"type": "mask_rle", "size": [int(o.size[0]), int(o.size[1])], "counts": o.counts, "label": o.label}
    if isinstance(o, Absent):
        return {"type": "absent", "label": o.label}
    if isinstance(o, CodedMask):
        xyxy = {"x1": float(o.x1), "y1": float(o.y1), "x2": float(o.x2), "y2": float(o.y2)}
        return {"type": "mask_codes", **xyxy, "label": o.label, "codes": [int(c) for c in o.codes]}
    raise TypeError(f"expected Point, Box, Mask, Caption, Region or Absent, got {type(o).__name__}")


def objects_to_json(objs: Sequence[Obj]) -> str:
    """JSON list with one dict per object, tagged by ``type``:

    ``{"type": "point", "x", "y", "label"}``, ``{"type": "box", "x1", "y1", "x2", "y2", "label"}``,
    ``{"type": "region", "x1", "y1", "x2", "y2", "phrase"}``, ``{"type": "caption", "text"}``,
    ``{"type": "mask_rle", "size": [h, w], "counts", "label"}`` (COCO compressed RLE),
    ``{"type": "absent", "label"}`` (a negative: the image holds no `label`),
    ``{"type": "mask_codes", "x1", "y1", "x2", "y2", "label", "codes": [16 ints]}`` (PaliGemma VQ codes).

    Raises ValueError on non-finite coordinates (NaN / inf are not JSON).
    """
    return json.dumps([_to_dict(o) for o in objs], allow_nan=False)


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name} is not allowed")


def objects_from_json(s: str) -> list[Obj]:
    """Inverse of ``objects_to_json``. Raises ValueError saying what is wrong on malformed input.

    ``label`` may be absent (read as ""); any other missing, extra or non-numeric field
    is an error, as is NaN / Infinity, and a mask whose RLE runs do not cover its size.
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
        if not isinstance(kind, str) or kind not in _FIELDS:
            raise ValueError(f"object {i}: unknown type {kind!r} (expected one of {_TYPES})")
        names = _FIELDS[kind]
        extra = set(d) - set(names) - set(_STRINGS[kind]) - set(_OTHER.get(kind, ())) - {"type"}
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
        text: dict[str, str] = {}
        for n, required in _STRINGS[kind].items():
            if n not in d and required:
                raise ValueError(f"object {i}: missing field {n!r}")
            v = d.get(n, "")
            if not isinstance(v, str):
                raise ValueError(f"object {i}: {n} must be a string, got {v!r}")
            text[n] = v
        if kind == "point":
            objs.append(Point(*coords, label=text["label"]))
        elif kind == "box":
            objs.append(Box(*coords, label=text["label"]))
        elif kind == "region":
            objs.append(Region(*coords, phrase=text["phrase"]))
        elif kind == "caption":
            objs.append(Caption(text["text"]))
        elif kind == "mask_codes":
            codes = d.get("codes")
            if not isinstance(codes, list) or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c for c in codes):
                raise ValueError(f"object {i}: codes must be a list of non-negative ints, got {codes!r}")
            objs.append(CodedMask(*coords, label=text["label"], codes=tuple(codes)))
        elif kind == "absent":
            if not text["label"].strip():
                raise ValueError(f"object {i}: an absent label must not be empty")
            objs.append(Absent(text["label"]))
        else:
            if "size" not in d:
                raise ValueError(f"object {i}: missing field 'size'")
            try:
                h, w = _check_size(d["size"])
                _check_counts(text["counts"], h, w)
            except ValueError as e:
                raise ValueError(f"object {i}: {e}") from None
            objs.append(Mask((h, w), text["counts"], text["label"]))
    return objs


# ---------------------------------------------------------------------------- validation

REASONS_INVALID_OBJECTS = ("empty_annotations", "coords_out_of_range", "degenerate_box")
REASONS_INVALID_OBJECTS_MORE = ("mask_size_mismatch", "empty_mask", "empty_text")
"""Reasons that only masks, captions and regions can give."""
ALL_REASONS_INVALID_OBJECTS = REASONS_INVALID_OBJECTS + REASONS_INVALID_OBJECTS_MORE


def _coords(o: Obj) -> tuple[tuple[float, float], ...]:
    """(value, limit-axis) pairs: axis 0 is x, 1 is y."""
    if isinstance(o, Point):
        return ((o.x, 0), (o.y, 1))
    if isinstance(o, (Box, Region, CodedMask)):
        return ((o.x1, 0), (o.y1, 1), (o.x2, 0), (o.y2, 1))
    return ()  # masks are checked by size, captions have no geometry


def check_objects(objs: Sequence[Obj], width: int, height: int) -> str | None:
    """None if the objects are usable on a ``width`` x ``height`` pixel image, else one reason.

    Reasons (``ALL_REASONS_INVALID_OBJECTS``), first failing object wins, coordinates checked
    before geometry: "empty_annotations" (no objects), "coords_out_of_range" (a coordinate
    is non-finite, < 0, or > width / height), "degenerate_box" (a box or region with
    x2 <= x1 or y2 <= y1), "mask_size_mismatch" (mask size != (height, width)),
    "empty_mask" (no pixel set), "empty_text" (blank caption or region phrase).
    """
    if len(objs) == 0:
        return "empty_annotations"
    limits = (width, height)
    for o in objs:
        for v, axis in _coords(o):
            if not math.isfinite(v) or v < 0 or v > limits[axis]:
                return "coords_out_of_range"
        if isinstance(o, (Box, Region, CodedMask)) and (o.x2 <= o.x1 or o.y2 <= o.y1):
            return "degenerate_box"
        if isinstance(o, Mask):
            if (o.height, o.width) != (height, width):
                return "mask_size_mismatch"
            if o.area == 0:
                return "empty_mask"
        if isinstance(o, Caption) and not o.text.strip():
            return "empty_text"
        if isinstance(o, Region) and not o.phrase.strip():
            return "empty_text"
    return None


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (any common unit); 0.0 when the union is empty."""
    iw = min(a.x2, b.x2) - max(a.x1, b.x1)
    ih = min(a.y2, b.y2) - max(a.y1, b.y1)
    inter = max(iw, 0.0) * max(ih, 0.0)
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


# ---------------------------------------------------------------------------- reading model text


def answer_body(text, end, remnants) -> tuple[str, bool] | ParseResult:
    """A model output up to its first end token (`end`, a compiled pattern), with control-token
    `remnants` removed: (body, whether an end token was seen); a ParseResult with "empty_output"
    when nothing is left (every text parser starts with this)."""
    body = text if isinstance(text, str) else ""
    m = end.search(body)
    if m is not None:
        body = body[: m.start()]
    body = remnants.sub("", body)
    if not body.strip():
        return ParseResult([], [ParseError("empty_output", text if isinstance(text, str) else repr(text))])
    return body, m is not None


# ---------------------------------------------------------------------------- matching pieces to a parse


def match_in_order(full: Sequence, placed: Sequence[tuple]) -> list:
    """For each object of `full` (a whole answer's parse), the value of the first not yet used
    (object, value) pair of `placed` (its pieces parsed one by one, in order) whose object equals
    it; NaN where none does. Confidences use it to give each parsed object its tokens' score."""
    out, k = [], 0
    for o in full:
        j = k
        while j < len(placed) and placed[j][0] != o:
            j += 1
        if j < len(placed):
            out.append(placed[j][1])
            k = j + 1
        else:
            out.append(float("nan"))
    return out


# ---------------------------------------------------------------------------- ranking and NMS


def score_order(scores: Sequence[float]) -> list[int]:
    """Indices best score first; NaN / None rank last; ties keep the input order."""
    key = [(-s if s is not None and math.isfinite(s) else math.inf) for s in (float(v) for v in scores)]
    return sorted(range(len(key)), key=lambda i: (key[i], i))


def nms(
    objects: Sequence[Obj],
    scores: Sequence[float],
    iou_threshold: float = 0.5,
    distance_threshold: float | None = None,
    class_aware: bool = True,
) -> list[int]:
    """Greedy non-maximum suppression; returns the indices kept, best score first.

    Boxes: a box is dropped when its IoU with an already kept box is > ``iou_threshold``
    (as ``torchvision.ops.nms``). Points: a point is dropped when it lies within
    ``distance_threshold`` pixels (<=) of a kept point; required for points. With
    ``class_aware`` only objects with the same label suppress each other. NaN scores rank last.
    """
    if len(objects) != len(scores):
        raise ValueError(f"{len(objects)} objects but {len(scores)} scores")
    if not objects:
        return []
    if all(isinstance(o, Box) for o in objects):
        def overlaps(a, b):
            return box_iou(a, b) > iou_threshold
    elif all(isinstance(o, Point) for o in objects):
        if distance_threshold is None:
            raise ValueError("nms over points needs distance_threshold (pixels)")

        def overlaps(a, b):
            return math.hypot(a.x - b.x, a.y - b.y) <= distance_threshold
    else:
        raise TypeError("nms needs all boxes or all points")
    kept: list[int] = []
    for i in score_order(scores):
        o = objects[i]
        if not any((not class_aware or objects[k].label == o.label) and overlaps(objects[k], o) for k in kept):
            kept.append(i)
    return kept


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
