"""Image preprocessing (raytrain/data/preprocess.py): letterbox geometry round trips, the pixels
agree with the mapped coordinates, the edge blend on a real photograph, the pipeline stage renders
targets in the padded frame, and the checkpoint record wins at inference."""

import io
import json
import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from raytrain import config as config_mod
from raytrain import predict
from raytrain.data import pipeline
from raytrain.config import Preprocess
from raytrain.data.preprocess import Geometry, apply, blend_edges, canny_edges, geometry, resolve_recorded
from raytrain.eval import batch as eval_batch
from raytrain.formats.annotations import Box, Mask, Point, Region, box_iou, objects_from_json, objects_to_json
from raytrain.models import family

LETTERBOX = Preprocess(resize="letterbox")
MODEL_HW = [(224, 224), (112, 112), (96, 160), (160, 96)]


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# geometry


@settings(max_examples=300, deadline=None)
@given(
    w=st.integers(8, 3000), h=st.integers(8, 3000), hw=st.sampled_from(MODEL_HW),
    fx=st.tuples(st.floats(0, 1), st.floats(0, 1)), fy=st.tuples(st.floats(0, 1), st.floats(0, 1)),
)
def test_letterbox_round_trips_boxes_and_points(w, h, hw, fx, fy):
    g = geometry(LETTERBOX, w, h, hw)
    (ax, bx), (ay, by) = sorted(fx), sorted(fy)
    x1, y1 = ax * (w - 1), ay * (h - 1)  # a box of at least one pixel inside the image
    box = Box(x1, y1, min(w, max(bx * w, x1 + 1)), min(h, max(by * h, y1 + 1)), "b")
    back = g.to_source(g.to_model(box))
    assert box_iou(box, back) >= 0.99
    assert max(abs(back.x1 - box.x1), abs(back.y1 - box.y1), abs(back.x2 - box.x2), abs(back.y2 - box.y2)) < 1e-6 * max(w, h)
    p = Point(bx * w, ay * h, "p")
    q = g.to_source(g.to_model(p))
    assert abs(q.x - p.x) < 1 and abs(q.y - p.y) < 1
    # one scale for both axes (up to the content box's rounding to whole pixels), centred
    s = min(hw[1] / w, hw[0] / h)
    for n, exact in ((g.x1 - g.x0, w * s), (g.y1 - g.y0, h * s)):
        assert abs(n - exact) <= 0.5 + 1e-9 or n == 1  # at least one pixel of content, however thin
    assert (g.x1 - g.x0 == hw[1]) or (g.y1 - g.y0 == hw[0])  # touches two sides
    assert abs(g.x0 - (hw[1] - g.x1)) <= 1 and abs(g.y0 - (hw[0] - g.y1)) <= 1
    m = g.to_model(box)  # inside the content box
    assert g.x0 - 1e-9 <= m.x1 <= m.x2 <= g.x1 + 1e-9 and g.y0 - 1e-9 <= m.y1 <= m.y2 <= g.y1 + 1e-9


def test_non_square_letterbox_numbers():
    g = geometry(LETTERBOX, 300, 120, (224, 224))
    assert g.content_box == (0, 67, 224, 157) and not g.covers_input  # 120 * 224/300 = 89.6 -> 90 rows
    m = g.to_model(Box(30, 12, 150, 60, "x"))
    assert (m.x1, m.x2) == pytest.approx((22.4, 112.0)) and (m.y1, m.y2) == pytest.approx((67 + 9.0, 67 + 45.0))
    # stretch: the whole input, so targets render from source pixels exactly as before
    s = geometry(Preprocess(), 300, 120, (224, 224))
    assert s.covers_input and s.target_frame([Box(1, 2, 3, 4)]) == ([Box(1, 2, 3, 4)], 300, 120)
    # a square source letterboxed into a square input needs no padding: the same as a stretch
    assert geometry(LETTERBOX, 64, 64, (224, 224)).covers_input


