"""Qwen3-VL's real-size presets: the released Qwen/Qwen3-VL-*-Instruct architectures rebuilt in code
(no download), for parameter counts, memory estimates and random-weight benchmarks (models/presets.py).

Numbers from the checkpoints' config.json (text_config / vision_config), as republished in
fine-tunes of them and in ollama's GGUF metadata of the same models:

    decoder      width  layers  heads  kv  head_dim  MLP     tied  ViT (depth, width, MLP, DeepStack)
    2B           2048   28      16     8   128       6144    yes   24, 1024, 4096, [5, 11, 17]
    4B           2560   36      32     8   128       9728    yes   24, 1024, 4096, [5, 11, 17]
    8B           4096   36      32     8   128       12288   no    27, 1152, 4304, [8, 16, 24]
    32B          5120   64      64     8   128       25600   no    27, 1152, 4304, [8, 16, 24]
    30B-A3B MoE  2048   48      32     4   128       128 experts x 768, top 8   no   27, 1152, 4304, [8, 16, 24]

All: vocabulary 151936, rope theta 5e6 with interleaved M-RoPE sections 24/20/20, 16-px patches x 2
frames, 2x2 merge, a 48x48 learned position grid, 16 ViT heads, QK-norm decoder without biases.

The MoE model is `Qwen3VLMoeForConditionalGeneration` (family qwen3_vl's `hf_model_class` picks the
class by the config's model_type). Its experts are fused 3-D parameters, not nn.Linear layers: the
memory planner counts them as bf16 weights that neither bitsandbytes quantizes nor LoRA's linear
targets adapt (peft's `target_modules` reach the attention only), which is what training them
through transformers does. Its activations are those of the 8 experts a token uses, 8 x 768 = 6144
= the config's intermediate_size, the width the planner reads.

Nominal image: 512x512 -> (512 / 16)**2 = 1024 patches, merged 2x2 -> 256 LM tokens (Qwen2.5-VL's
presets: 448 px for the same 256 tokens with 14-px patches).
"""

from __future__ import annotations

import functools

from raytrain.models.preset_spec import Preset

PATCH = 16
MERGE = 2
NOMINAL_IMAGE = 512
VOCAB = 151936
SMALL_VIT = (24, 1024, 4096, [5, 11, 17])  # (depth, width, MLP width, DeepStack block indexes)
LARGE_VIT = (27, 1152, 4304, [8, 16, 24])

# (width, layers, heads, kv heads, MLP width, tied embeddings, ViT)
DENSE = {
    "2b": (2048, 28, 16, 8, 6144, True, SMALL_VIT),
    "4b": (2560, 36, 32, 8, 9728, True, SMALL_VIT),
    "8b": (4096, 36, 32, 8, 12288, False, LARGE_VIT),
    "32b": (5120, 64, 64, 8, 25600, False, LARGE_VIT),
}
# (width, layers, heads, kv heads, experts, experts per token, expert MLP width, ViT)
MOE = {"30b-a3b": (2048, 48, 32, 4, 128, 8, 768, LARGE_VIT)}


def _vision(vit, out_width: int) -> dict:
    depth, width, mlp, deepstack = vit
    return {
        "depth": depth,
        "hidden_size": width,
        "hidden_act": "gelu_pytorch_tanh",
        "intermediate_size": mlp,
        "num_heads": 16,
        "in_channels": 3,
        "patch_size": PATCH,
        "spatial_merge_size": MERGE,
        "temporal_patch_size": 2,
        "out_hidden_size": out_width,  # the mergers project straight into the decoder's width
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": list(deepstack),
    }


def _text(width: int, layers: int, heads: int, kv: int, tied: bool) -> dict:
    return {
        "vocab_size": VOCAB,
        "hidden_size": width,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": 128,
        "hidden_act": "silu",
        "max_position_embeddings": 262144,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20], "mrope_interleaved": True},
        "tie_word_embeddings": tied,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    }


_TOKEN_IDS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653}


def _dense_config(size: str):
    from transformers import Qwen3VLConfig

    width, layers, heads, kv, mlp, tied, vit = DENSE[size]
    text = dict(_text(width, layers, heads, kv, tied), intermediate_size=mlp)
    return Qwen3VLConfig(text_config=text, vision_config=_vision(vit, width), tie_word_embeddings=tied, **_TOKEN_IDS)


def _moe_config(size: str):
    from transformers import Qwen3VLMoeConfig

    width, layers, heads, kv, experts, top_k, expert_mlp, vit = MOE[size]
    text = dict(_text(width, layers, heads, kv, False), intermediate_size=top_k * expert_mlp, moe_intermediate_size=expert_mlp,
                num_experts=experts, num_experts_per_tok=top_k, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
    return Qwen3VLMoeConfig(text_config=text, vision_config=_vision(vit, width), tie_word_embeddings=False, **_TOKEN_IDS)


def real_presets() -> list[Preset]:
    """Qwen3-VL 2B / 4B / 8B / 32B and 30B-A3B Instruct at the nominal 512x512 image."""
    tokens = (NOMINAL_IMAGE // (PATCH * MERGE)) ** 2
    builds = [(s, _dense_config) for s in DENSE] + [(s, _moe_config) for s in MOE]
    return [
        Preset(
            name=f"qwen3-vl-{size}",
            family="qwen3_vl",
            hub_id=f"Qwen/Qwen3-VL-{size.upper()}-Instruct",
            image_size=NOMINAL_IMAGE,
            image_tokens=tokens,
            config_fn=functools.partial(build, size),
        )
        for size, build in builds
    ]
