"""The task attention head (models/task_head.py): the module against a reference built from
torch's own multi-head attention, and its installation into the tiny PaliGemma preset (real
transformers model): off = untouched, on = the projector reads the head, trainable, saved and
re-installed with identical logits."""

import copy
import io

import pytest
import torch
from PIL import Image

from raytrain import config as config_mod
from raytrain.data import pipeline, synthetic
from raytrain.models import paligemma, task_head
from raytrain.models.task_head import TaskAttentionHead

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _reference(head: TaskAttentionHead, patches: torch.Tensor) -> torch.Tensor:
    """The same computation through nn.MultiheadAttention (pre-LN residual block + MLP + LN)."""
    d = patches.shape[-1]
    mha = torch.nn.MultiheadAttention(d, head.num_heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([head.q_proj.weight, head.k_proj.weight, head.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([head.q_proj.bias, head.k_proj.bias, head.v_proj.bias]))
        mha.out_proj.weight.copy_(head.o_proj.weight)
        mha.out_proj.bias.copy_(head.o_proj.bias)
    x = head.queries.expand(patches.shape[0], -1, -1)
    kv = head.norm_kv(patches)
    attn, weights = mha(head.norm_q(x), kv, kv, need_weights=True, average_attn_weights=True)
    x = x + attn
    x = x + head.mlp(head.norm_mlp(x))
    return head.norm_out(x), weights


def test_head_matches_torch_multihead_attention_and_shapes():
    torch.manual_seed(0)
    head = TaskAttentionHead(dim=32, num_queries=5, num_heads=4)
    patches = torch.randn(3, 11, 32)
    out, weights = head(patches, return_attention=True)
    assert out.shape == (3, 5, 32) and weights.shape == (3, 5, 11)
    ref, ref_w = _reference(head, patches)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, ref_w, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 5))
    assert torch.equal(head(patches), out)


def test_head_reads_patches_as_a_set_and_per_image():
    torch.manual_seed(1)
    head = TaskAttentionHead(dim=16, num_queries=4, num_heads=2)
    patches = torch.randn(2, 9, 16)
    out = head(patches)
    # no positional term of its own: SigLIP's embeddings carry position, the head pools over them
    torch.testing.assert_close(head(patches[:, torch.randperm(9)]), out, atol=1e-6, rtol=1e-5)
    # image 1's output does not depend on image 0's patches
    other = patches.clone()
    other[0] = torch.randn(9, 16)
    assert torch.equal(head(other)[1], out[1]) and not torch.allclose(head(other)[0], out[0])


def test_gradients_reach_the_queries_and_every_weight():
    torch.manual_seed(2)
    head = TaskAttentionHead(dim=16, num_queries=4, num_heads=2)
    patches = torch.randn(2, 9, 16, requires_grad=True)
    (head(patches) * torch.randn(2, 4, 16)).sum().backward()  # LN output sums are ~constant: weight them
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert patches.grad.abs().sum() > 0


def test_bad_sizes_fail_clearly():
    with pytest.raises(ValueError, match="num_queries"):
        TaskAttentionHead(dim=16, num_queries=0, num_heads=2)
    with pytest.raises(ValueError, match="divisible"):
        TaskAttentionHead(dim=18, num_queries=4, num_heads=4)


# ----------------------------------------------------------------------------------------------
# installed into the tiny PaliGemma


@pytest.fixture(scope="module")
def batch(tiny_model_path):
    proc = paligemma.load_processor(tiny_model_path)
    imgs, prefixes, suffixes = [], [], []
    for i in range(8):
        ex = synthetic.make_example(i, seed=5, image_size=64)
        (e,) = pipeline.examples_for(ex["objects"], ["detect"], 64, 64, "paligemma")
        imgs.append(Image.open(io.BytesIO(ex["image"])).convert("RGB"))
        prefixes.append(e["prefix"])
        suffixes.append(e["suffix"])
    enc = paligemma.encode_train(proc, imgs, prefixes, suffixes, 48)
    enc.pop("length")
    out = {k: torch.from_numpy(v) for k, v in enc.items()}
    for k in paligemma.SEQ_KEYS:
        out[k] = out[k].long()
    out["labels"] = out["labels"].long()
    return out


