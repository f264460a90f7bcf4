"""Qwen3-VL processors: the image-only processor the tiny Qwen3-VL preset saves, and loading a
processor for a hub id or a directory (its resize record checked, models/qwen_resize.py).

The stock `Qwen3VLProcessor` cannot be built without a video processor, as Qwen2.5-VL's cannot
(models/qwen_processor.py). For still images Qwen3-VL's processor does what Qwen2.5-VL's does
(Qwen2-VL's image processor, `<|image_pad|>` expanded to grid_t*grid_h*grid_w / merge**2 tokens,
`image_grid_thw`, `mm_token_type_ids`), only with 16-px patches: so the Qwen3-VL image-only
processor is Qwen2.5-VL's under its own name, which `processor_config.json` records and
`load_processor` reads to pick it. Hub ids keep going through AutoProcessor.
"""

from __future__ import annotations

from pathlib import Path

from raytrain.models.qwen_processor import Qwen2_5_VLImageOnlyProcessor, _saved_processor_class
from raytrain.models.qwen_processor import load_processor as load_qwen_processor
from raytrain.models.qwen_resize import RESIZE_RECORD, check_resize


class Qwen3VLImageOnlyProcessor(Qwen2_5_VLImageOnlyProcessor):
    """Qwen3-VL processor without a video processor: image processor + tokenizer + chat template
    (the outputs of `Qwen3VLProcessor` for image+text input). Saved and loaded under its own
    class name so a directory says which family's processor it holds."""


def load_processor(path: str):
    """The image-only processor when the saved processor_config.json names it (the tiny preset);
    otherwise what models/qwen_processor.py loads (AutoProcessor for hub ids and stock saved
    processors). Checks `raytrain_resize.json` when present."""
    local = Path(path)
    if not (local.is_dir() and _saved_processor_class(local) == Qwen3VLImageOnlyProcessor.__name__):
        return load_qwen_processor(path)
    processor = Qwen3VLImageOnlyProcessor.from_pretrained(path)
    if (local / RESIZE_RECORD).is_file():
        check_resize(processor, local)
    return processor
