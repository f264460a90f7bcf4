"""The Qwen2.5-VL family on the offline tiny preset: build / save / load through the same path real
checkpoints take, the resize record, batch encoding, forward + backward, generation, where boxes land
in the pixels the model sees (the frame test), added location tokens, and a plain training loop whose
loss must drop."""

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from raytrain import predict
from raytrain.data import synthetic
from raytrain.data.pipeline import examples_for
from raytrain.formats import qwen as fmt
from raytrain.formats.annotations import Box, Point
from raytrain.models import family
from raytrain.models import paligemma as pg
from raytrain.models import qwen2_5_vl as qw
from raytrain.models import qwen_encode, qwen_loc_tokens
from raytrain.models.losses import IGNORE_INDEX, suffix_loss
from raytrain.models import ensure_preset

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

PROCESSOR_FILES = ("processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "raytrain_resize.json")


@pytest.fixture(scope="module")
def preset(tiny_qwen_path):
    return tiny_qwen_path


@pytest.fixture(scope="module")
def loaded(preset):
    return qw.load(preset)


def _unpatchify(pv: np.ndarray, grid, patch=14, merge=2) -> np.ndarray:
    """(patches, C*T*P*P) of ONE image -> (C, H, W): the resized image the vision tower sees."""
    _, gh, gw = (int(v) for v in grid)
    x = pv.reshape(gh // merge, gw // merge, merge, merge, 3, 2, patch, patch)[:, :, :, :, :, 0]
    return x.transpose(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * patch, gw * patch)


def _bright_box(chw: np.ndarray) -> tuple[float, float, float, float]:
    """Continuous box (x1, y1, x2, y2) of the pixels brighter than mid-grey (normalised > 0)."""
    ys, xs = np.nonzero(chw.mean(0) > 0)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def _stretch(img: Image.Image, hw) -> Image.Image:
    return img.resize((hw[1], hw[0]), Image.BILINEAR)  # what the pipeline does


# ---------------------------------------------------------------------------- preset, loading, interface


def test_same_interface_as_paligemma():
    from raytrain.models.interface import REQUIRED_MEMBERS

    for name in REQUIRED_MEMBERS:
        assert hasattr(family("paligemma"), name) and hasattr(family("qwen2_5_vl"), name), name
    assert family("qwen2_5_vl").prepare_inputs is qw.prepare_inputs and family("paligemma").encode_train is pg.encode_train
    x = {"pixel_values": np.zeros((2, 3, 4, 4))}
    assert family("paligemma").prepare_inputs(x) is x


def test_preset_builds_saves_and_loads(preset, loaded):
    from transformers import Qwen2_5_VLForConditionalGeneration

    assert ensure_preset("tiny:qwen2_5_vl", str(Path(preset).parent)) == Path(preset)  # built once, found again
    for f in PROCESSOR_FILES + ("config.json", "model.safetensors", "generation_config.json", "raytrain_preset.json"):
        assert (Path(preset) / f).exists(), f
    meta = json.loads((Path(preset) / "raytrain_preset.json").read_text())
    assert meta["preset"] == "tiny:qwen2_5_vl" and meta["image_size"] == [112, 112]
    assert meta["resize"] == json.loads((Path(preset) / "raytrain_resize.json").read_text())
    assert json.loads((Path(preset) / "processor_config.json").read_text())["processor_class"] == "Qwen2_5_VLImageOnlyProcessor"

    model, proc = loaded
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration)
    assert type(proc).__name__ == "Qwen2_5_VLImageOnlyProcessor"
    n = sum(p.numel() for p in model.parameters())
    assert 3e5 < n < 1.2e6, n
    v, t = model.config.vision_config, model.config.text_config
    assert (v.depth, v.hidden_size, v.patch_size, v.spatial_merge_size, v.out_hidden_size) == (2, 64, 14, 2, t.hidden_size)
    assert (t.num_hidden_layers, t.hidden_size) == (2, 128)
    tok = proc.tokenizer
    for s in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|endoftext|>"):
        assert tok.convert_tokens_to_ids(s) is not None and len(tok.tokenize(s)) == 1, s
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert (tok.pad_token, tok.eos_token) == ("<|endoftext|>", "<|im_end|>")
    assert qw.image_size(proc) == (112, 112)
    assert qw.resize_settings(proc) == {"factor": 28, "min_pixels": 12544, "max_pixels": 12544, "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}
    assert qw.resolve("Qwen/Qwen2.5-VL-3B-Instruct") == "Qwen/Qwen2.5-VL-3B-Instruct"


def test_processor_round_trips_and_resize_record_is_checked(preset, loaded, tmp_path):
    _, proc = loaded
    out = tmp_path / "ckpt"
    qw.save_inference_files(proc, out)
    again = qw.load_processor(str(out))
    assert type(again) is type(proc) and qw.resize_settings(again) == qw.resize_settings(proc)
    assert again.tokenizer.get_vocab() == proc.tokenizer.get_vocab()
    assert again.chat_template == proc.chat_template

    # a record that disagrees with the processor (or a processor edited after training) is refused
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    rec = json.loads((bad / "raytrain_resize.json").read_text())
    (bad / "raytrain_resize.json").write_text(json.dumps({**rec, "max_pixels": 28 * 28 * 1280}))
    with pytest.raises(ValueError, match="max_pixels"):
        qw.load_processor(str(bad))
    with pytest.raises(ValueError, match="min_pixels"):
        qw.check_resize(proc, {**rec, "min_pixels": 3136})
    qw.check_resize(proc, rec)
    qw.check_resize(proc, out)


def test_hub_ids_go_through_autoprocessor(monkeypatch):
    """Real users' processors keep loading through AutoProcessor (no download here: stubbed)."""
    import transformers

    seen = []
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", classmethod(lambda cls, p, **kw: seen.append(p) or "stock"))
    assert qw.load_processor("Qwen/Qwen2.5-VL-3B-Instruct") == "stock"
    assert seen == ["Qwen/Qwen2.5-VL-3B-Instruct"]


def test_lora_targets_language_model_only(loaded):
    from peft import LoraConfig, get_peft_model

    model, _ = qw.load(loaded[0].name_or_path)
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    rx = re.compile(qw.lora_target_modules(names))
    hits = [n for n, _ in model.named_modules() if rx.fullmatch(n)]
    assert len(hits) == 2 * 7 and all(n.startswith("model.language_model.layers.") for n in hits)
    vis = re.compile(qw.lora_target_modules(names, include_vision=True))
    assert any(n.startswith("model.visual.") for n, _ in model.named_modules() if vis.fullmatch(n))
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=qw.lora_target_modules(names)))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 7 * 2 and all("language_model" in n for n in trainable)


