"""Packed rows train exactly as the same examples unpacked (issue 15), on both tiny presets, in
float32: the loss and every parameter's gradient agree within 1e-5. The examples come through the
real pipeline stages (decode_and_expand -> tokenize -> data/packing.py pack_batch -> the recipes'
batch_to_model) and the loss is the recipes' own (`loop.training_loss`: distance-aware <loc>
targets, the number loss on digit coordinates via num_place, focal, GIoU). Qwen2.5-VL examples are
photographs of different aspect ratios at native resolution, so a batch mixes image-token counts.

Negative controls show the test can fail: rows whose positions do not restart per example (so
attention and rotary positions cross examples) change the loss.

Also: the M-RoPE positions a packed row carries are those transformers' own `get_rope_index`
computes per example; exact mid-epoch resume still holds with packed batches (Ray-free recipe);
the packed batches' example keys are what the checkpoint records.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from PIL import Image

from raytrain import config as config_mod
from raytrain.data import packing, pipeline, synthetic
from raytrain.formats.annotations import Box, Point, objects_to_json
from raytrain.models import ensure_preset, family, qwen_batch
from raytrain.recipes import ddp
from raytrain.training import loop
from raytrain.training.session import Session, collate

pytestmark = pytest.mark.integration

LOSS = ["loss.loc_sigma=60", "loss.number_weight=1.0", "loss.focal_gamma=1.0", "loss.box_iou_weight=0.5"]


@pytest.fixture(scope="module")
def qwen_native_path(tmp_path_factory):
    """The tiny Qwen2.5-VL's native-resolution variant (min 56*56, max 224*224 pixels)."""
    return str(ensure_preset("tiny:qwen2_5_vl", tmp_path_factory.mktemp("qwen-native"), image_size=224))


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def photo_rows() -> dict:
    """Shard rows (the pipeline's input) of photographs at six different aspect ratios, two boxes
    and a point each, in source pixels."""
    from skimage import data as skd

    photos = {"astronaut": skd.astronaut(), "coffee": skd.coffee(), "chelsea": skd.chelsea(), "rocket": skd.rocket(),
              "tall": skd.astronaut()[:, 150:330], "wide": skd.coffee()[120:260]}
    rows = {k: [] for k in ("id", "image", "width", "height", "objects")}
    for name, a in photos.items():
        h, w = a.shape[:2]
        objs = [Box(0.1 * w, 0.2 * h, 0.6 * w, 0.7 * h, "thing"), Box(0.3 * w, 0.05 * h, 0.95 * w, 0.5 * h, "thing"),
                Point(0.4 * w, 0.45 * h, "spot")]
        for k, v in zip(rows, (name, _png(np.ascontiguousarray(a)), w, h, objects_to_json(objs))):
            rows[k].append(v)
    return {k: np.array(v, dtype=object) if k in ("id", "image", "objects") else np.array(v) for k, v in rows.items()}


def synthetic_rows(n: int, seed: int = 3) -> dict:
    rows = {k: [] for k in ("id", "image", "width", "height", "objects")}
    for i in range(n):
        ex = synthetic.make_example(i, seed=seed, image_size=64, shapes_per_image=1 + i % 2)
        for k in rows:
            rows[k].append(objects_to_json(ex[k]) if k == "objects" else ex[k])
    return {k: np.array(v, dtype=object) if k in ("id", "image", "objects") else np.array(v) for k, v in rows.items()}


def tokenized(rows: dict, spec: str, model_path: str, tasks, max_len: int, resize: str) -> dict:
    """The training pipeline's stages on `rows` (what prepare_block runs in a Ray task)."""
    fam = family(spec)
    proc = fam.load_processor(model_path)
    prep = config_mod.Preprocess(resize=resize)
    examples = pipeline.decode_and_expand(rows, split="train", tasks=tasks, image_hw=fam.input_frame(proc, resize), family=spec,
                                          preprocess=prep)
    return pipeline.tokenize(examples, split="train", model_path=model_path, max_len=max_len, family=spec)