def test_predictions_in_the_padding_clip_to_the_image():
    g = geometry(LETTERBOX, 300, 120, (224, 224))
    assert g.to_source(Point(10, 5)) == Point(10 * 300 / 224, 0.0)
    b = g.to_source(Box(-3, 60, 230, 200))
    assert (b.x1, b.y1, b.x2, b.y2) == (0.0, 0.0, 300.0, 120.0)


def test_regions_and_masks_map_both_ways():
    g = geometry(LETTERBOX, 90, 60, (64, 64))
    r = Region(9, 6, 45, 30, "a dog")
    back = g.to_source(g.to_model(r))
    assert (back.x1, back.y1, back.x2, back.y2) == pytest.approx((9, 6, 45, 30)) and back.phrase == "a dog"
    a = np.zeros((60, 90), bool)
    a[12:40, 20:70] = True
    m = Mask.from_array(a, "blob")
    framed = g.to_model(m)
    assert framed.size == (64, 64) and framed.label == "blob"
    fa = framed.to_array()
    assert not fa[: g.y0].any() and not fa[g.y1 :].any()  # nothing in the padding
    # the framed mask's box is the mapped box of the source mask (within a model pixel)
    mb, want = framed.box, g.to_model(m.box)
    assert max(abs(mb.x1 - want.x1), abs(mb.y1 - want.y1), abs(mb.x2 - want.x2), abs(mb.y2 - want.y2)) <= 1.0
    back = g.to_source(framed).to_array()
    iou = (back & a).sum() / (back | a).sum()
    assert back.shape == a.shape and iou > 0.9


def test_pixels_agree_with_mapped_coordinates():
    """A red box drawn in the source lands exactly where the geometry maps its corners."""
    w, h = 300, 120
    src = np.full((h, w, 3), 200, np.uint8)
    src[30:90, 60:180] = (255, 0, 0)
    prep = Preprocess(resize="letterbox", pad_color=(114, 114, 114))
    g = geometry(prep, w, h, (224, 224))
    out = apply(prep, Image.fromarray(src), g)
    assert out.shape == (224, 224, 3)
    assert (out[: g.y0] == 114).all() and (out[g.y1 :] == 114).all()
    red = (out[..., 0] > 200) & (out[..., 1] < 60)
    ys, xs = np.nonzero(red)
    want = g.to_model(Box(60, 30, 180, 90))
    assert abs(xs.min() - want.x1) <= 1 and abs(xs.max() + 1 - want.x2) <= 1
    assert abs(ys.min() - want.y1) <= 1 and abs(ys.max() + 1 - want.y2) <= 1


def test_stretch_is_the_old_bilinear_resize():
    src = np.random.default_rng(0).integers(0, 256, (50, 80, 3), dtype=np.uint8)
    g = geometry(Preprocess(), 80, 50, (64, 64))
    want = np.asarray(Image.fromarray(src).resize((64, 64), Image.BILINEAR))
    assert np.array_equal(apply(Preprocess(), src, g), want)


# ----------------------------------------------------------------------------------------------
# edge blend


def test_edge_blend_on_a_photograph_is_70_image_30_edges():
    skdata = pytest.importorskip("skimage.data")
    photo = skdata.astronaut()[:, 64:448]  # 384 x 512, a real photograph (scikit-image's data folder)
    prep = Preprocess(resize="letterbox", pad_color=(114, 114, 114), edge_blend=0.3)
    g = geometry(prep, 384, 512, (224, 224))
    out = apply(prep, photo, g).astype(np.float64)
    plain = apply(Preprocess(resize="letterbox", pad_color=(114, 114, 114)), photo, g).astype(np.float64)
    # the padding is untouched and carries no edge (edges are found on the content only)
    assert (out[:, : g.x0] == 114).all() and (out[:, g.x1 :] == 114).all()
    content, base = out[:, g.x0 : g.x1], plain[:, g.x0 : g.x1]
    # every pixel is 0.7 * image, plus 0.3 * 255 where there is an edge (rounded to uint8)
    extra = content - 0.7 * base
    is_edge = np.abs(extra - 76.5) <= 0.5 + 1e-9
    assert (is_edge | (np.abs(extra) <= 0.5 + 1e-9)).all()
    assert (is_edge == is_edge[..., :1]).all()  # the same edge map on all three channels
    edges = is_edge[..., 0]
    assert np.array_equal(edges, canny_edges(base.astype(np.uint8)))
    assert np.abs(content - (0.7 * base + 0.3 * 255.0 * edges[..., None])).max() <= 0.5 + 1e-9
    # edges where the photograph has them: thin lines on strong gradients, not noise
    frac = edges.mean()
    assert 0.02 < frac < 0.25, frac
    from scipy import ndimage

    luma = np.asarray(Image.fromarray(base.astype(np.uint8)).convert("L"), np.float64)
    grad = np.hypot(ndimage.sobel(luma, 0), ndimage.sobel(luma, 1))
    assert grad[edges].mean() > 3 * grad[~edges].mean()


