"""Model families. Each module exposes the same functions (load, load_processor,
lora_target_modules, encode_train, encode_prompts, generate, loc_token_ids).

A family SPEC names the module and, where the family offers several, how it writes boxes:
"qwen2_5_vl" (absolute pixels, the default), "qwen2_5_vl+normalized", "qwen2_5_vl+tokens",
"qwen2_5_vl+pairs". `family(spec)` returns the module itself for a plain name, or the module's view
bound to that box format (its `with_box_format`), which every caller uses exactly like the module.
The spec is what the recipes record in state.json ("family") and what eval/serve take, so a
checkpoint is always read in the format it was trained in. `family_spec(cfg.model.family,
cfg.model.box_format)` builds it from the config."""

import importlib
from types import ModuleType

FAMILIES = {"paligemma": "raytrain.models.paligemma", "qwen2_5_vl": "raytrain.models.qwen2_5_vl"}
BOX_FORMATS = ("absolute", "normalized", "tokens", "pairs")
DEFAULT_BOX_FORMAT = "absolute"


def family_spec(name: str, box_format: str = DEFAULT_BOX_FORMAT) -> str:
    """'qwen2_5_vl', 'tokens' -> 'qwen2_5_vl+tokens'; the default format adds nothing."""
    return name if box_format == DEFAULT_BOX_FORMAT else f"{name}+{box_format}"


def parse_family_spec(spec: str) -> tuple[str, str]:
    """'qwen2_5_vl+tokens' -> ('qwen2_5_vl', 'tokens'); raises ValueError for unknown parts."""
    name, _, box_format = spec.partition("+")
    box_format = box_format or DEFAULT_BOX_FORMAT
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    if box_format not in BOX_FORMATS:
        raise ValueError(f"unknown box format {box_format!r} in family {spec!r}; known: {list(BOX_FORMATS)}")
    return name, box_format


def family(spec: str):
    """The family module for `spec` (a plain family name), or its view bound to the spec's box format."""
    name, box_format = parse_family_spec(spec)
    module: ModuleType = importlib.import_module(FAMILIES[name])
    if box_format == DEFAULT_BOX_FORMAT:
        return module
    bind = getattr(module, "with_box_format", None)
    if bind is None:
        raise ValueError(f"model family {name!r} writes boxes in its own fixed format; box format {box_format!r} applies to qwen2_5_vl only")
    return bind(box_format)
