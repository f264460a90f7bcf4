"""Real-size presets: configs build, meta-device models instantiate, shapes and parameter counts
match the released checkpoints. Meta device only: nothing allocates real weights."""

from __future__ import annotations

import pytest

from raytrain.models import presets

# Published totals. PaliGemma: keras-hub's preset metadata (exact counts; keras pads the vocabulary
# to 257152 rows where the HF checkpoints have 257216, i.e. 64 x width fewer parameters).
# Qwen2.5-VL: the Hugging Face model pages (safetensors parameter count).
PUBLISHED = {
    "paligemma-3b-224": 2_923_335_408 + 64 * 2048,
    "paligemma-3b-448": 2_924_220_144 + 64 * 2048,
    "paligemma-3b-896": 2_927_759_088 + 64 * 2048,
    "paligemma2-3b-224": 3_032_094_960 + 64 * 2304,
    "paligemma2-3b-448": 3_032_979_696 + 64 * 2304,
    "paligemma2-3b-896": 3_036_518_640 + 64 * 2304,
    "paligemma2-10b-224": 9_662_409_456 + 64 * 3584,
    "paligemma2-10b-448": 9_663_294_192 + 64 * 3584,
    "paligemma2-10b-896": 9_666_833_136 + 64 * 3584,
    "paligemma2-28b-224": 27_650_192_112 + 64 * 4608,
    "qwen2.5-vl-3b": 3.75e9,
    "qwen2.5-vl-7b": 8.29e9,
    "qwen2.5-vl-32b": 33.5e9,
    "qwen2.5-vl-72b": 73.4e9,
}


def test_registry_covers_all_sizes():
    expected = {f"paligemma-3b-{r}" for r in (224, 448, 896)}
    expected |= {f"paligemma2-{s}-{r}" for s in ("3b", "10b", "28b") for r in (224, 448, 896)}
    expected |= {f"qwen2.5-vl-{s}" for s in ("3b", "7b", "32b", "72b")}
    expected |= {f"qwen3-vl-{s}" for s in ("2b", "4b", "8b", "32b", "30b-a3b")}  # tests/unit/models/test_presets_qwen3_vl.py
    assert set(presets.PRESETS) == expected
    assert presets.PRESETS["paligemma2-10b-448"].hub_id == "google/paligemma2-10b-pt-448"
    assert presets.PRESETS["paligemma-3b-896"].hub_id == "google/paligemma-3b-pt-896"
    assert presets.PRESETS["qwen2.5-vl-72b"].hub_id == "Qwen/Qwen2.5-VL-72B-Instruct"
    assert presets.get("google/paligemma2-3b-pt-224").name == "paligemma2-3b-224"
    with pytest.raises(KeyError):
        presets.get("paligemma2-3b-999")


@pytest.mark.parametrize("res,tokens", [(224, 256), (448, 1024), (896, 4096)])
def test_paligemma_image_tokens(res, tokens):
    # SigLIP So400m/14: (res / 14)^2 patch tokens, all passed to the decoder
    for stem in ("paligemma-3b", "paligemma2-3b", "paligemma2-10b", "paligemma2-28b"):
        p = presets.PRESETS[f"{stem}-{res}"]
        assert p.image_tokens == tokens
        cfg = presets.build_config(p.name)
        assert cfg.vision_config.patch_size == 14
        assert cfg.vision_config.image_size == res
        assert cfg.text_config.num_image_tokens == tokens  # what the processor's image_seq_length must be


@pytest.mark.parametrize(
    "name,width,layers,heads,kv,head_dim,mlp",
    [
        ("paligemma-3b-224", 2048, 18, 8, 1, 256, 16384),
        ("paligemma2-3b-224", 2304, 26, 8, 4, 256, 9216),
        ("paligemma2-10b-224", 3584, 42, 16, 8, 256, 14336),
        ("paligemma2-28b-224", 4608, 46, 32, 16, 128, 36864),
    ],
)
def test_paligemma_shapes(name, width, layers, heads, kv, head_dim, mlp):
    cfg = presets.build_config(name)
    t, v = cfg.text_config, cfg.vision_config
    assert (
        t.hidden_size,
        t.num_hidden_layers,
        t.num_attention_heads,
        t.num_key_value_heads,
        t.head_dim,
        t.intermediate_size,
    ) == (width, layers, heads, kv, head_dim, mlp)
    assert t.vocab_size == cfg.vocab_size == 257216
    assert cfg.image_token_id == 257152
    assert cfg.projection_dim == v.projection_dim == width
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads) == (1152, 4304, 27, 16)
    assert not v.vision_use_head
    assert cfg.tie_word_embeddings
    if name.startswith("paligemma2"):
        assert t.model_type == "gemma2"
        assert t.final_logit_softcapping == 30.0 and t.attn_logit_softcapping == 50.0
        assert t.query_pre_attn_scalar == (144 if "28b" in name else 256)
    else:
        assert t.model_type == "gemma"


