"""Qwen2.5-VL processors: the image-only processor the tiny preset saves, and loading a processor
for a hub id or a directory (its resize record checked, models/qwen_resize.py).

Why an image-only processor: the stock `Qwen2_5_VLProcessor` cannot be built or loaded without a
video processor, and the tiny preset has no video. `Qwen2_5_VLImageOnlyProcessor` holds only the
image processor and the tokenizer, produces the same inputs (`<|image_pad|>` expansion,
`image_grid_thw`, `mm_token_type_ids`), and says so in `processor_config.json` ("processor_class"),
which is what `load_processor` reads to pick it; hub ids keep going through AutoProcessor.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers.processing_utils import ProcessorMixin

from raytrain.models.qwen_resize import RESIZE_RECORD, check_resize, write_resize_record


class Qwen2_5_VLImageOnlyProcessor(ProcessorMixin):
    """Qwen2.5-VL processor without a video processor: image processor + tokenizer + chat template.

    Same outputs as `Qwen2_5_VLProcessor` for image+text input: each `<|image_pad|>` expands to
    grid_t*grid_h*grid_w / merge_size**2 tokens, plus `pixel_values` (patches, C*T*P*P),
    `image_grid_thw` (images, 3) and `mm_token_type_ids` (1 on image tokens: the model's M-RoPE
    needs it). `save_pretrained` also writes `raytrain_resize.json` (see write_resize_record).
    """

    return_mm_token_type_ids = True

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        merge_length = self.image_processor.merge_size**2
        return self.image_token * int(image_inputs["image_grid_thw"][image_idx].prod() // merge_length)

    @property
    def model_input_names(self):
        return super().model_input_names + ["mm_token_type_ids"]

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        files = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        write_resize_record(self, save_directory)
        return files



def _saved_processor_class(path: Path) -> str | None:
    cfg = path / "processor_config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text()).get("processor_class")
    except (OSError, ValueError):
        return None


def load_processor(path: str):
    """AutoProcessor for hub ids and stock saved processors; the image-only processor when the saved
    processor_config.json names it (the tiny preset). Checks `raytrain_resize.json` when present.
    `path`: a hub id or a local directory (tiny presets already resolved by the family)."""
    local = Path(path)
    if local.is_dir() and _saved_processor_class(local) == "Qwen2_5_VLImageOnlyProcessor":
        processor = Qwen2_5_VLImageOnlyProcessor.from_pretrained(path)
    else:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(path)
    if local.is_dir() and (local / RESIZE_RECORD).is_file():
        check_resize(processor, local)
    return processor
