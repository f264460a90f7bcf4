"""Row-level checks: every dropped row gets exactly one reason, every conversion one note.

Pure functions (bytes and dicts in, PIL images and strings out); used by ``shards.prepare_*``
when shards are written and again by the Ray Data pipeline when they are read, so a shard
written by anyone else is held to the same rules.

Drop reasons (``REASONS``), checked in this order, first failure wins:

=====================  ==============================================================
``empty_image``        no bytes, or an image with a zero width or height
``corrupt_image``      PIL cannot identify or fully decode the bytes (truncated files too)
``image_too_large``    more pixels than PIL's decompression-bomb limit
``non_rgb``            not RGB and ``allow_convert=False``, or a mode with no safe
                       conversion (32-bit int "I", float "F", ...)
``size_mismatch``      the row's width/height differ from the decoded image
``bad_annotations``    ``objects`` is not valid annotation JSON
``empty_annotations``  \\
``coords_out_of_range``  > from ``raytrain.formats.annotations.check_objects``
``degenerate_box``     /
=====================  ==============================================================

Conversion notes (row kept): ``converted_from_<MODE>``, e.g. ``converted_from_RGBA``.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from raytrain.formats.annotations import (
    ALL_REASONS_INVALID_OBJECTS,
    Box,
    Caption,
    Mask,
    Point,
    Region,
    check_objects,
    objects_from_json,
)

IMAGE_REASONS = ("empty_image", "corrupt_image", "image_too_large", "non_rgb")
ROW_REASONS = ("size_mismatch", "bad_annotations")
REASONS: tuple[str, ...] = IMAGE_REASONS + ROW_REASONS + tuple(ALL_REASONS_INVALID_OBJECTS)

# Modes that PIL's own convert("RGB") maps faithfully to 8-bit RGB.
_DIRECT = {"1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV"}
# Modes with an alpha channel: composited over white, since convert("RGB") would expose
# whatever colour happens to sit under fully transparent pixels.
_ALPHA = {"RGBA", "RGBa", "LA", "La", "PA"}
# 16-bit greyscale (PNG medical/depth style): scaled to 8 bit; convert("RGB") would clip at 255.
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N"}


def _to_rgb(im: Image.Image) -> Image.Image | None:
    mode = im.mode
    if mode in _ALPHA or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in _DIRECT:
        return im.convert("RGB")
    if mode in _SIXTEEN_BIT:
        arr = np.asarray(im, dtype=np.uint16)  # PIL decodes to native order
        return Image.fromarray((arr // 257).astype(np.uint8), "L").convert("RGB")
    return None  # "I", "F", ...: the value range is unknown, so no safe 8-bit mapping


def decode_image(data: bytes | None, allow_convert: bool = True) -> tuple[Image.Image | None, str | None, str | None]:
    """Decode encoded image bytes to an RGB PIL image.

    Returns ``(image, None, note)`` when usable, where ``note`` is ``None`` or
    ``"converted_from_<MODE>"``, and ``(None, reason, None)`` when the row must be dropped.
    """
    if data is None or len(data) == 0:
        return None, "empty_image", None
    try:
        with warnings.catch_warnings():
            # DecompressionBombWarning (between 1x and 2x the limit) is escalated to the error
            # raised above 2x: one image that size stalls a CPU worker for no training value.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(bytes(data)))
            im.load()  # open() only reads the header; load() catches truncated / corrupt bodies
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "image_too_large", None
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on bad input
        return None, "corrupt_image", None
    if im.width == 0 or im.height == 0:
        return None, "empty_image", None
    if im.mode == "RGB":
        return im, None, None
    if not allow_convert:
        return None, "non_rgb", None
    try:
        rgb = _to_rgb(im)
    except Exception:
        return None, "corrupt_image", None
    if rgb is None:
        return None, "non_rgb", None
    return rgb, None, f"converted_from_{im.mode}"


def check_row(row: dict, allow_convert: bool = True) -> tuple[dict | None, str | None, str | None]:
    """Validate one shard row (``raytrain.data.shards.SHARD_SCHEMA``).

    Returns ``(row_out, None, note)`` for a usable row, where ``row_out`` is a shallow copy of
    ``row`` with every field unchanged plus ``"pil"``: the decoded RGB image (the ``image``
    bytes are NOT re-encoded; converted rows keep their original bytes). Returns
    ``(None, reason, None)`` for a dropped row. ``objects`` may be a JSON string or a list of
    ``Point``/``Box``. Missing ``width``/``height`` are filled in from the image.
    """
    pil, reason, note = decode_image(row.get("image"), allow_convert=allow_convert)
    if reason is not None:
        return None, reason, None
    width, height = row.get("width"), row.get("height")
    if (width is not None and int(width) != pil.width) or (height is not None and int(height) != pil.height):
        return None, "size_mismatch", None

    objs = row.get("objects")
    if objs is None:
        objs = []
    elif isinstance(objs, (str, bytes)):
        try:
            objs = objects_from_json(objs.decode() if isinstance(objs, bytes) else objs)
        except (ValueError, UnicodeDecodeError):
            return None, "bad_annotations", None
    elif not all(isinstance(o, (Point, Box, Mask, Caption, Region)) for o in objs):
        return None, "bad_annotations", None
    reason = check_objects(objs, pil.width, pil.height)
    if reason is not None:
        return None, reason, None

    out = dict(row)
    out["width"], out["height"] = pil.width, pil.height
    out["pil"] = pil
    return out, None, note
