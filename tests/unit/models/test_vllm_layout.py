"""models/vllm_layout.py: every spelling of a weight name maps to the published one, once."""

import pytest

from raytrain.models import vllm_layout

CASES = {
    "paligemma": [
        # transformers 5 module name, transformers 5.25 save_pretrained, published (google/paligemma2-*)
        ("model.vision_tower.encoder.layers.0.self_attn.q_proj.weight", "vision_tower.encoder.layers.0.self_attn.q_proj.weight",
         "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"),
        ("model.language_model.layers.1.mlp.up_proj.weight", "language_model.model.layers.1.mlp.up_proj.weight",
         "language_model.model.layers.1.mlp.up_proj.weight"),
        ("model.multi_modal_projector.linear.bias", "multi_modal_projector.linear.bias", "multi_modal_projector.linear.bias"),
        ("lm_head.weight", "language_model.lm_head.weight", "language_model.lm_head.weight"),
    ],
    "qwen2_5_vl": [
        ("model.language_model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight",
         "model.layers.0.self_attn.q_proj.weight"),
        ("model.visual.blocks.1.attn.qkv.weight", "visual.blocks.1.attn.qkv.weight", "visual.blocks.1.attn.qkv.weight"),
        ("model.language_model.embed_tokens.weight", "model.embed_tokens.weight", "model.embed_tokens.weight"),
        ("lm_head.weight", "lm_head.weight", "lm_head.weight"),
    ],
}


@pytest.mark.parametrize("fam", sorted(CASES))
def test_every_spelling_maps_to_the_published_name_and_stays_there(fam):
    for runtime, saved, published in CASES[fam]:
        assert vllm_layout.published_name(fam, runtime) == published
        assert vllm_layout.published_name(fam, saved) == published
        assert vllm_layout.published_name(fam, published) == published  # idempotent
        assert vllm_layout.is_published(fam, published)
    assert not vllm_layout.is_published("paligemma", "vision_tower.encoder.layers.0.mlp.fc1.weight")


def test_names_without_a_place_are_refused():
    with pytest.raises(ValueError, match="no place"):
        vllm_layout.published_name("paligemma", "model.task_head.queries")  # seed 004's head: no released architecture has it
    with pytest.raises(ValueError, match="unknown model family"):
        vllm_layout.published_name("llava", "model.x")


def test_vllm_lora_scopes():
    assert vllm_layout.vllm_lora_scope("paligemma", "language_model.model.layers.0.self_attn.q_proj") == "language"
    assert vllm_layout.vllm_lora_scope("paligemma", "vision_tower.vision_model.encoder.layers.0.mlp.fc1") == "tower"
    assert vllm_layout.vllm_lora_scope("paligemma", "multi_modal_projector.linear") is None  # merged into the base
    assert vllm_layout.vllm_lora_scope("qwen2_5_vl", "visual.merger.mlp.0") == "connector"
    assert vllm_layout.vllm_lora_scope("qwen2_5_vl", "visual.blocks.0.attn.qkv") == "tower"
    assert vllm_layout.vllm_lora_scope("qwen2_5_vl", "model.layers.0.mlp.gate_proj") == "language"
