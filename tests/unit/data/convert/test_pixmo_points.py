"""PixMo-Points rows (hub schema, local parquet / JSONL) with images served from 127.0.0.1:
percent -> pixels, sha256 checks, and every failed download counted."""

import hashlib
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytrain.data.convert import common, pixmo_points
from raytrain.data.convert.common import FetchOptions
from raytrain.data.shards import PrepReport
from raytrain.formats.annotations import Absent, Point, objects_from_json


def _rows(server, images):
    p0 = images.encode(images.photo(200, 100, seed=1))
    p1 = images.encode(images.photo(50, 40, seed=2))
    p2 = images.encode(images.photo(30, 30, seed=3, mode="L"))
    server.files.update({"p0.jpg": p0, "p1.jpg": p1, "p2.jpg": p2})
    u = server.url
    sha = lambda b: hashlib.sha256(b).hexdigest()

    def row(url, label, points, digest=None):
        return {"image_url": url, "image_sha256": digest, "label": label,
                "points": [{"x": x, "y": y} for x, y in points], "count": len(points),
                "collection_method": "pointing"}

    return [
        row(f"{u}/img/p0.jpg", "dog", [(10, 20), (50, 50)], sha(p0)),
        row(f"{u}/img/p0.jpg", "tail", [(90, 80)], sha(p0)),
        row(f"{u}/img/gone.jpg", "cat", [(1, 1)]),  # 404
        row(f"{u}/slow/p1.jpg", "cat", [(1, 1)]),  # times out
        row(f"{u}/html", "cat", [(1, 1)]),  # a web page, not an image
        row(f"{u}/img/p1.jpg", "nothing", []),  # no points
        row(f"{u}/img/p1.jpg", "cat", [(5, 5)], "0" * 64),  # the image changed since annotation
        row(f"{u}/img/p1.jpg", "", [(5, 5)]),  # no label
        row(f"{u}/img/p1.jpg", "cat", [(150, 5)]),  # outside the image
        row(f"{u}/img/p2.jpg", "sky", [(50, 50), (float("nan"), 3)]),  # grayscale; one bad point
    ]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_pixmo_rows_and_counts(fmt, image_server, images, tmp_path):
    image_server.slow_s = 0.8
    src = _rows(image_server, images)
    path = tmp_path / f"rows.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(src), path)
    else:
        path.write_text("\n".join(json.dumps(r) for r in src))
    report, drops = PrepReport(), Counter()
    recs = pixmo_points.records(pixmo_points.load_rows(str(path)), report)
    fetch = FetchOptions(cache_dir=str(tmp_path / "cache"), timeout_s=0.3, retries=0)
    rows = {r["id"]: r for r in common.iter_rows(recs, pixmo_points.to_objects, report, fetch=fetch, object_drops=drops)}

    assert report.rows_in == 10
    assert report.dropped == {
        "download_failed": 2, "corrupt_image": 1, "hash_mismatch": 1,
        "missing_field": 1, "coords_out_of_range": 1,
    }
    assert report.converted == {"converted_from_L": 1}
    report.check()
    assert sorted(rows) == ["pixmo-00000000", "pixmo-00000001", "pixmo-00000005", "pixmo-00000009"]
    assert objects_from_json(rows["pixmo-00000005"]["objects"]) == [Absent("nothing")]  # no points: a negative
    assert objects_from_json(rows["pixmo-00000000"]["objects"]) == [Point(20, 20, "dog"), Point(100, 50, "dog")]
    assert objects_from_json(rows["pixmo-00000001"]["objects"]) == [Point(180, 80, "tail")]
    assert objects_from_json(rows["pixmo-00000009"]["objects"]) == [Point(15, 15, "sky")]
    assert drops == {"bad_point": 1}
    assert rows["pixmo-00000000"]["split"] == rows["pixmo-00000001"]["split"]  # one image, one split
    assert image_server.hits["/img/p0.jpg"] == 1  # two rows, one download (cache)
