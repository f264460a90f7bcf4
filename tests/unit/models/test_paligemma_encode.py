"""PaliGemma prompt / training encodings skip the processor's resize for images already at the model
size (the pipeline and Serve resize before encoding) and give exactly what the processor gives with
its resize on; other sizes are still resized."""

import numpy as np
import pytest
from PIL import Image

from raytrain.models import paligemma


@pytest.fixture(scope="module")
def proc(tiny_model_path):
    return paligemma.load_processor(tiny_model_path)


def _arrays(n, h, w, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def test_which_images_need_the_processors_resize(proc):
    h, w = paligemma.image_size(proc)
    at_size = _arrays(2, h, w)
    assert not paligemma._needs_resize(proc, at_size)
    assert not paligemma._needs_resize(proc, [Image.fromarray(a) for a in at_size])
    assert paligemma._needs_resize(proc, at_size + _arrays(1, h + 1, w))  # one image off size: all go through it
    assert paligemma._needs_resize(proc, [Image.fromarray(_arrays(1, h, 2 * w)[0])])
    assert paligemma._needs_resize(proc, [np.zeros((3, h, w), dtype=np.uint8)])  # channels first: not read as HxW


def test_prompt_batches_equal_the_processors_own(proc):
    h, w = paligemma.image_size(proc)
    prefixes = ["point to red circle", "detect blue square ; green star"]
    for images in (_arrays(2, h, w), [Image.fromarray(a) for a in _arrays(2, h, w, seed=1)], _arrays(2, 2 * h, w, seed=2)):
        got = paligemma.encode_prompts(proc, images, prefixes)
        side, proc.tokenizer.padding_side = proc.tokenizer.padding_side, "left"
        try:
            ref = proc(text=["<image>" + p for p in prefixes], images=list(images), padding="longest", return_tensors="pt")
        finally:
            proc.tokenizer.padding_side = side
        assert got["pixel_values"].shape == (2, 3, h, w)
        assert (got["pixel_values"] == ref["pixel_values"]).all()  # bit for bit
        for k in ("input_ids", "attention_mask", "token_type_ids"):
            assert (got[k] == ref[k]).all(), k


def test_training_pixels_of_arrays_at_model_size_equal_the_processors(proc):
    h, w = paligemma.image_size(proc)
    images = _arrays(3, h, w, seed=3)
    enc = paligemma.encode_train(proc, images, ["caption en"] * 3, ["a photo"] * 3, 48)
    ref = proc(text=["<image>caption en"] * 3, images=images, suffix=["a photo"] * 3, padding="longest", return_tensors="np",
               do_rescale=False, do_normalize=False)
    np.testing.assert_array_equal(enc["pixel_values"], ref["pixel_values"].astype(np.uint8))
