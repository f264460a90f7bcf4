"""What a real-size preset is (`Preset`): each family's preset module lists its released
checkpoints as these (models/presets_<family>.py), and models/presets.py collects them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    """Short name, the key in PRESETS (e.g. 'paligemma2-3b-224', 'qwen2.5-vl-7b')."""
    family: str
    """'paligemma' | 'qwen2_5_vl' (the raytrain.models.<family> module that loads it)."""
    hub_id: str
    """Hugging Face repository of the released weights."""
    image_size: int
    """Square input side in pixels (nominal for Qwen2.5-VL, which resizes dynamically)."""
    image_tokens: int
    """Tokens one image occupies in the language model's sequence."""
    config_fn: Callable[[], object]
    """Builds a fresh transformers config for this checkpoint."""