# ---------------------------------------------------------------------------- encoding, forward, generation


def _synthetic_examples(n_images: int, hw, tasks=("point", "detect")):
    images, prefixes, suffixes = [], [], []
    for i in range(n_images):
        ex = synthetic.make_example(i, seed=0, image_size=64)
        img = _stretch(Image.open(io.BytesIO(ex["image"])).convert("RGB"), hw)
        for e in examples_for(ex["objects"], list(tasks), ex["width"], ex["height"], "qwen2_5_vl", hw):
            images.append(img)
            prefixes.append(e["prefix"])
            suffixes.append(e["suffix"])
    return images, prefixes, suffixes


def test_encode_train_shapes_and_labels(loaded):
    _, proc = loaded
    tok = proc.tokenizer
    images, prefixes, suffixes = _synthetic_examples(2, (112, 112))
    enc = qw.encode_train(proc, images, prefixes, suffixes, max_len=128)
    b = len(prefixes)
    assert enc["input_ids"].shape == enc["attention_mask"].shape == enc["mm_token_type_ids"].shape == enc["labels"].shape == (b, 128)
    # uint8 patches of one frame (an eighth of float32 bytes in Ray's object store) + the per-channel map
    assert enc["pixel_values"].shape == (b, 64, 3 * 14 * 14) and enc["pixel_values"].dtype == np.uint8  # one of the 2 identical frames
    assert enc["pixel_repeat"].tolist() == [2] * b
    assert enc["pixel_scale"].shape == enc["pixel_offset"].shape == (b, 3)
    assert enc["image_grid_thw"].tolist() == [[1, 8, 8]] * b
    assert (enc["length"] <= 128).all() and (enc["attention_mask"].sum(1) == enc["length"]).all()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for i in range(b):
        n = int(enc["length"][i])
        assert (enc["input_ids"][i, n:] == tok.pad_token_id).all() and (enc["labels"][i, n:] == IGNORE_INDEX).all()
        assert int(enc["mm_token_type_ids"][i].sum()) == 16  # 8x8 patches merged 2x2
        assert (enc["input_ids"][i][enc["mm_token_type_ids"][i] == 1] == proc.image_token_id).all()
        lab = enc["labels"][i][enc["labels"][i] != IGNORE_INDEX]
        assert tok.decode(lab) == suffixes[i] + "<|im_end|>" and lab[-1] == im_end
        text = tok.decode(enc["input_ids"][i, :n])
        assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>")
        assert text.endswith(prefixes[i] + "<|im_end|>\n<|im_start|>assistant\n" + suffixes[i] + "<|im_end|>")
    # rows are what the chat template renders for the whole conversation (minus the final newline)
    full = proc.apply_chat_template(fmt.chat_messages(prefixes[0], suffixes[0]), tokenize=False)
    assert full == qwen_encode._chat_prompt(proc, prefixes[0]) + suffixes[0] + "<|im_end|>\n"
    # the prompt part is exactly what generation is fed
    gen = qw.encode_prompts(proc, images[:1], prefixes[:1])
    p = gen["input_ids"].shape[1]
    assert gen["input_ids"][0].tolist() == enc["input_ids"][0, :p].tolist()
    # too long: reported through `length`, never silently cut
    short = qw.encode_train(proc, images[:1], prefixes[:1], suffixes[:1], max_len=40)
    assert short["input_ids"].shape == (1, 40) and short["length"][0] > 40