def test_canny_finds_the_outline_of_a_square():
    pytest.importorskip("skimage")
    img = np.zeros((64, 64, 3), np.uint8)
    img[16:48, 16:48] = 255
    edges = canny_edges(img)
    ys, xs = np.nonzero(edges)
    # every edge pixel within 1.5 px of the square's outline (at 15.5..16.5 / 47.5..48.5)
    dist = np.minimum.reduce([np.abs(xs - 15.5), np.abs(xs - 47.5), np.abs(ys - 15.5), np.abs(ys - 47.5)])
    inside = (xs >= 15) & (xs <= 48) & (ys >= 15) & (ys <= 48)
    assert inside.all() and (dist <= 1.5).all()
    # and the outline is found: each side's middle is covered
    assert edges[30:34, 15:17].any(axis=1).all() and edges[15:17, 30:34].any(axis=0).all()
    blended = blend_edges(img, 0.3)
    assert blended[32, 32].tolist() == [178, 178, 178] and blended[0, 0].tolist() == [0, 0, 0]  # round(0.7*255), 0


# ----------------------------------------------------------------------------------------------
# spec, config, record


@pytest.mark.parametrize("kwargs", [dict(resize="crop"), dict(edge_blend=-0.1), dict(edge_blend=1.01), dict(pad_color=(0, 0)),
                                    dict(pad_color=(0, 0, 300)), dict(edge_low=0.5, edge_high=0.2), dict(edge_sigma=-1),
                                    dict(edge_blend=float("nan"))])
def test_bad_specs_fail_clearly(kwargs):
    with pytest.raises(ValueError):
        Preprocess(**kwargs)


def test_config_section_is_the_spec_and_is_validated():
    cfg = config_mod.load(None, ["data.preprocess.resize=letterbox", "data.preprocess.edge_blend=0.3",
                                 "data.preprocess.pad_color=[114,114,114]"])
    assert cfg.data.preprocess == Preprocess("letterbox", (114, 114, 114), 0.3)
    # resize "" = the family's default, resolved on load (and so recorded as the mode itself)
    assert config_mod.load(None).data.preprocess == Preprocess("stretch")  # PaliGemma: the old behaviour
    assert config_mod.load(None, ["model.family=qwen2_5_vl"]).data.preprocess == Preprocess("native")
    assert config_mod.load(None, ["model.family=qwen2_5_vl", "data.preprocess.resize=stretch"]).data.preprocess.resize == "stretch"
    with pytest.raises(ValueError, match="resizes stretch | letterbox"):  # SigLIP has one input size
        config_mod.load(None, ["data.preprocess.resize=native"])
    with pytest.raises(ValueError, match="preprocess.resize must be one of"):
        config_mod.load(None, ["data.preprocess.resize=crop"])
    with pytest.raises(ValueError, match="edge_blend"):
        config_mod.load(None, ["data.preprocess.edge_blend=2"])
    with pytest.raises(ValueError, match=r"resize is now data\.preprocess\.resize"):  # the old flat keys say where they went
        config_mod.load(None, ["data.resize=letterbox"])


