"""Reading what a run wrote: JSON / JSONL files (local or s3://) and the split's shards.

Nothing here raises on malformed content: unreadable JSONL lines are counted into a note,
objects the report cannot use are dropped. Missing files read as None.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from raytrain import storage, tasks
from raytrain.eval.metrics.values import finite

_COORDS = {"point": ("x", "y"), "box": ("x1", "y1", "x2", "y2")}
# objects-JSON "type" -> object kind, from the task registry ("mask_rle" -> "mask"); "mask" is
# the report's own lenient type (polygons, grids) and stays a mask
_KIND_OF = {**{t.json_type: t.kind for t in tasks.TASKS.values()}, "mask": "mask"}


def read_text(uri: str, opts) -> str | None:
    """The file's text, or None if it does not exist."""
    if not storage.exists(uri, opts):
        return None
    with storage.fsspec_fs(uri, opts).open(storage.strip_scheme(uri), "r", encoding="utf-8") as f:
        return f.read()


def read_jsonl(uri: str, opts, notes: list[str]) -> list[dict] | None:
    """Rows of a JSONL file; None if it does not exist. Unreadable lines are skipped and noted."""
    text = read_text(uri, opts)
    if text is None:
        return None
    rows, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    if bad:
        notes.append(f"{uri}: {bad} unreadable line(s) skipped.")
    return rows


def objects(raw: Any) -> list[dict]:
    """Object dicts from a JSON string or list, leniently, each tagged with its KIND
    (``tasks.TaskSpec.kind``: "point" | "box" | "mask"):

    * points and boxes with finite coordinates (a finite ``score``, the per-object
      confidence eval may attach, is kept);
    * the codec's ``mask_rle`` objects (``size`` + ``counts``) as ``{"type": "mask",
      "rle": {"size", "counts"}, "label"}``;
    * ``mask`` objects with any fields (``rle``, ``polygon(s)``, a ``mask`` grid in its box),
      as they are.

    Anything else is dropped. Unlike ``annotations.objects_from_json`` this never raises and
    accepts mask encodings the codecs do not write."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            return []
    out = []
    for o in raw if isinstance(raw, list) else []:
        if not isinstance(o, dict):
            continue
        kind = _KIND_OF.get(o.get("type"))
        label = str(o.get("label") or "")
        keys = _COORDS.get(kind)
        if keys is not None:
            vals = [finite(o.get(k)) for k in keys]
            if any(v is None for v in vals):
                continue
            d = {"type": kind, **dict(zip(keys, vals)), "label": label}
            if finite(o.get("score")) is not None:
                d["score"] = finite(o.get("score"))
            out.append(d)
        elif kind == "mask" and o.get("type") != "mask":  # the codec's COCO RLE
            out.append({"type": "mask", "rle": {"size": o.get("size"), "counts": o.get("counts")}, "label": label})
        elif kind == "mask":
            out.append(dict(o, label=label))
    return out


@dataclass
class Source:
    """One source image of the split: size in pixels and every annotation on it."""

    width: int
    height: int
    objects: list[dict]


def load_ground_truth(data_uri: str, split: str, opts) -> dict[str, Source]:
    """id -> size and objects for every row of the split (images are not read here)."""
    import pyarrow.parquet as pq

    from raytrain.data import shards

    paths, fs = shards.shard_source(data_uri, split, opts)
    out: dict[str, Source] = {}
    cols = ("id", "width", "height", "objects")
    for p in paths:
        t = pq.read_table(p, filesystem=fs, columns=list(cols))
        for i, w, h, objs in zip(*(t.column(c).to_pylist() for c in cols)):
            out[str(i)] = Source(int(w), int(h), objects(objs))
    return out


def load_images(data_uri: str, split: str, ids: set[str], opts) -> dict[str, bytes]:
    """Encoded image bytes of just the rows in ``ids`` (a filter, not a full read of the split)."""
    import pyarrow.parquet as pq

    from raytrain.data import shards

    if not ids:
        return {}
    paths, fs = shards.shard_source(data_uri, split, opts)
    out: dict[str, bytes] = {}
    for p in paths:
        t = pq.read_table(p, filesystem=fs, columns=["id", "image"], filters=[("id", "in", sorted(ids))])
        for i, b in zip(t.column("id").to_pylist(), t.column("image").to_pylist()):
            out[str(i)] = b
    return out
