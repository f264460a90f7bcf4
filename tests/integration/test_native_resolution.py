"""Qwen2.5-VL at native resolution (issue 14 item 6): a batch of photographs with different aspect
ratios goes through the training pipeline (each image at its own smart_resize size under the
processor's min/max pixels, a different number of image tokens each), trains, and predicts through
the one predict path with boxes mapped back to source pixels within 1 px. The frames training,
evaluation and Serve use are checked to be the same, not assumed: the image the model sees is
exactly the size the answer was rendered for (the processor's patch grid), and Serve's adapter
path, from a checkpoint's recorded preprocessing, builds the same image and geometry.

The tiny preset's native-resolution variant (`ensure_preset(..., image_size=224)`: min 56*56,
max 224*224 pixels) stands in for a released Qwen2.5-VL processor."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from raytrain import config as config_mod
from raytrain import predict
from raytrain.data import pipeline, preprocess
from raytrain.formats import qwen as qfmt
from raytrain.formats.annotations import Box, objects_from_json, objects_to_json
from raytrain.models import ensure_preset, family
from raytrain.models.qwen_resize import resize_settings
from raytrain.training import loop
from raytrain.training.session import collate

pytestmark = pytest.mark.integration

SPEC = "qwen2_5_vl"
# (width, height) of each source: aspect ratios from 1:2.1 to 2.1:1, pixel counts the variant keeps
# about as they are (so a pixel of the model frame is about a source pixel: integer answers then
# land within 1 px of any target)
SIZES = [(200, 150), (150, 200), (224, 112), (100, 210), (180, 180), (250, 120)]


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    path = str(ensure_preset("tiny:qwen2_5_vl", tmp_path_factory.mktemp("qwen-native"), image_size=224))
    model, proc = family(SPEC).load(path)
    return path, model, proc


def _rows() -> dict:
    from skimage import data as skd

    photos = [skd.astronaut(), skd.coffee(), skd.chelsea(), skd.rocket(), skd.astronaut()[::-1], skd.coffee()[:, ::-1]]
    rng = np.random.default_rng(0)
    rows = {k: [] for k in ("id", "image", "width", "height", "objects")}
    for i, ((w, h), a) in enumerate(zip(SIZES, photos)):
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(a)).resize((w, h), Image.BILINEAR).save(buf, format="PNG")
        objs = []
        for label in ("cat", "cup"):  # arbitrary (non-integer) source coordinates
            x1, y1 = rng.uniform(0, 0.5 * w), rng.uniform(0, 0.5 * h)
            objs.append(Box(x1, y1, x1 + rng.uniform(0.2, 0.5) * w, y1 + rng.uniform(0.2, 0.5) * h, label))
        for k, v in zip(rows, (f"photo-{i}", buf.getvalue(), w, h, objects_to_json(objs))):
            rows[k].append(v)
    return {k: np.array(v, dtype=object) if k in ("id", "image", "objects") else np.array(v) for k, v in rows.items()}


def test_native_batch_trains_and_predicts_in_source_pixels(native, one_torch_thread):
    path, model, proc = native
    fam = family(SPEC)
    cfg = config_mod.load(None, [f"model.family={SPEC}", "train.strategy=full"])
    assert cfg.data.preprocess.resize == "native"  # the family's default
    frame = fam.input_frame(proc, "native")
    s = resize_settings(proc)
    examples = pipeline.decode_and_expand(_rows(), split="train", tasks=["detect"], image_hw=frame, family=SPEC,
                                          preprocess=cfg.data.preprocess)
    n = len(examples["id"])
    assert n == 2 * len(SIZES)
    sizes = [tuple(np.shape(im)[:2]) for im in examples["image"]]
    for i, hw in enumerate(sizes):  # each image at its own smart_resize size (not a square)
        w, h = int(examples["width"][i]), int(examples["height"][i])
        assert hw == qfmt.smart_resize(h, w, s["factor"], s["min_pixels"], s["max_pixels"]) == fam.input_size(frame, w, h)
        assert tuple(examples["content_box"][i]) == (0, 0, hw[1], hw[0])
    assert len(set(sizes)) == len(SIZES)

    # training input: the processor patches each image as it is (its grid IS the rendered frame)
    enc = pipeline.tokenize(examples, split="train", model_path=path, max_len=400, family=SPEC)
    assert len(enc["input_ids"]) == n
    assert [(g[1] * 14, g[2] * 14) for g in enc["image_grid_thw"].tolist()] == sizes
    assert len(set(enc["mm_token_type_ids"].sum(1).tolist())) >= 3  # different image-token counts (a transposed size has the same)

    # it trains: a few AdamW steps on the batch lower its loss
    model.train()
    digits = torch.as_tensor(fam.digit_token_ids(proc.tokenizer))
    loss_fn = loop.training_loss(cfg, proc.tokenizer, torch.as_tensor(fam.loc_token_ids(proc.tokenizer)),
                                 model.get_output_embeddings().weight.shape[0], digits)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        inputs, targets = loop.batch_to_model(collate(dict(enc)), fam, torch.device("cpu"), torch.float32)
        opt.zero_grad()
        loss, _ = loss_fn(model(**inputs, use_cache=False).logits, targets)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.3, losses

    # it predicts: the one predict path on the ragged batch (constrained, per-example frames)
    model.eval()
    opts = predict.DecodeOptions(max_new_tokens=40, constrained=True, confidence=True)
    rows = predict.predict_batch(model, proc, fam, examples, opts)
    assert list(rows["id"]) == list(examples["id"])
    for text, objs in zip(rows["text"], rows["objects"]):
        for o in json.loads(objs):  # whatever it found lies inside its source image
            assert o["x1"] >= 0 and o["y2"] <= max(h for _, h in SIZES)

    # ... and maps answers back to source pixels within 1 px: the answers as rendered for the
    # model frame (what a perfect model writes), read back through the same path
    back = predict.texts_to_rows(fam, examples, list(examples["suffix"]))
    worst = 0.0
    for i in range(n):
        want = objects_from_json(examples["targets"][i])
        got = [o for o in objects_from_json(back["objects"][i])]
        assert len(got) == len(want)
        for g, t in zip(sorted(got, key=lambda b: b.x1), sorted(want, key=lambda b: b.x1)):
            worst = max(worst, *(abs(a - b) for a, b in zip((g.x1, g.y1, g.x2, g.y2), (t.x1, t.y1, t.x2, t.y2))))
    print(f"native batch: image sizes {sorted(set(sizes))}; loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
          f"worst box coordinate error after mapping back {worst:.3f} px")
    assert worst <= 1.0, worst


def test_train_eval_and_serve_frames_agree(native, tmp_path):
    """The checkpoint records resize=native; eval (launch/eval.py: the recorded preprocessing, the
    family's input_frame, the pipeline) and Serve's adapter path (serve/app.py: the recorded
    preprocessing, preprocess.geometry_for + apply on the request image) give the model the same
    image, in the same frame, as training did; the processor does not resize it again."""
    path, _, proc = native
    fam = family(SPEC)
    cfg = config_mod.load(None, [f"model.family={SPEC}"])
    (tmp_path / "state.json").write_text(json.dumps(loop.checkpoint_state(cfg, step=1, epoch=0, batch_in_epoch=1, metrics={})))
    from raytrain.training import checkpointing

    recorded = preprocess.resolve_recorded(checkpointing.recorded_preprocess(str(tmp_path)), cfg.data.preprocess)
    assert recorded.resize == "native"
    rows = _rows()
    train = pipeline.decode_and_expand(rows, split="train", tasks=["detect"], image_hw=fam.input_frame(proc, cfg.data.preprocess.resize),
                                       family=SPEC, preprocess=cfg.data.preprocess)
    evaluated = pipeline.decode_and_expand(rows, split="test", tasks=["detect"], image_hw=fam.input_frame(proc, recorded.mode),
                                           family=SPEC, preprocess=recorded)
    served = config_mod.Preprocess.from_dict(json.loads((tmp_path / "state.json").read_text())["preprocess"])
    for i in range(len(train["id"])):
        k = list(rows["id"]).index(train["id"][i])
        src = np.asarray(Image.open(io.BytesIO(rows["image"][k])).convert("RGB"))
        h, w = src.shape[:2]
        geom = preprocess.geometry_for(fam, served, fam.input_frame(proc, served.mode), w, h)  # as serve/app.py _predict
        image = preprocess.apply(served, src, geom)
        assert np.array_equal(image, train["image"][i]) and np.array_equal(image, evaluated["image"][i])
        assert predict.batch_geometries(train)[i] == geom == predict.batch_geometries(evaluated)[i]
        enc = fam.encode_prompts(proc, [Image.fromarray(image)], ["detect cat"])
        t, gh, gw = enc["image_grid_thw"][0].tolist()
        assert (gh * 14, gw * 14) == image.shape[:2]  # the model sees the image in the frame the answer is read in


def test_the_fixed_square_stays_an_option(native):
    path, _, proc = native
    fam = family(SPEC)
    cfg = config_mod.load(None, [f"model.family={SPEC}", "data.preprocess.resize=stretch"])
    ex = pipeline.decode_and_expand(_rows(), split="train", tasks=["detect"], image_hw=fam.input_frame(proc, "stretch"), family=SPEC,
                                    preprocess=cfg.data.preprocess)
    assert ex["image"].shape[1:] == (224, 224, 3)  # one stacked array: every image the same square
    enc = pipeline.tokenize(ex, split="train", model_path=path, max_len=400, family=SPEC)
    assert enc["pixel_values"].ndim == 3 and (enc["image_grid_thw"] == [1, 16, 16]).all()
    with pytest.raises(ValueError, match="fixed input size"):
        family("paligemma").input_frame(None, "native")
