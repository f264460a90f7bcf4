"""Image preprocessing between a source image and the model input, and the frame it implies.

Two independent options (`raytrain.config.Preprocess`, the `data.preprocess` section: this module
holds what they do, the config holds what they are), applied in the Ray Data stage (`pipeline.decode_and_expand`),
recorded with every checkpoint (state.json key "preprocess") and applied again, from that record,
by evaluation and Serve, so inference sees what training saw:

  resize      "stretch"   the whole image scaled to the model input (aspect ratio not kept): the
                          behaviour before these options existed
              "letterbox" scaled by ONE factor to fit inside the model input, centred, the rest
                          filled with `pad_color`; objects keep their shape
              "native"    scaled to the family's own input size for THIS image (Qwen2.5-VL:
                          smart_resize, aspect ratio about kept, a variable number of image
                          tokens); the image fills its input, as in a stretch. The size comes from
                          the family (`input_frame` / `input_size`, models/interface.py): callers
                          pass the per-image size here, or use `geometry_for`
              ""          (an experiment resolves it to its family's default) a stretch
  edge_blend  w in [0, 1]: out = (1 - w) * image + w * 255 * canny_edges (per RGB channel, rounded);
              0 = off. Seed 004 used 0.3 ("30 % edges over 70 % image").

Frames. Annotations live in SOURCE pixels (`raytrain.formats.annotations`). `Geometry` is the map
source -> model input, x' = x0 + x * (x1 - x0) / src_w (same for y), where (x0, y0, x1, y1) is the
content box: the integer pixel rectangle of the model input the source image occupies. For a
stretch the content box is the whole input; the model formats normalise by the image size, so
targets are rendered from source pixels directly, exactly as before. For a letterbox the targets
are mapped INTO the padded input and rendered there (a PaliGemma <loc> bin or a Qwen pixel then
means a place in the padded image, which is what the model sees), and parsed predictions are
mapped BACK to source pixels (clipped to the image) before scoring or answering.

Edges are computed on the resized content only (before padding: the pad border is no edge), with
scikit-image's Canny (`skimage.feature.canny`, imported when edge_blend > 0) on the BT.601 luma
in [0, 1]: Gaussian `edge_sigma`, hysteresis thresholds `edge_low` / `edge_high` on the Sobel
gradient magnitude as fractions of full scale (skimage's defaults 0.1 / 0.2).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image

from raytrain.config import Preprocess
from raytrain.formats.annotations import Box, Caption, Mask, Point, Region

log = logging.getLogger(__name__)

RECORD_KEY = "preprocess"  # the key in a checkpoint's state.json


def geometry(prep: Preprocess, width: int, height: int, image_hw: Sequence[int]) -> Geometry:
    """The map from a `width` x `height` source image to the model input (image_hw = (H, W): this
    image's model input size; under resize "native" the family's size for it, see `geometry_for`)."""
    if isinstance(image_hw, dict):
        raise ValueError("geometry needs this image's (H, W); a per-image frame is sized by the family: use geometry_for")
    out_h, out_w = int(image_hw[0]), int(image_hw[1])
    if width < 1 or height < 1 or out_w < 1 or out_h < 1:
        raise ValueError(f"sizes must be positive: source {width}x{height}, model input {out_w}x{out_h}")
    if prep.mode in ("stretch", "native"):
        return Geometry(width, height, out_w, out_h, 0, 0, out_w, out_h)
    s = min(out_w / width, out_h / height)
    cw = min(out_w, max(1, round(width * s)))
    ch = min(out_h, max(1, round(height * s)))
    x0, y0 = (out_w - cw) // 2, (out_h - ch) // 2  # centred; an odd remainder goes right/bottom
    return Geometry(width, height, out_w, out_h, x0, y0, x0 + cw, y0 + ch)


def frame_for(fam, processor, prep: Preprocess):
    """The model input frame `prep` sizes images to for this family and processor (what the
    pipeline's `image_hw` takes): `fam.input_frame` with the resize mode and native pixel bounds."""
    return fam.input_frame(processor, prep.mode, prep.min_pixels, prep.max_pixels)


def geometry_for(fam, prep: Preprocess, frame, width: int, height: int) -> Geometry:
    """`geometry` of one source image under a family's input frame (`frame_for`): the model input
    is the family's size for this image (fixed, or native)."""
    if (prep.mode == "native") != isinstance(frame, dict):
        raise ValueError(f"resize={prep.mode} with the model input frame {frame!r}: build the frame with frame_for")
    return geometry(prep, width, height, fam.input_size(frame, width, height))


def apply(prep: Preprocess, image: Image.Image | np.ndarray, geom: Geometry) -> np.ndarray:
    """Source image (PIL or HxWx3 uint8) -> model input, (H, W, 3) uint8."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    if img.mode != "RGB":
        img = img.convert("RGB")
    if (img.width, img.height) != (geom.src_w, geom.src_h):
        raise ValueError(f"image is {img.width}x{img.height}, geometry is for {geom.src_w}x{geom.src_h}")
    content = np.asarray(img.resize((geom.x1 - geom.x0, geom.y1 - geom.y0), Image.BILINEAR), dtype=np.uint8)
    if prep.edge_blend > 0:
        content = blend_edges(content, prep.edge_blend, prep.edge_sigma, prep.edge_low, prep.edge_high)
    if geom.covers_input:
        return content
    out = np.empty((geom.out_h, geom.out_w, 3), np.uint8)
    out[:] = np.asarray(prep.pad_color, np.uint8)
    out[geom.y0 : geom.y1, geom.x0 : geom.x1] = content
    return out


def coerce(spec: Preprocess | dict | None) -> Preprocess:
    """A Preprocess from itself, a record dict, or None (defaults): what stage functions accept."""
    return spec if isinstance(spec, Preprocess) else Preprocess.from_dict(spec)


def resolve_recorded(recorded: dict | None, configured: Preprocess, where: str = "checkpoint") -> Preprocess:
    """The preprocessing to run inference with. A checkpoint's record wins over the config: the
    model learned coordinates in the frame it was trained in, so a config that disagrees is
    logged as a warning and ignored. Without a record (a checkpoint from before records, or a
    model directory from elsewhere) the config is used."""
    if recorded is None:
        log.info("%s has no preprocessing record; using the configured one %s", where, configured.to_dict())
        return configured
    rec = Preprocess.from_dict(recorded)
    if rec != configured:
        diff = {k: (v, getattr(configured, k)) for k, v in dataclasses.asdict(rec).items() if v != getattr(configured, k)}
        log.warning("%s was trained with preprocessing %s; the config differs (recorded, configured): %s; "
                    "using the recorded preprocessing", where, rec.to_dict(), diff)
    return rec


# ----------------------------------------------------------------------------------------------
# edges


def canny_edges(rgb: np.ndarray, sigma: float = 1.0, low: float = 0.1, high: float = 0.2) -> np.ndarray:
    """(H, W) bool Canny edges of an (H, W, 3) uint8 image: scikit-image's detector on the BT.601
    luma scaled to [0, 1] (thresholds are fractions of full scale)."""
    try:
        from skimage.feature import canny
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("data.preprocess.edge_blend > 0 needs scikit-image (skimage.feature.canny): "
                          "pip install scikit-image, or set data.preprocess.edge_blend=0") from e
    gray = np.asarray(Image.fromarray(np.asarray(rgb, np.uint8)).convert("L"), dtype=np.float64) / 255.0
    return canny(gray, sigma=sigma, low_threshold=low, high_threshold=high)


def blend_edges(rgb: np.ndarray, weight: float, sigma: float = 1.0, low: float = 0.1, high: float = 0.2) -> np.ndarray:
    """(1 - weight) * image + weight * edges, edges white (255) on black, rounded to uint8."""
    edges = canny_edges(rgb, sigma, low, high)
    out = (1.0 - weight) * np.asarray(rgb, np.float64) + (weight * 255.0) * edges[:, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# geometry: source pixels <-> model-input pixels


@dataclass(frozen=True)
class Geometry:
    """Source image (src_w x src_h) placed at the content box (x0, y0)-(x1, y1) of the model input
    (out_w x out_h), all in pixels; coordinates are continuous (a pixel c covers [c, c+1))."""

    src_w: int
    src_h: int
    out_w: int
    out_h: int
    x0: int
    y0: int
    x1: int
    y1: int
    _scale: tuple[float, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if not (0 <= self.x0 < self.x1 <= self.out_w and 0 <= self.y0 < self.y1 <= self.out_h):
            raise ValueError(f"content box {(self.x0, self.y0, self.x1, self.y1)} outside the {self.out_w}x{self.out_h} input")
        object.__setattr__(self, "_scale", ((self.x1 - self.x0) / self.src_w, (self.y1 - self.y0) / self.src_h))

    @property
    def covers_input(self) -> bool:
        """The source fills the whole input (a stretch, or a letterbox that needed no padding)."""
        return (self.x0, self.y0, self.x1, self.y1) == (0, 0, self.out_w, self.out_h)

    @property
    def content_box(self) -> tuple[int, int, int, int]:
        return self.x0, self.y0, self.x1, self.y1

    @classmethod
    def from_content_box(cls, width: int, height: int, image_hw: Sequence[int], box: Sequence[int]) -> Geometry:
        """Rebuild from what the pipeline stores per example (width, height, image shape, content_box)."""
        x0, y0, x1, y1 = (int(v) for v in box)
        return cls(int(width), int(height), int(image_hw[1]), int(image_hw[0]), x0, y0, x1, y1)

    # ---- the frame formats render in / parse from ------------------------------------------

    def target_frame(self, objs: Sequence) -> tuple[list, int, int]:
        """(objects, width, height) to render targets from: source pixels when the source fills
        the input (normalised formats make that exact), else the objects mapped into the input."""
        if self.covers_input:
            return list(objs), self.src_w, self.src_h
        return [self.to_model(o) for o in objs], self.out_w, self.out_h

    @property
    def parse_size(self) -> tuple[int, int]:
        """(width, height) to parse model text with; follow with `from_frame` on the objects."""
        return (self.src_w, self.src_h) if self.covers_input else (self.out_w, self.out_h)

    def from_frame(self, objs: Sequence) -> list:
        """Parsed objects (in the `parse_size` frame) -> source pixels."""
        if self.covers_input:
            return list(objs)
        return [self.to_source(o) for o in objs]

    # ---- one object ------------------------------------------------------------------------

    def _fwd(self, x: float, y: float) -> tuple[float, float]:
        return self.x0 + x * self._scale[0], self.y0 + y * self._scale[1]

    def _back(self, x: float, y: float) -> tuple[float, float]:
        # clipped to the source image: a prediction in the padding means "at the border"
        sx = min(max((x - self.x0) / self._scale[0], 0.0), float(self.src_w))
        sy = min(max((y - self.y0) / self._scale[1], 0.0), float(self.src_h))
        return sx, sy

    def to_model(self, obj):
        """One annotation object, source pixels -> model-input pixels (captions unchanged)."""
        return self._map(obj, self._fwd, to_model=True)

    def to_source(self, obj):
        """One annotation object, model-input pixels -> source pixels, clipped to the image."""
        return self._map(obj, self._back, to_model=False)

    def _map(self, obj, f, *, to_model: bool):
        if isinstance(obj, Point):
            x, y = f(obj.x, obj.y)
            return dataclasses.replace(obj, x=x, y=y)
        if isinstance(obj, (Box, Region)):
            x1, y1 = f(obj.x1, obj.y1)
            x2, y2 = f(obj.x2, obj.y2)
            return dataclasses.replace(obj, x1=x1, y1=y1, x2=x2, y2=y2)
        if isinstance(obj, Mask):
            arr = self._mask_to_model(obj.to_array()) if to_model else self._mask_to_source(obj.to_array())
            m = Mask.from_array(arr)
            changes: dict = {"size": m.size, "counts": m.counts}
            if getattr(obj, "loc_box", None) is not None:  # a PredictedMask keeps the box the model wrote
                changes["loc_box"] = self._map(obj.loc_box, f, to_model=to_model)
            return dataclasses.replace(obj, **changes)
        if isinstance(obj, Caption):
            return obj
        raise TypeError(f"cannot map {type(obj).__name__} between frames")

    def _mask_to_model(self, a: np.ndarray) -> np.ndarray:
        if a.shape != (self.src_h, self.src_w):
            raise ValueError(f"mask of shape {a.shape} on a {self.src_w}x{self.src_h} image")
        out = np.zeros((self.out_h, self.out_w), bool)
        out[self.y0 : self.y1, self.x0 : self.x1] = _resize_mask(a, self.x1 - self.x0, self.y1 - self.y0)
        return out

    def _mask_to_source(self, a: np.ndarray) -> np.ndarray:
        if a.shape != (self.out_h, self.out_w):
            raise ValueError(f"mask of shape {a.shape} on a {self.out_w}x{self.out_h} model input")
        return _resize_mask(a[self.y0 : self.y1, self.x0 : self.x1], self.src_w, self.src_h)


def _resize_mask(a: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask (pixel centres sampled, no new labels invented)."""
    return np.asarray(Image.fromarray(a.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)) > 127
