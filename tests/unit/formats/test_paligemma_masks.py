"""PaliGemma segmentation: the mask VQ-VAE against a numpy re-implementation of big_vision's
computation, the codec's contract with random weights, render -> parse of <loc>x4 <seg>x16 label,
and a parser that never raises.

No real weights here (vae-oid.npz is not downloaded): every codec is random or built from a
synthetic npz in big_vision's key layout, so these tests check wiring, layouts and contracts,
not mask quality.
"""

import json
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raytrain.formats import paligemma_masks as pm
from raytrain.formats.annotations import Box, Mask, objects_to_json
from raytrain.formats.paligemma import decode_bin, encode_bin, loc_token, seg_token

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fast(n: int) -> settings:
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def codec():
    return pm.MaskCodec.random(0)


# ---------------------------------------------------------------------------- big_vision in numpy
# Shapes of vae-oid.npz, written out from the reference model (AiT's VQVAE with hidden_dim 16,
# downsample 16, 2 res blocks, 128 x 512 codebook), NOT read from the module under test.


def _res(prefix, c=128):
    return {f"{prefix}.net.0.weight": (c, c, 3, 3), f"{prefix}.net.0.bias": (c,), f"{prefix}.net.2.weight": (c, c, 3, 3),
            f"{prefix}.net.2.bias": (c,), f"{prefix}.net.4.weight": (c, c, 1, 1), f"{prefix}.net.4.bias": (c,)}


CKPT_SHAPES = {
    "encoder.0.weight": (16, 1, 4, 4), "encoder.0.bias": (16,),
    "encoder.2.weight": (32, 16, 4, 4), "encoder.2.bias": (32,),
    "encoder.4.weight": (64, 32, 4, 4), "encoder.4.bias": (64,),
    "encoder.6.weight": (128, 64, 4, 4), "encoder.6.bias": (128,),
    **_res("encoder.8"), **_res("encoder.9"),
    "encoder.10.weight": (512, 128, 1, 1), "encoder.10.bias": (512,),
    "_vq_vae._embedding": (128, 512),
    "decoder.0.weight": (128, 512, 1, 1), "decoder.0.bias": (128,),
    **_res("decoder.2"), **_res("decoder.3"),
    # ConvTranspose2d weights are (in, out, kh, kw)
    "decoder.4.weight": (128, 128, 4, 4), "decoder.4.bias": (128,),
    "decoder.6.weight": (128, 64, 4, 4), "decoder.6.bias": (64,),
    "decoder.8.weight": (64, 32, 4, 4), "decoder.8.bias": (32,),
    "decoder.10.weight": (32, 16, 4, 4), "decoder.10.bias": (16,),
    "decoder.12.weight": (1, 16, 1, 1), "decoder.12.bias": (1,),
}


def _np_conv(x, k_hwio, b, stride, pads):
    """Plain cross-correlation, NHWC input, HWIO kernel, explicit ((top, bottom), (left, right))."""
    x = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    kh, kw = k_hwio.shape[:2]
    oh, ow = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], oh, ow, k_hwio.shape[3]))
    for a in range(kh):
        for c in range(kw):
            out += x[:, a : a + stride * (oh - 1) + 1 : stride, c : c + stride * (ow - 1) + 1 : stride, :] @ k_hwio[a, c]
    return out + b


