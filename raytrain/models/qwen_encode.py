"""Qwen2.5-VL batches: the chat-templated prompt (and answer) through the processor, as the model
and Ray Data take them (Qwen3-VL's processor produces the same inputs and uses these too).

`encode_train` ships each image as uint8 patches plus a per-channel affine map (`_batch.pixel_affine`)
that `prepare_inputs` applies on the worker, so a tokenized split costs a quarter of float32's bytes
in Ray's object store; `encode_prompts` (generation) hands the processor's float values straight to
the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from raytrain.formats import qwen as fmt
from raytrain.formats.numbers import token_place_weights
from raytrain.models import qwen_batch
from raytrain.models._batch import apply_pixel_affine, join_images, pixel_affine, ragged, to_uint8
from raytrain.models.qwen_resize import resize_settings

IGNORE_INDEX = -100  # label value the loss skips (prompt, image and padding positions)
IM_END = "<|im_end|>"



def _chat_prompt(processor, prefix: str, system: str | None = None) -> str:
    """The user turn through the processor's chat template, ending with the assistant header:
    '<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n<|vision_start|><|image_pad|>
    <|vision_end|>{prefix}<|im_end|>\\n<|im_start|>assistant\\n' (the processor expands <|image_pad|>)."""
    return processor.apply_chat_template(fmt.chat_messages(prefix, system=system or None), tokenize=False, add_generation_prompt=True)


def _encode_prompts_np(processor, images: Sequence, prefixes: Sequence[str], side: str, system: str | None = None,
                       raw_pixels: bool = False) -> dict:
    """The processor's encoding. Images whose sides are multiples of patch * merge are model inputs
    the pipeline (or Serve) already sized: the processor must not resize them again (its
    smart_resize is not idempotent for every setting); other images it resizes as it always does.
    raw_pixels: patches of the un-rescaled, un-normalised pixels (0..255; `_batch.pixel_affine`
    maps them to the processor's values)."""
    tok = processor.tokenizer
    old = tok.padding_side
    tok.padding_side = side
    images = list(images)
    extra = {"do_resize": False} if qwen_batch.ready(images, resize_settings(processor)["factor"]) else {}
    if raw_pixels:
        extra.update(do_rescale=False, do_normalize=False)
    try:
        return processor(text=[_chat_prompt(processor, p, system) for p in prefixes], images=images, padding="longest",
                         return_tensors="np", **extra)
    finally:
        tok.padding_side = old


def _check_frames(images: Sequence, grid: np.ndarray, patch: int) -> None:
    """Each image reached the model at the size it has, i.e. in the frame its answer was rendered
    for (the pipeline's own resize is the only one)."""
    for i, (im, g) in enumerate(zip(images, grid)):
        if (int(g[2]) * patch, int(g[1]) * patch) != tuple(im.size):
            raise ValueError(f"image {i} is {im.size[0]}x{im.size[1]} but the processor made {int(g[2]) * patch}x{int(g[1]) * patch} "
                             "of it: its answer was rendered for the frame it was given (resize it to input_size first)")


