"""The `data.preprocess` section: what happens to an image between decoding and the model.

Part of the configuration (`raytrain.config` re-exports `Preprocess` and `RESIZE_MODES`; its own
module only to keep the package's modules under the 600-line bound). What each option DOES is
raytrain/data/preprocess.py; which modes a model family accepts, and how it sizes an image under
"native", is the family's (`RESIZE_MODES`, `input_frame`, `input_size` in models/interface.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

RESIZE_MODES = ("stretch", "letterbox", "native")
"""data.preprocess.resize values ("" in a config = the model family's default, resolved on load)."""
PRE_RECORD_RESIZE = "stretch"
"""The resize of checkpoints written before preprocessing was recorded (the only one there was)."""


@dataclass(frozen=True)
class Preprocess:
    """What happens to an image between decoding and the model (`data.preprocess`). Components take
    it as is; checkpoints record it (`to_dict`, state.json "preprocess") and inference rebuilds it
    from that record (`from_dict`). Validated on construction."""

    resize: str = ""
    """"" = the model family's default (PaliGemma: stretch; Qwen2.5-VL: native), resolved when the
    experiment loads, so checkpoints record the mode itself. stretch (scale to the family's fixed
    model input, aspect not kept) | letterbox (fit inside it keeping the aspect ratio, centred, padded
    with pad_color; targets are rendered in the padded frame) | native (each image at the family's own
    per-image size: Qwen2.5-VL's smart_resize under the processor's min_pixels / max_pixels, aspect
    ratio kept, a variable number of image tokens; families with a fixed input size refuse it).
    A component given "" (no experiment to resolve it) stretches."""
    pad_color: tuple[int, int, int] = (0, 0, 0)
    """Letterbox padding colour, R G B in 0..255."""
    edge_blend: float = 0.0
    """Weight of Canny edges blended over the image, 0..1: (1-w)*image + w*edges (seed 004: 0.3); 0 = off.
    Needs scikit-image."""
    edge_sigma: float = 1.0
    """Gaussian smoothing (pixels of the model input) before Canny."""
    edge_low: float = 0.1
    """Canny hysteresis low threshold, a fraction of full-scale gradient (skimage.feature.canny on [0, 1] luma)."""
    edge_high: float = 0.2
    """Canny hysteresis high threshold (>= edge_low)."""
    min_pixels: int = 0
    """resize=native: the fewest pixels of an image's model input (Qwen2.5-VL's smart_resize min_pixels);
    0 = the processor's own (its preprocessor_config.json)."""
    max_pixels: int = 0
    """resize=native: the most pixels of an image's model input, which bounds its image tokens
    (Qwen2.5-VL: pixels / 28^2; the released processors allow 12845056, i.e. 16384 tokens);
    0 = the processor's own."""

    def __post_init__(self):
        if self.resize not in ("", *RESIZE_MODES):
            raise ValueError(f"preprocess.resize must be one of {list(RESIZE_MODES)} (or empty: the family's default), got {self.resize!r}")
        pad = tuple(self.pad_color) if isinstance(self.pad_color, (list, tuple)) else None
        if pad is None or len(pad) != 3 or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in pad):
            raise ValueError(f"preprocess.pad_color must be three integers in 0..255 (R, G, B), got {self.pad_color!r}")
        object.__setattr__(self, "pad_color", pad)
        for name in ("edge_blend", "edge_sigma", "edge_low", "edge_high"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"preprocess.{name} must be a finite number, got {v!r}")
            object.__setattr__(self, name, float(v))
        if not 0.0 <= self.edge_blend <= 1.0:
            raise ValueError(f"preprocess.edge_blend is the weight of the edge image, 0..1 (0 = off), got {self.edge_blend}")
        if self.edge_sigma < 0:
            raise ValueError(f"preprocess.edge_sigma must be >= 0, got {self.edge_sigma}")
        if not 0.0 <= self.edge_low <= self.edge_high <= 1.0:
            raise ValueError("need 0 <= preprocess.edge_low <= preprocess.edge_high <= 1 (fractions of full scale), "
                             f"got {self.edge_low}, {self.edge_high}")
        for name in ("min_pixels", "max_pixels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"preprocess.{name} must be an integer >= 0 (0 = the processor's own), got {v!r}")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(f"preprocess.min_pixels ({self.min_pixels}) must be <= max_pixels ({self.max_pixels})")
        if (self.min_pixels or self.max_pixels) and self.resize not in ("", "native"):
            raise ValueError(f"preprocess.min_pixels / max_pixels size images under resize=native, not {self.resize}")

    @property
    def mode(self) -> str:
        """The resize that runs: `resize`, or stretch where nothing resolved the family default."""
        return self.resize or PRE_RECORD_RESIZE

    def resolved(self, default_resize: str) -> Preprocess:
        """This preprocessing with "" resize replaced by `default_resize` (the family's default)."""
        return self if self.resize else dataclasses.replace(self, resize=default_resize)

    def to_dict(self) -> dict:
        """JSON-ready record (what state.json stores under "preprocess")."""
        return {**dataclasses.asdict(self), "pad_color": list(self.pad_color)}

    @classmethod
    def from_dict(cls, d: dict | None) -> Preprocess:
        """From a record; None (a checkpoint written before records existed) = stretch without
        edges, the only preprocessing there was. Unknown keys raise ValueError."""
        if d is None:
            return cls(resize=PRE_RECORD_RESIZE)
        if not isinstance(d, dict):
            raise ValueError(f"a preprocess record is a mapping, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown preprocess key(s) {sorted(unknown)}; known: {[f.name for f in dataclasses.fields(cls)]}")
        return cls(**d)
