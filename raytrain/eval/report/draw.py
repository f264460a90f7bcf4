"""Overlays: ground truth vs prediction drawn on the source image, one PNG per example.

PIL, not matplotlib: exact colours and no anti-aliasing, so a test can find the markers in
the PNG, and no figure machinery per image.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from raytrain.eval.report.analysis import Example, as_box, has_box, score_summary
from raytrain.formats.annotations import Mask, box_iou

# Seed report 000's convention: ground truth is a blue circle, the prediction a red cross.
# Exact RGB values, drawn without anti-aliasing, so a test can find them in the PNG.
GT_COLOUR = (30, 144, 255)
PRED_COLOUR = (255, 40, 40)
HALO_COLOUR = (255, 255, 255)  # a thin white rim keeps markers visible on any background
OVERLAY_SIDE = 384  # longer side of an overlay's image area, in PNG pixels


def font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font, fixed size
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, fnt, width: float) -> str:
    text = " ".join(text.split())
    if draw.textlength(text, font=fnt) <= width:
        return text
    while text and draw.textlength(text + "...", font=fnt) > width:
        text = text[: max(len(text) - 4, 0)]
    return text + "..."


def mask_array(o: dict, width: int, height: int) -> np.ndarray | None:
    """A mask object as a bool (height, width) array in source pixels, or None if its encoding
    is unknown or malformed. Accepted: ``rle`` (COCO RLE, compressed or not, of this image's
    size), ``polygon`` / ``polygons`` (source-pixel vertices, [[x, y], ...] or flat), both
    through ``annotations.Mask``; ``mask`` (a 2-D grid of 0..1 spanning the object's box
    x1..y2, as PaliGemma's 64x64 masks, or the whole image when there is no box)."""
    if isinstance(o.get("rle"), dict):
        try:
            m = Mask.from_rle(o["rle"]).to_array()
        except (ValueError, TypeError):
            return None
        return m if m.shape == (height, width) else None
    polys = o.get("polygons") or ([o["polygon"]] if o.get("polygon") else None)
    if polys:
        flat = []
        for poly in polys if isinstance(polys, list) else []:
            try:
                xy = np.asarray(poly, dtype=np.float64).reshape(-1)
            except (ValueError, TypeError):
                continue
            if len(xy) >= 6 and len(xy) % 2 == 0 and np.isfinite(xy).all():
                flat.append(xy.tolist())
        return Mask.from_polygons(flat, height, width).to_array() if flat else None
    if o.get("mask") is not None:
        try:
            grid = np.asarray(o["mask"], dtype=np.float32)
        except (ValueError, TypeError):
            return None
        if grid.ndim != 2 or not grid.size:
            return None
        full = np.zeros((height, width), dtype=bool)
        if has_box(o):
            x1, y1 = max(math.floor(o["x1"]), 0), max(math.floor(o["y1"]), 0)
            x2, y2 = min(math.ceil(o["x2"]), width), min(math.ceil(o["y2"]), height)
        else:
            x1, y1, x2, y2 = 0, 0, width, height
        if x2 <= x1 or y2 <= y1:
            return full
        patch = Image.fromarray(grid).resize((x2 - x1, y2 - y1), Image.BILINEAR)
        full[y1:y2, x1:x2] = np.asarray(patch) > 0.5
        return full
    return None


def _paint_mask(canvas: Image.Image, m: np.ndarray, colour: tuple[int, int, int]) -> None:
    """Tint the mask's pixels (alpha 0.35) and draw its outline in the exact colour."""
    m = np.asarray(Image.fromarray(m).resize(canvas.size, Image.NEAREST), dtype=bool)
    if not m.any():
        return
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    rgb = np.asarray(canvas, dtype=np.float32)
    rgb[m] = 0.65 * rgb[m] + 0.35 * np.asarray(colour, dtype=np.float32)
    rgb = rgb.round().astype(np.uint8)
    rgb[m & ~inner] = colour
    canvas.paste(Image.fromarray(rgb))


def draw_overlay(img: Image.Image, ex: Example, caption: list[str]) -> tuple[Image.Image, dict]:
    """The source image scaled so its longer side is OVERLAY_SIDE, GT and prediction drawn on
    it, and a caption band below. Returns the PNG image and the geometry (scale, drawn
    coordinates) that report.json records."""
    w, h = ex.width or img.width, ex.height or img.height
    scale = OVERLAY_SIDE / max(w, h)
    size = (max(round(w * scale), 1), max(round(h * scale), 1))
    sx, sy = size[0] / w, size[1] / h  # source pixel edge coordinates map linearly
    base = img.convert("RGB").resize(size, Image.NEAREST if scale >= 1 else Image.LANCZOS)
    caption_font = font(13)
    line_h = 17
    canvas = Image.new("RGB", (size[0], size[1] + line_h * len(caption) + 6), (255, 255, 255))
    canvas.paste(base, (0, 0))
    gt = ex.gt or []
    drawn: dict[str, list] = {"gt": [], "pred": []}
    undrawable = 0

    # masks first (tints), then boxes, then points on top; GT before prediction
    image_area = canvas.crop((0, 0, *size))
    for who, objs, colour in (("gt", gt, GT_COLOUR), ("pred", ex.pred, PRED_COLOUR)):
        for o in objs:
            if o["type"] == "mask":
                m = mask_array(o, w, h)
                if m is None:
                    undrawable += 1
                    continue
                _paint_mask(image_area, m, colour)
                drawn[who].append({"type": "mask", "pixels": int(m.sum())})
    canvas.paste(image_area, (0, 0))
    draw = ImageDraw.Draw(canvas)
    small = font(11)

    def label_box(x: float, y: float, text: str, colour, above: bool) -> None:
        tw = draw.textlength(text, font=small) + 6
        top = y - 15 if above else y + 1
        top = min(max(top, 0), size[1] - 15)
        left = min(max(x, 0), max(size[0] - tw, 0))
        draw.rectangle([left, top, left + tw, top + 14], fill=colour)
        draw.text((left + 3, top + 1), text, fill=(255, 255, 255), font=small)

    gt_boxes = [as_box(o) for o in gt if o["type"] == "box"]
    labels = []  # drawn after every rectangle, so no outline crosses a label
    for who, objs, colour in (("gt", gt, GT_COLOUR), ("pred", ex.pred, PRED_COLOUR)):
        for o in objs:
            if o["type"] == "box" or (o["type"] == "mask" and has_box(o)):
                r = [o["x1"] * sx, o["y1"] * sy, o["x2"] * sx, o["y2"] * sy]
                if r[2] < r[0] or r[3] < r[1]:  # inverted: the parser rejects these; never drawn
                    continue
                draw.rectangle([r[0] - 1, r[1] - 1, r[2] + 1, r[3] + 1], outline=HALO_COLOUR, width=1)
                draw.rectangle(r, outline=colour, width=2)
                if who == "gt":  # GT label above the box's top-left, prediction's below its bottom-left
                    labels.append((r[0], r[1], f"GT {o['label']}", colour, True))
                else:
                    best = max((box_iou(as_box(o), g) for g in gt_boxes), default=None)
                    labels.append((r[0], r[3], o["label"] + ("" if best is None else f" IoU {best:.2f}"), colour, False))
                if o["type"] == "box":
                    drawn[who].append({"type": "box", "xyxy": r})
    for args in labels:
        label_box(*args)
    for o in gt:
        if o["type"] == "point":
            x, y = o["x"] * sx, o["y"] * sy
            draw.ellipse([x - 8, y - 8, x + 8, y + 8], outline=HALO_COLOUR, width=4)
            draw.ellipse([x - 7, y - 7, x + 7, y + 7], outline=GT_COLOUR, width=2)
            drawn["gt"].append({"type": "point", "xy": [x, y]})
    for o in ex.pred:
        if o["type"] == "point":
            x, y = o["x"] * sx, o["y"] * sy
            for colour, width in ((HALO_COLOUR, 5), (PRED_COLOUR, 3)):
                draw.line([(x - 6, y - 6), (x + 6, y + 6)], fill=colour, width=width)
                draw.line([(x - 6, y + 6), (x + 6, y - 6)], fill=colour, width=width)
            drawn["pred"].append({"type": "point", "xy": [x, y]})

    for k, line in enumerate(caption):
        draw.text((4, size[1] + 3 + k * line_h), _fit(draw, line, caption_font, size[0] - 8), fill=(0, 0, 0), font=caption_font)
    return canvas, {"scale": [sx, sy], "image_size": list(size), "drawn": drawn, "undrawable_masks": undrawable}


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in s) or "task"