def loss_and_grads(model, fam, loss_fn, batch: dict) -> tuple[float, dict]:
    inputs, targets = loop.batch_to_model(collate(dict(batch)), fam, torch.device("cpu"), torch.float32)
    model.zero_grad(set_to_none=True)
    out = model(**inputs, use_cache=False)
    loss, _ = loss_fn(out.logits, targets)
    loss.backward()
    return float(loss.detach()), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _loss_fn(cfg, fam, proc, model):
    digits = fam.digit_token_ids(proc.tokenizer)
    return loop.training_loss(cfg, proc.tokenizer, torch.as_tensor(fam.loc_token_ids(proc.tokenizer)),
                              model.get_output_embeddings().weight.shape[0], None if digits is None else torch.as_tensor(digits))


def _compare(model, fam, loss_fn, enc: dict, packed: dict) -> tuple[float, float]:
    l1, g1 = loss_and_grads(model, fam, loss_fn, enc)
    l2, g2 = loss_and_grads(model, fam, loss_fn, packed)
    assert g1.keys() == g2.keys() and len(g1) > 10
    grad = max(float((g1[k] - g2[k]).abs().max()) for k in g1)
    return abs(l1 - l2), grad


@pytest.mark.parametrize("spec", ["paligemma", "qwen2_5_vl"])
def test_packed_equals_unpacked_loss_and_gradients(spec, tiny_model_path, qwen_native_path, one_torch_thread):
    qwen = spec.startswith("qwen")
    path = qwen_native_path if qwen else tiny_model_path
    fam = family(spec)
    cfg = config_mod.load(None, [f"model.family={spec}", "train.strategy=full", "model.freeze_vision=false", *LOSS])
    model, proc = fam.load(path)
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():  # random init is near-uniform: spread the logits so the loss terms are not flat
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    rows = photo_rows() if qwen else synthetic_rows(6)
    enc = tokenized(rows, spec, path, ["detect", "point"], 480 if qwen else 48, cfg.data.preprocess.resize)
    n = len(enc["input_ids"])
    lengths = enc["attention_mask"].sum(1)
    if qwen:  # native resolution: a batch of different image sizes, so different image-token counts
        assert len({tuple(g) for g in enc["image_grid_thw"].tolist()}) >= 4
        assert len(set(enc["mm_token_type_ids"].sum(1).tolist())) >= 4
        assert enc["num_place"].any()  # the number loss has digits to weigh
    length = int(lengths.max()) * 2 + 7
    packed = packing.pack_batch(enc, family=spec, length=length, pad_id=proc.tokenizer.pad_token_id)
    rows_of = [len(k) for k in packed["example_keys"]]
    assert sum(rows_of) == n and len(rows_of) < n and max(rows_of) >= 2  # several examples per row
    assert sorted(np.concatenate(list(packed["example_keys"])).tolist()) == sorted(enc["example_keys"].ravel().tolist())
    dl, dg = _compare(model, fam, _loss_fn(cfg, fam, proc, model), enc, packed)
    print(f"{spec}: {n} examples in {len(rows_of)} packed rows; |loss diff| {dl:.2e}, max |grad diff| {dg:.2e}")
    assert dl <= 1e-5 and dg <= 1e-5, (dl, dg)

    # negative control: positions that run on across a row let examples attend to (and be rotated
    # relative to) each other; the same tokens then give another loss
    crossing = dict(packed)
    pos = np.asarray(packed["position_ids"]).copy()
    pos[...] = np.arange(pos.shape[-1]) + (1 if not qwen else 0)
    crossing["position_ids"] = pos
    wrong, _ = loss_and_grads(model, fam, _loss_fn(cfg, fam, proc, model), crossing)
    right, _ = loss_and_grads(model, fam, _loss_fn(cfg, fam, proc, model), packed)
    print(f"{spec}: negative control (positions crossing examples) |loss diff| {abs(wrong - right):.2e}")
    assert abs(wrong - right) > 1e-4, (wrong, right)


