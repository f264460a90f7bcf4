"""COCO instances JSON (``instances_*.json``) -> canonical rows: one per image entry.

Each annotation becomes a :class:`Box` (COCO ``bbox`` is ``[x, y, width, height]`` in pixels,
continuous coordinates, so ``x2 = x + width``) followed, when it has a segmentation, by a
:class:`Mask` over the whole image: polygons are rasterised and RLE (compressed, or the
uncompressed counts of ``iscrowd`` annotations) taken as is, both through pycocotools.
Labels are the category names.

Counted at the image level (rows): ``missing_field`` (an image entry without id / file_name),
``duplicate_image_id``; then by ``common.process_record``. Counted at the object level (the row
is kept): ``unknown_category``, ``degenerate_box`` (width or height <= 0), ``coords_out_of_range``
(a box more than ``BOX_TOLERANCE_PX`` outside the image; closer ones are clipped: COCO has boxes
like ``x + w = 640.01`` on 640-pixel images), ``bad_segmentation``, ``mask_size_mismatch``,
``empty_mask``, and ``annotation_for_unknown_image`` (counted by :func:`records`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

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
from raytrain.formats.annotations import Box, Mask
from raytrain.storage import StorageOptions

SOURCE = "coco"
BOX_TOLERANCE_PX = 1.0


def find_annotation_file(folder: str, opts: StorageOptions | None = None) -> str:
    """The single ``*.json`` in ``folder`` (or ``folder/annotations``)."""
    fs = storage.fsspec_fs(folder, opts)
    for sub in ("", "annotations"):
        d = storage.join(folder, sub) if sub else folder
        found = sorted(p for p in fs.glob(storage.strip_scheme(storage.join(d, "*.json"))))
        if len(found) == 1:
            return storage.S3_SCHEME + found[0] if storage.is_s3(folder) else found[0]
        if len(found) > 1:
            raise ValueError(f"several JSON files in {d}: {found}; name the annotation file instead")
    raise FileNotFoundError(f"no COCO annotation JSON in {folder} or {folder}/annotations")


def records(
    ann_path: str,
    image_root: str | None = None,
    report: PrepReport | None = None,
    *,
    source: str = SOURCE,
    masks: bool = True,
    opts: StorageOptions | None = None,
    object_drops: Counter | None = None,
) -> Iterator[dict]:
    """One record per image entry of a COCO instances file.

    ``image_root`` (default: the annotation file's folder) is where ``file_name`` is resolved.
    ``masks=False`` keeps only boxes (masks make the objects JSON much larger).
    """
    data = storage.read_json(ann_path, opts)
    root = image_root or parent(ann_path)
    categories = {c["id"]: str(c.get("name", c["id"])) for c in data.get("categories", [])}
    by_image: dict = {}
    for ann in data.get("annotations", []):
        by_image.setdefault(ann.get("image_id"), []).append(ann)
    seen: set = set()
    for img in data.get("images", []):
        if not isinstance(img, dict) or "id" not in img or not img.get("file_name"):
            count(report, "missing_field")
            continue
        if img["id"] in seen:
            count(report, "duplicate_image_id")
            continue
        seen.add(img["id"])
        objs = []
        for ann in by_image.pop(img["id"], []):
            objs.append(
                {
                    "bbox": ann.get("bbox"),
                    "segmentation": ann.get("segmentation") if masks else None,
                    "iscrowd": int(ann.get("iscrowd", 0) or 0),
                    "label": categories.get(ann.get("category_id")),
                }
            )
        admit(report)
        yield record(
            f"{source}-{img['id']}",
            resolve_ref(root, img["file_name"]),
            {"objects": objs},
            source=source,
            split_key=str(img["file_name"]),
            width=int(img.get("width") or 0),
            height=int(img.get("height") or 0),
        )
    orphans = sum(len(v) for v in by_image.values())
    if object_drops is not None and orphans:
        object_drops["annotation_for_unknown_image"] += orphans


def _box(bbox, label: str, w: int, h: int) -> tuple[Box | None, str | None]:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None, "degenerate_box"
    x, y, bw, bh = (float(v) for v in bbox)
    if not bw > 0 or not bh > 0:
        return None, "degenerate_box"
    x1, y1, x2, y2 = x, y, x + bw, y + bh
    t = BOX_TOLERANCE_PX
    if x1 < -t or y1 < -t or x2 > w + t or y2 > h + t:
        return None, "coords_out_of_range"
    x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(w)), min(y2, float(h))
    if x2 <= x1 or y2 <= y1:
        return None, "degenerate_box"
    return Box(x1, y1, x2, y2, label), None


def _mask(seg, label: str, w: int, h: int) -> tuple[Mask | None, str | None]:
    try:
        if isinstance(seg, dict):
            m = Mask.from_rle(seg, label)
        else:
            m = Mask.from_polygons(seg, h, w, label)
    except (ValueError, TypeError):
        return None, "bad_segmentation"
    if m.size != (h, w):
        return None, "mask_size_mismatch"
    if m.area == 0:
        return None, "empty_mask"
    return m, None


def to_objects(annotation: dict, width: int, height: int) -> Converted:
    """Boxes (+ masks) of one image, in the order of its annotations."""
    out = Converted()
    drops: Counter = Counter()
    for a in annotation["objects"]:
        if a["label"] is None:
            drops["unknown_category"] += 1
            continue
        box, reason = _box(a["bbox"], a["label"], width, height)
        if reason is not None:
            drops[reason] += 1
            continue
        out.objects.append(box)
        seg = a.get("segmentation")
        if seg:  # [] / None: the annotation has no mask
            mask, reason = _mask(seg, a["label"], width, height)
            if reason is not None:
                drops[reason] += 1
            else:
                out.objects.append(mask)
    out.object_drops = dict(drops)
    return out