def overlays(selected, images: dict[str, bytes], out: Path) -> tuple[list[dict], list[str]]:
    """Write overlays/<task>_<category>_<nn>.png for ``analysis.select``'s picks; returns their
    records (report.json) and notes."""
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    records, notes = [], []
    no_image = undrawable = 0
    for k, (cat, rank, of, ex) in enumerate(selected):
        data = images.get(ex.id)
        if data is None:
            no_image += 1
            continue
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # a broken image is a note, not a crash
            notes.append(f"overlay for {ex.id}: image does not decode ({type(e).__name__})")
            continue
        errs = Counter(r for r, _ in ex.errors)
        summary = score_summary(ex)
        caption = [
            f"{cat}: {rank} of {of}   {ex.task} \"{ex.query}\"",
            summary + (f";  errors: {', '.join(f'{r} x{n}' for r, n in errs.items())}" if errs else ""),
            f"output: {ex.text!r}",
            f"id {ex.id}",
        ]
        png, geom = draw_overlay(img, ex, caption)
        undrawable += geom.pop("undrawable_masks")
        name = f"overlays/{_safe(ex.task)}_{cat}_{k:02d}.png"
        png.save(out / name)
        records.append({
            "file": name, "category": cat, "rank": rank, "of": of, "id": ex.id, "task": ex.task, "query": ex.query,
            "text": ex.text, "errors": [list(e) for e in ex.errors], "score": ex.score, "summary": summary,
            "source_size": [ex.width, ex.height], "gt": ex.gt, "pred": ex.pred, **geom,
        })
    if no_image:
        notes.append(f"{no_image} selected example(s) have no image in the shards: no overlay drawn.")
    if undrawable:
        notes.append(f"{undrawable} mask object(s) in an encoding the report does not know were not drawn.")
    return records, notes
