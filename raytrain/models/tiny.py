"""Offline tiny presets, resolved in this one place: a cache directory per (family, seed, size),
built once under a file lock and saved atomically with `save_pretrained`, so tests and the demo load
them through the SAME `from_pretrained` path that loads `google/paligemma2-3b-pt-224` for users.

Each family brings its own builder (`models/tiny_paligemma.py`, `models/tiny_qwen.py`) through its
`build_tiny_preset` member; `raytrain.models.ensure_preset("tiny:<family>")` looks the family up and
calls `ensure_preset` here. This module imports no family, so nothing cycles. Nothing here touches
the network.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

PRESET_VERSION = 2  # bump when a builder changes; the cache key includes it (2: tiny Qwen's rotary base 10)
PREFIX = "tiny:"


def is_tiny(name_or_path: str) -> bool:
    return str(name_or_path).startswith(PREFIX)


def _default_cache() -> Path:
    return Path(os.environ.get("RAYTRAIN_CACHE", Path.home() / ".cache" / "raytrain")) / "presets"


@contextlib.contextmanager
def _file_lock(path: Path):
    """Several workers on one node may ask for the same preset at once: build it once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_preset(family: str, builder: Callable[..., Path], cache_dir: str | Path | None = None, seed: int = 0,
                  image_size: int | None = None) -> Path:
    """Path of the saved tiny preset of `family`, built once with `builder(out_dir, seed=..., [image_size=...])`.
    image_size None = the builder's default size; another size is cached under its own name (the
    builder rejects sizes its family cannot take)."""
    kwargs: dict = {"seed": seed}
    suffix = ""
    if image_size is not None:
        kwargs["image_size"], suffix = int(image_size), f"-{int(image_size)}px"
    root = Path(cache_dir) if cache_dir else _default_cache()
    out = root / f"tiny-{family}-v{PRESET_VERSION}-s{seed}{suffix}"
    marker = out / "raytrain_preset.json"
    if marker.exists():
        return out
    with _file_lock(root / f".tiny-{family}.lock"):
        if not marker.exists():
            builder(out, **kwargs)
    return out


def save_preset(out_dir: str | Path, model, processor, record: dict) -> Path:
    """save_pretrained model (safetensors) + processor and the raytrain_preset.json record (with
    PRESET_VERSION) into a sibling temp directory, then move it into place: a reader never sees a
    half-written preset, and a failed build leaves nothing behind."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".building-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        (tmp / "raytrain_preset.json").write_text(json.dumps({**record, "version": PRESET_VERSION}))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
