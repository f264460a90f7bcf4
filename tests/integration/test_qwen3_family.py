"""The Qwen3-VL family on its offline tiny preset: built and saved with `save_pretrained`, loaded back
through `from_pretrained` (the path Qwen/Qwen3-VL-* take); its chat layout; where a relative answer
lands in the pixels the model sees; LoRA targets; constrained decoding whose output always parses,
with confidences; packed rows that train exactly as the same examples unpacked (M-RoPE positions
the model's own); and the real recipe driving the loss down."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from raytrain import config as config_mod
from raytrain import predict
from raytrain.data import packing, pipeline, synthetic
from raytrain.formats import qwen as qwen_fmt
from raytrain.formats import qwen3_vl as codec
from raytrain.formats.annotations import Box, Point, objects_to_json
from raytrain.formats.grammar import query_labels
from raytrain.launch import smoke as smoke_mod
from raytrain.models import ensure_preset, family, qwen_batch, qwen_encode
from raytrain.models import qwen2_5_vl as qw
from raytrain.models import qwen3_vl as q3
from raytrain.training import loop
from raytrain.training.session import collate

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

FAM = family("qwen3_vl")
PATCH = 16


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    return str(ensure_preset("tiny:qwen3_vl", tmp_path_factory.mktemp("qwen3-presets")))


@pytest.fixture(scope="module")
def native_preset(tmp_path_factory):
    """The native-resolution variant (64*64 .. 256*256 pixels): images of other sizes and aspect
    ratios get other grids and image-token counts."""
    return str(ensure_preset("tiny:qwen3_vl", tmp_path_factory.mktemp("qwen3-native"), image_size=256))


@pytest.fixture(scope="module")
def loaded(preset):
    return FAM.load(preset)


def _unpatchify(pv: np.ndarray, grid, merge=2) -> np.ndarray:
    """(patches, C*T*P*P) of ONE image -> (C, H, W): the image the vision tower sees."""
    _, gh, gw = (int(v) for v in grid)
    x = pv.reshape(gh // merge, gw // merge, merge, merge, 3, 2, PATCH, PATCH)[:, :, :, :, :, 0]
    return x.transpose(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * PATCH, gw * PATCH)


# ---------------------------------------------------------------------------- preset, loading, chat


def test_preset_round_trips_through_save_and_from_pretrained(preset, loaded, tmp_path):
    from transformers import Qwen3VLForConditionalGeneration

    model, proc = loaded
    assert isinstance(model, Qwen3VLForConditionalGeneration) and type(proc).__name__ == "Qwen3VLImageOnlyProcessor"
    assert json.loads((Path(preset) / "processor_config.json").read_text())["processor_class"] == "Qwen3VLImageOnlyProcessor"
    meta = json.loads((Path(preset) / "raytrain_preset.json").read_text())
    assert meta["preset"] == "tiny:qwen3_vl" and meta["resize"] == json.loads((Path(preset) / "raytrain_resize.json").read_text())
    assert 3e5 < sum(p.numel() for p in model.parameters()) < 1.2e6
    v, t = model.config.vision_config, model.config.text_config
    assert (v.patch_size, v.spatial_merge_size, list(v.deepstack_visual_indexes), v.out_hidden_size) == (16, 2, [0], t.hidden_size)
    assert t.rope_parameters["rope_theta"] == 10.0 and t.rope_parameters["mrope_section"] == [6, 5, 5]  # module doc of tiny_qwen3
    assert q3.resize_settings(proc) == {"factor": 32, "min_pixels": 16384, "max_pixels": 16384, "patch_size": 16, "merge_size": 2,
                                        "temporal_patch_size": 2}
    assert list(proc.image_processor.image_mean) == [0.5] * 3 and FAM.image_size(proc) == (128, 128)
    # the checkpoint layout is the released one (what vLLM's loader maps from)
    from safetensors import safe_open

    with safe_open(str(Path(preset) / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert all(n.startswith(("model.language_model.", "model.visual.")) for n in names) and "lm_head.weight" not in names  # tied

    # a fine-tuned checkpoint: save_pretrained + the family's inference files, loaded back the same way
    with torch.no_grad():
        model.model.language_model.layers[0].mlp.up_proj.weight.add_(0.01)
    out = tmp_path / "ckpt"
    model.save_pretrained(out)
    FAM.save_inference_files(proc, out)
    again, proc2 = FAM.load(str(out))
    img = Image.new("RGB", (128, 128), (90, 120, 150))
    enc = FAM.encode_prompts(proc, [img], ["Describe this image."])
    with torch.no_grad():
        a, b = model(**enc).logits, again(**FAM.encode_prompts(proc2, [img], ["Describe this image."])).logits
    assert torch.equal(a, b)
    assert type(proc2) is type(proc) and proc2.tokenizer.get_vocab() == proc.tokenizer.get_vocab()
    FAM.check_inference_files(proc2, out)
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    rec = json.loads((bad / "raytrain_resize.json").read_text())
    (bad / "raytrain_resize.json").write_text(json.dumps({**rec, "max_pixels": 256 * 256}))
    with pytest.raises(ValueError, match="max_pixels"):
        FAM.load_processor(str(bad))


def test_chat_layout_and_teacher_forced_rows(loaded):
    _, proc = loaded
    tok = proc.tokenizer
    img = Image.new("RGB", (128, 128))
    prompt, answer = FAM.render_example("detect", "red circle", [Box(10, 20, 60, 50, "red circle")], 64, 64)
    enc = FAM.encode_train(proc, [img], [prompt], [answer], max_len=128, numbers=[FAM.answer_numbers("detect", "red circle",
                                                                                                     [Box(10, 20, 60, 50, "red circle")], 64, 64)])
    n = int(enc["length"][0])
    text = tok.decode(enc["input_ids"][0, :n])
    # Qwen3-VL's template: no default system turn, the image before the prompt, no <think> block
    assert text == ("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 16 + "<|vision_end|>" + prompt + "<|im_end|>\n"
                    "<|im_start|>assistant\n" + answer + "<|im_end|>")
    lab = enc["labels"][0][enc["labels"][0] != -100]
    assert tok.decode(lab) == answer + "<|im_end|>"
    digits = [tok.decode([int(t)]) for t, w in zip(enc["input_ids"][0], enc["num_place"][0]) if w != 0]
    coords = json.loads(answer.split("```json")[1].split("```")[0])[0]["bbox_2d"]
    assert "".join(digits) == "".join(str(v) for v in coords)  # the number loss weighs every coordinate digit, nothing else
    # rows are what the chat template renders for the whole conversation (minus the final newline)
    full = proc.apply_chat_template(qwen_fmt.chat_messages(prompt, answer), tokenize=False)
    assert full == qwen_encode._chat_prompt(proc, prompt) + answer + "<|im_end|>\n"
    bound = FAM.with_text(system_prompt="You locate shapes.")
    sys_text = tok.decode(bound.encode_prompts(proc, [img], [prompt])["input_ids"][0])
    assert sys_text.startswith("<|im_start|>system\nYou locate shapes.<|im_end|>\n<|im_start|>user\n")


def test_relative_answer_points_at_the_pixels_the_model_sees(loaded):
    """A white box on a 200x120 source, stretched to the 128x128 input: the answer's 0-1000
    coordinates x the input's side land on the box in the un-patchified pixel_values."""
    _, proc = loaded
    w, h = 200, 120
    box = Box(50, 30, 150, 90, "white square")
    src = Image.new("RGB", (w, h), (0, 0, 0))
    ImageDraw.Draw(src).rectangle([box.x1, box.y1, box.x2 - 1, box.y2 - 1], fill=(255, 255, 255))
    hw = FAM.input_size(FAM.input_frame(proc, "stretch"), w, h)
    prompt, answer = FAM.render_example("detect", box.label, [box], w, h, hw)
    enc = FAM.encode_train(proc, [src.resize((hw[1], hw[0]), Image.BILINEAR)], [prompt], [answer], max_len=128)
    grid = enc["image_grid_thw"][0]
    model_pixels = FAM.prepare_inputs({k: enc[k] for k in ("pixel_values", "pixel_scale", "pixel_offset", "image_grid_thw", "pixel_repeat")})["pixel_values"]
    chw = _unpatchify(model_pixels, grid)
    ys, xs = np.nonzero(chw.mean(0) > 0)
    seen = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    rel = json.loads(answer.split("```json")[1].split("```")[0])[0]["bbox_2d"]
    assert np.allclose(seen, [rel[0] * hw[1] / 1000, rel[1] * hw[0] / 1000, rel[2] * hw[1] / 1000, rel[3] * hw[0] / 1000], atol=1.5)
    res = FAM.parse_output(answer, "detect", w, h, hw)
    assert not res.errors and abs(res.objects[0].x1 - box.x1) <= w / 2000 + 1e-9


