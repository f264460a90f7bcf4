"""PaliGemma's real-size presets: the released checkpoints' architectures rebuilt in code (no
download), for parameter counts, memory estimates and random-weight benchmarks (models/presets.py).
The numbers: see models/presets.py's table and tests/unit/models/test_presets.py."""

from __future__ import annotations

import functools

from raytrain.models.preset_spec import Preset

PALIGEMMA_VOCAB = 257216
PALIGEMMA_IMAGE_TOKEN_ID = 257152  # "<image>", the first id after the 256000-word Gemma vocabulary + 1152 loc/seg
SIGLIP_PATCH = 14

# Decoder shapes: (width, layers, heads, kv heads, head_dim, MLP width, query_pre_attn_scalar)
_GEMMA = {
    "gemma-2b": (2048, 18, 8, 1, 256, 16384, None),
    "gemma2-2b": (2304, 26, 8, 4, 256, 9216, 256),
    "gemma2-9b": (3584, 42, 16, 8, 256, 14336, 256),
    # Gemma 2 27B scales queries by 1/sqrt(width / heads) = 1/sqrt(144), not 1/sqrt(head_dim).
    "gemma2-27b": (4608, 46, 32, 16, 128, 36864, 144),
}


def _siglip_so400m(image_size: int, projection_dim: int):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        num_channels=3,
        image_size=image_size,
        patch_size=SIGLIP_PATCH,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        vision_use_head=False,  # PaliGemma uses the patch tokens, not SigLIP's pooled embedding
        projection_dim=projection_dim,
    )


def _paligemma_config(decoder: str, image_size: int):
    from transformers import Gemma2Config, GemmaConfig, PaliGemmaConfig

    width, layers, heads, kv, head_dim, mlp, qscale = _GEMMA[decoder]
    common = {
        "vocab_size": PALIGEMMA_VOCAB,
        "hidden_size": width,
        "intermediate_size": mlp,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
    }
    if decoder.startswith("gemma2"):
        text = Gemma2Config(
            **common,
            query_pre_attn_scalar=qscale,
            sliding_window=4096,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        )
    else:
        text = GemmaConfig(**common)
    return PaliGemmaConfig(
        vision_config=_siglip_so400m(image_size, width),
        text_config=text,
        image_token_index=PALIGEMMA_IMAGE_TOKEN_ID,
        vocab_size=PALIGEMMA_VOCAB,
        projection_dim=width,
        hidden_size=width,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )


def real_presets() -> list[Preset]:
    """PaliGemma 1 / 2 at 224, 448 and 896 px (the released google/paligemma* checkpoints)."""
    out = []
    pg = [("paligemma-3b", "google/paligemma-3b-pt-{res}", "gemma-2b")] + [
        (f"paligemma2-{size}", f"google/paligemma2-{size}-pt-{{res}}", dec)
        for size, dec in (("3b", "gemma2-2b"), ("10b", "gemma2-9b"), ("28b", "gemma2-27b"))
    ]
    for stem, hub, decoder in pg:
        for res in (224, 448, 896):
            out.append(Preset(
                name=f"{stem}-{res}",
                family="paligemma",
                hub_id=hub.format(res=res),
                image_size=res,
                image_tokens=(res // SIGLIP_PATCH) ** 2,
                config_fn=functools.partial(_paligemma_config, decoder, res),
            ))
    return out
