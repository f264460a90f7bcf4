"""Deterministic, learnable coloured-shapes dataset: the embedded default for smoke runs and tests.

Every image is fully determined by ``(seed, index)``: a muted, slightly noisy background and
one or more flat-coloured shapes ("red circle", "blue triangle", ...) at random sizes and
positions, fully inside the image and not touching each other. Each shape is annotated with
its tight :class:`Box` and a :class:`Point` at its visual centre (the centroid of its pixels),
both in source-image pixels with the usual continuous convention: pixel ``(c, r)`` covers
``[c, c+1) x [r, r+1)``, so a box is ``[x1, x2) x [y1, y2)`` and the pixel under a point
``(x, y)`` is ``(floor(x), floor(y))``.

Why learnable: shape colours are saturated and far from every background colour, shapes are
drawn without anti-aliasing and never overlap, so colour + silhouette fully determine the
label and the location. A tiny model should drive its loss down on it in minutes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw

from raytrain.formats.annotations import Box, Caption, Point, Region

# Saturated shape colours, pairwise far apart in RGB (min distance > 150).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "magenta": (200, 40, 200),
    "cyan": (20, 200, 220),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
LABELS: tuple[str, ...] = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)

# Muted backgrounds: greys and earth tones, each far from every shape colour even after
# the gradient and noise below (|gradient| <= 12, noise sigma 3 clipped at +-8).
BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (128, 128, 128),
    (200, 196, 188),
    (70, 66, 62),
    (150, 130, 110),
    (110, 120, 110),
)

SIZE_FRACTION = (0.15, 0.40)  # shape side as a fraction of the image side
MIN_SIDE_PX = 4  # below this a triangle and a cross stop looking like themselves
GAP_PX = 2  # minimum empty pixels between two shapes' boxes
SOURCE = "synthetic"


def _rng(seed: int, index: int) -> np.random.Generator:
    # SeedSequence mixes both words, so (seed, index) streams are independent; no global state.
    return np.random.default_rng([int(seed), int(index)])


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = np.array(BACKGROUNDS[rng.integers(len(BACKGROUNDS))], dtype=np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)  # [0, 1]
    ramp = (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle)  # about [-0.71, 0.71]
    gradient = 12.0 * ramp / 0.71
    noise = np.clip(rng.normal(0.0, 3.0, size=(size, size)), -8, 8)
    img = base[None, None, :] + (gradient + noise)[:, :, None]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _shape_mask(shape: str, x0: int, y0: int, side: int, size: int) -> np.ndarray:
    """Boolean (size, size) mask of one shape whose bounding square is at (x0, y0), side px."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    x1, y1 = x0 + side - 1, y0 + side - 1  # PIL's rectangle/ellipse corners are inclusive
    cx, cy = x0 + (side - 1) / 2, y0 + (side - 1) / 2
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=255)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=255)
    elif shape == "triangle":  # apex up
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=255)
    elif shape == "cross":
        bar = max(2, round(side / 3))
        off = (side - bar) // 2
        draw.rectangle([x0, y0 + off, x1, y0 + off + bar - 1], fill=255)
        draw.rectangle([x0 + off, y0, x0 + off + bar - 1, y1], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(mask) > 0


def _place(rng: np.random.Generator, size: int, placed: list[tuple[int, int, int]]) -> tuple[int, int, int]:
    """(x0, y0, side) of a square fully inside the image and GAP_PX away from ``placed``."""
    lo_frac, hi_frac = SIZE_FRACTION
    for attempt in range(400):
        # After 200 misses, let sizes shrink towards MIN_SIDE_PX so crowded images still fit.
        shrink = min(1.0, max(0.0, (attempt - 200) / 200))
        lo = max(MIN_SIDE_PX, int(round(size * lo_frac * (1 - shrink))))
        hi = max(lo, int(round(size * hi_frac * (1 - shrink))))
        side = int(rng.integers(lo, hi + 1))
        if side > size:
            continue
        x0 = int(rng.integers(0, size - side + 1))
        y0 = int(rng.integers(0, size - side + 1))
        if all(
            x0 >= px + ps + GAP_PX or px >= x0 + side + GAP_PX or y0 >= py + ps + GAP_PX or py >= y0 + side + GAP_PX
            for px, py, ps in placed
        ):
            return x0, y0, side
    raise ValueError(f"cannot place {len(placed) + 1} non-overlapping shapes in a {size}px image")


def _centre(mask: np.ndarray) -> tuple[float, float]:
    """Centroid of the mask's pixel centres, moved to the nearest shape pixel if it falls outside."""
    ys, xs = np.nonzero(mask)
    x, y = float(xs.mean()) + 0.5, float(ys.mean()) + 0.5
    if not mask[int(y), int(x)]:  # cannot happen for these convex-ish shapes; guard anyway
        i = int(np.argmin((xs + 0.5 - x) ** 2 + (ys + 0.5 - y) ** 2))
        x, y = float(xs[i]) + 0.5, float(ys[i]) + 0.5
    return x, y


def make_example(index: int, seed: int, image_size: int = 64, shapes_per_image: int = 1) -> dict:
    """One synthetic example, fully determined by ``(seed, index)``.

    Returns ``{"id", "image" (PNG bytes, RGB), "width", "height", "objects"}`` where
    ``objects`` is every shape's tight ``Box`` followed by every shape's centre ``Point``,
    in the same shape order, labelled ``"<colour> <shape>"``, then one ``Caption`` naming the
    shapes from left to right ("a red circle and a blue square") and one ``Region`` per shape
    (its box and label as the phrase), so captioning and dense captioning are learnable too.
    """
    if image_size < 2 * MIN_SIDE_PX:
        raise ValueError(f"image_size must be >= {2 * MIN_SIDE_PX}, got {image_size}")
    if not 1 <= shapes_per_image <= len(LABELS):
        raise ValueError(f"shapes_per_image must be in [1, {len(LABELS)}], got {shapes_per_image}")
    rng = _rng(seed, index)
    pixels = _background(rng, image_size)
    # Distinct labels so every annotation is unambiguous.
    label_ids = rng.choice(len(LABELS), size=shapes_per_image, replace=False)

    placed: list[tuple[int, int, int]] = []
    boxes: list[Box] = []
    points: list[Point] = []
    for label_id in label_ids:
        label = LABELS[int(label_id)]
        colour, shape = label.split(" ")
        x0, y0, side = _place(rng, image_size, placed)
        placed.append((x0, y0, side))
        mask = _shape_mask(shape, x0, y0, side, image_size)
        pixels[mask] = COLOURS[colour]
        ys, xs = np.nonzero(mask)
        boxes.append(Box(float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1), label))
        px, py = _centre(mask)
        points.append(Point(px, py, label))

    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG", compress_level=6)
    return {
        "id": f"{SOURCE}-{seed}-{index:08d}",
        "image": buf.getvalue(),
        "width": image_size,
        "height": image_size,
        "objects": [*boxes, *points, _caption(boxes), *[Region(b.x1, b.y1, b.x2, b.y2, b.label) for b in boxes]],
    }