def test_prepare_inputs_flattens_per_example_patches():
    pv = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    grid = np.array([[1, 1, 3], [1, 1, 3]])
    out = qw.prepare_inputs({"pixel_values": pv, "image_grid_thw": grid, "input_ids": np.zeros((2, 5))})
    assert out["pixel_values"].shape == (6, 4) and (out["pixel_values"][3] == pv[1, 0]).all()
    t = qw.prepare_inputs({"pixel_values": torch.as_tensor(pv), "image_grid_thw": torch.as_tensor(grid, dtype=torch.int32)})
    assert t["pixel_values"].shape == (6, 4) and t["image_grid_thw"].dtype == torch.long
    flat = qw.prepare_inputs({"pixel_values": torch.zeros(6, 4)})
    assert flat["pixel_values"].shape == (6, 4)


def _batch(enc: dict, idx) -> tuple[dict, torch.Tensor]:
    """What the recipe does with a Ray batch: tensors, trim shared padding of SEQ_KEYS, prepare."""
    inputs = {k: torch.as_tensor(v[idx]) for k, v in enc.items() if k not in ("labels", "length")}
    labels = torch.as_tensor(enc["labels"][idx]).long()
    width = int(inputs["attention_mask"].sum(1).max())
    for k in qw.SEQ_KEYS:
        inputs[k] = inputs[k][:, :width].long()
    return qw.prepare_inputs(inputs), labels[:, :width]


def test_forward_backward_with_labels(loaded):
    model, proc = loaded
    images, prefixes, suffixes = _synthetic_examples(2, (112, 112))
    enc = qw.encode_train(proc, images, prefixes, suffixes, max_len=128)
    inputs, labels = _batch(enc, np.arange(len(prefixes)))
    model.zero_grad()
    out = model(**inputs, use_cache=False)
    assert out.logits.shape[:2] == labels.shape
    loc_ids = torch.as_tensor(qw.loc_token_ids(proc.tokenizer))
    loss, stats = suffix_loss(out.logits, labels, loc_ids, loc_sigma=60.0)
    loss.backward()
    assert torch.isfinite(loss) and stats["tokens"] == int((labels != IGNORE_INDEX).sum())
    assert model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0  # the image reaches the loss
    # absolute answers have no location tokens; the loss also takes an empty id set
    empty = torch.zeros(0, dtype=torch.long)
    loss0, _ = suffix_loss(out.logits.detach(), labels, empty, loc_sigma=60.0)
    assert torch.isfinite(loss0) and loss0.item() == pytest.approx(stats["ce"], rel=1e-5)
    model.zero_grad()


