"""Qwen2.5-VL's resize record: the frame its coordinates are written in, pinned per checkpoint.

Qwen2.5-VL answers in pixels of the image AFTER `smart_resize`, so training and inference must
resize the same way or every coordinate means something else. The processor's resize settings are
recorded next to the processor files (`raytrain_resize.json`) and checked whenever a processor is
loaded from a directory that has the record. No transformers import here (config checks stay fast).
"""

from __future__ import annotations

import json
from pathlib import Path

RESIZE_RECORD = "raytrain_resize.json"
RESIZE_KEYS = ("factor", "min_pixels", "max_pixels", "patch_size", "merge_size", "temporal_patch_size")
# The released Qwen2.5-VL-*-Instruct processors' settings (preprocessor_config.json): the frame used
# when a caller passes no `resize`. The tiny preset's 112x112 input is a fixed point of both.
DEFAULT_RESIZE = {"factor": 28, "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}


def resize_settings(processor) -> dict:
    """The resize a processor applies: factor (patch * merge), min/max pixels, patch sizes."""
    ip = processor.image_processor
    size = ip.size

    def get(k):
        return size[k] if isinstance(size, dict) else getattr(size, k)

    return {
        "factor": int(ip.patch_size * ip.merge_size),
        "min_pixels": int(get("shortest_edge")),
        "max_pixels": int(get("longest_edge")),
        "patch_size": int(ip.patch_size),
        "merge_size": int(ip.merge_size),
        "temporal_patch_size": int(ip.temporal_patch_size),
    }


def write_resize_record(processor, out_dir: str | Path) -> Path:
    """Write `raytrain_resize.json` (the processor's resize settings) into out_dir."""
    path = Path(out_dir) / RESIZE_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(resize_settings(processor), indent=2, sort_keys=True))
    return path


def check_resize(processor, recorded: dict | str | Path) -> None:
    """Raise ValueError unless `processor` resizes as `recorded` (a dict, a record file, or a directory
    holding one) says training did."""
    if not isinstance(recorded, dict):
        p = Path(recorded)
        recorded = json.loads((p / RESIZE_RECORD if p.is_dir() else p).read_text())
    have = resize_settings(processor)
    diff = {k: (recorded.get(k), have[k]) for k in RESIZE_KEYS if k in recorded and recorded[k] != have[k]}
    if diff:
        raise ValueError(
            "the processor resizes images differently from the recorded training settings "
            f"(key: (recorded, processor)): {diff}; coordinates would land in the wrong frame"
        )
