"""Batch-layout helpers both families call (plain functions, no family knowledge): fixed input
frames, joining per-image arrays across the rows of a batch, and the parts of a packed row that do
not depend on the family (per-token arrays concatenated, positions restarting per example).

Per-image arrays (pixels, grids, pixel affine maps) travel in Ray Data rows with a leading "images
of this row" axis where a row can hold several images (a packed row) or a variable number of
patches (Qwen2.5-VL at native resolution). Ray hands such columns over as one array when every row
has the same shape and as a list of per-row arrays otherwise; `join_images` turns either into the
flat (images or patches, ...) array the model takes, in row order, which is the order the model
fills image placeholders in (row-major over the batch).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def fixed_size(frame) -> tuple[int, int]:
    """(H, W) of a fixed input frame (what `input_frame` returns for stretch / letterbox)."""
    if isinstance(frame, dict) or len(frame) != 2:
        raise ValueError(f"expected a fixed (height, width) model input, got {frame!r}")
    return int(frame[0]), int(frame[1])


def join_images(x, flat_ndim: int):
    """Per-row per-image arrays -> one flat array of `flat_ndim` dims: a list (ragged rows) is
    concatenated, an array with one more dim (B, n, ...) is reshaped to (B * n, ...), an already
    flat one passes. Works for torch tensors and numpy arrays."""
    if isinstance(x, (list, tuple)) or (isinstance(x, np.ndarray) and x.dtype == object):
        parts = list(x)
        if not parts:
            raise ValueError("no per-image arrays to join")
        if hasattr(parts[0], "detach"):  # torch
            import torch

            return torch.cat([p.reshape(-1, *p.shape[len(p.shape) - flat_ndim + 1:]) for p in parts], dim=0)
        return np.concatenate([np.asarray(p).reshape(-1, *np.asarray(p).shape[np.ndim(p) - flat_ndim + 1:]) for p in parts], axis=0)
    if x.ndim == flat_ndim + 1:
        return x.reshape(-1, *x.shape[2:])
    if x.ndim != flat_ndim:
        raise ValueError(f"per-image array of shape {tuple(x.shape)}: expected {flat_ndim} or {flat_ndim + 1} dims")
    return x


def ragged(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """One column from per-row arrays: stacked when they share a shape, else a 1-D object array
    (Ray Data stores it as a variable-shaped tensor column)."""
    arrays = [np.asarray(a) for a in arrays]
    if arrays and all(a.shape == arrays[0].shape for a in arrays):
        return np.stack(arrays)
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


def concat_tokens(examples: Sequence[dict], pads: dict, length: int) -> dict[str, np.ndarray]:
    """Per-token arrays (the keys of `pads`, each example's cut to its own length) concatenated in
    order and right-padded to `length` with the key's pad value; keys an example lacks are skipped."""
    out = {}
    for k, pad in pads.items():
        if k not in examples[0]:
            continue
        parts = [np.asarray(e[k]) for e in examples]
        row = np.concatenate(parts, axis=-1)
        if row.shape[-1] > length:
            raise ValueError(f"examples of {row.shape[-1]} tokens do not fit a packed row of {length}")
        out[k] = np.concatenate([row, np.full((*row.shape[:-1], length - row.shape[-1]), pad, dtype=row.dtype)], axis=-1)
    return out


def restarting_positions(lengths: Sequence[int], length: int, start: int = 0) -> np.ndarray:
    """(length,) int64 positions start, start+1, ... restarting at every example and once more for
    the padding after the last one, which so becomes a sequence of its own (transformers reads
    example boundaries from positions that do not continue by +1, `find_packed_sequence_indices`)."""
    parts = [np.arange(n, dtype=np.int64) + start for n in lengths]
    pad = length - int(sum(lengths))
    if pad < 0:
        raise ValueError(f"examples of {sum(lengths)} tokens do not fit a packed row of {length}")
    parts.append(np.arange(pad, dtype=np.int64) + start)
    return np.concatenate(parts)


# ----------------------------------------------------------------------------------------------
# uint8 pixels: what the data pipeline ships, normalised on the worker
#
# A tokenized example carries its image as the processor's uint8 pixels (rescale and normalisation
# off) plus the per-channel affine map that turns them into the floats the processor would have
# produced: a quarter of float32's bytes through Ray's object store, which at native resolution
# decides whether an epoch's examples fit in memory or are spilled to disk and read back every epoch.


def pixel_affine(processor) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset), float32 (3,): the processor's `(x * rescale - mean) / std` as `x * scale + offset`."""
    ip = processor.image_processor
    rescale = float(ip.rescale_factor) if getattr(ip, "do_rescale", True) else 1.0
    if getattr(ip, "do_normalize", True):
        mean = np.broadcast_to(np.asarray(ip.image_mean, np.float64), (3,))
        std = np.broadcast_to(np.asarray(ip.image_std, np.float64), (3,))
    else:
        mean, std = np.zeros(3), np.ones(3)
    return (rescale / std).astype(np.float32), (-mean / std).astype(np.float32)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """The processor's un-rescaled pixels (whole numbers 0..255 as floats) as uint8."""
    if pixels.dtype == np.uint8:
        return pixels
    # a processor that ignored do_rescale=False would hand back floats: refuse to guess their scale
    if not np.array_equal(pixels, np.round(pixels)) or pixels.min() < 0 or pixels.max() > 255:
        raise ValueError("the image processor returned rescaled pixels although asked not to rescale")
    return pixels.astype(np.uint8)


def apply_pixel_affine(pixels, scale, offset):
    """float32 `pixels * scale + offset` per channel: pixels (N, 3, ...) uint8, scale / offset (N, 3);
    numpy or torch (on the pixels' device)."""
    extra = (1,) * (pixels.ndim - 2)
    scale, offset = scale.reshape(*scale.shape, *extra), offset.reshape(*offset.shape, *extra)
    if isinstance(pixels, np.ndarray):
        return pixels.astype(np.float32) * scale + offset
    return pixels.float() * scale.float() + offset.float()
