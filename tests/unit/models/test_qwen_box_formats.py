"""Qwen2.5-VL box formats chosen in config (model.box_format) and the added <|loc|> tokens, on the
offline tiny presets, without Ray: every format through the family (render -> encode -> decode ->
parse, in the processor's resize frame), tokens added to a vocabulary without them (ids, grown
embeddings, initialised rows), and the new-token warm-up through the real recipe loop (full and
LoRA; which tensors move in which steps, resume before and after the warm-up, checkpoints carrying
the tokenizer and the trained rows to inference)."""

import contextlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from raytrain import config as config_mod
from raytrain import predict
from raytrain.formats import qwen as fmt
from raytrain.formats.annotations import Box, Point, Region
from raytrain.launch import smoke
from raytrain.models import family, family_spec, parse_family_spec, tiny_qwen
from raytrain.models import qwen2_5_vl as qw
from raytrain.models.losses import IGNORE_INDEX
from raytrain.recipes import ddp
from raytrain.training.session import Session
from raytrain.training import checkpointing

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def preset(tiny_qwen_path):
    """The tiny preset: <|loc|> tokens already in its vocabulary, tied lm_head (like the 3B)."""
    return tiny_qwen_path


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """A stand-in for a released Qwen2.5-VL-7B: no <|loc|> tokens, untied lm_head."""
    return str(tiny_qwen.build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen-bare") / "base", loc_tokens=False, tie_embeddings=False))


# ---------------------------------------------------------------------------- spec and config


def test_family_spec_binds_a_box_format():
    assert family("qwen2_5_vl") == family("qwen2_5_vl+absolute") and family_spec("qwen2_5_vl", "absolute") == "qwen2_5_vl"
    assert family_spec("qwen2_5_vl", "tokens") == "qwen2_5_vl+tokens" and family_spec("qwen2_5_vl", "") == "qwen2_5_vl"
    assert parse_family_spec("qwen2_5_vl+pairs") == ("qwen2_5_vl", "pairs")
    view = family("qwen2_5_vl+normalized")
    assert view.answer_format == "normalized" and view.spec == "qwen2_5_vl+normalized" and view.prepare_inputs is qw.prepare_inputs
    with pytest.raises(AttributeError):  # immutable: one object per spec
        view.answer_format = "tokens"
    with pytest.raises(ValueError, match="not 'polar'"):
        family("qwen2_5_vl+polar")
    with pytest.raises(ValueError, match="not 'tokens'"):
        family("paligemma+tokens")
    with pytest.raises(ValueError, match="unknown model family"):
        family("llava+tokens")


def test_config_keys_are_validated():
    cfg = config_mod.load(None, ["model.family=qwen2_5_vl", "model.box_format=tokens", "train.new_token_warmup_steps=5"])
    assert cfg.model.spec == "qwen2_5_vl+tokens" and cfg.train.new_token_warmup_steps == 5
    default = config_mod.load(None)
    assert (default.model.box_format, default.train.new_token_warmup_steps, default.model.spec) == ("", 0, "paligemma")
    bad = {
        "not 'xyxy'": ["model.family=qwen2_5_vl", "model.box_format=xyxy"],
        "paligemma' writes answers as": ["model.box_format=normalized"],
        "must be >= 0": ["train.new_token_warmup_steps=-1"],
        "needs model.box_format=tokens": ["model.family=qwen2_5_vl", "train.new_token_warmup_steps=3"],
        "not supported with strategy zero2/zero3": ["model.family=qwen2_5_vl", "model.box_format=tokens",
                                                    "train.new_token_warmup_steps=3", "train.strategy=zero3"],
    }
    for msg, overrides in bad.items():
        with pytest.raises(ValueError, match=msg):
            config_mod.load(None, overrides)


# ---------------------------------------------------------------------------- formats through the family

SRC_W, SRC_H = 200, 120  # a non-square source: the pipeline stretches it to the 112 x 112 model input
BOX = Box(50, 30, 150, 90, "white box")  # -> (28, 28, 84, 84) in the model frame
POINT = Point(100, 60, "white box")  # -> (56, 56)
EXPECTED = {  # answers by hand: 50 * 112 / 200 = 28, 30 * 112 / 120 = 28; bins round(0.25 * 1023) = 256, round(0.75 * 1023) = 767
    ("absolute", "detect"): '[{"bbox_2d": [28, 28, 84, 84], "label": "white box"}]',
    ("normalized", "detect"): '[{"bbox_2d": [0.25, 0.25, 0.75, 0.75], "label": "white box"}]',
    ("tokens", "detect"): '[{"bbox_2d": "<|loc_0256|><|loc_0256|><|loc_0767|><|loc_0767|>", "label": "white box"}]',
    ("pairs", "detect"): "[('white box', [28, 28, 84, 84])]",
    ("absolute", "point"): '[{"point_2d": [56, 56], "label": "white box"}]',
    ("normalized", "point"): '[{"point_2d": [0.5, 0.5], "label": "white box"}]',
    ("tokens", "point"): '[{"point_2d": "<|loc_0512|><|loc_0512|>", "label": "white box"}]',  # 511.5 rounds half to even
    ("pairs", "point"): "[('white box', [56, 56])]",
}
# worst error of one source coordinate per format: half a model pixel, 0.0005 of the side, half a bin
TOLERANCE = {"absolute": 0.5 / 112, "pairs": 0.5 / 112, "normalized": 0.0005, "tokens": 0.5 / 1023}


def _unpatchify(pv: np.ndarray, grid, patch=14, merge=2) -> np.ndarray:
    """(patches, C*T*P*P) of ONE image -> (C, H, W): the resized image the vision tower sees."""
    _, gh, gw = (int(v) for v in grid)
    x = pv.reshape(gh // merge, gw // merge, merge, merge, 3, 2, patch, patch)[:, :, :, :, :, 0]
    return x.transpose(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * patch, gw * patch)


def _model_frame_coords(obj, rep: str, text: str) -> list[float]:
    """Coordinates as written in the answer, in pixels of the 112 x 112 model input."""
    if rep == "pairs":
        vals = [float(v) for v in text.split("[", 2)[2].split("]")[0].split(",")]
    else:
        raw = json.loads(text.removeprefix("```json").removesuffix("```"))[0]["bbox_2d" if isinstance(obj, Box) else "point_2d"]
        vals = [fmt.decode_bin(int(d)) for d in fmt._LOC.findall(raw)] if rep == "tokens" else raw
        if rep in ("tokens", "normalized"):
            vals = [v * 112 for v in vals]
    return vals


@pytest.mark.parametrize("rep", fmt.REPRESENTATIONS)
def test_every_box_format_round_trips_in_the_processor_frame(rep, preset):
    fam = family(family_spec("qwen2_5_vl", rep))
    proc = fam.load_processor(preset)
    hw = fam.image_size(proc)
    assert hw == (112, 112)
    src = Image.new("RGB", (SRC_W, SRC_H), "black")
    ImageDraw.Draw(src).rectangle([BOX.x1, BOX.y1, BOX.x2 - 1, BOX.y2 - 1], fill="white")
    img = src.resize((hw[1], hw[0]), Image.BILINEAR)  # what the pipeline does before encoding
    for task, obj in (("detect", BOX), ("point", POINT)):
        prompt, answer = qw.render_example(task, obj.label, [obj], SRC_W, SRC_H, hw, representation=rep, fenced=False)
        assert answer == EXPECTED[(rep, task)], (rep, task, answer)
        assert prompt == fmt.render_prompt(task, obj.label, rep)
        enc = fam.encode_train(proc, [img], [prompt], [answer], max_len=200)
        assert enc["length"][0] <= 200
        lab = enc["labels"][0][enc["labels"][0] != IGNORE_INDEX]
        text = proc.tokenizer.decode(lab, skip_special_tokens=True)
        assert text == answer  # every token of the answer survives tokenize -> decode (loc tokens included)
        if rep == "tokens":  # one vocabulary id per bin, not their characters
            assert np.isin(lab, qw.loc_token_ids(proc.tokenizer)).sum() == (4 if task == "detect" else 2)
        res = fam.parse_output(text, task, SRC_W, SRC_H, hw)
        assert not res.errors and len(res.objects) == 1
        got, tol = res.objects[0], TOLERANCE[rep]
        pairs = [(got.x1, BOX.x1, SRC_W), (got.y1, BOX.y1, SRC_H), (got.x2, BOX.x2, SRC_W), (got.y2, BOX.y2, SRC_H)] \
            if task == "detect" else [(got.x, POINT.x, SRC_W), (got.y, POINT.y, SRC_H)]
        for v, want, side in pairs:
            assert abs(v - want) <= tol * side + 1e-9, (rep, task, v, want)
        if task == "detect":  # the written coordinates are where the box is in the pixels the model sees
            seen_by_model = fam.prepare_inputs({k: enc[k] for k in ("pixel_values", "pixel_scale", "pixel_offset", "image_grid_thw", "pixel_repeat")})
            grey = _unpatchify(seen_by_model["pixel_values"], enc["image_grid_thw"][0]).mean(0)
            ys, xs = np.nonzero(grey > 0)
            seen = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert np.allclose(_model_frame_coords(obj, rep, text), seen, atol=1.0), (rep, seen)
    # dense captioning asks for the answer's shape too
    prompt, answer = qw.render_example("dense_caption", "", [Region(50, 30, 150, 90, "a box")], SRC_W, SRC_H, hw, representation=fam.answer_format, fenced=False)
    assert prompt == qw.DENSE_PROMPTS[rep]
    assert fam.parse_output(answer, "dense_caption", SRC_W, SRC_H, hw).objects[0].phrase == "a box"


# ---------------------------------------------------------------------------- added tokens


def test_tokens_format_adds_tokens_and_initialises_their_rows(bare):
    plain_model, plain_proc = qw.load(bare)
    n0 = len(plain_proc.tokenizer)
    assert qw.loc_token_ids(plain_proc.tokenizer).shape == (0,)
    W0 = plain_model.get_input_embeddings().weight.detach().clone()
    O0 = plain_model.get_output_embeddings().weight.detach().clone()
    assert W0.shape[0] == n0 and O0 is not W0  # untied

    fam = family("qwen2_5_vl+tokens")
    model, proc = fam.load(bare)
    tok = proc.tokenizer
    ids = qw.loc_token_ids(tok)
    assert len(tok) == n0 + 1024 and ids.tolist() == list(range(n0, n0 + 1024))
    assert fam.load_processor(bare).tokenizer.get_vocab() == tok.get_vocab()  # data workers get the same ids
    W = model.get_input_embeddings().weight.detach()
    O = model.get_output_embeddings().weight.detach()
    assert W.shape == (n0 + 1024, 128) and O.shape == (n0 + 1024, 128) and O.data_ptr() != W.data_ptr()
    assert model.config.get_text_config().vocab_size == n0 + 1024
    assert torch.equal(W[:n0], W0) and torch.equal(O[:n0], O0)  # the old vocabulary is untouched

    for M, M0 in ((W, W0), (O, O0)):
        new = M[torch.as_tensor(ids)]
        assert new.abs().sum(1).min() > 0 and torch.unique(new, dim=0).shape[0] == 1024  # not zeros, not identical
        # as documented: the 8:4:2:1 mean of the bin's digit rows plus noise of 0.1 x the old rows' std
        digit = {d: M0[tok(str(d), add_special_tokens=False)["input_ids"][0]] for d in range(10)}
        want = torch.stack([sum(w * digit[int(c)] for w, c in zip((8, 4, 2, 1), f"{b:04d}")) / 15 for b in range(1024)])
        noise = (new - want).std() / M0.std()
        assert 0.08 < float(noise) < 0.12, float(noise)
        # neighbouring bins start closer together than bins far apart
        near = (new[1:] - new[:-1]).norm(dim=1).mean()
        far = (new[512:] - new[:512]).norm(dim=1).mean()
        assert near < 0.5 * far, (float(near), float(far))

    again_model, _ = fam.load(bare)  # the same rows every time (seeded)
    assert torch.equal(again_model.get_input_embeddings().weight, model.get_input_embeddings().weight)
    preset_like = family("qwen2_5_vl+tokens").load_processor(bare)
    assert len(preset_like.tokenizer) == n0 + 1024


def test_data_workers_encode_loc_tokens_as_the_added_ids(bare):
    """What the Ray Data tasks run (decode_and_expand, tokenize) with the spec string they are given:
    the answer's bins become the added vocabulary ids, not the characters of "<|loc_0256|>"."""
    from raytrain.data import pipeline, synthetic
    from raytrain.formats.annotations import objects_to_json

    spec = "qwen2_5_vl+tokens"
    ex = synthetic.make_example(0, seed=3)
    rows = {"id": np.array([ex["id"]], dtype=object), "image": np.array([ex["image"]], dtype=object),
            "width": np.array([ex["width"]]), "height": np.array([ex["height"]]),
            "objects": np.array([objects_to_json(ex["objects"])], dtype=object)}
    proc = family(spec).load_processor(bare)
    exs = pipeline.decode_and_expand(rows, split="train", tasks=["detect"], image_hw=family(spec).image_size(proc), family=spec)
    assert "<|loc_" in exs["suffix"][0] and exs["prefix"][0] == fmt.render_prompt("detect", exs["query"][0], "tokens")
    enc = pipeline.tokenize(exs, split="train", model_path=bare, max_len=200, family=spec)
    lab = enc["labels"][0][enc["labels"][0] != IGNORE_INDEX]
    loc = qw.loc_token_ids(proc.tokenizer)
    assert loc.min() == len(qw.load_processor(bare).tokenizer)  # appended after the base vocabulary
    assert np.isin(lab, loc).sum() == 4 and proc.tokenizer.decode(lab, skip_special_tokens=True) == exs["suffix"][0]


# ---------------------------------------------------------------------------- warm-up through the recipe


def _run(cfg, base, batches, out: Path, resume_dir=None) -> dict[int, Path]:
    """lora.train with a plain Session; returns {step: checkpoint copy under `out` (a test's tmp_path)}."""
    saved: dict[int, Path] = {}

    def report(metrics, ckpt_dir):
        if ckpt_dir:
            keep = Path(tempfile.mkdtemp(prefix="ckpt-", dir=out))
            shutil.copytree(ckpt_dir, keep, dirs_exist_ok=True)
            saved[metrics["step"]] = keep

    def checkpoint_dir():
        return contextlib.nullcontext(str(resume_dir)) if resume_dir else None

    session = Session(rank=0, world_size=1, checkpoint_dir=checkpoint_dir, report=report, epoch_batches=lambda epoch, micro: batches)
    ddp.train(cfg, base, session, torch.device("cpu"), wrap_ddp=lambda m: m)
    return saved


def _cfg(base, *extra):
    return config_mod.load("jobs/tiny/shapes_qwen.yaml", [
        f"model.name_or_path={base}", "model.box_format=tokens", "model.freeze_vision=true", "model.train_projector=false",
        "train.steps=4", "train.new_token_warmup_steps=2", "train.checkpoint_every=1", "train.log_every=1",
        "train.micro_batch_size=4", "train.warmup_steps=0", "train.schedule=constant", "train.lr=1e-2",
        "train.weight_decay=0.1", "data.tasks=[detect]", "loss.loc_sigma=60", *extra])


def _full_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    # through from_pretrained, as checkpointing.load_weights does: the files may hold legacy key names
    from transformers import Qwen2_5_VLForConditionalGeneration

    return {k: v.detach() for k, v in Qwen2_5_VLForConditionalGeneration.from_pretrained(str(ckpt / "model")).state_dict().items()}


def _changed_rows(a: torch.Tensor, b: torch.Tensor) -> set[int]:
    return set((a != b).any(1).nonzero().flatten().tolist())


@pytest.mark.parametrize("base_name", ["bare", "preset"])
def test_full_warmup_moves_only_new_rows_then_everything_and_resumes_by_step(base_name, request, tmp_path):
    base = request.getfixturevalue(base_name)
    cfg = _cfg(base, "train.strategy=full")
    fam = family(cfg.model.spec)
    batches = smoke.synthetic_batches(cfg, base, 2)
    start = fam.load(base)[0]  # the recipe's starting point: tokens added, rows initialised (deterministic)
    ref = {k: v.detach().clone() for k, v in start.state_dict().items()}
    loc = set(qw.loc_token_ids(fam.load_processor(base).tokenizer).tolist())
    saved = _run(cfg, base, batches, tmp_path)
    assert sorted(saved) == [1, 2, 3, 4]
    w = {s: _full_weights(p) for s, p in saved.items()}
    emb, head = "model.language_model.embed_tokens.weight", "lm_head.weight"
    mats = [emb, head]
    assert set(w[1]) == set(ref)
    assert torch.equal(w[1][head], w[1][emb]) == (base_name == "preset")  # the preset ties them, the bare base does not

    for s in (1, 2):  # warm-up: only <|loc|> rows of the embedding matrices moved (weight decay included)
        for k in mats:
            rows = _changed_rows(w[s][k], ref[k])
            assert rows and rows <= loc, (s, k, sorted(rows - loc)[:5])
        assert all(torch.equal(w[s][k], ref[k]) for k in w[s] if k not in mats), s
    prev = w[2]
    others = [k for k in w[3] if k not in mats]
    moved = [k for k in others if not torch.equal(w[3][k], prev[k])]
    trained = [k for k in others if not k.startswith("model.visual.")]  # the job's freeze policy: vision frozen
    assert moved == trained and len(trained) > 20  # after warm-up: everything the strategy trains
    assert _changed_rows(w[3][emb], prev[emb]) - loc  # old vocabulary rows train again (decay moves every row)

    # resumed inside the warm-up (after step 1): step 2 still moves only the new rows
    r1 = _run(cfg, base, batches, tmp_path, resume_dir=saved[1])
    assert sorted(r1) == [2, 3, 4]
    w12 = _full_weights(r1[2])
    assert all(torch.equal(w12[k], ref[k]) for k in others)
    # resumed after it (step 2 done): the next step trains everything at once
    r2 = _run(cfg, base, batches, tmp_path, resume_dir=saved[2])
    w23 = _full_weights(r2[3])
    assert len([k for k in others if not torch.equal(w23[k], prev[k])]) == len(moved)
    # the tokenizer with the added tokens is in the checkpoint: a plain load reads the same ids
    again = qw.load_processor(str(saved[4] / "model"))
    assert set(qw.loc_token_ids(again.tokenizer).tolist()) == loc
    assert json.loads((saved[4] / "state.json").read_text())["family"] == "qwen2_5_vl+tokens"


def test_lora_trains_added_rows_through_the_adapter_and_back_to_inference(bare, tmp_path):
    cfg = _cfg(bare, "train.strategy=lora", "train.steps=3", "lora.r=4", "lora.alpha=8")
    fam = family(cfg.model.spec)
    batches = smoke.synthetic_batches(cfg, bare, 2)
    start_model, start_proc = fam.load(bare)
    ids = torch.as_tensor(qw.loc_token_ids(start_proc.tokenizer))
    init_rows = start_model.get_input_embeddings().weight[ids].detach().clone()
    init_out = start_model.get_output_embeddings().weight[ids].detach().clone()
    saved = _run(cfg, bare, batches, tmp_path)
    sd = {s: load_file(str(p / "adapter" / "adapter_model.safetensors")) for s, p in saved.items()}
    delta_in = next(k for k in sd[1] if "embed_tokens" in k and "trainable_tokens_delta" in k)
    delta_out = next(k for k in sd[1] if "lm_head" in k and "trainable_tokens_delta" in k)
    lora_a = sorted(k for k in sd[1] if "lora_A" in k)
    lora_b = sorted(k for k in sd[1] if "lora_B" in k)
    assert lora_a and lora_b and sd[1][delta_in].shape == sd[1][delta_out].shape == (1024, 128)
    assert not (saved[1] / "adapter" / checkpointing.EXTRA).exists()  # token rows live in the adapter file only

    for s in (1, 2):  # warm-up: the token rows move, LoRA stays at its init (B = 0, A as at step 1)
        assert _changed_rows(sd[s][delta_out], init_out) == set(range(1024))  # every bin's output row (softmax gradient)
        assert all(float(sd[s][k].abs().max()) == 0.0 for k in lora_b)
        assert all(torch.equal(sd[s][k], sd[1][k]) for k in lora_a)
    assert not torch.equal(sd[2][delta_out], sd[1][delta_out])
    assert _changed_rows(sd[2][delta_in], init_rows)  # input rows of the <|loc|> tokens the batches contain moved
    assert all(float(sd[3][k].abs().max()) > 0 for k in lora_b)  # after warm-up LoRA trains, and the rows keep training
    assert not torch.equal(sd[3][delta_out], sd[2][delta_out])

    # the adapter carries the tokenizer; inference rebuilds the same vocabulary on the base and merges the rows
    tok_dir = saved[3] / "adapter"
    assert json.loads((tok_dir / "adapter_config.json").read_text())["trainable_token_indices"]
    model, proc = checkpointing.load_for_inference(saved[3], bare, fam)
    assert len(proc.tokenizer) == len(start_proc.tokenizer)
    assert torch.equal(model.get_input_embeddings().weight[ids], sd[3][delta_in])
    assert torch.equal(model.get_output_embeddings().weight[ids], sd[3][delta_out])
    hw = fam.image_size(proc)
    texts = [g.text for g in predict.decode(model, proc, fam, [Image.new("RGB", hw)], [fmt.render_prompt("detect", "red circle", "tokens")],
                                            max_new_tokens=4)]
    assert len(texts) == 1 and isinstance(texts[0], str)
    with pytest.raises(ValueError, match="qwen2_5_vl\\+tokens"):  # read with the wrong family: refused, not misdecoded
        checkpointing.load_for_inference(saved[3], bare, family("qwen2_5_vl"))