def encode_train(processor, images: Sequence, prefixes: Sequence[str], suffixes: Sequence[str], max_len: int,
                 numbers: Sequence | None = None, system: str | None = None) -> dict:
    """Tokenize a batch for teacher-forced training, padded/truncated to exactly `max_len`.

    Each row is the chat-templated prompt (exactly the tokens `encode_prompts` feeds generation)
    followed by the answer and <|im_end|>. Returns numpy arrays: input_ids, attention_mask,
    mm_token_type_ids (1 on image tokens), labels (answer + <|im_end|> ids, IGNORE_INDEX elsewhere),
    pixel_values (B, patches, C*P*P) **uint8**, one of the processor's T identical frames of a still
    image (`pixel_repeat` (B,) = T), with `pixel_scale` / `pixel_offset` (B, 3) float32 (the
    processor's rescale + normalisation as one per-channel affine map) — `prepare_inputs` rebuilds
    the processor's float values on the worker; an eighth of the float32 patches' bytes in Ray's
    object store, where the shapes_qwen split of float32 patches was spilled to disk and read back
    every epoch —, image_grid_thw (B, 3) int64 (prepare_inputs flattens them for the model), and `length`
    (untruncated tokens) so callers can count and drop examples that would not fit instead of
    silently cutting their targets. Right padding with <|endoftext|>.
    `numbers` (per example, the answer's coordinate NumberSpans from `render_with_numbers`): also
    `num_place` (B, max_len) float32, each answer digit's signed place weight (formats/numbers.py)
    at its label position, for the distance-aware number loss.
    """
    tok = processor.tokenizer
    images = list(images)
    enc = _encode_prompts_np(processor, images, prefixes, "right", system, raw_pixels=True)
    answer_enc = tok([s + IM_END for s in suffixes], add_special_tokens=False, return_offsets_mapping=numbers is not None)
    answers = answer_enc["input_ids"]
    prompt_len = enc["attention_mask"].sum(axis=1).astype(np.int64)
    b = len(answers)
    ids = np.full((b, max_len), tok.pad_token_id, dtype=np.int32)
    attn = np.zeros((b, max_len), dtype=np.int8)
    mm = np.zeros((b, max_len), dtype=np.int8)
    labels = np.full((b, max_len), IGNORE_INDEX, dtype=np.int32)
    num_place = np.zeros((b, max_len), dtype=np.float32)
    length = np.zeros((b,), dtype=np.int32)
    for i in range(b):
        p = int(prompt_len[i])
        row = np.concatenate([enc["input_ids"][i, :p], np.asarray(answers[i], dtype=np.int64)])
        length[i] = len(row)
        n = min(len(row), max_len)
        ids[i, :n] = row[:n]
        attn[i, :n] = 1
        mm[i, : min(p, max_len)] = enc["mm_token_type_ids"][i, : min(p, max_len)]
        labels[i, p:n] = row[p:n]
        if numbers is not None and p < n:
            w = token_place_weights(suffixes[i], numbers[i] or [], answer_enc["offset_mapping"][i])
            num_place[i, p:n] = w[: n - p]
    grid = np.asarray(enc["image_grid_thw"], dtype=np.int64)
    scale, offset = pixel_affine(processor)
    pixels, repeat = _one_frame(to_uint8(np.asarray(enc["pixel_values"])), getattr(processor.image_processor, "temporal_patch_size", 1) or 1)
    if qwen_batch.ready(images, resize_settings(processor)["factor"]):
        _check_frames(images, grid, resize_settings(processor)["patch_size"])
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "mm_token_type_ids": mm,
        "labels": labels,
        "pixel_values": ragged(qwen_batch.split_pixels(pixels, grid)),
        "pixel_repeat": np.full((b,), repeat, dtype=np.int8),
        "pixel_scale": np.broadcast_to(scale, (b, 3)).copy(),
        "pixel_offset": np.broadcast_to(offset, (b, 3)).copy(),
        "image_grid_thw": grid,
        "length": length,
        **({"num_place": num_place} if numbers is not None else {}),
    }


def prepare_inputs(inputs: dict) -> dict:
    """Batch as Ray Data delivers it -> what `model(**inputs)` takes: each row's (patches, D)
    pixels (one array (B, patches, D), or a list when rows differ) joined into (all patches, D),
    image_grid_thw (B, 3) / (B, images, 3) / a list joined into (images, 3) int64. Packed rows
    (`position_ids` (B, 4, T)): positions to the model's (4, B, T) and no attention_mask, so
    transformers builds its causal mask from the positions, per example (models/qwen_batch.py).
    Works on torch tensors and numpy arrays; already-flat inputs (encode_prompts) pass through
    unchanged. uint8 pixels (encode_train) become the processor's float values: each image's patches
    times its `pixel_scale` plus its `pixel_offset`, per channel. Call it after the SEQ_KEYS trim."""
    out = dict(inputs)
    if out.get("pixel_values") is not None:
        out["pixel_values"] = join_images(out["pixel_values"], 2)
    grid = out.get("image_grid_thw")
    if grid is not None:
        grid = join_images(grid, 2).reshape(-1, 3)
        out["image_grid_thw"] = grid.long() if hasattr(grid, "long") else grid.astype(np.int64)
    if "pixel_scale" in out:
        repeat = out.pop("pixel_repeat", None)
        out["pixel_values"] = _normalise_patches(out["pixel_values"], join_images(out.pop("pixel_scale"), 2),
                                                 join_images(out.pop("pixel_offset"), 2), out["image_grid_thw"],
                                                 _one_repeat(repeat))
    pos = out.get("position_ids")
    if pos is not None and pos.ndim == 3 and pos.shape[1] == 4:
        out["position_ids"] = pos.permute(1, 0, 2) if hasattr(pos, "permute") else pos.transpose(1, 0, 2)
        out.pop("attention_mask", None)
    return out


