"""PaliGemma segmentation: the mask VQ-VAE of big_vision (``vae-oid.npz``) in torch, and the
``<loc>``x4 ``<seg>``x16 text it feeds.

A segmentation object is written as big_vision writes it: the four loc tokens of the object's box
(y1 x1 y2 x2, ``raytrain.formats.paligemma`` bins), sixteen seg tokens (the VQ codes of the mask
cropped to that box and resized to 64x64), a space and the label; objects joined by ``" ; "``::

    <loc0277><loc0241><loc0782><loc0809><seg102>...<seg073> butterfly ; <loc...>...

The codec (Ning et al. 2023, "All in Tokens", arXiv 2301.02229; the PyTorch model whose weights
big_vision ships as ``gs://big_vision/paligemma/vae-oid.npz``):

* encoder (big_vision ``pp/proj/paligemma/segmentation.py``): input ``2 * (mask - 0.5)``,
  4 x [Conv 4x4 stride 2 + ReLU] (1 -> 16 -> 32 -> 64 -> 128 channels, 64x64 -> 4x4),
  2 residual blocks (Conv3x3, ReLU, Conv3x3, ReLU, Conv1x1, + input), Conv1x1 128 -> 512;
  each of the 4x4 = 16 vectors (row-major) -> index of the nearest of 128 codebook entries
  (squared L2). big_vision runs it in TF with ``padding='SAME'``: for a 4x4 kernel, stride 2 on
  an even size that pads 1 before and 1 after, which is PyTorch's ``padding=1``.
* decoder (big_vision ``evaluators/proj/paligemma/transfers/segmentation.py``, Flax): codebook
  vectors (4x4x512) -> Conv1x1 512 -> 128 + ReLU, 2 residual blocks, 4 x [ConvTranspose 4x4
  stride 2 + ReLU] (128 -> 128 -> 64 -> 32 -> 16, 4x4 -> 64x64), Conv1x1 16 -> 1. No output
  activation: values are roughly in [-1, 1] and big_vision thresholds them at 0. Flax's
  ``ConvTranspose(padding=2, transpose_kernel=True)`` on the transposed PyTorch kernel is exactly
  PyTorch's ``ConvTranspose2d(stride=2, padding=1)`` on the original one.

Checkpoint layout: ``vae-oid.npz`` holds the PyTorch ``state_dict`` of that model, so the arrays
are already in PyTorch layout (Conv2d ``(out, in, kh, kw)``, ConvTranspose2d ``(in, out, kh, kw)``;
big_vision transposes them with ``(2, 3, 1, 0)`` for TF/Flax). :class:`MaskCodec` uses the same
module tree, so its ``state_dict`` keys ARE the npz keys (``encoder.{i}.weight``,
``encoder.8.net.0.weight``, ``decoder.4.weight``, ``_vq_vae._embedding``, ...) and loading
is a shape-checked copy.

Resizing, as big_vision does it:

* encode: crop the SOURCE-size mask to the box (pixel coordinates rounded half to even, as
  ``tf.round``), resize to 64x64 with ``tf.image.resize(bilinear, antialias=True)``; here
  ``torch.nn.functional.interpolate(bilinear, antialias=True)``, the same triangle filter
  (support scaled by the downscale factor, half-pixel centres, weights renormalised at edges).
* decode: box pixels ``int(bin / 1023 * size)`` (truncation, as the evaluator), the decoder's
  64x64 output resized into the box with ``PIL.Image.resize(BILINEAR)`` on the float values
  (exactly the evaluator's call), thresholded and pasted into a full-size mask.
  ``decode`` returns ``clip(0.5 * raw + 0.5, 0, 1)``; "threshold 0.5" on that scale is
  "raw > 0", big_vision's test, and :func:`tokens_to_mask` resizes the raw values (an affine map
  commutes with bilinear resizing, the clip would not), so its pixels agree with big_vision's.

Weights: loaded lazily from a path given as an argument or by ``RAYTRAIN_MASK_CODEC``
(:func:`load_codec`). Without them there is no meaningful codec: :meth:`MaskCodec.random` exists
only to test the contract (shapes, ranges, determinism, render/parse plumbing), and
rendering training targets without a path refuses (:class:`MaskCodecMissing`), since a model
trained on codes of random weights would learn nothing usable.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from raytrain.formats import paligemma as fmt
from raytrain.formats.annotations import Box, CodedMask, Mask, ParseError, ParseResult

# One tokenizer grammar: the <pad>/<bos> remnants, the end markers and the loc-bin check are the
# detection parser's own (same package), so segment and detect outputs are cut the same way.
from raytrain.formats.paligemma import _bins

ENV_VAR = "RAYTRAIN_MASK_CODEC"
MASK_SIZE = 64  # side of the codec's mask, pixels
NUM_CODES = fmt.NUM_SEG  # codebook entries: <seg000>..<seg127>
CODE_DIM = 512  # codebook vector length
NUM_TOKENS = 16  # 4x4 latent grid, row-major
TASK = "segment"
MIN_ANSWER_TOKENS = fmt.MASK_ANSWER_MIN_TOKENS  # one mask answer's length (eval and Serve check budgets with it)

SEG_PARSE_REASONS = fmt.PARSE_REASONS + (
    "missing_mask",  # four valid locs (and a label) but no <seg> token at all: a box, not a mask
)
"""Reasons :func:`parse_segments` gives. ``wrong_token_count`` covers a seg run that is not
exactly 16 valid ``<segDDD>`` (0..127) as well as a loc run that is not exactly 4."""

MISSING_CODEC_MESSAGE = "segmentation targets need the mask codec weights (vae-oid.npz); set RAYTRAIN_MASK_CODEC"


class MaskCodecMissing(ValueError):
    """No mask codec weights were given (argument or ``RAYTRAIN_MASK_CODEC``)."""


# ---------------------------------------------------------------------------- the VQ-VAE


class _ResBlock(nn.Module):
    """Conv3x3, ReLU, Conv3x3, ReLU, Conv1x1, plus the input (keys ``net.0``, ``net.2``, ``net.4``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class MaskEncoder(nn.Sequential):
    """``(N, 1, 64, 64)`` normalised to [-1, 1] -> ``(N, 512, 4, 4)`` latents.

    Indices match ``vae-oid.npz``: convs at 0, 2, 4, 6 (ReLUs between), residual blocks 8 and 9,
    the 1x1 projection at 10.
    """

    def __init__(self):
        layers: list[nn.Module] = []
        c_in = 1
        for c_out in (16, 32, 64, 128):  # 64 -> 32 -> 16 -> 8 -> 4 pixels
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU()]
            c_in = c_out
        layers += [_ResBlock(128), _ResBlock(128), nn.Conv2d(128, CODE_DIM, 1)]
        super().__init__(*layers)


