"""Fetching (local, HTTP with cache / retries / timeouts), one record -> one row, resizing, splits."""

import hashlib
import json
import time

import numpy as np
import pytest
from PIL import Image

from raytrain.data import splits
from raytrain.data.convert import common
from raytrain.data.convert.common import (
    Converted,
    FetchOptions,
    fetch_bytes,
    process_record,
)
from raytrain.formats.annotations import (
    Box,
    Caption,
    Mask,
    Point,
    Region,
    objects_from_json,
)

# ---------------------------------------------------------------------------- fetching


def test_fetch_local(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    assert fetch_bytes(str(tmp_path / "a.bin")) == (b"abc", None)
    assert fetch_bytes(str(tmp_path / "nope.jpg")) == (None, "image_missing")
    assert fetch_bytes(str(tmp_path)) in ((None, "image_missing"), (None, "image_unreadable"))


def test_download_cached_and_failures(image_server, tmp_path, images):
    data = images.encode(images.photo(16, 12))
    image_server.files["a.jpg"] = data
    opts = FetchOptions(cache_dir=str(tmp_path / "cache"), timeout_s=0.3, retries=1, backoff_s=0.01)
    url = f"{image_server.url}/img/a.jpg"
    assert fetch_bytes(url, opts) == (data, None)
    assert fetch_bytes(url, opts) == (data, None)
    assert image_server.hits["/img/a.jpg"] == 1  # second one came from the on-disk cache

    # 404 is permanent: one request, no retry, not cached
    assert fetch_bytes(f"{image_server.url}/img/missing.jpg", opts) == (None, "download_failed")
    assert image_server.hits["/img/missing.jpg"] == 1

    # a server slower than the timeout: every attempt times out, then it is counted
    image_server.files["s.jpg"] = data
    t0 = time.monotonic()
    assert fetch_bytes(f"{image_server.url}/slow/s.jpg", opts) == (None, "download_failed")
    assert time.monotonic() - t0 < 1.5  # 2 attempts x 0.3 s, not the server's 1.5 s sleep
    assert image_server.hits["/slow/s.jpg"] == 2

    # 503 then success: retried
    image_server.files["f.jpg"] = data
    assert fetch_bytes(f"{image_server.url}/flaky/f.jpg", opts) == (data, None)
    assert image_server.hits["/flaky/f.jpg"] == 2

    # too large, nothing listening, not a URL at all
    assert fetch_bytes(url, FetchOptions(max_bytes=10)) == (None, "download_failed")
    assert image_server.hits["/img/a.jpg"] == 2  # no cache in these options: it was fetched, then refused
    assert fetch_bytes("http://127.0.0.1:9/x.jpg", FetchOptions(retries=0)) == (None, "download_failed")


# ---------------------------------------------------------------------------- process_record


def _boxes(annotation, w, h):
    return Converted([Box(*annotation["box"], label="thing"), Point(w, h, "corner")])


def _rec(ref, **kw):
    return {**common.record("r1", ref, {"box": [2, 3, 10, 9]}, source="t", **kw), "split": "train"}


def test_process_record_row(tmp_path, images):
    p = tmp_path / "a.jpg"
    p.write_bytes(images.encode(images.photo(40, 30)))
    out = process_record(_rec(str(p), width=40, height=30), _boxes)
    assert out.reason is None and out.notes == []
    row = out.row
    assert (row["id"], row["width"], row["height"], row["split"], row["source"]) == ("r1", 40, 30, "train", "t")
    assert row["image"] == p.read_bytes()  # untouched bytes when nothing changed
    assert objects_from_json(row["objects"]) == [Box(2, 3, 10, 9, "thing"), Point(40, 30, "corner")]


def test_process_record_reasons(tmp_path, images):
    good = images.encode(images.photo(40, 30))
    (tmp_path / "a.jpg").write_bytes(good)
    (tmp_path / "bad.jpg").write_bytes(good[: len(good) // 3])
    a = str(tmp_path / "a.jpg")
    assert process_record(_rec(str(tmp_path / "none.jpg")), _boxes).reason == "image_missing"
    assert process_record(_rec(str(tmp_path / "bad.jpg")), _boxes).reason == "corrupt_image"
    assert process_record(_rec(a, width=41, height=30), _boxes).reason == "size_mismatch"
    assert process_record(_rec(a, sha256="0" * 64), _boxes).reason == "hash_mismatch"
    assert process_record(_rec(a, sha256=hashlib.sha256(good).hexdigest().upper()), _boxes).reason is None
    assert process_record(_rec(a, sha256="0" * 64), _boxes, check_sha256=False).reason is None
    assert process_record(_rec(a), lambda ann, w, h: Converted([Box(5, 5, 5, 9)])).reason == "degenerate_box"
    assert process_record(_rec(a), lambda ann, w, h: Converted(reason="mine")).reason == "mine"
    assert process_record(_rec(a), lambda ann, w, h: ann["nope"]).reason == "bad_annotations"


def test_conversion_and_resize(tmp_path, images):
    img = images.photo(200, 100).convert("RGBA")
    (tmp_path / "a.png").write_bytes(images.encode(img, "PNG"))
    mask = np.zeros((100, 200), bool)
    mask[20:60, 40:120] = True

    def objs(ann, w, h):
        return Converted([Box(40, 20, 120, 60, "b"), Point(200, 100, "p"), Region(0, 0, 200, 100, "all"),
                          Mask.from_array(mask, "m"), Caption("c")])

    out = process_record(_rec(str(tmp_path / "a.png")), objs, max_side=50)
    assert out.notes == ["converted_from_RGBA", "resized"]
    row = out.row
    assert (row["width"], row["height"]) == (50, 25)
    stored = Image.open(__import__("io").BytesIO(row["image"]))
    assert stored.size == (50, 25) and stored.mode == "RGB" and stored.format == "PNG"
    box, point, region, m, cap = objects_from_json(row["objects"])
    assert box == Box(10, 5, 30, 15, "b") and point == Point(50, 25, "p") and region == Region(0, 0, 50, 25, "all")
    assert m.size == (25, 50) and m.box == Box(10, 5, 30, 15, "m") and cap == Caption("c")


# ---------------------------------------------------------------------------- splits


def test_split_presets_and_stability():
    assert splits.resolve("90/10") == {"train": 0.9, "val": 0.1}
    assert splits.resolve("70/20/10") == pytest.approx({"train": 0.7, "val": 0.2, "test": 0.1})
    assert splits.resolve({"a": 1, "b": 3}) == {"a": 0.25, "b": 0.75}
    for bad in ("50/50", {}, {"a": -1, "b": 2}, {"a": 0}, {"x/y": 1}):
        with pytest.raises(ValueError):
            splits.resolve(bad)
    keys = [f"img{i}.jpg" for i in range(4000)]
    first = [splits.split_of(k, 7, "70/20/10") for k in keys]
    # adding images (and asking in another order) moves nobody
    more = {k: splits.split_of(k, 7, "70/20/10") for k in reversed(keys + [f"new{i}" for i in range(500)])}
    assert [more[k] for k in keys] == first
    n = len(keys)
    for name, frac in (("train", 0.7), ("val", 0.2), ("test", 0.1)):
        assert abs(first.count(name) - frac * n) < 4 * (n * frac * (1 - frac)) ** 0.5
    # another seed reshuffles
    assert [splits.split_of(k, 8, "70/20/10") for k in keys] != first


def test_assign_splits_by_image_and_source_split():
    recs = [common.record(f"r{i}", f"u{i % 7}", {}, source="s", split_key=f"u{i % 7}") for i in range(70)]
    out = list(common.assign_splits(recs, "90/10", seed=1))
    by_key = {}
    for r in out:
        by_key.setdefault(r["split_key"], set()).add(r["split"])
    assert all(len(v) == 1 for v in by_key.values())  # every row of an image in one split
    given = [common.record("x", "u", {}, source="s", split="test")]
    assert next(common.assign_splits(given, "90/10", 0))["split"] == "test"
    assert next(common.assign_splits(given, "90/10", 0, use_source_split=False))["split"] in ("train", "val")
    assert json.loads(given[0]["annotation"]) == {}
