"""Qwen3-VL's real-size presets (2B, 4B, 8B, 32B, 30B-A3B MoE): configs as the released
config.json files give them, parameter counts against the checkpoints' tensors, and what the memory
planner makes of them. Meta device only."""

from __future__ import annotations

import pytest

from raytrain.models import memory, presets

NAMES = ("qwen3-vl-2b", "qwen3-vl-4b", "qwen3-vl-8b", "qwen3-vl-32b", "qwen3-vl-30b-a3b")


@pytest.mark.parametrize(
    "name,width,layers,heads,kv,mlp,tied,vit",
    [
        ("qwen3-vl-2b", 2048, 28, 16, 8, 6144, True, (24, 1024, 4096, [5, 11, 17])),
        ("qwen3-vl-4b", 2560, 36, 32, 8, 9728, True, (24, 1024, 4096, [5, 11, 17])),
        ("qwen3-vl-8b", 4096, 36, 32, 8, 12288, False, (27, 1152, 4304, [8, 16, 24])),
        ("qwen3-vl-32b", 5120, 64, 64, 8, 25600, False, (27, 1152, 4304, [8, 16, 24])),
        ("qwen3-vl-30b-a3b", 2048, 48, 32, 4, 6144, False, (27, 1152, 4304, [8, 16, 24])),
    ],
)
def test_shapes(name, width, layers, heads, kv, mlp, tied, vit):
    cfg = presets.build_config(name)
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.intermediate_size,
            t.vocab_size) == (width, layers, heads, kv, 128, mlp, 151936)
    assert bool(cfg.tie_word_embeddings) == tied
    assert t.rope_parameters["rope_theta"] == 5e6 and t.rope_parameters["mrope_section"] == [24, 20, 20]
    assert (v.depth, v.hidden_size, v.intermediate_size, list(v.deepstack_visual_indexes)) == vit
    assert (v.patch_size, v.spatial_merge_size, v.num_heads, v.num_position_embeddings, v.out_hidden_size) == (16, 2, 16, 2304, width)
    p = presets.PRESETS[name]
    assert (p.family, p.image_size, p.image_tokens) == ("qwen3_vl", 512, 256) and p.hub_id.startswith("Qwen/Qwen3-VL-")
    if name.endswith("a3b"):
        assert cfg.model_type == "qwen3_vl_moe" and p.hub_id == "Qwen/Qwen3-VL-30B-A3B-Instruct"
        assert (t.num_experts, t.num_experts_per_tok, t.moe_intermediate_size) == (128, 8, 768)  # 8 x 768 = the intermediate_size above


def test_2b_counts_are_the_checkpoints():
    # Qwen3-VL-2B-Instruct's tensors (OpenExplorer's model card, counted from the upstream
    # checkpoint): 2.128B in all, ViT 407.0M (blocks + merger + DeepStack mergers), LM 1.721B.
    c = presets.count_params("qwen3-vl-2b")
    assert c["total"] == pytest.approx(2.128e9, rel=5e-4)
    assert c["vision"] + c["projector"] == pytest.approx(407.0e6, rel=5e-4)
    assert c["language"] == pytest.approx(1.721e9, rel=5e-4)
    assert c["embeddings"] == 151936 * 2048  # tied lm_head: counted once


@pytest.mark.parametrize("name,billions", [("qwen3-vl-4b", 4.44), ("qwen3-vl-8b", 8.77), ("qwen3-vl-32b", 33.4), ("qwen3-vl-30b-a3b", 31.1)])
def test_totals_follow_the_architecture(name, billions):
    """Decoder: embeddings + layers x (attention + MLP or experts + router + norms); the rest is the
    ViT and its mergers. The totals land on the size the checkpoints are published at."""
    cfg = presets.build_config(name)
    t = cfg.text_config
    h, q, kv = t.hidden_size, t.num_attention_heads * 128, t.num_key_value_heads * 128
    attn = h * q + 2 * h * kv + q * h + 2 * 128  # q, k, v, o + q / k norms
    if cfg.model_type == "qwen3_vl_moe":
        mlp = t.num_experts * 3 * h * t.moe_intermediate_size + t.num_experts * h  # experts + router
    else:
        mlp = 3 * h * t.intermediate_size
    emb = t.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
    c = presets.count_params(name)
    assert c["language"] == emb + t.num_hidden_layers * (attn + mlp + 2 * h) + h
    assert c["total"] == pytest.approx(billions * 1e9, rel=0.01)


def test_component_split_and_lora_reach():
    q = presets.count_params("qwen3-vl-8b")
    merger = 4608 * 4608 + 4608 + 4608 * 4096 + 4096 + 2 * 1152  # norm on the ViT width, 2x2 patches -> 4608
    deepstack = 3 * (4608 * 4608 + 4608 + 4608 * 4096 + 4096 + 2 * 4608)  # norm after the 2x2 shuffle
    assert q["projector"] == merger + deepstack
    # LoRA on every decoder linear: the MoE's experts are fused parameters, not nn.Linear, so only
    # its attention is adapted (what peft's target_modules reach in transformers 5)
    assert memory.lora_params("qwen3-vl-30b-a3b", r=8) == 48 * 8 * ((2048 + 4096) * 2 + (2048 + 512) * 2)
    assert memory.lora_params("qwen3-vl-8b", r=8) == 36 * 8 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + 3 * (4096 + 12288))


@pytest.mark.parametrize("name", NAMES)
def test_memory_cli(name, capsys):
    assert memory.main([name, "--gpu-gb", "80"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{name} (Qwen/Qwen3-VL-") and "256 image tokens" in out
    assert all(s in out for s in memory.STRATEGIES) and "recommended: " in out


def test_memory_numbers():
    kw = {"micro_batch": 1, "seq_len": 256}
    est = {n: {s: memory.estimate(n, s, **memory._kwargs_for(s, kw)) for s in memory.STRATEGIES} for n in NAMES}
    for n in NAMES:
        total = presets.count_params(n)["total"]
        assert est[n]["lora_bf16"].weights_gb == pytest.approx(total * 2 / 2**30)
        assert est[n]["lora_bf16"].breakdown["tokens_per_example"] == 256 + 256
    # one 80 GB GPU: full fine-tuning up to 8B (8 B/param), LoRA on 32B (bf16 weights 62 GiB),
    # and the MoE's bf16 experts leave QLoRA little to quantize (its linears are the attention)
    assert memory.recommend("qwen3-vl-8b", 80, **kw) == "full_bf16"
    assert memory.recommend("qwen3-vl-32b", 80, **kw) == "lora_bf16"
    assert est["qwen3-vl-32b"]["qlora_4bit"].weights_gb < 0.35 * est["qwen3-vl-32b"]["lora_bf16"].weights_gb
    assert est["qwen3-vl-30b-a3b"]["qlora_4bit"].weights_gb > 0.9 * est["qwen3-vl-30b-a3b"]["lora_bf16"].weights_gb
    # the ViT is a LayerNorm / plain-MLP tower: counted as such
    text, vision = memory.towers(presets.build_config("qwen3-vl-8b"), "qwen3_vl")
    assert (vision.layers, vision.width, vision.rms, vision.gated, vision.rotary) == (27, 1152, False, False, True)
    assert (text.q, text.kv, text.mlp) == (4096, 1024, 12288)
