"""The offline tiny PaliGemma preset goes through the same from_pretrained path as a hub model."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

from raytrain.formats.paligemma import NUM_LOC, NUM_SEG
from raytrain import predict
from raytrain.models import ensure_preset, family, paligemma

pytestmark = pytest.mark.integration


def test_tokenizer_has_the_paligemma_vocabulary(tiny_model_path):
    tok = AutoProcessor.from_pretrained(tiny_model_path).tokenizer
    locs = paligemma.loc_token_ids(tok)
    assert len(locs) == NUM_LOC and (np.diff(locs) == 1).all()  # contiguous, in bin order
    segs = tok.convert_tokens_to_ids([f"<seg{i:03d}>" for i in range(NUM_SEG)])
    assert tok.unk_token_id not in segs and len(set(segs)) == NUM_SEG
    assert tok.convert_tokens_to_ids("<image>") != tok.unk_token_id
    ids = tok("<loc0001><loc1023> red circle", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "<loc0001><loc1023> red circle"
    assert tok.unk_token_id not in tok("point to blue square\n", add_special_tokens=False)["input_ids"]


def test_saved_preset_reloads_identically(tiny_model_path, tmp_path):
    model, proc = paligemma.load(tiny_model_path)
    assert proc.image_seq_length == 16
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 0.7e6
    # same path as google/paligemma2-3b-pt-224: from_pretrained on a directory with config + safetensors
    assert (Path(tiny_model_path) / "model.safetensors").exists()
    assert json.loads((Path(tiny_model_path) / "config.json").read_text())["model_type"] == "paligemma"
    model.save_pretrained(tmp_path / "again")
    again = PaliGemmaForConditionalGeneration.from_pretrained(tmp_path / "again")
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n


def test_preset_build_is_deterministic_and_cached(tmp_path):
    a = ensure_preset("tiny:paligemma", tmp_path / "a")
    b = ensure_preset("tiny:paligemma", tmp_path / "b")
    wa = PaliGemmaForConditionalGeneration.from_pretrained(a).state_dict()
    wb = PaliGemmaForConditionalGeneration.from_pretrained(b).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    mtime = (a / "model.safetensors").stat().st_mtime
    assert ensure_preset("tiny:paligemma", tmp_path / "a") == a
    assert (a / "model.safetensors").stat().st_mtime == mtime  # not rebuilt


def test_preset_at_another_input_size_is_its_own_cached_model(tmp_path):
    default = ensure_preset("tiny:paligemma", tmp_path)
    big = ensure_preset("tiny:paligemma", tmp_path, image_size=96)
    assert big != default and ensure_preset("tiny:paligemma", tmp_path, image_size=96) == big
    assert ensure_preset("tiny:paligemma", tmp_path, image_size=64) == default  # the default size is the default preset
    model, proc = paligemma.load(str(big))
    assert proc.image_seq_length == (96 // 16) ** 2 and paligemma.image_size(proc) == (96, 96)
    enc = paligemma.encode_train(proc, [Image.new("RGB", (96, 96), (10, 200, 30))], ["detect circle"], ["<loc0001> circle"], 64)
    with torch.no_grad():
        out = model(**paligemma.prepare_inputs({k: torch.from_numpy(v) for k, v in enc.items() if k not in ("length", "labels")}))
    assert out.logits.shape[1] == 64
    with pytest.raises(ValueError, match="multiple of 16"):
        ensure_preset("tiny:paligemma", tmp_path, image_size=100)
    with pytest.raises(ValueError, match="multiple of 28"):  # Qwen's image_size is a pixel budget's side
        ensure_preset("tiny:qwen2_5_vl", tmp_path, image_size=96)


def test_hub_ids_are_passed_through_unchanged():
    assert paligemma.resolve("google/paligemma2-3b-pt-224") == "google/paligemma2-3b-pt-224"


def test_forward_and_generate(tiny_model_path):
    model, proc = paligemma.load(tiny_model_path)
    img = Image.new("RGB", (64, 64), (10, 200, 30))
    enc = paligemma.encode_train(proc, [img], ["point to red circle"], ["<loc0100><loc0200> red circle"], 48)
    assert enc["input_ids"].shape == (1, 48) and enc["length"][0] < 48
    # the suffix (and only the suffix + eos) is supervised
    n_sup = (enc["labels"] != paligemma.IGNORE_INDEX).sum()
    assert n_sup == enc["token_type_ids"].sum()
    out = [g.text for g in predict.decode(model, proc, family("paligemma"), [img, img], ["point to red circle", "detect blue square"], max_new_tokens=4)]
    assert len(out) == 2 and all(isinstance(t, str) for t in out)


def test_uint8_pixels_normalised_on_the_worker_equal_the_processors_floats(tiny_model_path):
    """encode_train ships uint8 pixels + the processor's affine map; prepare_inputs applied on
    numpy or torch gives the processor's own float pixel_values (model size and off-size images),
    and the token side is untouched by skipping the processor's image work."""
    import numpy as np
    import torch
    from skimage import data as skdata

    proc = paligemma.load_processor(tiny_model_path)
    h, w = paligemma.image_size(proc)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)),
              Image.fromarray(skdata.astronaut()),  # 512x512: encode_train must resize it like the processor
              Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))]
    prefixes = ["point to red circle", "detect person", "caption en"]
    suffixes = ["<loc0100><loc0200> red circle", "<loc0001><loc0002><loc0500><loc0600> person", "a photo"]
    enc = paligemma.encode_train(proc, images, prefixes, suffixes, 48)
    assert enc["pixel_values"].dtype == np.uint8 and enc["pixel_values"].shape == (3, 3, h, w)
    assert enc["pixel_scale"].shape == enc["pixel_offset"].shape == (3, 3)

    ref = proc(text=["<image>" + p for p in prefixes], images=images, suffix=suffixes,
               padding="longest", return_tensors="np")
    for as_torch in (False, True):
        batch = {k: (torch.from_numpy(v) if as_torch else v) for k, v in enc.items() if k != "length"}
        out = paligemma.prepare_inputs(batch)
        assert "pixel_scale" not in out and "pixel_offset" not in out
        pv = out["pixel_values"].numpy() if as_torch else out["pixel_values"]
        assert pv.dtype == np.float32
        np.testing.assert_allclose(pv, ref["pixel_values"], atol=1e-6)
    n = ref["input_ids"].shape[1]
    np.testing.assert_array_equal(enc["input_ids"][:, :n], ref["input_ids"])
    np.testing.assert_array_equal(enc["labels"][:, :n], ref["labels"])
    # 4x smaller than the float32 the processor returns
    assert enc["pixel_values"].nbytes * 4 == ref["pixel_values"].astype(np.float32).nbytes
