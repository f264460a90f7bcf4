"""Shards on the real S3 protocol (moto on 127.0.0.1) and on local disk, read back with
pyarrow and with Ray Data."""

import io

import pyarrow.parquet as pq
import pytest
from PIL import Image

from raytrain import storage
from raytrain.data import shards, synthetic
from raytrain.formats.annotations import objects_from_json

pytestmark = pytest.mark.integration

SPLITS = {"train": 0.6, "val": 0.2, "test": 0.2}


@pytest.fixture(params=["s3", "local"])
def target(request, tmp_path):
    """(root URI, StorageOptions) on moto S3 or on a local tmp dir."""
    if request.param == "s3":
        return storage.join(request.getfixturevalue("s3_bucket"), "data", "shapes"), request.getfixturevalue("s3_opts")
    return str(tmp_path / "shapes"), None


@pytest.fixture(scope="module")
def ray_local(ray_cluster):
    # The session's Ray (conftest), started after s3_server: workers inherit its fake credentials.
    return ray_cluster


def _rows(n=25, seed=0):
    return list(synthetic.generate_rows(n, seed, image_size=32, shapes_per_image=2, splits=SPLITS))


def test_write_shards_layout_and_pyarrow_roundtrip(target):
    uri, opts = target
    rows = _rows()
    files = shards.write_shards(rows, uri, rows_per_shard=6, opts=opts)

    by_split = {s: [r for r in rows if r["split"] == s] for s in SPLITS}
    expected = [
        storage.join(uri, s, f"shard-{k:05d}.parquet") for s, rs in by_split.items() for k in range(-(-len(rs) // 6))
    ]
    assert files == sorted(expected)
    for split, split_rows in by_split.items():
        assert shards.shard_paths(uri, split, opts) == sorted(f for f in files if f"/{split}/" in f)
        table = shards.read_split(uri, split, opts)
        assert table.schema.equals(shards.SHARD_SCHEMA, check_metadata=False)
        got = table.to_pylist()
        assert [r["id"] for r in got] == [r["id"] for r in split_rows]  # order kept within a split
        for want, have in zip(split_rows, got):
            assert have["image"] == want["image"]
            assert (have["width"], have["height"], have["split"], have["source"]) == (32, 32, split, "synthetic")
            assert objects_from_json(have["objects"]) == want["objects"]
            assert Image.open(io.BytesIO(have["image"])).size == (32, 32)
    assert shards.shard_paths(uri, "nope", opts) == []

    # plain pyarrow on one file, through the filesystem shard_source hands out
    paths, fs = shards.shard_source(uri, "train", opts)
    assert not any(p.startswith("s3://") for p in paths)
    assert pq.read_table(paths[0], filesystem=fs).num_rows == 6


def test_ray_data_reads_shards(target, ray_local):
    uri, opts = target
    rows = _rows(n=30, seed=1)
    shards.write_shards(rows, uri, rows_per_shard=5, opts=opts)
    paths, fs = shards.shard_source(uri, "train", opts)
    ds = ray_local.data.read_parquet(paths, filesystem=fs)
    got = ds.take_all()
    want = {r["id"]: r for r in rows if r["split"] == "train"}
    assert sorted(r["id"] for r in got) == sorted(want)
    for r in got:
        assert bytes(r["image"]) == want[r["id"]]["image"]
        assert objects_from_json(r["objects"]) == want[r["id"]]["objects"]


def test_prepare_synthetic_report_and_idempotency(target):
    uri, opts = target
    kwargs = dict(n=30, seed=2, image_size=32, shapes_per_image=1, splits=SPLITS, rows_per_shard=4, opts=opts)
    report = shards.prepare_synthetic(uri, **kwargs)
    assert not report.reused
    assert report.rows_in == 30 and report.dropped == {}
    assert sum(report.rows_written.values()) == 30
    assert list(report.rows_written) == list(SPLITS)
    assert report.stages[:2] == [("generated", 30), ("after validation", 30)]
    for split, count in report.rows_written.items():
        assert shards.read_split(uri, split, opts).num_rows == count
        assert len(shards.shard_paths(uri, split, opts)) == report.shards[split] == -(-count // 4)
    stored = storage.read_json(storage.join(uri, shards.REPORT_NAME), opts)
    assert stored == report.to_dict()
    assert "generated" in report.format_table() and "split: train" in report.format_table()

    # same parameters: nothing is rewritten, the stored report comes back
    fs = storage.fsspec_fs(uri, opts)
    first = shards.shard_paths(uri, "train", opts)[0]
    before = fs.info(storage.strip_scheme(first))
    again = shards.prepare_synthetic(uri, **kwargs)
    assert again.reused and again.to_dict() == report.to_dict()
    assert "reused" in again.format_table()
    assert fs.info(storage.strip_scheme(first)) == before

    # different parameters: prepared again, no stale shards of the larger first run left over
    smaller = shards.prepare_synthetic(uri, **{**kwargs, "n": 8})
    assert not smaller.reused and smaller.rows_in == 8
    for split, count in smaller.rows_written.items():
        assert shards.read_split(uri, split, opts).num_rows == count


def test_prepare_counts_drops_and_conversions(target):
    uri, opts = target
    good = _rows(n=6, seed=3)
    rgba = io.BytesIO()
    Image.new("RGBA", (32, 32), (0, 0, 255, 255)).save(rgba, format="PNG")
    bad = [
        {**good[0], "id": "corrupt", "image": good[0]["image"][:30]},
        {**good[1], "id": "mismatch", "width": 31},
        {**good[2], "id": "no-objects", "objects": []},
        {**good[3], "id": "rgba", "image": rgba.getvalue()},
    ]
    report = shards.prepare_rows(good + bad, uri, params={"test": "drops"}, rows_per_shard=100, opts=opts)
    assert report.rows_in == 10
    assert report.dropped == {"corrupt_image": 1, "size_mismatch": 1, "empty_annotations": 1}
    assert report.converted == {"converted_from_RGBA": 1}
    assert sum(report.rows_written.values()) == 7
    ids = {r["id"]: r for s in report.rows_written for r in shards.read_split(uri, s, opts).to_pylist()}
    assert "corrupt" not in ids and "rgba" in ids
    assert Image.open(io.BytesIO(ids["rgba"]["image"])).mode == "RGB"  # re-encoded once, at prep time
    assert shards.PrepReport.read(uri, opts).dropped == report.dropped
    table = report.format_table()
    assert "dropped: corrupt_image" in table and "converted_from_RGBA" in table


def test_report_invariant_is_enforced():
    report = shards.PrepReport(rows_in=5, rows_written={"train": 3}, dropped={"corrupt_image": 1})
    with pytest.raises(ValueError, match="does not add up"):
        report.to_dict()
    report.dropped["empty_annotations"] = 1
    assert report.to_dict()["rows_in"] == 5