def test_record_round_trip_and_policy(caplog):
    p = Preprocess("letterbox", (1, 2, 3), 0.3, 1.5, 0.05, 0.3)
    rec = json.loads(json.dumps(p.to_dict()))
    assert Preprocess.from_dict(rec) == p
    assert Preprocess.from_dict(None) == Preprocess("stretch")  # a checkpoint from before records: stretch
    assert Preprocess().mode == "stretch"  # unresolved (a component called without an experiment): stretch
    with pytest.raises(ValueError, match="unknown preprocess key"):
        Preprocess.from_dict({**rec, "clahe": True})
    # a record as checkpoints written before data.preprocess existed hold it (state.json "preprocess"):
    # the same keys, so it loads, and today's records are written the same way
    old = {"resize": "letterbox", "pad_color": [114, 114, 114], "edge_blend": 0.3, "edge_sigma": 1.0, "edge_low": 0.1, "edge_high": 0.2}
    assert Preprocess.from_dict(old) == Preprocess("letterbox", (114, 114, 114), 0.3)
    assert Preprocess.from_dict(old).to_dict() == {**old, "min_pixels": 0, "max_pixels": 0}  # + native's pixel bounds (0: the processor's)
    with caplog.at_level(logging.WARNING, logger="raytrain.data.preprocess"):
        assert resolve_recorded(rec, Preprocess(), "ckpt") == p  # the record wins ...
    assert "using the recorded preprocessing" in caplog.text and "resize" in caplog.text  # ... loudly
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="raytrain.data.preprocess"):
        assert resolve_recorded(rec, p, "ckpt") == p
        assert resolve_recorded(None, p, "ckpt") == p  # no record: the config
    assert not caplog.records


# ----------------------------------------------------------------------------------------------
# the pipeline stage and the eval parse-back


def _row(w=200, h=100, box=Box(40, 20, 120, 70, "cat"), point=Point(150.0, 80.0, "cat")):
    img = np.full((h, w, 3), 90, np.uint8)
    img[int(box.y1) : int(box.y2), int(box.x1) : int(box.x2)] = (250, 40, 40)
    return {"id": ["r0"], "image": [_png(img)], "width": [w], "height": [h], "objects": [objects_to_json([box, point])]}


@pytest.mark.parametrize("fam_name,hw", [("paligemma", (224, 224)), ("qwen2_5_vl", (112, 112))])
def test_letterboxed_stage_renders_targets_in_the_padded_frame(fam_name, hw):
    fam = family(fam_name)
    box, point = Box(40, 20, 120, 70, "cat"), Point(150.0, 80.0, "cat")
    prep = Preprocess(resize="letterbox", pad_color=(0, 0, 0))
    out = pipeline.decode_and_expand(_row(), split="val", tasks=["point", "detect"], image_hw=hw, family=fam_name,
                                     preprocess=prep.to_dict())
    g = geometry(prep, 200, 100, hw)
    assert out["image"].shape == (2, hw[0], hw[1], 3)
    assert out["content_box"].tolist() == [list(g.content_box)] * 2 and g.y0 > 0  # padded top and bottom
    assert (out["image"][:, : g.y0] == 0).all() and (out["image"][:, g.y1 :] == 0).all()
    det = list(out["task"]).index("detect")
    assert objects_from_json(out["targets"][det]) == [box]  # scoring targets stay in source pixels
    # the target text means the padded frame: parsed there it is the mapped box ...
    tol = hw[1] / 1023 if fam_name == "paligemma" else 0.5  # one <loc> bin / Qwen's integer pixels
    framed = fam.parse_output(str(out["suffix"][det]), "detect", hw[1], hw[0], hw).objects[0]
    want = g.to_model(box)
    assert np.allclose([framed.x1, framed.y1, framed.x2, framed.y2], [want.x1, want.y1, want.x2, want.y2], atol=tol)
    # ... which is not the box a stretch reading would give (the frame matters) ...
    naive = fam.parse_output(str(out["suffix"][det]), "detect", 200, 100, hw).objects[0]
    assert box_iou(naive, box) < 0.8
    # ... and eval's parse-back (content_box) returns the source box; the point too
    rows = predict.texts_to_rows(fam, out, [str(s) for s in out["suffix"]], hw)
    scores = {t: json.loads(s) for t, s in zip(rows["task"], rows["score"])}
    parsed = {t: objects_from_json(o)[0] for t, o in zip(rows["task"], rows["objects"])}
    src_tol = tol / g.to_model(Box(0, 0, 1, 1)).width + 1e-6
    assert box_iou(parsed["detect"], box) >= 0.97 and scores["detect"]["tp"] == 1
    assert abs(parsed["point"].x - point.x) <= src_tol and abs(parsed["point"].y - point.y) <= src_tol
    # the blind baseline goes through the same frame: a centred box comes back centred
    base = eval_batch.centre_baseline(out, mean_box_wh=(0.5, 0.5), family=fam_name)
    cb = objects_from_json(base["objects"][list(base["task"]).index("detect")])[0]
    assert abs((cb.x1 + cb.x2) / 2 - 100) <= 2 * src_tol and abs((cb.y1 + cb.y2) / 2 - 50) <= 2 * src_tol


