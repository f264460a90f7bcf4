"""Model families. Each module exposes the same functions (load, load_processor,
lora_target_modules, encode_train, encode_prompts, generate, loc_token_ids)."""

import importlib
from types import ModuleType

FAMILIES = {"paligemma": "raytrain.models.paligemma", "qwen2_5_vl": "raytrain.models.qwen2_5_vl"}


def family(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])