def _logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def test_zero_queries_is_off_and_leaves_the_model_bit_identical(tiny_model_path, batch):
    model, proc = paligemma.load(tiny_model_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = _logits(model, batch)
    assert task_head.install(model, 0, processor=proc) is None
    assert task_head.find(model) is None and not model.model.multi_modal_projector._forward_pre_hooks
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(_logits(model, batch), ref)


def test_installed_head_feeds_the_projector_and_always_trains(tiny_model_path, batch):
    model, proc = paligemma.load(tiny_model_path)
    paligemma.apply_freeze_policy(model, train_language=False)  # everything frozen
    ref = _logits(model, batch)
    torch.manual_seed(0)
    head = task_head.install(model, 16, processor=proc)
    assert model.model.task_head is head and head.num_heads == model.config.vision_config.num_attention_heads
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.task_head.{n}" for n, _ in head.named_parameters()}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(p.numel() for p in head.parameters())
    # the output norm starts as SigLIP's post_layernorm (the projector's usual input scale)
    assert torch.equal(head.norm_out.weight, model.model.vision_tower.post_layernorm.weight)
    pixels = batch["pixel_values"]
    with torch.no_grad():
        patches = model.model.vision_tower(pixels).last_hidden_state
        expect = model.model.multi_modal_projector.linear(head(patches))
        got = model.model.get_image_features(pixels).pooler_output
    torch.testing.assert_close(got, expect)
    assert not torch.allclose(_logits(model, batch), ref)
    # a deep copy hooks its own copy of the head (the hook is a bound method of the head)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.model.task_head.queries.zero_()
    assert not torch.equal(_logits(twin, batch), _logits(model, batch))


def test_head_alone_lowers_the_loss(tiny_model_path, batch):
    """Only the head trains (tower, projector and LM frozen): a few Adam steps on one batch."""
    model, proc = paligemma.load(tiny_model_path)
    paligemma.apply_freeze_policy(model, train_language=False)
    torch.manual_seed(0)
    head = task_head.install(model, 16, processor=proc)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    losses = []
    for _ in range(15):
        loss = model(**inputs, labels=batch["labels"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_save_model_then_load_reinstalls_the_head_with_identical_logits(tiny_model_path, batch, tmp_path):
    model, proc = paligemma.load(tiny_model_path)
    torch.manual_seed(3)
    task_head.install(model, 16, processor=proc)
    with torch.no_grad():  # weights unlike a fresh head's
        for p in model.model.task_head.parameters():
            p.add_(0.01 * torch.randn_like(p))
    task_head.save_model(model, tmp_path)
    proc.save_pretrained(str(tmp_path))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "task_head" in k]  # not duplicated into the HF weights
    with safe_open(str(tmp_path / task_head.FILE), "pt") as f:
        assert f.metadata()["num_queries"] == "16" and "queries" in f.keys()
    again, _ = paligemma.load(str(tmp_path))
    assert task_head.find(again) is not None
    assert torch.equal(_logits(again, batch), _logits(model, batch))


def test_load_refuses_mismatches(tiny_model_path, tmp_path):
    model, proc = paligemma.load(tiny_model_path)
    task_head.install(model, 16, processor=proc)
    task_head.save(model, tmp_path / "with")
    bare, _ = paligemma.load(tiny_model_path)
    with pytest.raises(RuntimeError, match="task_head_queries=16"):  # resume: the config must ask for it
        task_head.load(bare, tmp_path / "with", install_missing=False)
    with pytest.raises(RuntimeError, match="no task_head.safetensors"):
        task_head.load(model, tmp_path / "without", install_missing=False)
    assert task_head.load(bare, tmp_path / "without", install_missing=False) is None
    with pytest.raises(RuntimeError, match="already"):
        task_head.install(model, 16)


def test_token_count_must_match_the_prompts(tiny_model_path):
    model, proc = paligemma.load(tiny_model_path)
    with pytest.raises(ValueError, match=r"task_head_queries=8.*16 image tokens.*task_head_queries=16"):
        task_head.install(model, 8, processor=proc)
    proc.image_seq_length = 9  # a processor that would write another number of placeholders
    with pytest.raises(ValueError, match="9 image tokens"):
        task_head.install(model, 16, processor=proc)
    assert task_head.find(model) is None


def test_qwen_is_refused(tmp_path):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=128, rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, fullatt_block_indexes=[0]),
    )
    with pytest.raises(ValueError, match="PaliGemma only"):
        task_head.install(Qwen2_5_VLForConditionalGeneration(cfg), 16)


def test_config_key_defaults_off_and_is_validated():
    assert config_mod.load(None).model.task_head_queries == 0
    assert config_mod.load(None, ["model.task_head_queries=256"]).model.task_head_queries == 256
    with pytest.raises(ValueError, match=">= 0"):
        config_mod.load(None, ["model.task_head_queries=-1"])
    with pytest.raises(ValueError, match="fixed number of image tokens"):
        config_mod.load(None, ["model.family=qwen2_5_vl", "model.task_head_queries=16"])
    with pytest.raises(ValueError, match="expected int"):
        config_mod.load(None, ["model.task_head_queries=many"])


def test_real_sizes_on_the_meta_device():
    """PaliGemma 2 3B 224 px: seed 004's 256 queries fit exactly; 448 px has 1024 image tokens."""
    from raytrain.models import presets

    head = task_head.install(presets.meta_model("paligemma2-3b-224"), 256)
    assert (head.num_queries, head.num_heads, head.queries.shape[-1]) == (256, 16, 1152)
    assert sum(p.numel() for p in head.parameters()) == 16_239_744
    with pytest.raises(ValueError, match="1024 image tokens"):
        task_head.install(presets.meta_model("paligemma2-3b-448"), 256)


def test_image_features_dtype_follows_the_tower():
    """bf16 tower, fp32 head (QLoRA keeps non-quantized modules in fp32): the hook converts both ways."""
    torch.manual_seed(0)
    head = TaskAttentionHead(dim=16, num_queries=4, num_heads=2)
    feats = torch.randn(2, 4, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        (out,) = head.projector_pre_hook(None, (feats,))
        assert out.dtype == torch.bfloat16 and out.shape == (2, 4, 16)
        assert torch.equal(out, head(feats.float()).to(torch.bfloat16))
