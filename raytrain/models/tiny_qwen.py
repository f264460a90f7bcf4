"""Offline tiny Qwen2.5-VL preset: a locally trained byte-level BPE tokenizer with Qwen's special
tokens and chat template, an image-only processor, and a random-init
`Qwen2_5_VLForConditionalGeneration`, saved with `save_pretrained` so tests load it through the same
`from_pretrained` calls that load `Qwen/Qwen2.5-VL-3B-Instruct`. Nothing here touches the network.

Architecture: Qwen2.5-VL's (window-attention ViT with 2-D RoPE -> 2x2 patch merger -> Qwen2.5 decoder
with M-RoPE) at ~0.6M parameters. The default preset's processor pins min_pixels = max_pixels =
112*112: a square image becomes 8x8 patches of 14 px -> 2x2 merge -> 16 image tokens (other aspect
ratios still get their own size near 112*112 pixels under the native resize). `image_size=S` (a
multiple of 28 above 112) builds a native-resolution variant instead: min_pixels = 56*56 (the released
processors' minimum), max_pixels = S*S, so images of different sizes and aspect ratios get
different grids and image-token counts, as with a released Qwen2.5-VL; its fixed square
(`image_size(processor)`, stretch / letterbox) is S x S.

The preset saves the image-only processor of `models/qwen_processor.py` (the stock
`Qwen2_5_VLProcessor` cannot be built without a video processor).
"""

from __future__ import annotations

from pathlib import Path

from raytrain.formats.qwen import FACTOR, LOC_TOKENS, smart_resize
from raytrain.models.tiny import save_preset

IMAGE_SIDE = 112  # px; a multiple of 28 (patch 14 x merge 2)
PATCH = 14
MERGE = 2
TEMPORAL_PATCH = 2
RESIZE = {  # what raytrain_resize.json records; min == max pins the resize to one size
    "factor": FACTOR,
    "min_pixels": IMAGE_SIDE * IMAGE_SIDE,
    "max_pixels": IMAGE_SIDE * IMAGE_SIDE,
    "patch_size": PATCH,
    "merge_size": MERGE,
    "temporal_patch_size": TEMPORAL_PATCH,
}

# Qwen2.5-VL's added special tokens, in the real vocabulary's order (ids 151643..151656 there).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2's pre-tokenizer split: digits one at a time, words with one leading non-letter, newlines apart.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2.5-VL-Instruct's chat template (default system turn, image placeholders in user turns).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# What the tokenizer is trained on: the prompts and answers this project renders, plus some English.
_CORPUS = """
You are a helpful assistant. Locate every red circle in the image and output bbox_2d coordinates in JSON format.
Point to every blue square in the image and output point_2d coordinates in JSON format.
output bbox_2d coordinates normalised to 0-1 in JSON format. output point_2d location tokens in JSON format.
output a list of (phrase, [x1, y1, x2, y2]) pairs. (phrase, [x, y]) pairs.
```json [ {"bbox_2d": [12, 34, 56, 78], "label": "red circle"}, {"point_2d": [0.125, 0.5], "label": "green cross"} ] ```
[('yellow triangle', [1, 2, 3, 4]), ('cyan diamond', [5, 6])]
red green blue yellow magenta cyan orange purple white black gray grey brown pink circle square triangle diamond
cross star rectangle ellipse shape object left right top bottom middle centre center small large
person people man woman child dog cat car bus bike boat sky tree house road water hand table chair
cup bottle plate window door building street grass sign light phone book bag shirt hat head face
detect point to segment caption describe the a an of in on with and is are
"""


