"""Multi-caption sets (RISC: five captions per remote-sensing image) -> rows of several Captions.

Accepted sources:

* CSV with a header: ``image`` and any number of ``caption_<k>`` columns (RISC's
  ``captions.csv`` also has ``split`` and ``source`` columns; a ``split`` column is kept as the
  row's split when ``use_source_split`` is on in the split step);
* JSON: ``[{"image": ..., "captions": [...], "split": optional}, ...]`` or
  ``{"<image>": [captions...], ...}``.

All non-blank captions of an image become :class:`Caption` objects, in column order; choosing
one per image (seed 003 keeps the best by CLIPScore) is ``raytrain.data.clean.CaptionSelector``.

Row reasons: ``missing_field`` (no image name). Object reasons: ``empty_text`` (blank caption;
an image with none left is dropped as ``empty_annotations``).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Iterator

from raytrain import storage
from raytrain.data.convert.common import (
    Converted,
    admit,
    count,
    parent,
    record,
    resolve_ref,
)
from raytrain.data.shards import PrepReport
from raytrain.formats.annotations import Caption
from raytrain.storage import StorageOptions

SOURCE = "captions"
_CAPTION_COL = re.compile(r"caption_?(\d+)$", re.IGNORECASE)


def _read_text(path: str, opts: StorageOptions | None) -> str:
    with storage.fsspec_fs(path, opts).open(storage.strip_scheme(path), "r", encoding="utf-8-sig") as f:
        return f.read()


def _entries(path: str, opts: StorageOptions | None) -> Iterable[dict]:
    text = _read_text(path, opts)
    if path.endswith(".json"):
        data = json.loads(text)
        if isinstance(data, dict):
            return [{"image": k, "captions": v} for k, v in data.items()]
        return data
    reader = csv.DictReader(io.StringIO(text))
    cols = sorted(
        (int(m.group(1)), c) for c in (reader.fieldnames or []) if (m := _CAPTION_COL.match(c.strip()))
    )
    return (
        {"image": row.get("image"), "captions": [row.get(c) for _, c in cols], "split": row.get("split") or ""}
        for row in reader
    )


def records(
    path: str,
    image_root: str | None = None,
    report: PrepReport | None = None,
    *,
    source: str = SOURCE,
    opts: StorageOptions | None = None,
) -> Iterator[dict]:
    """One record per image; images resolved against ``image_root`` (default: the file's folder)."""
    root = image_root or parent(path)
    for entry in _entries(path, opts):
        image = entry.get("image") if isinstance(entry, dict) else None
        if not isinstance(image, str) or not image.strip():
            count(report, "missing_field")
            continue
        caps = entry.get("captions") or []
        if isinstance(caps, str):
            caps = [caps]
        admit(report)
        yield record(
            f"{source}-{image}",
            resolve_ref(root, image),
            {"captions": [c if isinstance(c, str) else "" for c in caps]},
            source=source,
            split_key=image,
            split=str(entry.get("split") or ""),
        )


def to_objects(annotation: dict, width: int, height: int) -> Converted:
    """Every non-blank caption, whitespace-normalised."""
    caps = [" ".join(c.split()) for c in annotation["captions"]]
    blank = sum(1 for c in caps if not c)
    return Converted([Caption(c) for c in caps if c], object_drops={"empty_text": blank} if blank else {})
