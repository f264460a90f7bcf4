"""Seeded train/val/test assignment by IMAGE, stable when rows are added.

The split of a row depends only on ``(seed, image key)``: ``u = sha256(f"{seed}:{key}")`` read as
a number in [0, 1), then the first split whose cumulative fraction exceeds ``u``. So

* every row of one image lands in the same split (PixMo-Points has one row per (image, label),
  JSONL files one line per (image, task)): no image is trained on and evaluated on;
* adding rows never moves an existing image to another split (no index, no shuffle);
* the same seed gives the same assignment on every machine and Python version (sha256, not
  ``hash()``, which is salted per process).

Fractions are honoured in expectation; with n images the count of a split with fraction p is
within a few sqrt(n p (1 - p)) of n p.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

PRESETS: dict[str, dict[str, float]] = {
    "90/10": {"train": 0.9, "val": 0.1},  # seed 000 (PixMo-Points)
    "70/20/10": {"train": 0.7, "val": 0.2, "test": 0.1},  # seed 001 (PaliGemma primer)
}


def resolve(splits: str | Mapping[str, float]) -> dict[str, float]:
    """A preset name ("90/10", "70/20/10") or a ``{name: fraction}`` mapping -> normalised fractions.

    Raises ValueError for an unknown preset, negative fractions, a zero total, or a split name
    that is not a single path segment (it becomes a folder of the shards).
    """
    if isinstance(splits, str):
        if splits not in PRESETS:
            raise ValueError(f"unknown split preset {splits!r}; presets: {sorted(PRESETS)}")
        splits = PRESETS[splits]
    fracs = {str(k): float(v) for k, v in dict(splits).items()}
    total = sum(fracs.values())
    if not fracs or total <= 0 or any(v < 0 for v in fracs.values()):
        raise ValueError(f"split fractions must be non-negative and sum > 0, got {dict(splits)}")
    for name in fracs:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"split name must be a single path segment, got {name!r}")
    return {k: v / total for k, v in fracs.items()}


def unit_interval(key: str, seed: int) -> float:
    """Deterministic ``u`` in [0, 1) for ``(seed, key)``: the top 53 bits of sha256."""
    digest = hashlib.sha256(f"{int(seed)}:{key}".encode("utf-8", "surrogatepass")).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / float(1 << 53)


def split_of(key: str, seed: int, splits: str | Mapping[str, float]) -> str:
    """Split of the image identified by ``key`` (its id, file name or URL)."""
    fracs = resolve(splits)
    u = unit_interval(key, seed)
    acc = 0.0
    for name, frac in fracs.items():
        acc += frac
        if u < acc:
            return name
    return next(name for name, frac in reversed(fracs.items()) if frac > 0)  # u ~ 1.0 rounding