def test_prefix_lm_mask_is_each_examples_own(tiny_model_path, one_torch_thread):
    """PaliGemma: a packed example's prefix tokens see the rest of ITS prefix (bidirectional) and
    nothing of the other examples: changing another example's tokens leaves its logits unchanged,
    while its own prefix tokens see a later prefix token of their own example."""
    fam = family("paligemma")
    model, proc = fam.load(tiny_model_path)
    model.eval()
    enc = tokenized(synthetic_rows(4), "paligemma", tiny_model_path, ["detect"], 48, "stretch")
    packed = packing.pack_batch({k: v[:2] for k, v in enc.items()}, family="paligemma", length=100, pad_id=proc.tokenizer.pad_token_id)
    n0 = int(enc["attention_mask"][0].sum())

    def logits(batch):
        inputs, _ = loop.batch_to_model(collate(dict(batch)), fam, torch.device("cpu"), torch.float32)
        with torch.no_grad():
            return model(**inputs, use_cache=False).logits[0]

    n1 = int(enc["attention_mask"][1].sum())
    base = logits(packed)
    other = dict(packed)
    ids = packed["input_ids"].copy()
    ids[0, n0 + n1 - 3:n0 + n1 - 1] = ids[0, n0 - 2]  # answer tokens of the SECOND example
    other["input_ids"] = ids
    changed = logits(other)
    assert torch.allclose(changed[:n0], base[:n0], atol=1e-6)  # the first example does not see them ...
    assert not torch.allclose(changed[n0:], base[n0:], atol=1e-6)  # ... its own example does
    own = dict(packed)
    ids = packed["input_ids"].copy()
    last_prefix = int(np.nonzero(packed["token_type_ids"][0, :n0] == 0)[0].max())
    ids[0, last_prefix] = ids[0, last_prefix + 1]  # the first example's last prefix token
    own["input_ids"] = ids
    assert not torch.allclose(logits(own)[0], base[0], atol=1e-6)  # its first token sees it: bidirectional prefix


def test_rope_positions_are_the_models_own(qwen_native_path):
    model, proc = family("qwen2_5_vl").load(qwen_native_path)
    enc = tokenized(photo_rows(), "qwen2_5_vl", qwen_native_path, ["detect"], 480, "native")
    ids, mm = torch.as_tensor(enc["input_ids"]).long(), torch.as_tensor(enc["mm_token_type_ids"]).long()
    grid = torch.as_tensor(enc["image_grid_thw"])
    pos, _ = model.model.get_rope_index(ids, mm, grid, attention_mask=torch.as_tensor(enc["attention_mask"]).long())
    for i in range(len(ids)):
        n = int(enc["attention_mask"][i].sum())
        mine = qwen_batch.rope_positions(enc["mm_token_type_ids"][i][:n], enc["image_grid_thw"][i:i + 1], 2)
        assert (pos[:, i, :n].numpy() == mine).all(), i
    assert qwen_batch.merge_size({"image_grid_thw": enc["image_grid_thw"][0], "mm_token_type_ids": enc["mm_token_type_ids"][0]}) == 2


# ---------------------------------------------------------------------------- resume with packing


def _packed_batches(model_path, micro=2):
    enc = tokenized(synthetic_rows(40, seed=5), "paligemma", model_path, ["detect"], 48, "stretch")
    proc = family("paligemma").load_processor(model_path)
    packed = packing.pack_batch(enc, family="paligemma", length=100, pad_id=proc.tokenizer.pad_token_id)
    n = len(packed["input_ids"])
    return [collate({k: v[i:i + micro] for k, v in packed.items()}) for i in range(0, n - micro + 1, micro)]