def test_lora_targets_the_language_model(loaded):
    from peft import LoraConfig, get_peft_model

    model, _ = FAM.load(loaded[0].name_or_path)
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    rx = re.compile(FAM.lora_target_modules(names))
    hits = [n for n, _ in model.named_modules() if rx.fullmatch(n)]
    assert len(hits) == 2 * 7 and all(n.startswith("model.language_model.layers.") for n in hits)
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=FAM.lora_target_modules(names)))
    assert len([n for n, p in peft_model.named_parameters() if p.requires_grad]) == 2 * 7 * 2


# ---------------------------------------------------------------------------- constrained decoding


def test_constrained_decoding_always_parses_with_confidences(loaded):
    """An untrained model's free text does not parse; constrained, every answer does (greedy,
    sampling, a budget that binds), with the query's labels only and one confidence per object."""
    model, proc = loaded
    model.eval()
    exs = [synthetic.make_example(i, seed=7, image_size=128, shapes_per_image=1 + i % 2) for i in range(4)]
    images = [Image.open(io.BytesIO(e["image"])).convert("RGB") for e in exs]
    queries = [" ; ".join(sorted({o.label for o in e["objects"]})) for e in exs]
    tasks = ["detect", "point", "detect", "point"]
    prefixes = [FAM.render_example(t, q, [], 128, 128)[0] for t, q in zip(tasks, queries)]
    geoms = [predict.identity_geometry(128, 128)] * 4
    free = predict.decode(model, proc, FAM, images, prefixes, max_new_tokens=24)
    assert sum(bool(FAM.parse_output(g.text, t, 128, 128).errors) for g, t in zip(free, tasks)) >= 3
    for gen_kw, budget in (({}, 80), ({"do_sample": True, "top_p": 0.95, "temperature": 1.5}, 80), ({}, 20)):
        torch.manual_seed(0)
        opts = predict.DecodeOptions(max_new_tokens=budget, constrained=True, confidence=True, generate=gen_kw)
        preds = predict.predict(model, proc, FAM, images, tasks, queries, prefixes, geoms, opts)
        for p, q in zip(preds, queries):
            assert p.errors == [], (p.text, p.errors)
            assert {o.label for o in p.objects} <= set(query_labels(q))
            assert len(p.scores) == len(p.objects) and all(s is not None and 0 < s <= 1 for s in p.scores)
            assert codec.parse(p.text, "box" if "bbox_2d" in p.text else "point", 128, 128).errors == []