def _one_frame(pixels: np.ndarray, t: int) -> tuple[np.ndarray, int]:
    """(patches, C*T*P*P) -> (patches, C*P*P), T: the processor repeats a still image T times along
    each patch's temporal axis; keep one copy. Every row of a dataset must have the same layout (a
    batch mixes rows of many encode calls), so frames that differ are an error, not a second layout."""
    n, d = pixels.shape
    if t <= 1:
        return pixels, 1
    frames = pixels.reshape(n, 3, t, d // (3 * t))
    if not (frames == frames[:, :, :1]).all():
        raise ValueError(f"the image processor's {t} temporal frames of a still image differ: "
                         "raytrain's Qwen batches keep one frame per patch and cannot store this processor's output")
    return np.ascontiguousarray(frames[:, :, 0]).reshape(n, d // t), t


def _one_repeat(repeat) -> int:
    """The batch's single temporal repeat (per-row values from Ray Data, any layout)."""
    if repeat is None:
        return 1
    flat = join_images(repeat, 1)  # (B,) or packed rows' (B, images) / ragged lists -> one value per image
    values = {int(v) for v in np.unique(flat.cpu().numpy() if hasattr(flat, "cpu") else np.asarray(flat))}
    if len(values) != 1:  # every encode_train call of one processor writes the same T
        raise ValueError(f"rows of one batch repeat their frames {sorted(values)} times: encoded by different processors")
    return values.pop()


def _normalise_patches(pv, scale, offset, grid, repeat: int = 1):
    """(patches, C*P*P) uint8 -> float32 (patches, C*repeat*P*P) with each image's (3,) affine map,
    each frame repeated `repeat` times along the temporal axis as the processor lays it out: an
    image's patches are its grid_t * grid_h * grid_w consecutive rows, each row channel-major
    (C blocks of T*P*P)."""
    n, d = pv.shape
    if hasattr(pv, "detach"):
        import torch

        counts = torch.prod(grid.reshape(-1, 3), dim=1).to(pv.device)
        scale, offset = (torch.repeat_interleave(torch.as_tensor(a, device=pv.device), counts, dim=0) for a in (scale, offset))
    else:
        counts = np.prod(np.asarray(grid).reshape(-1, 3), axis=1)
        scale, offset = np.repeat(scale, counts, axis=0), np.repeat(offset, counts, axis=0)
    if scale.shape[0] != n:
        raise ValueError(f"{n} patches for image grids totalling {scale.shape[0]}")
    out = apply_pixel_affine(pv.reshape(n, 3, d // 3), scale, offset)  # (n, C, P*P [* T])
    if repeat > 1:
        out = out[:, :, None, :].expand(n, 3, repeat, d // 3) if hasattr(out, "expand") else \
            np.broadcast_to(out[:, :, None, :], (n, 3, repeat, d // 3))
    return out.reshape(n, d * repeat)


def encode_prompts(processor, images: Sequence, prefixes: Sequence[str], system: str | None = None) -> dict:
    """Left-padded prompt batch for generation (torch tensors, model-ready: pixel_values flat)."""
    import torch

    enc = _encode_prompts_np(processor, images, prefixes, "left", system)
    out = {
        "input_ids": torch.as_tensor(enc["input_ids"], dtype=torch.long),
        "attention_mask": torch.as_tensor(enc["attention_mask"], dtype=torch.long),
        "mm_token_type_ids": torch.as_tensor(enc["mm_token_type_ids"], dtype=torch.long),
        "pixel_values": torch.as_tensor(np.asarray(enc["pixel_values"], dtype=np.float32)),
        "image_grid_thw": torch.as_tensor(np.asarray(enc["image_grid_thw"]), dtype=torch.long),
    }
    return out
