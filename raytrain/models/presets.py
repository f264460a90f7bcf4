"""Real-size architecture presets, built in code (no hub download).

Each preset names a released checkpoint (`hub_id`) and rebuilds its architecture config by hand, so
that we can count parameters, estimate memory (`raytrain.models.memory`) and build random-weight
models of the real shape for GPU benchmarks without fetching gigabytes of weights.

Families and the numbers behind them (checked against the checkpoints' config.json and published
parameter counts; see tests/unit/models/test_presets.py):

PaliGemma (`family="paligemma"`): SigLIP-So400m/14 encoder (27 layers, width 1152, MLP 4304,
16 heads, 14x14-pixel patches, no pooling head) -> one linear projector (1152 -> LM width) ->
Gemma decoder, vocabulary 257216 (256000 text + 1024 <loc> + 128 <seg> + 64 spare).
Image tokens = (image_size / 14)**2: 224 -> 256, 448 -> 1024, 896 -> 4096.

    decoder            width  layers  heads  kv  head_dim  MLP     published total
    Gemma 2B (PG1 3B)  2048   18      8      1   256       16384   2.92B
    Gemma 2 2B (3B)    2304   26      8      4   256       9216    3.03B
    Gemma 2 9B (10B)   3584   42      16     8   256       14336   9.66B
    Gemma 2 27B (28B)  4608   46      32     16  128       36864   27.65B

Qwen2.5-VL (`family="qwen2_5_vl"`): window-attention ViT (32 blocks, width 1280, 16 heads,
SwiGLU MLP 3420 for 3B/7B and 3456 for 32B/72B, RMSNorm, 14x14 patches x 2 frames, full attention in
blocks 7/15/23/31, window 112 px) -> patch merger (2x2 patches -> 5120 -> MLP -> LM width) ->
Qwen2.5 decoder (M-RoPE sections 16/24/24, rope theta 1e6, QKV bias).

    decoder       width  layers  heads  kv  MLP     vocab   tied  published total
    Qwen2.5 3B    2048   36      16     2   11008   151936  yes   3.75B
    Qwen2.5 7B    3584   28      28     4   18944   152064  no    8.29B
    Qwen2.5 32B   5120   64      40     8   27648   152064  no    33.5B
    Qwen2.5 72B   8192   80      64     8   29568   152064  no    73.4B

Qwen2.5-VL reads images at their own resolution (`smart_resize` to multiples of 28 px), so its
image token count varies per image. The Qwen presets use a nominal 448x448 image:
(448 / 14)**2 = 1024 patches, merged 2x2 -> 256 LM tokens. That is what memory estimates and
benchmarks assume; the training pipeline decides the real resolution.
"""

from __future__ import annotations

import functools

from raytrain.models import family as model_family
from raytrain.models.preset_spec import Preset

# ---------------------------------------------------------------------------- registry


def _build_presets() -> dict[str, Preset]:
    """Every family's real-size presets (its `real_presets` member), by name."""
    from raytrain.models import FAMILIES

    presets: dict[str, Preset] = {}
    for name in FAMILIES:
        for p in model_family(name).real_presets():
            presets[p.name] = p
    return presets


PRESETS: dict[str, Preset] = _build_presets()


def get(name: str) -> Preset:
    """The preset called `name`; also accepts its hub id (e.g. 'google/paligemma2-3b-pt-224')."""
    if name in PRESETS:
        return PRESETS[name]
    for p in PRESETS.values():
        if p.hub_id.lower() == name.lower():
            return p
    raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")


def build_config(name: str):
    """A fresh transformers config (PaliGemmaConfig or Qwen2_5_VLConfig) for preset `name`."""
    return get(name).config_fn()


def _model_class(family_name: str):
    return model_family(family_name).hf_model_class()


def random_model(name: str, dtype="bfloat16", device="cpu", *, seed: int = 0, attn_implementation: str | None = None):
    """Random-weight model of the real architecture, created directly on `device` in `dtype`
    (for GPU throughput/memory benchmarks; real weights come from `from_pretrained(hub_id)`).

    Needs the full memory of the model on `device` (2 bytes/param in bf16): 28B -> ~55 GiB.
    `attn_implementation`: None = transformers' default for the architecture ('eager' for Gemma 2,
    which SDPA cannot softcap; 'sdpa' otherwise), or e.g. 'flash_attention_2'.
    """
    import torch

    preset = get(name)
    cfg = preset.config_fn()
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    torch.manual_seed(seed)
    kwargs = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with torch.device(device):
        model = _model_class(preset.family)._from_config(cfg, **kwargs)
    return model


@functools.cache
def meta_model(name: str):
    """The model of preset `name` on the meta device: real shapes, no storage (fast, ~no memory).
    Cached: treat it as read-only."""
    import torch

    preset = get(name)
    cfg = preset.config_fn()
    with torch.device("meta"):
        return _model_class(preset.family)._from_config(cfg)


def _component(family_name: str, param_name: str) -> str:
    """'vision' | 'projector' | 'language' for a parameter name of the transformers 5 layout."""
    return model_family(family_name).component(param_name)


@functools.cache
def param_inventory(name: str) -> dict[str, int]:
    """Parameter counts of preset `name` by (component, kind), from the meta-device model.

    Keys are '<component>.<kind>' with component in vision | projector | language and kind in
    linear (weights of nn.Linear layers inside the towers: what bitsandbytes quantizes and LoRA
    adapts), embedding (token embeddings and an untied lm_head), other (norms, biases, patch and
    position embeddings). Tied weights are counted once.
    """
    import torch

    preset = get(name)
    model = meta_model(name)
    linear_weights = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod_name != "lm_head":
            linear_weights.add(f"{mod_name}.weight")
    embeddings = {
        f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding) and "language_model" in n
    }
    embeddings.add("lm_head.weight")
    inv: dict[str, int] = {}
    for pname, p in model.named_parameters():  # named_parameters() yields a tied tensor once
        kind = "linear" if pname in linear_weights else "embedding" if pname in embeddings else "other"
        key = f"{_component(preset.family, pname)}.{kind}"
        inv[key] = inv.get(key, 0) + p.numel()
    return inv


def count_params(name: str) -> dict[str, int]:
    """{total, vision, projector, language, embeddings} parameter counts of preset `name`.

    vision = the image encoder without its projector; projector = PaliGemma's linear projector or
    Qwen2.5-VL's patch merger; language = the decoder including token embeddings and an untied
    lm_head; embeddings = those embedding matrices alone (a subset of language). Tied embeddings
    count once. total = vision + projector + language.
    """
    inv = param_inventory(name)
    out = {c: sum(v for k, v in inv.items() if k.startswith(c + ".")) for c in ("vision", "projector", "language")}
    out["total"] = out["vision"] + out["projector"] + out["language"]
    out["embeddings"] = inv.get("language.embedding", 0)
    return out


def linear_shapes(name: str, component: str = "language") -> list[tuple[str, int, int]]:
    """(module name, in_features, out_features) of every nn.Linear in `component` (lm_head excluded)."""
    import torch

    preset = get(name)
    out = []
    for mod_name, mod in meta_model(name).named_modules():
        if (
            isinstance(mod, torch.nn.Linear)
            and mod_name != "lm_head"
            and _component(preset.family, mod_name + ".weight") == component
        ):
            out.append((mod_name, mod.in_features, mod.out_features))
    return out