def _caption(boxes: list[Box]) -> Caption:
    names = [f"a {b.label}" for b in sorted(boxes, key=lambda b: (b.x1, b.y1))]
    return Caption(names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1])


_GOLDEN = (math.sqrt(5) - 1) / 2  # 0.618...: consecutive multiples mod 1 are evenly spread


def split_of(index: int, seed: int, splits: dict[str, float]) -> str:
    """Deterministic split of example ``index``.

    Uses the golden-ratio sequence ``frac(seed_offset + index * 0.618...)`` instead of a random
    draw: every prefix of the indices honours the fractions to within a few rows, and growing
    ``n`` never moves an existing example to another split.
    """
    total = sum(splits.values())
    if not splits or total <= 0 or any(v < 0 for v in splits.values()):
        raise ValueError(f"split fractions must be non-negative and sum > 0, got {splits}")
    offset = (int(seed) * 0x9E3779B9 % 2**32) / 2**32  # per-seed phase, so seeds shuffle splits
    u = (offset + index * _GOLDEN) % 1.0
    acc = 0.0
    for name, frac in splits.items():
        acc += frac / total
        if u < acc:
            return name
    return next(name for name, frac in reversed(splits.items()) if frac > 0)  # u ~ 1.0 rounding


def generate_rows(
    n: int,
    seed: int,
    image_size: int = 64,
    shapes_per_image: int = 1,
    splits: dict[str, float] | None = None,
) -> Iterator[dict]:
    """Shard rows (see ``raytrain.data.shards.SHARD_SCHEMA``) for examples ``0 .. n-1``.

    ``objects`` is left as a list of ``Box``/``Point``; ``write_shards`` serialises it.
    """
    splits = splits if splits is not None else {"train": 0.9, "val": 0.05, "test": 0.05}
    for index in range(n):
        row = make_example(index, seed, image_size, shapes_per_image)
        row["split"] = split_of(index, seed, splits)
        row["source"] = SOURCE
        yield row
