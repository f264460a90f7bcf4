"""Qwen2.5-VL's real-size presets: the released checkpoints' architectures rebuilt in code (no
download), for parameter counts, memory estimates and random-weight benchmarks (models/presets.py).
The numbers: see models/presets.py's table and tests/unit/models/test_presets.py."""

from __future__ import annotations

import functools

from raytrain.models.preset_spec import Preset

QWEN_PATCH = 14
QWEN_MERGE = 2
QWEN_NOMINAL_IMAGE = 448

# (width, layers, heads, kv heads, MLP width, vocab, tied embeddings, ViT MLP width)
_QWEN = {
    "3b": (2048, 36, 16, 2, 11008, 151936, True, 3420),
    "7b": (3584, 28, 28, 4, 18944, 152064, False, 3420),
    "32b": (5120, 64, 40, 8, 27648, 152064, False, 3456),
    "72b": (8192, 80, 64, 8, 29568, 152064, False, 3456),
}


def _qwen2_5_vl_config(size: str):
    from transformers import Qwen2_5_VLConfig

    width, layers, heads, kv, mlp, vocab, tied, vit_mlp = _QWEN[size]
    vision = {
        "depth": 32,
        "hidden_size": 1280,
        "hidden_act": "silu",
        "intermediate_size": vit_mlp,
        "num_heads": 16,
        "in_channels": 3,
        "patch_size": QWEN_PATCH,
        "spatial_merge_size": QWEN_MERGE,
        "temporal_patch_size": 2,
        "tokens_per_second": 2,
        "window_size": 112,
        "out_hidden_size": width,  # the merger projects straight into the decoder's width
        "fullatt_block_indexes": [7, 15, 23, 31],
    }
    text = {
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": mlp,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "hidden_act": "silu",
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": layers,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        "tie_word_embeddings": tied,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        tie_word_embeddings=tied,
    )


def real_presets() -> list[Preset]:
    """Qwen2.5-VL 3B / 7B / 32B / 72B Instruct at the nominal 448x448 image."""
    return [
        Preset(
            name=f"qwen2.5-vl-{size}",
            family="qwen2_5_vl",
            hub_id=f"Qwen/Qwen2.5-VL-{size.upper()}-Instruct",
            image_size=QWEN_NOMINAL_IMAGE,
            image_tokens=(QWEN_NOMINAL_IMAGE // (QWEN_PATCH * QWEN_MERGE)) ** 2,
            config_fn=functools.partial(_qwen2_5_vl_config, size),
        )
        for size in _QWEN
    ]