class MaskDecoder(nn.Sequential):
    """``(N, 512, 4, 4)`` codebook vectors -> ``(N, 1, 64, 64)`` raw mask values (about [-1, 1]).

    Indices match ``vae-oid.npz``: 1x1 conv at 0, residual blocks 2 and 3, transposed convs at
    4, 6, 8, 10 (ReLUs between), the 1x1 output conv at 12.
    """

    def __init__(self):
        layers: list[nn.Module] = [nn.Conv2d(CODE_DIM, 128, 1), nn.ReLU(), _ResBlock(128), _ResBlock(128)]
        c_in = 128
        for c_out in (128, 64, 32, 16):  # 4 -> 8 -> 16 -> 32 -> 64 pixels
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU()]
            c_in = c_out
        layers.append(nn.Conv2d(16, 1, 1))
        super().__init__(*layers)


class _Codebook(nn.Module):
    """Holds ``_embedding`` (128, 512): the EMA quantiser's codebook buffer, as checkpointed."""

    def __init__(self):
        super().__init__()
        self.register_buffer("_embedding", torch.zeros(NUM_CODES, CODE_DIM))


class MaskCodec(nn.Module):
    """big_vision's mask VQ-VAE: 64x64 masks <-> 16 codes in 0..127.

    Build it with :meth:`from_checkpoint` (real weights) or :meth:`random` (contract tests only:
    codes of a random codec mean nothing). ``source`` says which. Always in eval mode, float32.
    """

    def __init__(self):
        super().__init__()
        # attribute names = the checkpoint's key prefixes: state_dict keys are the npz keys
        self.encoder = MaskEncoder()
        self.decoder = MaskDecoder()
        self._vq_vae = _Codebook()
        self.source = "uninitialised"
        self.eval()

    @property
    def codebook(self) -> torch.Tensor:
        """``(128, 512)`` codebook vectors."""
        return self._vq_vae._embedding

    @classmethod
    def random(cls, seed: int = 0) -> MaskCodec:
        """Random weights, reproducible per ``seed``. FOR TESTS ONLY: it satisfies the codec's
        contract (shapes, ranges, determinism), its codes carry no mask shape.

        PyTorch's default init; the codebook is the encoder's own latents of random blobs (an
        N(0, 1) codebook is so far from the small random latents that every vector maps to one
        code), and the output bias is centred so decoded masks have pixels on and off."""
        with torch.random.fork_rng(devices=[]):  # seeded, and the global RNG stream is untouched
            torch.manual_seed(seed)
            codec = cls()
            with torch.no_grad():
                blobs = (torch.rand(NUM_CODES // NUM_TOKENS, 1, 8, 8) > 0.5).float()
                blobs = F.interpolate(blobs, size=(MASK_SIZE, MASK_SIZE), mode="bilinear", align_corners=False)
                z = codec.encoder(2.0 * (blobs - 0.5)).permute(0, 2, 3, 1).reshape(-1, CODE_DIM)
                codec._vq_vae._embedding.copy_(z + 0.01 * z.std() * torch.randn_like(z))
                out = codec.decoder(codec.codebook[torch.randint(0, NUM_CODES, (16, 16))].reshape(-1, 4, 4, CODE_DIM).permute(0, 3, 1, 2))
                codec.decoder[12].bias -= out.median()
        codec.source = f"random(seed={seed})"
        return codec

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> MaskCodec:
        """Weights from big_vision's ``vae-oid.npz`` (PyTorch layout, key names as documented in
        the module docstring). Raises ValueError naming the key when one is missing or has the
        wrong shape (a kernel saved in TF/Flax layout fails here, instead of silently decoding
        garbage). Extra keys (e.g. EMA statistics of the quantiser) are ignored."""
        codec = cls()
        expected = codec.state_dict()
        npz = np.load(os.fspath(path), allow_pickle=False)
        if not hasattr(npz, "files"):  # a bare .npy array, not an archive of named arrays
            raise ValueError(f"{path}: not an .npz archive of named arrays (vae-oid.npz)")
        with npz:
            arrays = {k: npz[k] for k in npz.files if k in expected}
        missing = [k for k in expected if k not in arrays]
        if missing:
            raise ValueError(f"{path}: not a vae-oid mask codec checkpoint; missing {len(missing)} keys, e.g. {missing[:3]}")
        for k, t in expected.items():
            if arrays[k].shape != tuple(t.shape):
                raise ValueError(
                    f"{path}: {k} has shape {arrays[k].shape}, expected {tuple(t.shape)} (PyTorch layout: "
                    "Conv2d (out, in, kh, kw), ConvTranspose2d (in, out, kh, kw), codebook (128, 512))"
                )
        codec.load_state_dict({k: torch.from_numpy(np.asarray(a, dtype=np.float32)) for k, a in arrays.items()})
        codec.source = os.fspath(path)
        return codec

    # ------------------------------------------------------------------ encode / decode

    @torch.inference_mode()
    def encode(self, masks) -> torch.Tensor:
        """``(N, 64, 64)`` floats in [0, 1] (array-like) -> ``(N, 16)`` int64 codes in 0..127."""
        x = torch.as_tensor(np.asarray(masks, dtype=np.float32) if not torch.is_tensor(masks) else masks, dtype=torch.float32)
        if x.ndim != 3 or tuple(x.shape[1:]) != (MASK_SIZE, MASK_SIZE):
            raise ValueError(f"masks must have shape (N, {MASK_SIZE}, {MASK_SIZE}), got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("masks contain non-finite values")
        z = self.encoder(2.0 * (x[:, None] - 0.5))  # (N, 512, 4, 4)
        flat = z.permute(0, 2, 3, 1).reshape(-1, CODE_DIM)  # row-major 4x4, as TF's NHWC reshape
        emb = self.codebook
        # squared L2 written as big_vision writes it (same float32 rounding on near ties)
        dist = (flat**2).sum(1, keepdim=True) + (emb**2).sum(1) - 2 * flat @ emb.T
        return dist.argmin(1).reshape(-1, NUM_TOKENS).to(torch.int64)

    @torch.inference_mode()
    def decode_logits(self, codes) -> torch.Tensor:
        """``(N, 16)`` codes -> ``(N, 64, 64)`` raw decoder output (about [-1, 1]; mask where > 0):
        what big_vision's ``reconstruct_masks`` returns."""
        c = torch.as_tensor(np.asarray(codes) if not torch.is_tensor(codes) else codes)
        if c.ndim != 2 or c.shape[1] != NUM_TOKENS:
            raise ValueError(f"codes must have shape (N, {NUM_TOKENS}), got {tuple(c.shape)}")
        if c.dtype.is_floating_point or c.dtype == torch.bool:
            raise ValueError(f"codes must be integers, got {c.dtype}")
        c = c.to(torch.int64)
        if c.numel() and (c.min() < 0 or c.max() >= NUM_CODES):
            raise ValueError(f"codes must be in 0..{NUM_CODES - 1}")
        q = self.codebook[c].reshape(-1, 4, 4, CODE_DIM).permute(0, 3, 1, 2)
        return self.decoder(q)[:, 0]

    def decode(self, codes) -> torch.Tensor:
        """``(N, 16)`` codes -> ``(N, 64, 64)`` float32 mask in [0, 1] (``clip(0.5 raw + 0.5)``;
        > 0.5 is the mask)."""
        return (0.5 * self.decode_logits(codes) + 0.5).clamp_(0.0, 1.0)


@functools.lru_cache(maxsize=4)
def _load_cached(path: str) -> MaskCodec:
    return MaskCodec.from_checkpoint(path)


def load_codec(path: str | os.PathLike | None = None) -> MaskCodec:
    """The codec from ``path``, else from ``$RAYTRAIN_MASK_CODEC``; loaded once per process and
    path. Raises :class:`MaskCodecMissing` (a ValueError) when neither names an existing file."""
    p = os.fspath(path) if path is not None else os.environ.get(ENV_VAR, "")
    if not p:
        raise MaskCodecMissing(MISSING_CODEC_MESSAGE)
    if not os.path.isfile(p):
        raise MaskCodecMissing(f"{MISSING_CODEC_MESSAGE} (no file at {p!r})")
    return _load_cached(os.path.abspath(p))


# ---------------------------------------------------------------------------- masks <-> tokens


@dataclass(frozen=True)
class PredictedMask(Mask):
    """A mask read from ``<loc>``x4 ``<seg>``x16: the decoded pixels (RLE, source size) plus the
    box the model wrote. ``box`` is THAT box, not the tight box of the pixels: it is big_vision's
    predicted box (box accuracy is scored on it) and the pixels lie inside it. Serialised with
    ``objects_to_json`` it becomes a plain mask (the loc box is not stored)."""

    loc_box: Box | None = None

    @property
    def box(self) -> Box:
        return self.loc_box if self.loc_box is not None else super().box


def _pixel_crop(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """(y1, x1, y2, x2) crop of the encoder: coordinates rounded half to even (``tf.round``)
    and clipped to the image."""
    def r(v: float, hi: int) -> int:
        return min(max(round(v), 0), hi)  # round(): half to even

    return r(box.y1, height), r(box.x1, width), r(box.y2, height), r(box.x2, width)


def _resize_to_64(crop: np.ndarray) -> np.ndarray:
    """``(h, w)`` floats -> ``(64, 64)``: bilinear with antialiasing (``tf.image.resize(...,
    antialias=True)``'s filter)."""
    t = torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32))[None, None]
    out = F.interpolate(t, size=(MASK_SIZE, MASK_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return out[0, 0].numpy()


def mask_to_tokens(mask: Mask, box: Box, codec: MaskCodec) -> str:
    """The 16 ``<segDDD>`` tokens of ``mask`` (source pixels) cropped to ``box`` (source pixels).
    Raises ValueError when the box covers no pixel after rounding."""
    arr = mask.to_array()
    y1, x1, y2, x2 = _pixel_crop(box, mask.width, mask.height)
    if y2 <= y1 or x2 <= x1:
        raise ValueError(f"box {box} covers no pixel of the {mask.width}x{mask.height} mask")
    m64 = _resize_to_64(arr[y1:y2, x1:x2].astype(np.float32))
    codes = codec.encode(m64[None])[0].tolist()
    return "".join(fmt.seg_token(c) for c in codes)


def _paste(raw64: np.ndarray, box: Box, width: int, height: int) -> np.ndarray:
    """Decoder output ``(64, 64)`` (raw, threshold 0) resized into ``box`` -> bool ``(height, width)``."""
    from PIL import Image

    full = np.zeros((height, width), dtype=bool)
    # big_vision: y1, x1, y2, x2 = map(int, (y1 * h, x1 * w, y2 * h, x2 * w)) -- truncation
    y1, x1 = min(max(int(box.y1), 0), height), min(max(int(box.x1), 0), width)
    y2, x2 = min(max(int(box.y2), 0), height), min(max(int(box.x2), 0), width)
    if y2 <= y1 or x2 <= x1:  # big_vision counts this as invalid: no pixel
        return full
    patch = Image.fromarray(np.asarray(raw64, dtype=np.float32)).resize((x2 - x1, y2 - y1), resample=Image.BILINEAR)
    full[y1:y2, x1:x2] = np.asarray(patch) > 0.0
    return full


def tokens_to_mask(box: Box, seg_codes: Sequence[int], width: int, height: int, codec: MaskCodec) -> PredictedMask:
    """16 codes decoded to 64x64, resized into ``box`` (source pixels), thresholded at 0.5 and
    pasted into a ``width`` x ``height`` mask labelled ``box.label``; its ``.box`` is ``box``.
    A box that truncates to zero pixels gives an empty mask (big_vision: invalid)."""
    raw = codec.decode_logits([list(seg_codes)])[0].numpy()
    return _predicted(box, _paste(raw, box, width, height))


def _predicted(box: Box, pixels: np.ndarray) -> PredictedMask:
    m = Mask.from_array(pixels, box.label)
    return PredictedMask(m.size, m.counts, m.label, loc_box=box)


# ---------------------------------------------------------------------------- rendering


def render_prefix(query: str) -> str:
    """Prompt text of the segment task: ``"segment <query>"``."""
    return f"{TASK} {query}"


def render_segments(masks: Sequence[Mask], width: int, height: int, codec: MaskCodec | None = None) -> str:
    """Target text for masks of a ``width`` x ``height`` image: per object the loc tokens of the
    mask's tight box, its 16 seg tokens, a space and the label; objects joined by ``" ; "``.

    ``codec=None`` loads the one named by ``RAYTRAIN_MASK_CODEC`` and raises
    :class:`MaskCodecMissing` (ValueError) if there is none. Raises ValueError for a mask of
    another size, an empty mask, or a label the parser would not read back.
    """
    if masks and all(isinstance(m, CodedMask) for m in masks):
        return render_coded(masks, width, height)
    if codec is None:
        codec = load_codec()
    parts = []
    for m in masks:
        if not isinstance(m, Mask):
            raise TypeError(f"expected Mask (or only CodedMasks), got {type(m).__name__}")
        if (m.height, m.width) != (height, width):
            raise ValueError(f"mask size {m.width}x{m.height} != image size {width}x{height}")
        box = Mask.box.fget(m)  # the pixels' tight box, even for a PredictedMask
        if box.area == 0:
            raise ValueError("empty mask: nothing to segment")
        # locs and label exactly as detection renders them (same bins, same label checks)
        det = fmt.render_objects([box], width, height)
        locs, rest = det[: 4 * len("<loc0000>")], det[4 * len("<loc0000>") :]
        parts.append(locs + mask_to_tokens(m, box, codec) + rest)
    return " ; ".join(parts)


def render_coded(masks: Sequence[CodedMask], width: int, height: int) -> str:
    """Target text of masks given as their VQ codes (JSONL segment rows): per object the loc
    tokens of its box, its 16 seg tokens as given, a space and the label -- no codec involved, so
    training reproduces the source's tokens exactly."""
    parts = []
    for m in masks:
        if len(m.codes) != NUM_TOKENS or not all(0 <= c < NUM_CODES for c in m.codes):
            raise ValueError(f"a coded mask needs {NUM_TOKENS} codes in 0..{NUM_CODES - 1}, got {list(m.codes)}")
        det = fmt.render_objects([m.box], width, height)
        locs, rest = det[: 4 * len("<loc0000>")], det[4 * len("<loc0000>") :]
        parts.append(locs + "".join(fmt.seg_token(c) for c in m.codes) + rest)
    return " ; ".join(parts)


# ---------------------------------------------------------------------------- parsing
# Grammar (as raytrain.formats.paligemma.parse, with the seg tokens kept instead of skipped):
#   text    := segment (";" segment)*
#   segment := [garbage] (locrun label)*
#   locrun  := <loc\d+> (ws* <loc\d+>)* (ws* <seg\d+>)*      must be 4 locs + 16 segs
#   label   := any text up to the next loc run / ";" / end, stripped

_RUN = re.compile(r"<loc[0-9]+>(?:\s*<loc[0-9]+>)*(?:\s*<seg[0-9]+>)*")
_SEG = re.compile(r"<seg([0-9]+)>")
# a loc or seg token cut off by the end of the text: "<", "<l", "<loc01", "<se", "<seg1"
_PARTIAL = re.compile(r"<(?:l(?:o(?:c[0-9]{0,4})?)?|s(?:e(?:g[0-9]{0,3})?)?)?")


def _codes(run: str) -> list[int] | None:
    """Codes of the seg tokens of a run, or None if any is not a real one (<seg000>..<seg127>)."""
    digits = _SEG.findall(run)
    if any(len(d) != 3 for d in digits):  # length first: int() refuses > 4300 digits
        return None
    codes = [int(d) for d in digits]
    return codes if all(c < NUM_CODES for c in codes) else None


def parse_segments(
    text: str,
    width: int,
    height: int,
    codec: MaskCodec | None | bool = None,
    allowed_labels: Collection[str] | None = None,
    divisor: int = 1023,
) -> ParseResult:
    """Read segment objects (``PredictedMask``, source pixels) from model output.

    Never raises on ``text``: every object it can read is returned, every rejected fragment
    gets a ``ParseError`` with a reason from ``SEG_PARSE_REASONS``. An object needs exactly 4
    valid locs, exactly 16 valid segs and a label. A box with NO seg token is rejected as
    ``missing_mask`` and NOT returned as a box: a segment answer's objects are all masks, and
    big_vision scores such an answer as invalid (mask IoU 0, box IoU 0). Boxes whose end bin
    precedes the start are ``invalid_box``; a box that truncates to zero pixels gives an empty
    mask (returned; big_vision counts it invalid, the metric gives IoU 0 either way).
    Cut-off text ("...<seg01" or a full object without its label, and no ``<eos>``) is
    ``truncated_object``. Boxes decode with ``bin / divisor * size`` as in
    :func:`raytrain.formats.paligemma.parse`.

    ``codec=None`` loads the one named by ``RAYTRAIN_MASK_CODEC``; without weights (``codec=False``,
    or none configured) objects come back as :class:`CodedMask` (box + the 16 codes): no pixels,
    but their boxes and seg-token validity can still be scored.

    Raises only for bad arguments (size, divisor).
    """
    if divisor not in fmt.DIVISORS:
        raise ValueError(f"divisor must be one of {fmt.DIVISORS}, got {divisor}")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if codec is None:
        try:
            codec = load_codec()
        except MaskCodecMissing:
            codec = False

    good: list[tuple[Box, list[int]]] = []
    errors: list[ParseError] = []
    for f in fmt.scan(text, _RUN, _PARTIAL):
        if isinstance(f, ParseError):
            errors.append(f)
            continue
        bins, codes = _bins(f.tokens), _codes(f.tokens)
        if f.at_end:
            # no label yet: cut off, unless what is there could never be the start of an object
            fits = (
                bins is not None
                and codes is not None
                and len(codes) <= NUM_TOKENS
                and (len(bins) == 4 or (len(bins) < 4 and not codes))
            )
            reason = "truncated_object" if fits else "wrong_token_count"
        elif bins is None or len(bins) != 4 or codes is None:
            reason = "wrong_token_count"
        elif not codes:
            reason = "missing_mask"
        elif len(codes) != NUM_TOKENS:
            reason = "wrong_token_count"
        elif not f.label:
            reason = "missing_label"
        elif allowed_labels is not None and f.label not in allowed_labels:
            reason = "unknown_label"
        elif bins[2] < bins[0] or bins[3] < bins[1]:
            reason = "invalid_box"
        else:
            y1, x1, y2, x2 = (fmt.decode_bin(b, divisor) * s for b, s in zip(bins, (height, width, height, width)))
            good.append((Box(x1, y1, x2, y2, f.label), codes))
            continue
        errors.append(ParseError(reason, f.text))

    objects: list = []
    if good and codec is False:
        return ParseResult([CodedMask(b.x1, b.y1, b.x2, b.y2, b.label, tuple(c)) for b, c in good], errors)
    if good:
        raw = codec.decode_logits([c for _, c in good]).numpy()  # one batched decoder call
        objects = [_predicted(box, _paste(r, box, width, height)) for (box, _), r in zip(good, raw)]
    return ParseResult(objects, errors)
