"""Offline tiny PaliGemma preset: a locally trained tokenizer and a random-init model, saved with
`save_pretrained` so that tests and the demo load them through the SAME `from_pretrained` path that
loads `google/paligemma2-3b-pt-224` for real users. Nothing here touches the network.

The tiny PaliGemma mirrors PaliGemma 2's architecture (SigLIP encoder -> linear projector -> Gemma 2
decoder) at ~0.6M parameters: 64-px images, 16-px patches -> 16 image tokens.
"""

from __future__ import annotations

from pathlib import Path

from raytrain.formats.paligemma import NUM_LOC, NUM_SEG, loc_token, seg_token
from raytrain.models.tiny import save_preset

DEFAULT_IMAGE_SIZE = 64

# Words the tokenizer is trained on: the synthetic task vocabulary plus a little general English,
# so that prompts of converted datasets still tokenize into sub-words rather than <unk>.
_CORPUS = """
point to detect segment caption en describe the image a an of in on with and is are red green blue
yellow magenta cyan orange purple white black gray grey brown pink circle square triangle diamond
cross star rectangle ellipse shape object left right top bottom middle centre center small large
person people man woman child dog cat car bus bike boat sky tree house road water hand table chair
cup bottle plate window door building street grass sign light phone book bag shirt hat head face
"""


def build_tokenizer(extra_words: str = ""):
    """A small BPE tokenizer (sentencepiece-style metaspace) with Gemma's special-token layout
    (<pad>=0, <eos>=1, <bos>=2, <unk>=3), `<image>`, 1024 `<locNNNN>` and 128 `<segNNN>` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
        # "\n" must be a token: the PaliGemma processor ends every prefix with it.
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()-_/<>=[]{}#%&*+\n"),
        show_progress=False,
    )
    words = (_CORPUS + " " + extra_words).split()
    # Every word many times, in sliding phrases, so each becomes a single token where the vocab allows.
    corpus = [" ".join(words[i : i + 8]) for i in range(0, len(words))] * 8
    tok.train_from_iterator(corpus, trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        padding_side="right",
        model_max_length=4096,
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    # Same order as the real PaliGemma vocabulary: 1024 locs then 128 segs, contiguous ids.
    fast.add_tokens([loc_token(i) for i in range(NUM_LOC)] + [seg_token(i) for i in range(NUM_SEG)])
    return fast


def _sincos_2d(grid: int, dim: int):
    """2-D sin-cos position embeddings (MAE-style), (grid*grid, dim). Random-init SigLIP position
    embeddings make the tiny model slow to learn *where* things are; a fixed 2-D layout fixes that."""
    import torch

    assert dim % 4 == 0, dim
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij")
    omega = 1.0 / (10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4)))
    out = []
    for coord in (ys.flatten(), xs.flatten()):
        arg = coord[:, None] * omega[None, :]
        out += [torch.sin(arg), torch.cos(arg)]
    return torch.cat(out, dim=1)


def tiny_paligemma_config(vocab_size: int, image_token_id: int, pad_token_id: int, image_size: int = 64):
    from transformers import Gemma2Config, PaliGemmaConfig, SiglipVisionConfig

    patch = 16
    vision = SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
        vision_use_head=False,
    )
    text = Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        sliding_window=512,
        pad_token_id=pad_token_id,
        bos_token_id=2,
        eos_token_id=1,
        attn_implementation="eager",
    )
    cfg = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        projection_dim=text.hidden_size,
        hidden_size=text.hidden_size,
    )
    cfg.vision_config.projection_dim = text.hidden_size
    return cfg, (image_size // patch) ** 2


def build_tiny_paligemma(out_dir: str | Path, seed: int = 0, image_size: int | None = None) -> Path:
    """Build tokenizer + processor + random-init model and `save_pretrained` them into out_dir.
    image_size: a multiple of 16 (the patch size), default 64 (16 image tokens); 224 gives
    PaliGemma-224's token layout at tiny width."""
    import torch
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    image_size = DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
    if image_size <= 0 or image_size % 16:
        raise ValueError(f"image_size must be a positive multiple of 16 (the patch size), got {image_size}")
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    cfg, n_img_tokens = tiny_paligemma_config(len(tokenizer), image_token_id, tokenizer.pad_token_id, image_size)

    image_processor = SiglipImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )
    image_processor.image_seq_length = n_img_tokens
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)

    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(cfg)
    with torch.no_grad():
        # Larger embedding init (std 0.05, vs 0.02) separates the 1024 <loc> rows at random init;
        # measured on this preset: it is what lets pointing leave the "constant location" collapse.
        emb = model.get_input_embeddings()
        emb.weight.normal_(0.0, 0.05)
        pos = model.model.vision_tower.embeddings.position_embedding
        grid = image_size // 16
        pos.weight.copy_(_sincos_2d(grid, pos.weight.shape[1]) * 0.5)
    model.config.use_cache = True

    return save_preset(out_dir, model, processor, {"preset": "tiny:paligemma", "seed": seed, "image_size": image_size})
