"""data.prepare.subset for every source format (issue 14 item 7; seed 002 trained on 1,250 Visual
Genome images, seed 000 on 100,000 PixMo rows): a seeded random subset of IMAGES (every row of a
chosen image kept) or of rows, drawn where `raytrain prepare` reads the source
(`launch.prepare.source_records`), the rest counted as `not_in_subset`."""

from collections import Counter
from pathlib import Path

import pytest

from raytrain import config
from raytrain.data.convert import common
from raytrain.data.shards import PrepReport
from raytrain.launch import prepare

ASSETS = Path(__file__).parents[3] / "assets"
D001 = ASSETS / "seed001_datature_jsonl"


@pytest.fixture
def several_lines_per_image(tmp_path):
    """seed 001's caption + detect lines in one file: most images have two lines."""
    path = tmp_path / "both.jsonl"
    path.write_text((D001 / "caption.jsonl").read_text() + (D001 / "detect.jsonl").read_text())
    return str(path)


SOURCES = {
    "coco": lambda _: str(ASSETS / "coco_mini" / "instances_mini.json"),
    "jsonl": lambda fx: fx,
    "pixmo_points": lambda _: str(ASSETS / "seed000_pixmo_points" / "rows.jsonl"),
    "visual_genome": lambda _: str(ASSETS / "seed002_visual_genome"),
    "captions": lambda _: str(ASSETS / "risc_mini" / "captions.csv"),
    "ms_swift": lambda _: str(ASSETS / "ms_swift_grounding" / "data.jsonl"),
    "llamafactory": lambda _: str(ASSETS / "llamafactory_sharegpt") + "#raytrain_grounding",
}


def _records(fmt, path, tmp_path, **opts):
    pc = config.PrepareConfig(format=fmt, path=path, out=str(tmp_path / "out"), **opts)
    report, info = PrepReport(), {}
    recs, _ = prepare.source_records(pc, report, Counter(), info)
    return list(recs), report, info


@pytest.mark.parametrize("fmt", sorted(SOURCES))
def test_a_subset_of_images_for_every_source(fmt, tmp_path, several_lines_per_image):
    assert set(SOURCES) == set(config.PREPARE_FORMATS)  # every converter is covered
    path = SOURCES[fmt](several_lines_per_image)
    full, full_report, _ = _records(fmt, path, tmp_path)
    images = Counter(r["split_key"] for r in full)
    assert len(images) >= 3, "the fixture needs a few images to draw from"
    recs, report, info = _records(fmt, path, tmp_path, subset=2, seed=3)
    chosen = {r["split_key"] for r in recs}
    assert len(chosen) == 2
    # every row of a chosen image comes along (an image never loses some of its rows)
    assert Counter(r["split_key"] for r in recs) == {k: images[k] for k in chosen}
    assert [r["id"] for r in recs] == [r["id"] for r in full if r["split_key"] in chosen]  # ids and order as in the full run
    # counted: the same rows come in, the others leave as not_in_subset, and rows in == records + drops
    left_out = len(full) - len(recs)
    assert report.rows_in == full_report.rows_in
    assert report.dropped == {**full_report.dropped, "not_in_subset": left_out}
    assert report.rows_in == len(recs) + sum(report.dropped.values())
    assert info["subset"] == {"unit": "image", "requested": 2, "available": len(images), "chosen": 2, "rows_kept": len(recs),
                              "rows_left_out": left_out}
    # seeded: the same draw again, and a subset at least as large as the source keeps everything
    assert [r["id"] for r in _records(fmt, path, tmp_path, subset=2, seed=3)[0]] == [r["id"] for r in recs]
    everything, rep_all, _ = _records(fmt, path, tmp_path, subset=len(images), seed=3)
    assert len(everything) == len(full) and "not_in_subset" not in rep_all.dropped


def test_the_draw_depends_on_the_seed_not_on_the_row_order():
    keys = [f"img{i}" for i in range(40)]
    a = {keys[i] for i in common.subset_indices(keys, 10, seed=0)}
    assert len(a) == 10
    assert {keys[::-1][i] for i in common.subset_indices(keys[::-1], 10, seed=0)} == a
    assert {keys[i] for i in common.subset_indices(keys, 10, seed=1)} != a
    # adding images keeps most of the draw (each old pick stays unless a new image outranks it)
    more = keys + [f"new{i}" for i in range(10)]
    assert len(a & {more[i] for i in common.subset_indices(more, 10, seed=0)}) >= 5


def test_subset_and_split_draws_are_independent():
    """Both hash (seed, image): the subset salts its key, or its images would all share a split."""
    from raytrain.data import splits

    keys = [f"img{i}" for i in range(400)]
    chosen = [keys[i] for i in common.subset_indices(keys, 100, seed=0)]
    per_split = Counter(splits.split_of(k, 0, {"train": 0.5, "val": 0.5}) for k in chosen)
    assert 30 <= per_split["val"] <= 70


def test_pixmo_draws_rows_or_images_before_reading(tmp_path):
    path = str(ASSETS / "seed000_pixmo_points" / "rows.jsonl")
    rows, report, info = _records("pixmo_points", path, tmp_path, subset=4, subset_unit="row", seed=0)
    full, _, _ = _records("pixmo_points", path, tmp_path)
    assert info["subset"]["unit"] == "row" and info["subset"]["chosen"] == 4
    # row ids keep their source numbering, so a subset's rows are the full run's rows
    assert {r["id"] for r in rows} <= {r["id"] for r in full}
    assert report.rows_in == 10 and report.dropped.get("not_in_subset") == 10 - 4
    by_image, _, info = _records("pixmo_points", path, tmp_path, subset=1, seed=0)
    (url,) = {r["split_key"] for r in by_image}
    assert len(by_image) == sum(r["split_key"] == url for r in full)
    with pytest.raises(ValueError, match="subset_unit"):
        _records("visual_genome", str(ASSETS / "seed002_visual_genome"), tmp_path, subset=1, subset_unit="label")


def test_the_stage_table_shows_the_subset():
    report = PrepReport(rows_in=20, rows_written={"train": 3}, dropped={"missing_field": 2, "not_in_subset": 12, "image_missing": 3})
    table = prepare.stage_table(report, {"missing_field", "not_in_subset"}, ["train"], subset=True)
    assert table[:4] == [("rows in", 20), ("after reading annotations", 18), ("after random subset", 6), ("after fetching images", 3)]
    plain = prepare.stage_table(PrepReport(rows_in=5, rows_written={"train": 5}), set(), ["train"])
    assert "after random subset" not in [name for name, _ in plain]
