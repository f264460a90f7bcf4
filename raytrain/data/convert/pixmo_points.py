"""PixMo-Points (``allenai/pixmo-points``) -> canonical rows, one per source row.

Source rows: ``{"image_url", "image_sha256", "label", "points": [{"x", "y"}, ...], "count",
"collection_method"}``. Points are in PERCENT of the image (0-100): Molmo's own loader reads
them with ``point_scale=100``, although the dataset card says "pixels". Here
``x_px = x / 100 * width`` of the downloaded image.

One image carries several rows (one per label); the split is by ``image_url`` so all of them
land in the same split, and the download cache fetches each URL once. The image bytes are
checked against ``image_sha256`` (``hash_mismatch``): URLs on the web change content.

Row reasons: ``missing_field`` (no URL / label), ``empty_annotations`` (no points, counted
before any download); then ``download_failed`` / ``hash_mismatch`` / image reasons in
``common.process_record``. Object reason: ``bad_point`` (not two finite numbers).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator

import pyarrow.parquet as pq

from raytrain import storage
from raytrain.data.convert.common import Converted, admit, count, record
from raytrain.data.shards import PrepReport
from raytrain.formats.annotations import Absent, Point
from raytrain.storage import StorageOptions

SOURCE = "pixmo_points"
HUB_ID = "allenai/pixmo-points"


def load_rows(path: str = HUB_ID, split: str = "train", opts: StorageOptions | None = None) -> Iterable[dict]:
    """Source rows from a local / s3 ``.parquet``, ``.jsonl`` or ``.json`` file in the hub schema,
    or from the hub through the ``datasets`` library (``path`` = a dataset id)."""
    if path.endswith((".parquet", ".jsonl", ".json")):
        fs = storage.fsspec_fs(path, opts)
        with fs.open(storage.strip_scheme(path), "rb") as f:
            if path.endswith(".parquet"):
                return pq.read_table(f).to_pylist()
            text = f.read().decode("utf-8")
        if path.endswith(".json"):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    import datasets  # the hub path: downloads the annotation parquet files (not the images)

    return datasets.load_dataset(path, split=split)


def row_id(i: int) -> str:
    return f"pixmo-{i:08d}"


def subset_keys(rows, unit: str) -> list[str | None]:
    """Per source row, what a subset draws (``common.subset_indices``): its image URL (unit
    "image"; None for a row without one) or its record id (unit "row"). Reads only the URL column
    of a hub dataset, so a subset of the 2.4M-row source never converts the rows it leaves out."""
    if unit == "row":
        return [row_id(i) for i in range(len(rows))]
    urls = rows["image_url"] if hasattr(rows, "column_names") else [r.get("image_url") if isinstance(r, dict) else None for r in rows]
    return [u if isinstance(u, str) and u else None for u in urls]


def records(rows: Iterable[dict], report: PrepReport | None = None, *, source: str = SOURCE, index: list[int] | None = None) -> Iterator[dict]:
    """One record per source row; ids are ``pixmo-<row index>`` in the source's order (``index``:
    the source row numbers of ``rows`` when they are a subset of it)."""
    for k, row in enumerate(rows):
        i = index[k] if index is not None else k
        url, label = row.get("image_url"), row.get("label")
        if not isinstance(url, str) or not url or not isinstance(label, str) or not label.strip():
            count(report, "missing_field")
            continue
        points = row.get("points") or []  # none: a negative (the label is not in the image)
        admit(report)
        yield record(
            row_id(i),
            url,
            {"label": label.strip(), "points": [[p.get("x"), p.get("y")] if isinstance(p, dict) else p for p in points]},
            source=source,
            split_key=url,
            sha256=row.get("image_sha256") or "",
        )


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def to_objects(annotation: dict, width: int, height: int) -> Converted:
    """Percent points -> :class:`Point` in pixels of a ``width`` x ``height`` image; a row with no
    point marks the image :class:`Absent` for its label (a negative)."""
    if not annotation["points"]:
        return Converted([Absent(annotation["label"])], notes=["negative"])
    drops: Counter = Counter()
    objs = []
    for p in annotation["points"]:
        if not isinstance(p, (list, tuple)) or len(p) != 2 or not all(_finite(v) for v in p):
            drops["bad_point"] += 1
            continue
        objs.append(Point(p[0] / 100.0 * width, p[1] / 100.0 * height, annotation["label"]))
    return Converted(objs, object_drops=dict(drops))
