"""Visual Genome region descriptions -> canonical rows of :class:`Region` (dense captioning).

Sources (VG 1.2 layout)::

    region_descriptions.json  [{"id": image_id, "regions": [{"region_id", "image_id", "phrase",
                                 "x", "y", "width", "height"}, ...]}, ...]
    image_data.json           [{"image_id" (or "id"), "url", "width", "height", ...}, ...]
    VG_100K/<image_id>.jpg, VG_100K_2/<image_id>.jpg     (optional: else images come from "url")

A region is ``Region(x, y, x + width, y + height, phrase)``. VG boxes often stick out of the
image by a few pixels: they are clipped to it (row note ``regions_clipped``); what is left
empty is dropped. Up to 300 regions per image overlap heavily in place and meaning: see
``raytrain.data.clean.RegionCleaner`` (seed 002's cleaning).

Row reasons: ``missing_field`` (an entry without image id). Object reasons (row kept):
``degenerate_box`` (no area after clipping), ``empty_text`` (blank phrase), ``bad_region``
(non-numeric geometry).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterator

from raytrain import storage
from raytrain.data.convert.common import Converted, admit, count, parent, record
from raytrain.data.shards import PrepReport
from raytrain.formats.annotations import Region
from raytrain.storage import StorageOptions

SOURCE = "visual_genome"
REGIONS_FILE = "region_descriptions.json"
IMAGES_FILE = "image_data.json"


def _index_local_images(root: str) -> dict[str, str]:
    """``{"<image_id>": path}`` for every image file under ``root`` (VG_100K, VG_100K_2, or flat)."""
    out: dict[str, str] = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            stem, ext = os.path.splitext(name)
            if ext.lower() in (".jpg", ".jpeg", ".png"):
                out.setdefault(stem, os.path.join(dirpath, name))
    return out


def records(
    path: str,
    image_data: str | None = None,
    image_root: str | None = None,
    report: PrepReport | None = None,
    *,
    source: str = SOURCE,
    opts: StorageOptions | None = None,
) -> Iterator[dict]:
    """One record per image of ``region_descriptions.json`` (``path``: the file or its folder).

    ``image_data`` (default: ``image_data.json`` beside it, if present) gives sizes and URLs.
    Images are looked up under ``image_root`` (default: the folder) as ``<image_id>.jpg`` in any
    subfolder; images not found there are downloaded from their URL when one is known.
    """
    if not path.endswith(".json"):
        path = storage.join(path, REGIONS_FILE)
    folder = parent(path)
    image_data = image_data or storage.join(folder, IMAGES_FILE)
    meta: dict[str, dict] = {}
    if storage.exists(image_data, opts):
        for d in storage.read_json(image_data, opts):
            key = d.get("image_id", d.get("id"))
            if key is not None:
                meta[str(key)] = d
    root = image_root or folder
    local = _index_local_images(root) if not storage.is_s3(root) and os.path.isdir(root) else {}
    for entry in storage.read_json(path, opts):
        image_id = entry.get("id", entry.get("image_id")) if isinstance(entry, dict) else None
        if image_id is None:
            count(report, "missing_field")
            continue
        key = str(image_id)
        info = meta.get(key, {})
        if key in local:
            ref = local[key]
        elif info.get("url") and not storage.is_s3(root):
            ref = info["url"]
        else:
            ref = storage.join(root, f"{key}.jpg")  # s3 layout, or missing: fetch says image_missing
        regions = [
            [r.get("x"), r.get("y"), r.get("width"), r.get("height"), r.get("phrase"), r.get("region_id")]
            for r in entry.get("regions") or []
        ]
        admit(report)
        yield record(
            f"{source}-{key}",
            ref,
            {"regions": regions},
            source=source,
            split_key=key,
            width=int(info.get("width") or 0),
            height=int(info.get("height") or 0),
        )


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def to_objects(annotation: dict, width: int, height: int) -> Converted:
    """Regions of one image, clipped to ``width`` x ``height``."""
    drops: Counter = Counter()
    objs = []
    clipped = False
    for x, y, w, h, phrase, _ in annotation["regions"]:
        if not all(_num(v) for v in (x, y, w, h)):
            drops["bad_region"] += 1
            continue
        if not isinstance(phrase, str) or not phrase.strip():
            drops["empty_text"] += 1
            continue
        x1, y1 = min(max(float(x), 0.0), width), min(max(float(y), 0.0), height)
        x2, y2 = min(max(float(x + w), 0.0), width), min(max(float(y + h), 0.0), height)
        clipped |= (x1, y1, x2, y2) != (x, y, x + w, y + h)
        if x2 <= x1 or y2 <= y1:
            drops["degenerate_box"] += 1
            continue
        objs.append(Region(x1, y1, x2, y2, " ".join(phrase.split())))
    return Converted(objs, object_drops=dict(drops), notes=["regions_clipped"] if clipped else [])
