"""Qwen2.5-VL batch layout: native-resolution sizing, per-example pixel arrays, packed rows.

Native resolution. Qwen2.5-VL's processor resizes every image to `smart_resize(h, w)` (sides
multiples of patch * merge, pixel count within min_pixels..max_pixels, aspect ratio about kept) and
feeds it as (grid_h * grid_w) patches, one language-model token per merge x merge patches, so the
number of image tokens varies per image. `input_size` computes that size from a source size and
the processor's settings (`native_frame`); the pipeline resizes each image to it ONCE and the
processor is then told not to resize again (smart_resize is not idempotent when min_pixels is
close to max_pixels: 64x48 -> 140x112 -> 112x84), so the answer's frame is the image the model sees.

Rows. The processor flattens a batch's patches into one (sum of patches, C*T*P*P) array plus
`image_grid_thw` (images, 3). Ray Data keeps one row per example (or per packed row): `split_pixels`
cuts the flat array into each example's (patches, D) block, and `models._batch.join_images` joins
the rows' blocks back in row order right before the model.

Packing (`pack`). Several examples in one row: per-token arrays concatenated; `position_ids`
(4, T): row 0 the text positions restarting at 0 per example (transformers builds a causal mask
that never crosses examples from them), rows 1-3 the M-RoPE (temporal, height, width) positions of
each example exactly as `get_rope_index` computes them for that example alone (`rope_positions`),
so each example sees the positions it sees unpacked.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from raytrain.formats import qwen as fmt
from raytrain.models._batch import concat_tokens, restarting_positions

IGNORE_INDEX = -100
TOKEN_PADS = {"input_ids": None, "attention_mask": 0, "mm_token_type_ids": 0, "labels": IGNORE_INDEX, "num_place": 0.0}
"""Per-token arrays of encode_train and their pad values (input_ids: the tokenizer's pad id)."""


def native_frame(settings: dict, min_pixels: int = 0, max_pixels: int = 0) -> dict:
    """The plain value `input_frame` returns for resize=native: the processor's resize settings,
    its pixel bounds replaced by min/max_pixels where those are > 0 (data.preprocess)."""
    s = {k: int(settings[k]) for k in ("factor", "min_pixels", "max_pixels")}
    s.update({k: int(v) for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v})
    if s["max_pixels"] < s["factor"] ** 2 or s["min_pixels"] > s["max_pixels"]:
        raise ValueError(f"native resize needs factor^2 <= min_pixels <= max_pixels, got {s}")
    return {"native": s}


def input_size(frame, width: int, height: int) -> tuple[int, int]:
    """(H, W) of the model input for a width x height source: smart_resize under a native frame's
    settings, or the fixed size of a fixed frame."""
    if isinstance(frame, dict):
        s = frame["native"]
        return fmt.smart_resize(int(height), int(width), s["factor"], s["min_pixels"], s["max_pixels"])
    return int(frame[0]), int(frame[1])


def ready(images: Sequence, factor: int) -> bool:
    """Every image already has sides that are multiples of `factor`: it is a model input as the
    pipeline made it, and the processor must not resize it again."""
    return all(im.size[0] % factor == 0 and im.size[1] % factor == 0 for im in images)


def split_pixels(pixel_values: np.ndarray, grid: np.ndarray) -> list[np.ndarray]:
    """(sum of patches, D) -> each image's (patches, D) block, in order."""
    counts = np.prod(np.asarray(grid, dtype=np.int64), axis=1)
    if int(counts.sum()) != len(pixel_values):
        raise ValueError(f"{len(pixel_values)} patches for grids totalling {int(counts.sum())}")
    return np.split(pixel_values, np.cumsum(counts)[:-1])


def rope_positions(mm_token_type_ids: np.ndarray, grids: Sequence, merge: int) -> np.ndarray:
    """(3, L) int64 M-RoPE positions of ONE example (no padding), as transformers'
    `Qwen2_5_VLModel.get_rope_index` computes them for still images: text runs count on from the
    current position on all three rows; an image block (t, h, w patches) takes (current + t_idx,
    current + row, current + col) over its (t, h / merge, w / merge) tokens, and the text after it
    continues from current + max(h, w) / merge. (tests/integration/test_packing.py compares it with
    the model's own method.)"""
    types = np.asarray(mm_token_type_ids).astype(np.int64)
    out, pos, g, i = [], 0, 0, 0
    n = len(types)
    while i < n:
        j = i
        while j < n and types[j] == types[i]:
            j += 1
        if types[i] == 0:
            out.append(np.broadcast_to(np.arange(j - i, dtype=np.int64) + pos, (3, j - i)))
            pos += j - i
        else:
            t, h, w = (int(v) for v in grids[g])
            g += 1
            lt, lh, lw = t, h // merge, w // merge
            if lt * lh * lw != j - i:
                raise ValueError(f"an image block of {j - i} tokens for a grid of {t}x{h}x{w} (merge {merge})")
            tt, hh, ww = np.meshgrid(np.arange(lt), np.arange(lh), np.arange(lw), indexing="ij")
            out.append(np.stack([tt.ravel() + pos, hh.ravel() + pos, ww.ravel() + pos]).astype(np.int64))
            pos += max(h, w) // merge
        i = j
    if g != len(grids):
        raise ValueError(f"{len(grids)} image grids for {g} image blocks")
    return np.concatenate(out, axis=1) if out else np.zeros((3, 0), np.int64)


def merge_size(example: dict) -> int:
    """The spatial merge (patches per token side) of an encoded example: its patches per image token."""
    patches = int(np.prod(np.asarray(example["image_grid_thw"], dtype=np.int64).reshape(-1, 3), axis=1).sum())
    tokens = int(np.count_nonzero(np.asarray(example["mm_token_type_ids"])))
    merge = int(round((patches / max(tokens, 1)) ** 0.5))
    if tokens == 0 or merge * merge * tokens != patches:
        raise ValueError(f"{patches} patches for {tokens} image tokens: not a merge of whole patch squares")
    return merge


def pack(examples: Sequence[dict], length: int, pad_id: int, merge: int | None = None) -> dict:
    """One packed row (see the module doc) from encoded examples: each a dict of one row of
    encode_train (per-token arrays cut to the example's length, `pixel_values` (patches, D),
    `image_grid_thw` (3,) or (images, 3)). merge: patches per token side (None: read from the
    first example's patches per image token)."""
    if not examples:
        raise ValueError("nothing to pack")
    merge = merge or merge_size(examples[0])
    pads = dict(TOKEN_PADS, input_ids=pad_id)
    row = concat_tokens(examples, pads, length)
    lengths = [len(e["input_ids"]) for e in examples]
    grids = [np.asarray(e["image_grid_thw"], dtype=np.int64).reshape(-1, 3) for e in examples]
    text = restarting_positions(lengths, length)
    rope = [rope_positions(e["mm_token_type_ids"], g, merge) for e, g in zip(examples, grids)]
    pad = length - sum(lengths)
    rope.append(np.broadcast_to(np.arange(pad, dtype=np.int64), (3, pad)))
    row["position_ids"] = np.concatenate([text[None, :], np.concatenate(rope, axis=1)], axis=0)
    row["pixel_values"] = np.concatenate([np.asarray(e["pixel_values"]).reshape(-1, np.shape(e["pixel_values"])[-1]) for e in examples])
    row["image_grid_thw"] = np.concatenate(grids)
    for k in ("pixel_scale", "pixel_offset"):  # one (3,) map per image, in the order of the grids
        if k in examples[0]:
            row[k] = np.concatenate([np.asarray(e[k], dtype=np.float32).reshape(-1, 3) for e in examples])
    if "pixel_repeat" in examples[0]:
        row["pixel_repeat"] = np.asarray([int(np.max(e["pixel_repeat"])) for e in examples], dtype=np.int8)
    return row