# ---------------------------------------------------------------------------- packing


def _photo_rows() -> dict:
    """Shard rows of photographs at four aspect ratios, a box and a point each (source pixels)."""
    from skimage import data as skd

    photos = {"astronaut": skd.astronaut(), "coffee": skd.coffee(), "tall": skd.astronaut()[:, 150:330], "wide": skd.coffee()[120:260]}
    rows = {k: [] for k in ("id", "image", "width", "height", "objects")}
    for name, a in photos.items():
        h, w = a.shape[:2]
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(a)).save(buf, format="PNG")
        objs = [Box(0.1 * w, 0.2 * h, 0.6 * w, 0.7 * h, "thing"), Point(0.4 * w, 0.45 * h, "spot")]
        for k, v in zip(rows, (name, buf.getvalue(), w, h, objects_to_json(objs))):
            rows[k].append(v)
    return {k: np.array(v, dtype=object) if k in ("id", "image", "objects") else np.array(v) for k, v in rows.items()}


def _loss_and_grads(model, loss_fn, batch):
    inputs, targets = loop.batch_to_model(collate(dict(batch)), FAM, torch.device("cpu"), torch.float32)
    model.zero_grad(set_to_none=True)
    loss, _ = loss_fn(model(**inputs, use_cache=False).logits, targets)
    loss.backward()
    return float(loss.detach()), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_rows_train_exactly_as_unpacked(native_preset):
    """Native resolution mixes image-token counts in a batch; packed rows (positions restarting per
    example, each example's M-RoPE positions = the model's own get_rope_index) give the same loss
    and gradients as the examples unpacked, with the number loss on; positions that run on across a
    row do not."""
    cfg = config_mod.load(None, ["model.family=qwen3_vl", "train.strategy=full", "model.freeze_vision=false", "loss.number_weight=1.0"])
    model, proc = FAM.load(native_preset)
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():  # random init is near-uniform: spread the logits so the loss terms are not flat
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    examples = pipeline.decode_and_expand(_photo_rows(), split="train", tasks=["detect", "point"], image_hw=FAM.input_frame(proc, "native"),
                                          family="qwen3_vl", preprocess=config_mod.Preprocess(resize="native"))
    enc = pipeline.tokenize(examples, split="train", model_path=native_preset, max_len=400, family="qwen3_vl")
    assert len({tuple(g) for g in enc["image_grid_thw"].tolist()}) >= 3 and enc["num_place"].any()

    ids, mm = torch.as_tensor(enc["input_ids"]).long(), torch.as_tensor(enc["mm_token_type_ids"]).long()
    pos, _ = model.model.get_rope_index(ids, mm, torch.as_tensor(enc["image_grid_thw"]), attention_mask=torch.as_tensor(enc["attention_mask"]).long())
    for i in range(len(ids)):
        n = int(enc["attention_mask"][i].sum())
        assert (pos[:, i, :n].numpy() == qwen_batch.rope_positions(enc["mm_token_type_ids"][i][:n], enc["image_grid_thw"][i:i + 1], 2)).all()

    digits = FAM.digit_token_ids(proc.tokenizer)
    loss_fn = loop.training_loss(cfg, proc.tokenizer, torch.as_tensor(FAM.loc_token_ids(proc.tokenizer)),
                                 model.get_output_embeddings().weight.shape[0], torch.as_tensor(digits))
    length = int(enc["attention_mask"].sum(1).max()) * 2 + 5
    packed = packing.pack_batch(enc, family="qwen3_vl", length=length, pad_id=proc.tokenizer.pad_token_id)
    rows_of = [len(k) for k in packed["example_keys"]]
    assert sum(rows_of) == len(enc["input_ids"]) and max(rows_of) >= 2
    l1, g1 = _loss_and_grads(model, loss_fn, enc)
    l2, g2 = _loss_and_grads(model, loss_fn, packed)
    assert g1.keys() == g2.keys() and any(k.startswith("model.visual.deepstack") for k in g1)
    assert abs(l1 - l2) <= 1e-5 and max(float((g1[k] - g2[k]).abs().max()) for k in g1) <= 1e-5
    crossing = dict(packed)
    crossing["position_ids"] = np.broadcast_to(np.arange(length), np.shape(packed["position_ids"])).copy()
    assert abs(_loss_and_grads(model, loss_fn, crossing)[0] - l2) > 1e-4


# ---------------------------------------------------------------------------- the real recipe


def test_the_recipe_drives_the_loss_down(tmp_path):
    """jobs/tiny/shapes_qwen3.yaml shrunk to 30 steps (launch/smoke.py): recipes/ddp.py with its
    loss (number loss on), optimizer and schedule; the checkpoint reloads and generates answers
    that parse."""
    cfg = smoke_mod.smoke(config_mod.load(str(Path(__file__).resolve().parents[2] / "jobs/tiny/shapes_qwen3.yaml")), steps=30,
                          root=str(tmp_path / "root"))
    assert (cfg.model.family, cfg.model.name_or_path, cfg.train.strategy) == ("qwen3_vl", "tiny:qwen3_vl", "full")
    res = smoke_mod.run_local(cfg, tmp_path / "ckpt", preset_cache=str(tmp_path / "presets"))
    losses = res.losses
    assert len(losses) == 30 and np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3]), losses
    assert len(res.generated) == 2 and all(not codec.parse(t, "point" if "point_2d" in t else "box", 64, 64).errors for t in res.generated)