def build_tokenizer(vocab_size: int = 1024, loc_tokens: bool = True):
    """Byte-level BPE with Qwen2's pre-tokenizer, Qwen's special tokens (pad = <|endoftext|>,
    eos = <|im_end|>, no bos) and, unless `loc_tokens` is False (a stand-in for a released Qwen
    vocabulary), the 1024 <|loc_DDDD|> tokens of the `tokens` box representation (ordinary added
    tokens, so decoding with skip_special_tokens keeps them)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: nothing is ever unknown
        show_progress=False,
    )
    lines = [ln for ln in _CORPUS.strip().splitlines() if ln.strip()]
    tok.train_from_iterator(lines * 16, trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="right",
        model_max_length=4096,
        chat_template=CHAT_TEMPLATE,
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    if loc_tokens:
        fast.add_tokens(list(LOC_TOKENS))  # contiguous ids, bin order
    return fast


MIN_NATIVE_PIXELS = 56 * 56  # the released Qwen2.5-VL processors' min_pixels


def resize_for(image_size: int | None) -> dict:
    """The resize record of the default preset (None or IMAGE_SIDE) or of the native-resolution variant
    whose largest input is image_size x image_size pixels (module doc)."""
    return native_resize(image_size, RESIZE, IMAGE_SIDE, MIN_NATIVE_PIXELS, "tiny:qwen2_5_vl")


def native_resize(image_size: int | None, default: dict, side: int, min_native: int, preset: str) -> dict:
    """A tiny Qwen-style preset's resize record: `default` (the pinned side x side square) for None or
    `side`; else the native-resolution variant, pixels between `min_native` and image_size^2.
    ValueError for a size that is not a multiple of the merge factor above `side`."""
    if image_size in (None, side):
        return default
    factor = default["factor"]
    if image_size % factor or image_size < side:
        raise ValueError(f"{preset}'s image_size is the side of its pixel budget: a multiple of {factor} above {side}, "
                         f"got {image_size}")
    return dict(default, min_pixels=min_native, max_pixels=image_size * image_size)


def finish_model(model, tokenizer) -> None:
    """What every tiny Qwen-style preset does to its random-init model before saving: a wider
    embedding init than the 0.02 default (at this width the digits, and the <|loc|> rows where they
    exist, are otherwise nearly indistinguishable at the start), generation ending at <|im_end|> or
    <|endoftext|>, greedy, with the KV cache."""
    import torch
    from transformers import GenerationConfig

    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 0.05)
    im_end, eot = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    model.generation_config = GenerationConfig(eos_token_id=[im_end, eot], pad_token_id=eot, do_sample=False)
    model.config.use_cache = True


def build_image_processor(resize: dict = RESIZE):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        min_pixels=resize["min_pixels"],
        max_pixels=resize["max_pixels"],
        patch_size=resize["patch_size"],
        merge_size=resize["merge_size"],
        temporal_patch_size=resize["temporal_patch_size"],
    )


# The decoder's rotary base. mRoPE gives the image tokens' height / width positions the lower
# rotary frequencies; at Qwen's own base (1e6) and this preset's head width (16 frequencies, 6 each
# for height and width) those turn by < 0.03 rad per image-token step, so the 4x4 image-token grid
# is indistinguishable by position and a random-init model cannot learn WHERE (measured: pointing
# stays at the centre baseline, bench/learning.py digits). Base 10 turns them by 0.1-0.6 rad per
# step. Real checkpoints keep their own config; this is the tiny stand-in's, as the tiny
# PaliGemma's 2-D sin-cos position init is (models/tiny_paligemma.py).
ROPE_THETA = 10.0


def tiny_qwen_config(tokenizer, tie_embeddings: bool = True, rope_theta: float = ROPE_THETA):
    """The tiny architecture for `tokenizer`'s vocabulary; tie_embeddings=False gives the lm_head its
    own weight (as Qwen2.5-VL-7B and larger have; the 3B ties them)."""
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    hidden = 128
    vision = dict(
        depth=2,
        hidden_size=64,
        hidden_act="silu",
        intermediate_size=128,
        num_heads=2,
        in_channels=3,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL_PATCH,
        tokens_per_second=2,
        window_size=IMAGE_SIDE,  # px: one window covers the whole tiny image
        out_hidden_size=hidden,  # the merger projects straight into the decoder's width
        fullatt_block_indexes=[1],
    )
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        # head_dim 32 -> 16 rotary frequencies split temporal/height/width like the real 16/24/24 of 64
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": [4, 6, 6]},
        tie_word_embeddings=tie_embeddings,
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_embeddings,
    )


def build_tiny_qwen2_5_vl(out_dir: str | Path, seed: int = 0, loc_tokens: bool = True, tie_embeddings: bool = True,
                          image_size: int | None = None, rope_theta: float = ROPE_THETA) -> Path:
    """Build tokenizer + image-only processor + random-init model and `save_pretrained` them into out_dir.
    loc_tokens=False, tie_embeddings=False: a stand-in for a released Qwen2.5-VL-7B (no <|loc|> tokens
    in the vocabulary, untied lm_head), what the `tokens` box format has to add tokens to.
    image_size: None (or IMAGE_SIDE) = the default preset; a larger multiple of 28 = the native-resolution
    variant with that pixel budget (`resize_for`)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from raytrain.models.qwen_processor import Qwen2_5_VLImageOnlyProcessor

    resize = resize_for(image_size)
    side = int(image_size or IMAGE_SIDE)
    assert smart_resize(side, side, resize["factor"], resize["min_pixels"], resize["max_pixels"]) == (side, side)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(loc_tokens=loc_tokens)
    processor = Qwen2_5_VLImageOnlyProcessor(build_image_processor(resize), tokenizer, chat_template=CHAT_TEMPLATE)
    cfg = tiny_qwen_config(tokenizer, tie_embeddings=tie_embeddings, rope_theta=rope_theta)

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    finish_model(model, tokenizer)

    return save_preset(out_dir, model, processor,
                       {"preset": "tiny:qwen2_5_vl", "seed": seed, "image_size": [side, side], "resize": resize})
