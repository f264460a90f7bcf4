"""The Ray Data pipeline on a shard full of bad input: every skipped row is counted by reason,
every convertible image is converted (and counted), every valid row comes out tokenized.
Runs on local disk and on S3 (moto on 127.0.0.1) through the same code."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from raytrain import storage
from raytrain.data import pipeline, shards, synthetic
from raytrain.formats.annotations import Point, objects_to_json

pytestmark = pytest.mark.integration

TASKS = ["point", "detect"]


def _png(img: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _bad_rows():
    good = [synthetic.make_example(i, seed=3, image_size=64) for i in range(6)]
    rows = [dict(g, split="train", source="test", objects=objects_to_json(g["objects"])) for g in good]
    base = synthetic.make_example(100, seed=3, image_size=64)
    img = Image.open(io.BytesIO(base["image"])).convert("RGB")
    objs = objects_to_json(base["objects"])

    def row(rid, data, objects=objs, w=64, h=64):
        return {"id": rid, "image": data, "width": w, "height": h, "split": "train", "source": "test", "objects": objects}

    rows += [
        row("corrupt", b"definitely not an image"),
        row("truncated", base["image"][: len(base["image"]) // 2]),
        row("gray", _png(img.convert("L"))),
        row("rgba", _png(img.convert("RGBA"))),
        row("cmyk", _png(img.convert("CMYK"), "JPEG")),
        row("no_objects", base["image"], objects="[]"),
        row("out_of_range", base["image"], objects=objects_to_json([Point(1000.0, 5.0, "red circle")])),
        row("bad_json", base["image"], objects="{not json"),
        row("degenerate", base["image"], objects=json.dumps([{"type": "box", "x1": 30, "y1": 5, "x2": 10, "y2": 20, "label": "red circle"}])),
        row("bad_label", base["image"], objects=objects_to_json([Point(5.0, 5.0, "a ; b")])),
    ]
    return rows, [g["id"] for g in good] + ["gray", "rgba", "cmyk"]


EXPECTED = {
    "rows_read": 16,
    "rows_kept": 9,
    "examples": 18,  # 9 images x 2 tasks, one label each
    "tokenized": 18,
    "dropped:corrupt_image": 2,
    "dropped:empty_annotations": 1,
    "dropped:coords_out_of_range": 1,
    "dropped:bad_annotations": 1,
    "dropped:degenerate_box": 1,
    "dropped:unrenderable_label": 1,  # ';' would split the target into two objects
    "converted:converted_from_L": 1,
    "converted:converted_from_RGBA": 1,
    "converted:converted_from_CMYK": 1,
}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_bad_rows_counted_valid_rows_kept(where, tmp_path, request, ray_cluster, tiny_model_path):
    if where == "s3":
        uri, opts = storage.join(request.getfixturevalue("s3_bucket"), "bad"), request.getfixturevalue("s3_opts")
    else:
        uri, opts = str(tmp_path / "bad"), None
    rows, kept_ids = _bad_rows()
    shards.write_shards(rows, uri, rows_per_shard=7, opts=opts)

    counter = pipeline.drop_counter()
    common = dict(tasks=TASKS, image_hw=(64, 64), opts=opts, counter=counter, batch_size=4)
    tokenized = pipeline.train_dataset(uri, "train", model_path=tiny_model_path, max_len=48, **common, family="paligemma").take_all()
    counts = ray_cluster.get(counter.get.remote())["train"]
    assert counts == EXPECTED
    # every example is a full, untruncated target: the suffix ends with <eos> inside max_len
    assert len(tokenized) == 18
    for r in tokenized:
        assert r["pixel_values"].shape == (3, 64, 64)
        assert (r["labels"] != -100).sum() >= 4

    examples = pipeline.examples_dataset(uri, "train", **dict(common, counter=None), family="paligemma").take_all()
    assert sorted({e["id"] for e in examples}) == sorted(kept_ids)
    by_task = {t: sorted(e["id"] for e in examples if e["task"] == t) for t in TASKS}
    assert by_task["point"] == by_task["detect"] == sorted(kept_ids)


def test_too_long_examples_are_dropped_and_counted(tmp_path, ray_cluster, tiny_model_path):
    uri = str(tmp_path / "long")
    rows = list(synthetic.generate_rows(8, seed=1, image_size=64, shapes_per_image=1, splits={"train": 1.0}))
    shards.write_shards(rows, uri)
    counter = pipeline.drop_counter()
    # 16 image tokens + <bos> + prompt + "\n" + 4 locs + label + <eos> does not fit in 20 tokens
    out = pipeline.train_dataset(uri, "train", tasks=["detect"], model_path=tiny_model_path, image_hw=(64, 64), max_len=20, counter=counter, family="paligemma").take_all()
    counts = ray_cluster.get(counter.get.remote())["train"]
    assert out == []
    assert counts["dropped:too_long"] == 8 and counts.get("tokenized", 0) == 0


def test_examples_render_source_pixel_targets():
    ex = synthetic.make_example(0, seed=0, image_size=64)
    (box,) = [o for o in ex["objects"] if o.__class__.__name__ == "Box"]
    out = pipeline.examples_for(ex["objects"], TASKS, 64, 64, "paligemma")
    assert [e["task"] for e in out] == TASKS
    assert out[0]["prefix"] == f"point to {box.label}"
    assert out[1]["prefix"] == f"detect {box.label}"
    y1 = int(np.clip(np.round(box.y1 / 64 * 1023), 0, 1023))
    assert out[1]["suffix"].startswith(f"<loc{y1:04d}>")
    assert out[1]["suffix"].endswith(box.label)


def test_training_read_fuses_with_preparation_and_matches_the_staged_functions(tmp_path, ray_cluster, tiny_model_path):
    """train_dataset runs the Parquet read and prepare_block in ONE task per block (the property
    bench/data_pipeline.py's throughput rests on), and its examples are exactly what the stage
    functions give when called one after the other in-process."""
    uri = str(tmp_path / "fused")
    rows = list(synthetic.generate_rows(40, seed=5, image_size=64, splits={"train": 1.0}))
    shards.write_shards(rows, uri, rows_per_shard=10)  # 4 files >= the test cluster's CPUs
    ds = pipeline.train_dataset(uri, "train", tasks=TASKS, model_path=tiny_model_path, image_hw=(64, 64), max_len=48, batch_size=8, family="paligemma")
    got = ds.take_all()
    stats = ds.stats()
    assert "ReadParquet->MapBatches(prepare_block)" in stats, stats

    table = shards.read_split(uri, "train")
    batch = {k: np.array(table[k].to_pylist(), dtype=object) for k in ("id", "image", "width", "height", "objects")}
    examples = pipeline.decode_and_expand(batch, split="train", tasks=TASKS, image_hw=(64, 64), family="paligemma")
    want = pipeline.tokenize(examples, split="train", model_path=tiny_model_path, max_len=48, family="paligemma")
    assert len(got) == len(want["input_ids"]) > 40

    def key(ids, pix):
        return (tuple(int(x) for x in ids), int(np.asarray(pix, dtype=np.int64).sum()))

    assert sorted(key(r["input_ids"], r["pixel_values"]) for r in got) == sorted(
        key(i, p) for i, p in zip(want["input_ids"], want["pixel_values"]))


@pytest.mark.parametrize(("files", "cpus", "blocks"), [
    (1, 2, 8),      # one small shard: split so both CPUs work (no fusion)
    (3, 4, 16),
    (2, 2, 2),      # a file per CPU: whole files, fused
    (20, 2, 4),     # 5 files per task
    (21, 2, 5),
    (20, 16, 16),   # at least one block per CPU
    (200, 16, 40),
])
def test_read_blocks(files, cpus, blocks):
    assert pipeline.read_blocks(files, cpus) == blocks


@pytest.mark.parametrize(("files", "cpus", "rows", "blocks"), [
    (1, 2, 54, 1),        # a tiny split: one block, not 8 tasks of 7 rows
    (1, 2, 300, 5),       # 64+ rows per block
    (1, 2, 10_000, 8),    # big enough: 4 blocks per CPU as before
    (3, 64, 900, 15),     # a big cluster no longer cuts 900 rows into 256 blocks
    (3, 64, 10, 3),       # never fewer blocks than files
    (20, 2, 54, 4),       # a file per CPU or more: the row count does not enter
])
def test_small_splits_are_not_cut_into_blocks_of_a_few_rows(files, cpus, rows, blocks):
    assert pipeline.read_blocks(files, cpus, rows) == blocks


def test_split_rows_reads_the_footers(tmp_path):
    from raytrain.data import shards

    uri = str(tmp_path / "data")
    shards.prepare_synthetic(uri, n=30, seed=1, splits={"train": 1.0}, rows_per_shard=12)
    paths, fs = shards.shard_source(uri, "train")
    assert len(paths) == 3 and pipeline.split_rows(paths, fs) == 30


def test_lost_drop_counter_is_reported_not_raised(ray_cluster):
    """A counter that died with its node must not fail a finished run: the counts are marked lost."""
    counter = pipeline.drop_counter()
    pipeline._report(counter, "train", {"rows_read": 3})
    assert pipeline.drop_counts(counter) == {"train": {"rows_read": 3}}
    ray_cluster.kill(counter)
    pipeline._report(counter, "train", {"rows_read": 1})  # logged, not raised
    assert pipeline.drop_counts(counter) == {"unavailable": "drop counter lost: ActorDiedError"}


def test_job_workers_get_the_ray_data_process_setting(ray_cluster):
    """The job's setup hook ran in its worker processes, where Ray Train's split coordinators run
    the training pipeline's executor (a class attribute does not travel with a dataset)."""
    from raytrain.launch import ray_runtime

    @ray_cluster.remote(num_cpus=0.1)
    def refresh_interval():
        from ray.data._internal.execution.resource_manager import ResourceManager

        return ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S

    assert ray_cluster.get(refresh_interval.remote()) == ray_runtime.LIMITS_REFRESH_S


def test_prepare_block_pieces_are_the_whole_block_cut_up_and_counted_once(tmp_path, ray_cluster, tiny_model_path):
    """prepare_block yields ~yield_bytes pieces: cut at every 4-example chunk (yield_bytes=1) they must
    be exactly the one-piece output, in order, with the block's drops counted once either way."""
    rows, _ = _bad_rows()
    uri = str(tmp_path / "pieces")
    shards.write_shards(rows, uri, rows_per_shard=100)
    table = shards.read_split(uri, "train")
    block = {k: np.array(table[k].to_pylist(), dtype=object) for k in ("id", "image", "width", "height", "objects")}
    runs = {}
    for yb in (pipeline.YIELD_BYTES, 1):
        counter = pipeline.drop_counter()
        pieces = list(pipeline.prepare_block(block, split="train", tasks=TASKS, image_hw=(64, 64), model_path=tiny_model_path,
                                             max_len=48, counter=counter, batch_size=4, yield_bytes=yb, family="paligemma"))
        runs[yb] = (pieces, ray_cluster.get(counter.get.remote())["train"])
    (whole, whole_counts), (cut, cut_counts) = runs[pipeline.YIELD_BYTES], runs[1]
    assert len(whole) == 1 and len(whole[0]["input_ids"]) == 18  # the 18 examples of the bad-rows test
    assert len(cut) >= 18 // 4 and all(1 <= len(p["input_ids"]) <= 4 for p in cut)
    for k in whole[0]:
        np.testing.assert_array_equal(np.concatenate([p[k] for p in cut]), whole[0][k])
    assert whole_counts == cut_counts == EXPECTED