def test_generate_returns_strings(loaded):
    model, proc = loaded
    img = Image.new("RGB", (112, 112), (120, 120, 120))
    prompts = [fmt.render_prompt("detect", "red circle"), fmt.render_prompt("point", "a large blue square")]  # different lengths: left padding
    texts = [g.text for g in predict.decode(model, proc, family("qwen2_5_vl"), [img, img], prompts, max_new_tokens=6)]
    assert isinstance(texts, list) and len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert all("<|im_end|>" not in t and "<|endoftext|>" not in t for t in texts)
    for t in texts:  # whatever an untrained model says, the parser accounts for it
        res = qw.parse_output(t, "detect", 112, 112, (112, 112))
        assert res.objects or res.errors


# ---------------------------------------------------------------------------- frames


def test_processor_resize_is_the_codec_frame():
    """Where a box lands in the pixels Qwen's image processor produces is where the codec says it is:
    the processor's grid is fmt.smart_resize(image), and a drawn rectangle shows up at
    to_model_frame(box) in the un-patchified pixel_values (released-model settings, odd source sizes)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    s = qw.DEFAULT_RESIZE
    ip = Qwen2VLImageProcessorPil(min_pixels=s["min_pixels"], max_pixels=s["max_pixels"], patch_size=14, merge_size=2, temporal_patch_size=2)
    for (w, h), box in (((300, 200), Box(60, 40, 180, 120, "x")), ((517, 233), Box(100, 20, 400, 210, "y")), ((90, 160), Box(10, 30, 50, 150, "z"))):
        img = Image.new("RGB", (w, h), (0, 0, 0))
        ImageDraw.Draw(img).rectangle([box.x1, box.y1, box.x2 - 1, box.y2 - 1], fill=(255, 255, 255))
        enc = ip([img], return_tensors="np")
        grid = enc["image_grid_thw"][0]
        rh, rw = fmt.smart_resize(h, w, s["factor"], s["min_pixels"], s["max_pixels"])
        assert (int(grid[1]) * 14, int(grid[2]) * 14) == (rh, rw)
        seen = _bright_box(_unpatchify(enc["pixel_values"], grid))
        want = fmt.to_model_frame(box, w, h, rw, rh)
        assert np.allclose(seen, [want.x1, want.y1, want.x2, want.y2], atol=1.0), (seen, want)


def test_known_box_through_render_processor_and_parse(loaded):
    """A box on a 200x120 source: rendered into the model frame of the 112x112 input, tokenized with the
    image by encode_train, read back from the label tokens and parsed to source pixels: within one
    model-frame pixel (x scale). And the answer's coordinates point at the rectangle in pixel_values."""
    _, proc = loaded
    w, h = 200, 120
    hw = qw.image_size(proc)
    box = Box(50, 30, 150, 90, "white square")
    src = Image.new("RGB", (w, h), (0, 0, 0))
    ImageDraw.Draw(src).rectangle([box.x1, box.y1, box.x2 - 1, box.y2 - 1], fill=(255, 255, 255))
    prompt, answer = qw.render_example("detect", box.label, [box], w, h, hw)
    enc = qw.encode_train(proc, [_stretch(src, hw)], [prompt], [answer], max_len=128)
    grid = enc["image_grid_thw"][0]
    assert (int(grid[1]) * 14, int(grid[2]) * 14) == fmt.smart_resize(*hw) == hw  # render's frame is the processor's

    lab = enc["labels"][0][enc["labels"][0] != IGNORE_INDEX]
    text = proc.tokenizer.decode(lab, skip_special_tokens=True)
    res = qw.parse_output(text, "detect", w, h, hw)
    assert not res.errors and len(res.objects) == 1
    got = res.objects[0]
    sx, sy = w / hw[1], h / hw[0]
    assert abs(got.x1 - box.x1) <= sx and abs(got.x2 - box.x2) <= sx
    assert abs(got.y1 - box.y1) <= sy and abs(got.y2 - box.y2) <= sy

    coords = json.loads(text.split("```json")[1].split("```")[0])[0]["bbox_2d"]
    model_pixels = qw.prepare_inputs({k: enc[k] for k in ("pixel_values", "pixel_scale", "pixel_offset", "image_grid_thw", "pixel_repeat")})["pixel_values"]
    seen = _bright_box(_unpatchify(model_pixels, grid))
    assert np.allclose(seen, coords, atol=1.5), (seen, coords)


