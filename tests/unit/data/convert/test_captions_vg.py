"""Caption sets (RISC captions.csv, real columns; JSON) and Visual Genome region descriptions."""

import json
import shutil
from collections import Counter
from pathlib import Path

from raytrain.data.convert import captions, common, visual_genome
from raytrain.data.shards import PrepReport
from raytrain.formats.annotations import Caption, Region, objects_from_json

RISC = Path(__file__).parents[3] / "assets" / "risc_mini" / "captions.csv"


def test_risc_csv(tmp_path, images):
    # the edge-case rows (first four) get made-up images; the seed-003 rows after them have real
    # photos in the folder (tests/unit/data/convert/test_seed_fixtures.py reads those)
    shutil.copytree(RISC.parent, tmp_path, dirs_exist_ok=True)
    for i, name in enumerate(["airport_001.png", "harbor_002.png"]):
        (tmp_path / name).write_bytes(images.encode(images.photo(24, 24, seed=i), "PNG"))
    report, drops = PrepReport(), Counter()
    recs = captions.records(str(tmp_path / "captions.csv"), report=report)
    rows = {r["id"]: r for r in common.iter_rows(recs, captions.to_objects, report, object_drops=drops)}
    assert report.rows_in == 7 and report.dropped == {"missing_field": 1, "image_missing": 1}
    report.check()
    # the source's own splits are kept
    assert {k: r["split"] for k, r in rows.items()} == {
        "captions-airport_001.png": "train", "captions-harbor_002.png": "val", "captions-moon_004.jpg": "train",
        "captions-galaxies_005.jpg": "val", "captions-gravel_006.jpg": "test"}
    caps = objects_from_json(rows["captions-airport_001.png"]["objects"])
    assert len(caps) == 5 and caps[0] == Caption("a plane is parked at the airport .")
    assert objects_from_json(rows["captions-harbor_002.png"]["objects"]) == [
        Caption("many boats are docked in the harbor ."),
        Caption("boats docked in a harbor, next to a pier ."),
        Caption("several boats are moored in the harbor ."),
    ]
    assert drops == {"empty_text": 2}  # an empty and a blank caption


def test_captions_json_forms(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"image": "x.png", "captions": ["one", "two"], "split": "test"}]))
    (tmp_path / "b.json").write_text(json.dumps({"y.png": ["three"]}))
    a = list(captions.records(str(tmp_path / "a.json")))
    b = list(captions.records(str(tmp_path / "b.json")))
    assert a[0]["split"] == "test" and json.loads(a[0]["annotation"]) == {"captions": ["one", "two"]}
    assert b[0]["image_ref"] == str(tmp_path / "y.png") and b[0]["split"] == ""
    assert captions.to_objects({"captions": ["  ", ""]}, 1, 1).objects == []


def test_visual_genome(tmp_path, images, image_server):
    (tmp_path / "VG_100K").mkdir()
    (tmp_path / "VG_100K_2").mkdir()
    (tmp_path / "VG_100K" / "1.jpg").write_bytes(images.encode(images.photo(80, 60)))
    (tmp_path / "VG_100K_2" / "2.jpg").write_bytes(images.encode(images.photo(40, 40)))
    image_server.files["3.jpg"] = images.encode(images.photo(30, 20))
    regions = [
        {"id": 1, "regions": [
            {"region_id": 11, "image_id": 1, "phrase": "a man wearing a yellow shirt", "x": 10, "y": 5, "width": 30, "height": 40},
            {"region_id": 12, "image_id": 1, "phrase": "the water is  blue ", "x": 50, "y": 30, "width": 40, "height": 40},
            {"region_id": 13, "image_id": 1, "phrase": "", "x": 1, "y": 1, "width": 5, "height": 5},
            {"region_id": 14, "image_id": 1, "phrase": "off the image", "x": 90, "y": 1, "width": 5, "height": 5},
        ]},
        {"id": 2, "regions": [{"region_id": 21, "image_id": 2, "phrase": "sky", "x": 0, "y": 0, "width": 40, "height": 10}]},
        {"id": 3, "regions": [{"region_id": 31, "image_id": 3, "phrase": "a dog", "x": 2, "y": 2, "width": 10, "height": 10}]},
        {"id": 4, "regions": [{"region_id": 41, "image_id": 4, "phrase": "gone", "x": 2, "y": 2, "width": 10, "height": 10}]},
        {"regions": []},
    ]
    data = [
        {"image_id": 1, "url": "http://unused/1.jpg", "width": 80, "height": 60},
        {"image_id": 2, "url": "http://unused/2.jpg", "width": 41, "height": 40},  # wrong size on record
        {"image_id": 3, "url": f"{image_server.url}/img/3.jpg", "width": 30, "height": 20},
    ]
    (tmp_path / "region_descriptions.json").write_text(json.dumps(regions))
    (tmp_path / "image_data.json").write_text(json.dumps(data))
    report, drops, notes = PrepReport(), Counter(), Counter()
    recs = visual_genome.records(str(tmp_path), report=report)
    rows = {r["id"]: r for r in common.iter_rows(recs, visual_genome.to_objects, report, object_drops=drops, notes=notes)}
    assert report.rows_in == 5
    assert report.dropped == {"missing_field": 1, "size_mismatch": 1, "image_missing": 1}
    report.check()
    assert sorted(rows) == ["visual_genome-1", "visual_genome-3"]
    assert objects_from_json(rows["visual_genome-1"]["objects"]) == [
        Region(10, 5, 40, 45, "a man wearing a yellow shirt"),
        Region(50, 30, 80, 60, "the water is blue"),  # clipped to the 80x60 image
    ]
    assert objects_from_json(rows["visual_genome-3"]["objects"]) == [Region(2, 2, 12, 12, "a dog")]  # by URL
    assert drops == {"empty_text": 1, "degenerate_box": 1}
    assert notes == {"regions_clipped": 1}