def _tf_same(n, k, s):
    """TF's 'SAME' padding along one axis: (before, after)."""
    total = max((-(-n // s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def _transp(w):  # big_vision's PyTorch -> TF/Flax kernel transpose
    return np.transpose(w, (2, 3, 1, 0))


def _bv_conv_tf(ck, x, name, stride):
    """big_vision pp/.../segmentation.py `_conv_tf`: tf.nn.conv2d(x, transp(w), stride, 'SAME') + b."""
    k = _transp(ck[name + ".weight"])
    pads = (_tf_same(x.shape[1], k.shape[0], stride), _tf_same(x.shape[2], k.shape[1], stride))
    return _np_conv(x, k, ck[name + ".bias"], stride, pads)


def _relu(x):
    return np.maximum(x, 0)


def bv_encode(ck, masks):
    """big_vision `encode_to_codebook_indices`, in numpy float64: (codes (N, 16), latents (N, 4, 4, 512))."""
    x = 2.0 * (np.asarray(masks, np.float64)[..., None] - 0.5)
    for n in range(4):
        x = _relu(_bv_conv_tf(ck, x, f"encoder.{2 * n}", 2))
    for n in range(2):
        name, r = f"encoder.{8 + n}.net", x
        x = _relu(_bv_conv_tf(ck, x, name + ".0", 1))
        x = _relu(_bv_conv_tf(ck, x, name + ".2", 1))
        x = _bv_conv_tf(ck, x, name + ".4", 1) + r
    z = _bv_conv_tf(ck, x, "encoder.10", 1)
    emb = ck["_vq_vae._embedding"].astype(np.float64)
    flat = z.reshape(-1, emb.shape[1])
    d = (flat**2).sum(1, keepdims=True) + (emb**2).sum(1) - 2 * flat @ emb.T
    return d.argmin(1).reshape(-1, 16), z


def _flax_conv(ck, x, name, pad):
    """flax nn.Conv(padding=pad) with big_vision's `_get_params` kernel (transp of the PyTorch one)."""
    return _np_conv(x, _transp(ck[name + ".weight"]), ck[name + ".bias"], 1, ((pad, pad), (pad, pad)))


def _flax_conv_transpose(ck, x, name):
    """flax nn.ConvTranspose(kernel 4, strides 2, padding=2, transpose_kernel=True) with kernel
    transp(w): lax.conv_transpose flips the spatial axes and swaps I/O, then convolves the
    input dilated by the stride with padding (2, 2)."""
    k = np.flip(_transp(ck[name + ".weight"]), (0, 1)).swapaxes(2, 3)
    n, h, w, c = x.shape
    dil = np.zeros((n, 2 * h - 1, 2 * w - 1, c))
    dil[:, ::2, ::2] = x
    return _np_conv(dil, k, ck[name + ".bias"], 1, ((2, 2), (2, 2)))


def bv_decode(ck, codes):
    """big_vision `reconstruct_masks` (the evaluator's Flax Decoder), in numpy: (N, 64, 64)."""
    codes = np.asarray(codes)
    x = ck["_vq_vae._embedding"].astype(np.float64)[codes.reshape(-1)].reshape(len(codes), 4, 4, -1)
    x = _relu(_flax_conv(ck, x, "decoder.0", 0))
    for blk in ("decoder.2.net", "decoder.3.net"):
        r = x
        x = _relu(_flax_conv(ck, x, blk + ".0", 1))
        x = _relu(_flax_conv(ck, x, blk + ".2", 1))
        x = _flax_conv(ck, x, blk + ".4", 0) + r
    for name in ("decoder.4", "decoder.6", "decoder.8", "decoder.10"):
        x = _relu(_flax_conv_transpose(ck, x, name))
    return _flax_conv(ck, x, "decoder.12", 0)[..., 0]


def _blobs(n, seed):
    """n smooth-ish random masks (N, 64, 64) in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64] + 0.5
    out = []
    for _ in range(n):
        cy, cx, ry, rx = rng.uniform(10, 54), rng.uniform(10, 54), rng.uniform(4, 30), rng.uniform(4, 30)
        out.append((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.float64))
    return np.stack(out)


@pytest.fixture(scope="module")
def synthetic_ckpt(tmp_path_factory):
    """(path, arrays): random float32 weights in vae-oid.npz's key layout (PyTorch layouts). The
    codebook is made of reference-encoder latents of random blobs, so codes are not all alike."""
    rng = np.random.default_rng(1)
    ck = {}
    for k, shape in CKPT_SHAPES.items():
        if k.endswith(".weight"):
            fan_in = int(np.prod(shape[1:])) if not k.startswith(("decoder.4", "decoder.6", "decoder.8", "decoder.10")) else shape[0] * 16
            ck[k] = rng.normal(0, 1 / np.sqrt(fan_in), shape).astype(np.float32)
        elif k.endswith(".bias"):
            ck[k] = rng.normal(0, 0.05, shape).astype(np.float32)
    _, z = bv_encode({**ck, "_vq_vae._embedding": np.zeros((128, 512), np.float32)}, _blobs(8, 2))
    z = z.reshape(-1, 512)
    ck["_vq_vae._embedding"] = (z + rng.normal(0, 0.05 * z.std(), z.shape)).astype(np.float32)
    path = tmp_path_factory.mktemp("codec") / "vae-oid.npz"
    np.savez(path, **ck, **{"_vq_vae._ema_cluster_size": np.ones(128, np.float32)})  # an extra key is ignored
    return path, ck


# ---------------------------------------------------------------------------- the checkpoint


def test_module_keys_and_shapes_are_the_checkpoints():
    sd = pm.MaskCodec().state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == CKPT_SHAPES


def test_checkpoint_computes_what_big_vision_computes(synthetic_ckpt):
    path, ck = synthetic_ckpt
    codec = pm.MaskCodec.from_checkpoint(path)
    assert codec.source == str(path)
    masks = _blobs(4, 3)
    # one conv: torch Conv2d(4x4, stride 2, padding 1) == TF SAME conv on the transposed kernel
    x = torch.tensor(2 * (masks[:, None] - 0.5), dtype=torch.float32)
    first = codec.encoder[0](x).permute(0, 2, 3, 1).detach().numpy()
    ref_first = _bv_conv_tf(ck, 2 * (masks[..., None] - 0.5), "encoder.0", 2)
    np.testing.assert_allclose(first, ref_first, rtol=1e-4, atol=1e-5)
    # the whole encoder: latents and codes
    ref_codes, ref_z = bv_encode(ck, masks)
    z = codec.encoder(x).permute(0, 2, 3, 1).detach().numpy()
    np.testing.assert_allclose(z, ref_z, rtol=1e-4, atol=1e-4 * np.abs(ref_z).max())
    codes = codec.encode(masks).numpy()
    np.testing.assert_array_equal(codes, ref_codes)
    assert len(np.unique(codes)) > 4
    # the decoder, Flax ConvTranspose(transpose_kernel=True) semantics included
    some = np.random.default_rng(4).integers(0, 128, (3, 16))
    ref = bv_decode(ck, some)
    np.testing.assert_allclose(codec.decode_logits(some).numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_checkpoint_rejects_missing_keys_and_tf_layout(tmp_path, synthetic_ckpt):
    _, ck = synthetic_ckpt
    partial = {k: v for k, v in ck.items() if k != "decoder.12.bias"}
    np.savez(tmp_path / "a.npz", **partial)
    with pytest.raises(ValueError, match="missing"):
        pm.MaskCodec.from_checkpoint(tmp_path / "a.npz")
    tf_layout = dict(ck, **{"encoder.8.net.0.weight": _transp(ck["encoder.8.net.0.weight"])})  # HWIO
    np.savez(tmp_path / "b.npz", **tf_layout)
    with pytest.raises(ValueError, match="encoder.8.net.0.weight"):
        pm.MaskCodec.from_checkpoint(tmp_path / "b.npz")
    np.save(tmp_path / "c.npy", ck["encoder.0.weight"])
    with pytest.raises(ValueError, match="not an .npz"):
        pm.MaskCodec.from_checkpoint(tmp_path / "c.npy")


def test_load_codec_from_argument_or_env(monkeypatch, tmp_path, synthetic_ckpt):
    path, _ = synthetic_ckpt
    monkeypatch.delenv(pm.ENV_VAR, raising=False)
    with pytest.raises(ValueError, match=re.escape(pm.MISSING_CODEC_MESSAGE)):
        pm.load_codec()
    with pytest.raises(pm.MaskCodecMissing, match="no file"):
        pm.load_codec(tmp_path / "nope.npz")
    assert pm.load_codec(path) is pm.load_codec(str(path))  # loaded once per process
    monkeypatch.setenv(pm.ENV_VAR, str(path))
    assert pm.load_codec() is pm.load_codec(path)


# ---------------------------------------------------------------------------- contract (random weights)


def test_encode_decode_contract(codec):
    masks = _blobs(6, 5)
    codes = codec.encode(masks)
    assert codes.shape == (6, 16) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) <= 127
    assert torch.equal(codes, codec.encode(torch.tensor(masks, dtype=torch.float32)))  # deterministic
    assert torch.equal(codes, pm.MaskCodec.random(0).encode(masks))  # same seed, same codec
    assert len({tuple(c) for c in codes.tolist()}) > 1  # not a constant map
    dec = codec.decode(codes)
    assert dec.shape == (6, 64, 64) and dec.dtype == torch.float32
    assert float(dec.min()) >= 0.0 and float(dec.max()) <= 1.0
    assert codec.decode_logits(codes).shape == (6, 64, 64)
    for bad in (np.zeros((2, 64, 63)), np.zeros((64, 64)), np.full((1, 64, 64), np.nan)):
        with pytest.raises(ValueError):
            codec.encode(bad)
    for bad in (np.zeros((1, 15), int), np.full((1, 16), 128), np.full((1, 16), -1), np.zeros((1, 16)) + 0.5):
        with pytest.raises(ValueError):
            codec.decode(bad)


def _tf_resize_aa(img, out_h, out_w):
    """tf.image.resize(bilinear, antialias=True) in numpy: triangle filter scaled by the
    downscale factor, half-pixel centres, weights renormalised where they leave the image."""

    def weights(n_in, n_out):
        inv = n_in / n_out
        ks = max(inv, 1.0)
        centres = (np.arange(n_out) + 0.5) * inv
        w = np.maximum(0.0, 1 - np.abs((np.arange(n_in)[None] + 0.5 - centres[:, None]) / ks))
        return w / w.sum(1, keepdims=True)

    return weights(img.shape[0], out_h) @ img @ weights(img.shape[1], out_w).T


@pytest.mark.parametrize("hw", [(200, 90), (10, 30), (64, 64), (1, 500), (3, 3)])
def test_encoder_resize_is_tf_antialiased_bilinear(hw):
    crop = (np.random.default_rng(hw[0]).random(hw) > 0.5).astype(np.float32)
    np.testing.assert_allclose(pm._resize_to_64(crop), _tf_resize_aa(crop.astype(np.float64), 64, 64), atol=2e-5)


def test_mask_to_tokens_crops_the_box(codec):
    yy, xx = np.mgrid[:120, :200] + 0.5
    arr = ((yy - 60) / 30) ** 2 + ((xx - 110) / 60) ** 2 <= 1  # box 30..90 x 50..170
    m = Mask.from_array(arr, "blob")
    box = m.box
    toks = pm.mask_to_tokens(m, box, codec)
    assert re.fullmatch(r"(<seg\d{3}>){16}", toks)
    y1, x1, y2, x2 = int(box.y1), int(box.x1), int(box.y2), int(box.x2)
    ref = _tf_resize_aa(arr[y1:y2, x1:x2].astype(np.float64), 64, 64)
    assert toks == "".join(seg_token(c) for c in codec.encode(ref[None]).tolist()[0])
    with pytest.raises(ValueError, match="no pixel"):
        pm.mask_to_tokens(m, Box(10.2, 10, 10.4, 50), codec)


def test_tokens_to_mask_pastes_into_the_box(codec):
    codes = codec.encode(_blobs(1, 8))[0].tolist()
    # a 64x64 box at integer pixels: the paste is the decoded mask thresholded at 0.5
    m = pm.tokens_to_mask(Box(10, 20, 74, 84, "blob"), codes, 100, 90, codec)
    assert isinstance(m, pm.PredictedMask) and m.size == (90, 100) and m.label == "blob"
    arr = m.to_array()
    np.testing.assert_array_equal(arr[20:84, 10:74], codec.decode([codes])[0].numpy() > 0.5)
    assert not arr[:20].any() and not arr[84:].any() and not arr[:, :10].any() and not arr[:, 74:].any()
    assert m.box == Box(10, 20, 74, 84, "blob")  # the box written by the model, not the pixels' box
    # a box that truncates to no pixel: empty mask, big_vision's invalid prediction
    empty = pm.tokens_to_mask(Box(5.2, 5.0, 5.9, 40.0, "blob"), codes, 100, 90, codec)
    assert empty.area == 0 and empty.box.x1 == 5.2
    # serialises as a plain mask
    assert json.loads(objects_to_json([m]))[0]["type"] == "mask_rle"


# ---------------------------------------------------------------------------- render -> parse


SIZES = [(64, 64), (224, 224), (640, 480), (33, 700), (1000, 17), (1600, 1200)]


@st.composite
def shape_masks(draw):
    w, h = draw(st.sampled_from(SIZES))
    x1 = draw(st.integers(0, w - 1))
    x2 = draw(st.integers(x1 + 1, min(w, x1 + 600)))
    y1 = draw(st.integers(0, h - 1))
    y2 = draw(st.integers(y1 + 1, min(h, y1 + 600)))
    arr = np.zeros((h, w), bool)
    if draw(st.booleans()):
        arr[y1:y2, x1:x2] = True
    else:  # ellipse inscribed in the rectangle (at least its centre pixel)
        yy, xx = np.mgrid[y1:y2, x1:x2] + 0.5
        cy, cx, ry, rx = (y1 + y2) / 2, (x1 + x2) / 2, (y2 - y1) / 2, (x2 - x1) / 2
        arr[y1:y2, x1:x2] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        arr[int(cy), int(cx)] = True
    return w, h, Mask.from_array(arr, draw(st.sampled_from(["blob", "red circle", "a-b_c 2"])))


_OBJ = re.compile(r"((?:<loc\d{4}>){4})((?:<seg\d{3}>){16}) ([^;<]+)")


@fast(30)
@given(shape_masks())
def test_masks_through_the_codec_keep_their_box_exactly(codec, wh_mask):
    w, h, m = wh_mask
    text = pm.render_segments([m], w, h, codec)
    locs, _segs, label = _OBJ.fullmatch(text).groups()
    bins = [int(b) for b in re.findall(r"\d{4}", locs)]
    b = m.box
    assert bins == [encode_bin(b.y1 / h), encode_bin(b.x1 / w), encode_bin(b.y2 / h), encode_bin(b.x2 / w)]
    assert label == m.label
    res = pm.parse_segments(text, w, h, codec)
    assert res.errors == [] and len(res.objects) == 1
    o = res.objects[0]
    assert isinstance(o, pm.PredictedMask) and o.size == (h, w) and o.label == m.label
    # the box comes from the locs, not from the decoded pixels
    assert [encode_bin(o.box.y1 / h), encode_bin(o.box.x1 / w), encode_bin(o.box.y2 / h), encode_bin(o.box.x2 / w)] == bins
    ys, xs = np.nonzero(o.to_array())
    if len(ys):  # decoded pixels stay inside the (truncated) loc box
        assert ys.min() >= int(o.box.y1) and ys.max() < int(o.box.y2)
        assert xs.min() >= int(o.box.x1) and xs.max() < int(o.box.x2)
    # supervision's divisor reads every coordinate at most one bin towards the origin
    o24 = pm.parse_segments(text, w, h, _FastCodec(), divisor=1024).objects[0]
    assert 0 <= o.box.x2 - o24.box.x2 <= w / 1024 + 1e-9 and 0 <= o.box.y2 - o24.box.y2 <= h / 1024 + 1e-9


def test_render_several_objects_in_order(codec):
    a = np.zeros((50, 80), bool)
    a[5:20, 10:30] = True
    b = np.zeros((50, 80), bool)
    b[25:50, 40:80] = True
    text = pm.render_segments([Mask.from_array(a, "cat"), Mask.from_array(b, "cat")], 80, 50, codec)
    parts = text.split(" ; ")
    assert len(parts) == 2 and all(_OBJ.fullmatch(p) for p in parts)
    assert parts[0].startswith(loc_token(encode_bin(5 / 50)) + loc_token(encode_bin(10 / 80)))
    res = pm.parse_segments(text, 80, 50, codec, allowed_labels={"cat"})
    assert [o.box.y1 for o in res.objects] == [decode_bin(encode_bin(5 / 50)) * 50, decode_bin(encode_bin(25 / 50)) * 50]


def test_render_refuses_bad_targets(codec):
    m = Mask.from_array(np.ones((10, 10), bool), "x")
    with pytest.raises(ValueError, match="size"):
        pm.render_segments([m], 11, 10, codec)
    with pytest.raises(ValueError, match="empty"):
        pm.render_segments([Mask.from_array(np.zeros((10, 10), bool), "x")], 10, 10, codec)
    with pytest.raises(ValueError, match="label"):
        pm.render_segments([Mask.from_array(np.ones((10, 10), bool), "a;b")], 10, 10, codec)
    with pytest.raises(TypeError):
        pm.render_segments([Box(0, 0, 5, 5, "x")], 10, 10, codec)


def test_training_targets_refuse_without_weights(monkeypatch):
    from raytrain.models import paligemma as family

    monkeypatch.delenv(pm.ENV_VAR, raising=False)
    m = Mask.from_array(np.ones((10, 10), bool), "x")
    with pytest.raises(ValueError, match=re.escape(pm.MISSING_CODEC_MESSAGE)):
        family.render_example("segment", "x", [m], 10, 10)


def test_family_pipeline_and_eval_wiring(monkeypatch, synthetic_ckpt):
    from raytrain.data.pipeline import examples_for
    from raytrain import predict
    from raytrain.formats import paligemma as fmt
    from raytrain.models import paligemma as family

    monkeypatch.setenv(pm.ENV_VAR, str(synthetic_ckpt[0]))
    arr = np.zeros((60, 90), bool)
    arr[10:40, 20:70] = True
    gt = Mask.from_array(arr, "blob")
    from raytrain import tasks

    assert tasks.kind("segment") == "mask"
    prefix, suffix = family.render_example("segment", "blob", [gt], 90, 60)
    assert prefix == "segment blob" and _OBJ.fullmatch(suffix)
    # point / detect unchanged
    box = Box(20, 10, 70, 40, "blob")
    assert family.render_example("detect", "blob", [box], 90, 60) == ("detect blob", fmt.render_objects([box], 90, 60))
    exs = examples_for([gt, box], ["segment", "detect"], 90, 60, "paligemma")
    assert [(e["task"], e["suffix"]) for e in exs] == [("segment", suffix), ("detect", fmt.render_objects([box], 90, 60))]

    res = family.parse_output(suffix + "<eos>", "segment", 90, 60)
    assert len(res.objects) == 1 and not res.errors
    targets = objects_to_json([gt])
    s = predict.score_example("segment", res.objects, targets, 90, 60)
    assert s["valid"] == 1 and 0 <= s["mask_iou"] <= 1 and s["box_iou"] > 0.95 and s["box_hit_75"] == 1
    perfect = pm.PredictedMask(gt.size, gt.counts, "blob", loc_box=gt.box)
    assert predict.score_example("segment", [perfect], targets, 90, 60)["mask_iou"] == 1.0
    miss = predict.score_example("segment", None, targets, 90, 60)
    assert miss["valid"] == 0 and miss["mask_iou"] == 0.0
    rows = [{"task": "segment", "score": json.dumps(x), "errors": "[]"} for x in (predict.score_example("segment", [perfect], targets, 90, 60), miss)]
    from raytrain.eval import batch

    agg = batch.aggregate(rows)["segmentation"]
    assert agg["miou"] == 0.5 and agg["n"] == 2 and agg["invalid"] == 1 and agg["box_acc_50"] == 0.5


# ---------------------------------------------------------------------------- the parser


def _obj(bins=(100, 200, 300, 400), codes=tuple(range(16)), label=" blob"):
    return "".join(loc_token(b) for b in bins) + "".join(f"<seg{c:03d}>" for c in codes) + label


@pytest.mark.parametrize(
    "text, n_objects, reasons",
    [
        (_obj(), 1, []),
        (_obj() + " ; " + _obj((0, 0, 1023, 1023)) + "<eos>", 2, []),
        (_obj(codes=range(15)), 0, ["wrong_token_count"]),
        (_obj(codes=range(17)), 0, ["wrong_token_count"]),
        (_obj().replace("<seg005>", "<seg128>"), 0, ["wrong_token_count"]),
        (_obj().replace("<seg005>", "<seg05>"), 0, ["wrong_token_count"]),
        (_obj(bins=(1, 2, 3)), 0, ["wrong_token_count"]),
        (_obj(codes=()), 0, ["missing_mask"]),
        (_obj(codes=(), label="") + "<eos>", 0, ["missing_mask"]),
        (_obj(label="") + "<eos>", 0, ["missing_label"]),
        (_obj(label=""), 0, ["truncated_object"]),
        (_obj(codes=range(10), label="") + "<seg0", 0, ["truncated_object"]),
        (_obj(bins=(1, 2), codes=(), label="") + "<lo", 0, ["truncated_object"]),
        (_obj() + " ; " + "<loc0001><se", 1, ["truncated_object"]),
        (_obj(label=" dog"), 0, ["unknown_label"]),
        (_obj(bins=(300, 200, 100, 400)), 0, ["invalid_box"]),
        ("", 0, ["empty_output"]),
        (" ; <pad><eos>", 0, ["empty_output"]),
        ("hello " + _obj(), 1, ["garbage"]),
        (_obj() + " ; " + _obj(codes=range(3)), 1, ["wrong_token_count"]),
        ("<seg001>" * 16 + " blob", 0, ["garbage"]),
    ],
)
def test_parse_reasons(codec, text, n_objects, reasons):
    res = pm.parse_segments(text, 120, 80, codec, allowed_labels={"blob"})
    assert len(res.objects) == n_objects, res
    assert [e.reason for e in res.errors] == reasons


def test_zero_size_box_is_an_empty_mask(codec):
    res = pm.parse_segments(_obj(bins=(100, 200, 100, 400)), 120, 80, codec)
    assert len(res.objects) == 1 and res.objects[0].area == 0 and not res.errors


class _FastCodec:
    """Stands in for the codec where the PARSER is under test: decode_logits (all the parser
    calls) returns a cheap pattern per code instead of running the network."""

    def decode_logits(self, codes):
        c = torch.as_tensor(np.asarray(codes), dtype=torch.float32)
        return (c.sum(1) % 2 * 2 - 1)[:, None, None].expand(-1, 64, 64).clone()


_TOKENS = [
    _obj(), _obj(label=" cat"), "<loc0000>", "<loc1023>", "<loc0512>", "<loc99999>", "<loc12>", "<loc0001>",
    "<seg000>", "<seg127>", "<seg128>", "<seg12>", "<seg0001>", "<seg064>", "<seg\u0661\u0662\u0663>",
    " ", " ; ", ";", "blob", "cat", "<eos>", "</s>", "<pad>", "<bos>", "<", "<l", "<lo", "<loc", "<s", "<se", "<seg",
    "<seg1", "\n", "é", "<image>", ">",
]


@fast(800)
@given(st.lists(st.one_of(st.sampled_from(_TOKENS), st.text(max_size=5)), max_size=30), st.sampled_from([(1, 1), (120, 80), (33, 700)]))
def test_parser_never_raises_and_explains_rejections(parts, wh):
    text = "".join(parts)
    w, h = wh
    res = pm.parse_segments(text, w, h, _FastCodec())
    assert {e.reason for e in res.errors} <= set(pm.SEG_PARSE_REASONS)
    for o in res.objects:
        assert isinstance(o, pm.PredictedMask) and o.size == (h, w) and o.label
    if text.strip() and not res.objects:
        assert res.errors  # nothing is dropped without a reason
    # every loc run that is not an object is a rejection
    runs = len(pm._RUN.findall(re.split(r"<eos>|</s>", re.sub(r"<pad>|<bos>", "", text))[0]))
    assert len(res.objects) + sum(e.reason not in ("garbage", "empty_output") for e in res.errors) >= runs


def test_parser_mutations_of_valid_output():
    """3,000 deletions / duplications / swaps of tokens and characters in a valid two-object answer."""
    rng = np.random.default_rng(0)
    good = _obj() + " ; " + _obj((10, 20, 900, 1000), codes=[127] * 16, label=" cat") + "<eos>"
    toks = re.findall(r"<[^>]*>|[^<]+", good)
    for _ in range(3000):
        t = list(toks)
        for _ in range(rng.integers(1, 4)):
            i = int(rng.integers(len(t)))
            op = rng.integers(4)
            if op == 0:
                del t[i]
            elif op == 1:
                t.insert(i, t[int(rng.integers(len(t)))])
            elif op == 2:
                t[i] = t[i][: int(rng.integers(len(t[i]) + 1))]
            else:
                j = int(rng.integers(len(t)))
                t[i], t[j] = t[j], t[i]
            if not t:
                break
        res = pm.parse_segments("".join(t), 120, 80, _FastCodec())
        assert {e.reason for e in res.errors} <= set(pm.SEG_PARSE_REASONS)
        assert len(res.objects) <= 2