def test_default_stage_is_unchanged_stretch():
    out = pipeline.decode_and_expand(_row(), split="val", tasks=["detect"], image_hw=(224, 224), family="paligemma")
    src = Image.open(io.BytesIO(_row()["image"][0])).convert("RGB")
    assert np.array_equal(out["image"][0], np.asarray(src.resize((224, 224), Image.BILINEAR)))
    assert out["content_box"].tolist() == [[0, 0, 224, 224]]
    old = pipeline.examples_for(objects_from_json(_row()["objects"][0]), ["detect"], 200, 100, "paligemma", (224, 224))
    assert out["suffix"][0] == old[0]["suffix"] == "<loc0205><loc0205><loc0716><loc0614> cat"


def test_serve_answer_maps_back_from_the_recorded_frame():
    from raytrain.serve.app import answer_body

    fam = family("paligemma")
    g = geometry(LETTERBOX, 200, 100, (224, 224))
    box = Box(40, 20, 120, 70, "cat")
    text = predict.Generation(fam.render_example("detect", "cat", *g.target_frame([box]), (224, 224))[1], [], [])
    got = answer_body(predict.read_answer(fam, None, "detect", "cat", text, g))["objects"][0]
    assert box_iou(Box(got["x1"], got["y1"], got["x2"], got["y2"]), box) >= 0.97
    # without the geometry the same text would be read as a stretched image: wrong place
    wrong = answer_body(predict.read_answer(fam, None, "detect", "cat", text, predict.identity_geometry(200, 100)))["objects"][0]
    assert box_iou(Box(wrong["x1"], wrong["y1"], wrong["x2"], wrong["y2"]), box) < 0.8


def test_geometry_rebuilds_from_the_stored_content_box():
    g = geometry(LETTERBOX, 640, 480, (96, 160))
    assert Geometry.from_content_box(640, 480, (96, 160), np.asarray(g.content_box, np.int32)) == g


def test_checkpoint_records_the_preprocessing(tiny_model_path, tmp_path):
    """checkpointing.save writes the recipe's state (with the record) -> recorded_preprocess reads
    it back; a checkpoint without the record reads as None (-> the config, or stretch in Serve)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from raytrain.models import paligemma
    from raytrain.training import checkpointing

    model, _ = paligemma.load(tiny_model_path)
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    p = Preprocess("letterbox", (114, 114, 114), 0.3)
    cfg = config_mod.load(None, ["data.preprocess.resize=letterbox", "data.preprocess.edge_blend=0.3",
                                 "data.preprocess.pad_color=[114,114,114]"])
    from raytrain.training.loop import checkpoint_state

    state = checkpoint_state(cfg, step=1, epoch=0, batch_in_epoch=1, metrics={})  # as the recipes write it
    d = checkpointing.save(tmp_path / "ckpt", model=model, optimizer=opt, scheduler=None, state=state)
    assert Preprocess.from_dict(checkpointing.recorded_preprocess(str(d))) == p
    assert resolve_recorded(checkpointing.recorded_preprocess(str(d)), Preprocess(), str(d)) == p
    (d / "state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "preprocess"}))
    assert checkpointing.recorded_preprocess(str(d)) is None
    assert checkpointing.recorded_preprocess(str(tmp_path / "nowhere")) is None
