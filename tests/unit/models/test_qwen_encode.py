"""Qwen2.5-VL / Qwen3-VL training batches carry uint8 pixels (models/qwen_encode.py): the worker's
`prepare_inputs` must turn them back into exactly the float values the processor produces, for
images of different sizes (a ragged column), on numpy and torch, and inside packed rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from raytrain.models import ensure_preset, family
from raytrain.models._batch import ragged

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (width, height): sides multiples of 28 (Qwen2.5-VL) and 32 (Qwen3-VL) so both processors keep them
SIZES = {"qwen2_5_vl": [(112, 112), (168, 84), (56, 140)], "qwen3_vl": [(128, 128), (192, 96), (64, 160)]}


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def fam_proc(request, tmp_path_factory):
    fam = family(request.param)
    path = str(ensure_preset(f"tiny:{request.param}", tmp_path_factory.mktemp("presets")))
    return request.param, fam, fam.load_processor(path)


def _encoded(fam_proc, prefixes, suffixes):
    """(family, processor, images, encode_train's batch, generation's encoding: the processor's own
    floats) of three random images of different sizes."""
    name, fam, proc = fam_proc
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES[name]]
    return fam, proc, images, fam.encode_train(proc, images, prefixes, suffixes, max_len=200), fam.encode_prompts(proc, images, prefixes)


def test_uint8_patches_normalised_on_the_worker_equal_the_processors_floats(fam_proc):
    fam, proc, _, enc, ref = _encoded(fam_proc, ["point to the cat", "detect dog", "Describe this image."],
                                      ['[{"point_2d": [10, 20], "label": "cat"}]', "[]", "noise"])
    assert all(np.asarray(p).dtype == np.uint8 for p in enc["pixel_values"])
    assert enc["pixel_scale"].shape == enc["pixel_offset"].shape == (3, 3)
    # one of the processor's two identical frames of a still image, in uint8: an eighth of its float32 bytes
    t = proc.image_processor.temporal_patch_size
    assert t == 2 and enc["pixel_repeat"].tolist() == [t] * 3
    float_bytes = ref["pixel_values"].numel() * 4
    assert sum(np.asarray(p).nbytes for p in enc["pixel_values"]) * 4 * t == float_bytes

    keys = ("pixel_values", "pixel_scale", "pixel_offset", "image_grid_thw", "pixel_repeat")
    as_numpy = fam.prepare_inputs({k: enc[k] for k in keys})
    # Ray hands a ragged column to torch as a list of per-row tensors
    as_torch = fam.prepare_inputs({"pixel_values": [torch.from_numpy(p) for p in enc["pixel_values"]],
                                   **{k: torch.from_numpy(enc[k]) for k in keys[1:]}})
    for out in (as_numpy, as_torch):
        assert "pixel_scale" not in out and "pixel_offset" not in out
        pv = out["pixel_values"]
        pv = pv.numpy() if hasattr(pv, "numpy") else pv
        assert pv.dtype == np.float32
        np.testing.assert_allclose(pv, ref["pixel_values"].numpy(), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(as_torch["image_grid_thw"]), ref["image_grid_thw"].numpy())


def test_packed_rows_keep_each_images_normalisation(fam_proc):
    fam, proc, _, enc, ref_enc = _encoded(fam_proc, ["detect cat", "detect dog", "detect bird"], ["[]", "[]", "[]"])
    length = enc.pop("length")
    examples = []
    for i in range(3):
        ex = {k: (np.asarray(v[i])[: length[i]] if k in fam.SEQ_KEYS or k == "labels" else np.asarray(v[i])) for k, v in enc.items()}
        examples.append(ex)
    # one example's map differs: the row must apply each image's own (scale, offset) to its own patches
    examples[1]["pixel_scale"] = examples[1]["pixel_scale"] * 2
    rows = [fam.pack(examples[:2], int(length[:2].sum()) + 3, proc.tokenizer.pad_token_id), fam.pack(examples[2:], int(length[2]), 0)]
    assert rows[0]["pixel_repeat"].tolist() == [2, 2]
    batch = {k: ragged([r[k] for r in rows]) for k in ("pixel_values", "pixel_scale", "pixel_offset", "image_grid_thw", "pixel_repeat")}
    out = fam.prepare_inputs(batch)
    ref = ref_enc["pixel_values"].numpy()
    n0 = int(np.prod(enc["image_grid_thw"][0]))
    n1 = int(np.prod(enc["image_grid_thw"][1]))
    got = out["pixel_values"]
    np.testing.assert_allclose(got[:n0], ref[:n0], atol=1e-5)
    raw = np.asarray(examples[1]["pixel_values"], np.float32).reshape(n1, 3, 1, -1).repeat(2, axis=2)  # both frames
    doubled = (raw * examples[1]["pixel_scale"][None, :, None, None] + examples[1]["pixel_offset"][None, :, None, None]).reshape(n1, -1)
    np.testing.assert_allclose(got[n0 : n0 + n1], doubled, atol=1e-4)
    np.testing.assert_allclose(got[n0 + n1 :], ref[n0 + n1 :], atol=1e-5)


def test_a_processor_whose_frames_differ_is_refused_not_stored_in_a_second_layout():
    from raytrain.models import qwen_encode

    same = np.repeat(np.arange(12, dtype=np.uint8).reshape(2, 3, 1, 2), 2, axis=2).reshape(2, 12)
    one, t = qwen_encode._one_frame(same, 2)
    assert t == 2 and one.shape == (2, 6) and one.tolist() == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]
    differ = same.copy()
    differ[1, -1] += 1  # the second frame of the last patch's last channel
    with pytest.raises(ValueError, match="temporal frames"):
        qwen_encode._one_frame(differ, 2)
