"""Offline tiny Qwen3-VL preset: the tiny Qwen tokenizer (models/tiny_qwen.py) with Qwen3-VL's chat
template and <think> tokens, the image-only processor of models/qwen3_processor.py, and a random-init
`Qwen3VLForConditionalGeneration`, saved with `save_pretrained` so tests load it through the same
`from_pretrained` calls that load `Qwen/Qwen3-VL-4B-Instruct`. Nothing here touches the network.

Architecture: Qwen3-VL's (ViT with learned + 2-D rotary positions and LayerNorm, 2x2 patch merger,
DeepStack mergers feeding early decoder layers -> Qwen3 decoder with q/k norms and interleaved
M-RoPE) at ~0.6M parameters. Patches are 16 px (Qwen2.5-VL: 14), so the merge factor is 32 px: the
default preset's processor pins min_pixels = max_pixels = 128*128, a square image becomes 8x8
patches -> 2x2 merge -> 16 image tokens (other aspect ratios get their own size near 128*128 pixels
under the native resize). `image_size=S` (a multiple of 32 above 128) builds the native-resolution
variant: min_pixels = 64*64, max_pixels = S*S, so sizes and aspect ratios give different grids.
"""

from __future__ import annotations

from pathlib import Path

from raytrain.formats.qwen import smart_resize
from raytrain.models import tiny_qwen
from raytrain.models.tiny import save_preset

IMAGE_SIDE = 128  # px; a multiple of 32 (patch 16 x merge 2)
PATCH = 16
MERGE = 2
FACTOR = PATCH * MERGE
RESIZE = {  # what raytrain_resize.json records; min == max pins the resize to one size
    "factor": FACTOR,
    "min_pixels": IMAGE_SIDE * IMAGE_SIDE,
    "max_pixels": IMAGE_SIDE * IMAGE_SIDE,
    "patch_size": PATCH,
    "merge_size": MERGE,
    "temporal_patch_size": 2,
}
MIN_NATIVE_PIXELS = 64 * 64  # the native variant's floor: 4x4 patches, one 2x2 image-token grid
THINK_TOKENS = ["<think>", "</think>"]  # Qwen3's reasoning markers (ordinary added tokens there too)
IMAGE_MEAN = [0.5, 0.5, 0.5]  # Qwen3-VL's preprocessor_config.json (Qwen2.5-VL: CLIP's mean / std)

# Qwen3-VL-Instruct's chat template for the turns raytrain writes (system, user with an image and
# text, assistant): unlike Qwen2.5-VL's there is NO default system turn, and the generation prompt
# opens the assistant turn without a <think> block (the Thinking checkpoints add one).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Why a rotary base of 10 and not Qwen3-VL's 5e6: see tiny_qwen.ROPE_THETA. Qwen3-VL interleaves the
# height / width frequencies across the spectrum (Qwen2.5-VL gives them the low ones), but with 16
# frequencies at 5e6 only one height (0.38 rad) and one width frequency (0.15 rad per image-token
# step) turn by more than 0.03 rad, too little for a random-init model to learn WHERE in a 4x4
# grid; at 10 all ten turn by 0.13-0.87 rad per step.
ROPE_THETA = 10.0


def build_tokenizer():
    """Tiny Qwen byte-level BPE (no <|loc|> tokens: Qwen3-VL writes digits) with Qwen3-VL's chat
    template and the <think> / </think> markers."""
    tok = tiny_qwen.build_tokenizer(loc_tokens=False)
    tok.chat_template = CHAT_TEMPLATE
    tok.add_tokens(THINK_TOKENS)
    return tok


def resize_for(image_size: int | None) -> dict:
    """The resize record of the default preset (None or IMAGE_SIDE) or of the native-resolution
    variant whose largest input is image_size x image_size pixels (module doc)."""
    return tiny_qwen.native_resize(image_size, RESIZE, IMAGE_SIDE, MIN_NATIVE_PIXELS, "tiny:qwen3_vl")


def tiny_qwen3_config(tokenizer, rope_theta: float = ROPE_THETA):
    """The tiny architecture for `tokenizer`'s vocabulary (tied embeddings, as Qwen3-VL 2B / 4B)."""
    from transformers import Qwen3VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tiny_qwen.SPECIAL_TOKENS}
    hidden = 128
    vision = dict(
        depth=2,
        hidden_size=64,
        hidden_act="gelu_pytorch_tanh",
        intermediate_size=128,
        num_heads=2,
        in_channels=3,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=2,
        out_hidden_size=hidden,  # the mergers project straight into the decoder's width
        num_position_embeddings=(IMAGE_SIDE // PATCH) ** 2,  # an 8x8 learned grid, resampled per image
        deepstack_visual_indexes=[0],  # block 0's features join after decoder layer 0 (real: 3 of 27)
    )
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        # 16 rotary frequencies: temporal / height / width interleaved 6 / 5 / 5 like the real 24 / 20 / 20 of 64
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": [6, 5, 5], "mrope_interleaved": True},
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def build_tiny_qwen3_vl(out_dir: str | Path, seed: int = 0, image_size: int | None = None, rope_theta: float = ROPE_THETA) -> Path:
    """Build tokenizer + image-only processor + random-init model and `save_pretrained` them into
    out_dir. image_size: None (or IMAGE_SIDE) = the default preset; a larger multiple of 32 = the
    native-resolution variant with that pixel budget (`resize_for`)."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from raytrain.models.qwen3_processor import Qwen3VLImageOnlyProcessor

    resize = resize_for(image_size)
    side = int(image_size or IMAGE_SIDE)
    assert smart_resize(side, side, resize["factor"], resize["min_pixels"], resize["max_pixels"]) == (side, side)
    tokenizer = build_tokenizer()
    image_processor = tiny_qwen.build_image_processor(resize)
    image_processor.image_mean, image_processor.image_std = list(IMAGE_MEAN), list(IMAGE_MEAN)
    processor = Qwen3VLImageOnlyProcessor(image_processor, tokenizer, chat_template=CHAT_TEMPLATE)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(tiny_qwen3_config(tokenizer, rope_theta))
    tiny_qwen.finish_model(model, tokenizer)
    return save_preset(Path(out_dir), model, processor,
                       {"preset": "tiny:qwen3_vl", "seed": seed, "image_size": [side, side], "resize": resize})