def test_exact_mid_epoch_resume_with_packed_batches(tiny_model_path, one_torch_thread, run_until):
    cfg = config_mod.load(None, ["train.steps=10", "train.micro_batch_size=2", "train.grad_accum=2", "train.warmup_steps=2",
                                 "train.log_every=1", "train.checkpoint_every=4", "train.lr=3e-3", "train.strategy=lora",
                                 "lora.r=4", "lora.alpha=8", "lora.dropout=0.1", "data.packing=100"])
    batches = _packed_batches(tiny_model_path)
    per_epoch = len(batches) // 2  # optimizer steps per epoch
    assert 2 <= per_epoch < 10 and all(len(k) >= 2 for b in batches for k in b["example_keys"])

    full, _ = run_until(cfg, tiny_model_path, batches)
    first, saved = run_until(cfg, tiny_model_path, batches, stop_after=6)
    resumed, _ = run_until(cfg, tiny_model_path, batches, resume_dir=saved[-1])
    assert sorted(resumed) == list(range(5, 11))
    for step in range(5, 11):
        assert abs(resumed[step] - full[step]) <= 1e-6, (step, resumed[step], full[step])

    # the step-4 checkpoint records the examples its epoch trained on: those of its batches so far
    import json

    state = json.loads((saved[-1] / "state.json").read_text())
    keys = np.load(saved[-1] / loop.POSITION_FILE)
    drawn = 4 * 2  # steps x accumulation
    epoch, in_epoch = divmod(drawn, len(batches))
    assert (state["epoch"], state["batch_in_epoch"]) == (epoch, in_epoch)
    want = np.concatenate([np.concatenate([np.asarray(k) for k in b["example_keys"]]) for b in batches[:in_epoch]])
    assert sorted(keys.tolist()) == sorted(want.tolist()) and state["samples_in_epoch"] == len(want)


# ---------------------------------------------------------------------------- both recipes


_ZERO_WORKER = """
import json, sys, contextlib, torch
from raytrain import config as config_mod
from raytrain.recipes import zero
from raytrain.training.session import Session
args = json.loads(sys.argv[1])
torch.set_num_threads(1)
batches = torch.load(args["data"], weights_only=False)
rows = []
session = Session(rank=0, world_size=1, checkpoint_dir=lambda: None, report=lambda m, d: rows.append(m),
                  epoch_batches=lambda e, m: [dict(b) for b in batches])
zero.train(config_mod.load(None, args["overrides"]), args["model_path"], session, torch.device("cpu"))
print("FIRST_LOSS", json.dumps(rows[0]["loss"]), flush=True)
"""


def test_zero_recipe_trains_packed_rows_as_unpacked(tiny_model_path, tmp_path, one_torch_thread):
    """recipes/zero.py (ZeRO-3, one rank, its own process) on packed rows: its first-step loss
    equals the DDP recipe's on the same examples unpacked (same weights, before any update)."""
    import json
    import subprocess
    import sys

    enc = tokenized(synthetic_rows(6), "paligemma", tiny_model_path, ["detect", "point"], 48, "stretch")
    proc = family("paligemma").load_processor(tiny_model_path)
    packed = packing.pack_batch(enc, family="paligemma", length=100, pad_id=proc.tokenizer.pad_token_id)
    n, rows = len(enc["input_ids"]), len(packed["input_ids"])
    base = ["train.steps=1", "train.warmup_steps=0", "train.log_every=1", "train.checkpoint_every=100", "model.freeze_vision=false", *LOSS]

    reports = []
    session = Session(rank=0, world_size=1, checkpoint_dir=lambda: None, report=lambda m, d: reports.append(m),
                      epoch_batches=lambda e, m: [collate(dict(enc))])
    with contextlib.chdir(tmp_path):
        ddp.train(config_mod.load(None, ["train.strategy=full", f"train.micro_batch_size={n}", *base]), tiny_model_path, session,
                  torch.device("cpu"), wrap_ddp=lambda m: m)
    torch.save([collate(dict(packed))], tmp_path / "packed.pt")
    args = {"data": str(tmp_path / "packed.pt"), "model_path": tiny_model_path,
            "overrides": ["train.strategy=zero3", f"train.micro_batch_size={rows}", *base]}
    out = subprocess.run([sys.executable, "-c", _ZERO_WORKER, json.dumps(args)], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    zero_loss = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("FIRST_LOSS")).split()[1])  # DeepSpeed logs too
    print(f"first-step loss: ddp unpacked {reports[0]['loss']:.7f}, zero3 packed {zero_loss:.7f}")
    assert abs(zero_loss - reports[0]["loss"]) <= 1e-4, (zero_loss, reports[0]["loss"])  # test_zero.py's tolerance across recipes
