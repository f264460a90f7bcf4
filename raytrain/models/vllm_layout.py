"""Weight names of the published checkpoints, per family: what vLLM's loaders read.

Why a separate layout: transformers 5 renames weights on load and writes them back in its own way.
For Qwen2.5-VL what `save_pretrained` writes (transformers 5.25: `model.layers.*`, `visual.*`) is
already the layout of the released Qwen/Qwen2.5-VL-*-Instruct checkpoints. For PaliGemma it is not:
transformers flattened SigLIP (5.6+: no inner `vision_model` module), so the vision tower is saved
as `vision_tower.encoder.*` where the released google/paligemma2-* checkpoints (and vLLM's loader)
have `vision_tower.vision_model.encoder.*`. vLLM maps names with the model's `hf_to_vllm_mapper`
(vllm/model_executor/models/paligemma.py, qwen2_5_vl.py) onto its own modules, whose SigLIP keeps
the `vision_model` level (vllm/model_executor/models/siglip.py, SiglipVisionModel), so the flat
names match nothing: weights fail to load and a vision-tower LoRA is silently ignored.

`published_name(family, name)` maps any of the three spellings (transformers 5 module names,
transformers' saved names, published names) of a weight or module to the published one; it is
idempotent and raises for a name the published layout has no place for (e.g. the task head of
models/task_head.py, which no released architecture has). transformers 5 reads the published
layout back (tests/integration/test_export.py loads it and compares logits), so one folder serves
both. `vllm_lora_scope` says where vLLM can apply a LoRA on a (published) module name.

Each family declares its layout as data (`PUBLISHED_RENAMES`, `VLLM_LORA_SCOPES` on the family
class: (prefix as it may come, published prefix), first match wins; (published prefix, vLLM LoRA
scope), longest wins); the functions here apply them, so a new family adds its tables, not code.
"""

from __future__ import annotations

def _rules(family, attr: str) -> tuple:
    """The family's table (`PUBLISHED_RENAMES` / `VLLM_LORA_SCOPES`, data of its module); `family`
    is a family object or a spec / name."""
    from raytrain.models import family as model_family  # the family registry (no cycle: families do not import this)

    return getattr(model_family(family), attr)


def published_name(family_name: str, name: str) -> str:
    """The published-layout spelling of a weight (or module) name of family `family_name`.
    ValueError for a name the layout has no place for."""
    for old, new in _rules(family_name, "PUBLISHED_RENAMES"):
        if name.startswith(old):
            return new + name[len(old):]
    raise ValueError(f"{family_name}: weight {name!r} has no place in the published checkpoint layout")


def is_published(family_name: str, name: str) -> bool:
    """True when `name` is already spelled as in the published layout."""
    try:
        return published_name(family_name, name) == name
    except ValueError:
        return False


def vllm_lora_scope(family_name: str, published_module: str) -> str | None:
    """'language' | 'tower' | 'connector' for a module (published name) vLLM can carry a LoRA on;
    None where vLLM has no LoRA for it (merge that LoRA into the base weights instead)."""
    best = None
    for prefix, scope in _rules(family_name, "VLLM_LORA_SCOPES"):
        if published_module.startswith(prefix) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, scope)
    return best[1] if best else None