def test_points_and_other_representations_through_the_family(loaded):
    _, proc = loaded
    hw = qw.image_size(proc)
    for rep in fmt.REPRESENTATIONS:
        for task, obj in (("point", Point(33.0, 21.0, "red circle")), ("detect", Box(5, 6, 40, 50, "red circle"))):
            prompt, answer = qw.render_example(task, obj.label, [obj], 64, 64, hw, representation=rep)
            enc = qw.encode_train(proc, [Image.new("RGB", hw)], [prompt], [answer], max_len=160)
            lab = enc["labels"][0][enc["labels"][0] != IGNORE_INDEX]
            text = proc.tokenizer.decode(lab, skip_special_tokens=True)  # <|loc_|> tokens survive decoding
            res = qw.parse_output(text, task, 64, 64, hw, representation=rep)
            assert len(res.objects) == 1 and not res.errors, (rep, text)


# ---------------------------------------------------------------------------- added tokens


def test_add_loc_tokens_to_a_vocabulary_without_them():
    from transformers import Qwen2_5_VLForConditionalGeneration

    from raytrain.models import tiny_qwen

    tok = tiny_qwen.build_tokenizer(loc_tokens=False)
    assert qw.loc_token_ids(tok).shape == (0,)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(tiny_qwen.tiny_qwen_config(tok))
    n0 = len(tok)
    ids = qw.add_loc_tokens(model, tok)
    assert len(tok) == n0 + 1024 and model.get_input_embeddings().weight.shape[0] >= len(tok)
    assert ids.tolist() == list(range(n0, n0 + 1024))
    rows = model.get_input_embeddings().weight[torch.as_tensor(ids)].detach()
    assert torch.isfinite(rows).all() and torch.unique(rows, dim=0).shape[0] == 1024
    assert tok.decode(tok("<|loc_0007|>", add_special_tokens=False)["input_ids"], skip_special_tokens=True) == "<|loc_0007|>"
    assert (qw.add_loc_tokens(model, tok) == ids).all()  # idempotent


def test_new_token_init(preset):
    model, proc = qw.load(preset)
    tok = proc.tokenizer
    new = list(fmt.LOC_TOKENS[:4]) + ["<|loc_0512|>"]
    ids = qwen_loc_tokens.init_new_token_embeddings(model, tok, new, method="digits", noise_std=0.0)
    W = model.get_input_embeddings().weight.detach()
    digits = tok("0512", add_special_tokens=False)["input_ids"]
    want = sum(wt * W[d] for wt, d in zip([8, 4, 2, 1], digits)) / 15
    assert torch.allclose(W[ids[-1]], want, atol=1e-6)
    qwen_loc_tokens.init_new_token_embeddings(model, tok, new[:1], method="mean", noise_std=0.0)
    old = torch.ones(W.shape[0], dtype=torch.bool)
    old[torch.as_tensor(ids[:1])] = False
    assert torch.allclose(W[ids[0]], W[old].mean(0), atol=1e-5)

    # the warm-up of these rows: tests/unit/models/test_qwen_box_formats.py (through the recipe)


# ---------------------------------------------------------------------------- a plain training loop


def test_thirty_steps_drive_the_loss_down(preset):
    """Single process, no Ray: the pipeline's examples_for + encode_train on synthetic shapes, AdamW,
    suffix_loss; the recipe's batch handling (trim SEQ_KEYS, prepare_inputs)."""
    torch.manual_seed(0)
    model, proc = qw.load(preset)
    model.train()
    images, prefixes, suffixes = _synthetic_examples(12, qw.image_size(proc))
    enc = qw.encode_train(proc, images, prefixes, suffixes, max_len=128)
    assert (enc["length"] <= 128).all()
    loc_ids = torch.as_tensor(qw.loc_token_ids(proc.tokenizer))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(30):
        inputs, labels = _batch(enc, rng.choice(len(prefixes), size=6, replace=False))
        loss, _ = suffix_loss(model(**inputs, use_cache=False).logits, labels, loc_ids, loc_sigma=60.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.4 * np.mean(losses[:3]), losses