@pytest.mark.parametrize(
    "name,width,layers,heads,kv,mlp,vocab,tied",
    [
        ("qwen2.5-vl-3b", 2048, 36, 16, 2, 11008, 151936, True),
        ("qwen2.5-vl-7b", 3584, 28, 28, 4, 18944, 152064, False),
        ("qwen2.5-vl-32b", 5120, 64, 40, 8, 27648, 152064, False),
        ("qwen2.5-vl-72b", 8192, 80, 64, 8, 29568, 152064, False),
    ],
)
def test_qwen_shapes(name, width, layers, heads, kv, mlp, vocab, tied):
    cfg = presets.build_config(name)
    t, v = cfg.text_config, cfg.vision_config
    assert (
        t.hidden_size,
        t.num_hidden_layers,
        t.num_attention_heads,
        t.num_key_value_heads,
        t.intermediate_size,
        t.vocab_size,
    ) == (width, layers, heads, kv, mlp, vocab)
    assert bool(cfg.tie_word_embeddings) == tied
    assert t.rope_parameters["mrope_section"] == [16, 24, 24]
    assert (v.depth, v.hidden_size, v.num_heads, v.patch_size, v.spatial_merge_size, v.window_size) == (
        32,
        1280,
        16,
        14,
        2,
        112,
    )
    assert list(v.fullatt_block_indexes) == [7, 15, 23, 31]
    assert v.out_hidden_size == width  # the merger projects into the decoder's width
    p = presets.PRESETS[name]
    assert p.image_tokens == (p.image_size // 28) ** 2 == 256


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_every_preset_instantiates_on_meta(name):
    model = presets.meta_model(name)
    w = next(model.parameters())
    assert w.device.type == "meta"
    counts = presets.count_params(name)
    assert counts["total"] == counts["vision"] + counts["projector"] + counts["language"]
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert 0 < counts["embeddings"] < counts["language"]
    if name in PUBLISHED:
        assert counts["total"] == pytest.approx(PUBLISHED[name], rel=0.01)


def test_paligemma_counts_exact():
    # Our PaliGemma architectures reproduce the published counts to the parameter.
    for name, n in PUBLISHED.items():
        if name.startswith("paligemma"):
            assert presets.count_params(name)["total"] == n, name


def test_component_split():
    c = presets.count_params("paligemma2-3b-224")
    assert c["vision"] == pytest.approx(412e6, rel=0.01)  # SigLIP So400m without its head
    assert c["projector"] == 1152 * 2304 + 2304
    assert c["embeddings"] == 257216 * 2304  # tied with lm_head: counted once
    q = presets.count_params("qwen2.5-vl-7b")
    assert q["vision"] + q["projector"] == pytest.approx(676.6e6, rel=0.002)  # model card: ViT 676.6M
    assert q["language"] == pytest.approx(7.616e9, rel=0.002)  # Qwen2.5-7B
    assert q["embeddings"] == 2 * 152064 * 3584  # untied lm_head


def test_seed000_lora_count():
    # seed 000: PaliGemma 2 3B, LoRA r=8 on q/k/v/o/gate/up/down of the decoder: "~10.4 million".
    from raytrain.models.memory import lora_params

    assert lora_params("paligemma2-3b-224", r=8, targets="all-linear") == pytest.approx(10.4e6, rel=0.01)


def test_random_model_on_meta():
    # random_model goes through _from_config on the requested device; exercise it on meta
    import torch

    model = presets.random_model("paligemma2-3b-224", dtype="bfloat16", device="meta")
    w = model.get_input_embeddings().weight
    assert w.device.type == "meta" and w.dtype == torch.bfloat16
    assert tuple(w.shape) == (257216, 2304)
