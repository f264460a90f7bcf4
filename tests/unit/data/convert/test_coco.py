"""COCO instances JSON (tests/assets/coco_mini, real schema) -> rows with boxes and masks."""

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from raytrain.data.convert import coco, common
from raytrain.data.shards import PrepReport
from raytrain.formats.annotations import Box, objects_from_json

ASSET = Path(__file__).parents[3] / "assets" / "coco_mini" / "instances_mini.json"


@pytest.fixture
def coco_dir(tmp_path, images):
    shutil.copy(ASSET, tmp_path / "instances_mini.json")
    for name, (w, h) in {"a.jpg": (64, 48), "b.jpg": (32, 32), "c.jpg": (40, 40), "d.jpg": (20, 20)}.items():
        (tmp_path / name).write_bytes(images.encode(images.photo(w, h)))
    return tmp_path


def test_coco_rows_and_counts(coco_dir):
    report, drops = PrepReport(), Counter()
    ann = coco.find_annotation_file(str(coco_dir))
    recs = coco.records(ann, report=report, object_drops=drops)
    rows = {r["id"]: r for r in common.iter_rows(recs, coco.to_objects, report, splits={"train": 1.0}, object_drops=drops)}
    assert list(rows) == ["coco-1"]
    assert report.rows_in == 6
    assert report.dropped == {
        "missing_field": 1,  # image 5 has no file_name
        "empty_annotations": 2,  # image 2 (its objects were all dropped), image 6 (none)
        "image_missing": 1,  # image 3
        "size_mismatch": 1,  # image 4: declared 50x50, the file is 40x40
    }
    assert report.rows_written == {"train": 1}
    report.check()
    # image 2's zero-width box and unknown category emptied a row that was then dropped:
    # object counts are for kept rows only, the row's reason covers the rest
    assert drops == {"annotation_for_unknown_image": 1}
    image2 = next(r for r in coco.records(ann) if r["id"] == "coco-2")
    assert coco.to_objects(json.loads(image2["annotation"]), 32, 32).object_drops == {"degenerate_box": 1, "unknown_category": 1}

    objs = objects_from_json(rows["coco-1"]["objects"])
    assert [type(o).__name__ for o in objs] == ["Box", "Mask", "Box", "Box", "Mask", "Box", "Mask"]
    poly_box, poly_mask, clipped, crowd_box, crowd_mask, rle_box, rle_mask = objs
    assert poly_box == Box(10, 8, 30, 20, "cat")  # xywh -> x1y1x2y2
    assert clipped == Box(50, 20, 64, 30, "person")  # 64.5 is within the tolerance: clipped
    assert crowd_box == Box(40, 2, 60, 10, "person")
    expected = np.zeros((48, 64), bool)
    expected[2:10, 40:60] = True
    assert (crowd_mask.to_array() == expected).all() and crowd_mask.label == "person"  # uncompressed RLE
    assert rle_box == rle_mask.box == Box(5, 30, 15, 40, "cat") and rle_mask.area == 100  # compressed RLE
    # the polygon is rasterised the COCO way: about its 20 x 12 area, in its box
    assert poly_mask.size == (48, 64) and abs(poly_mask.area - 240) < 40
    b = poly_mask.box
    assert (b.x1, b.y1) == (10, 8) and 29 <= b.x2 <= 31 and 19 <= b.y2 <= 21


def test_coco_box_only_and_bad_segmentations():
    conv = coco.to_objects(
        {"objects": [
            {"bbox": [0, 0, 4, 4], "segmentation": [[1, 1, 2, 2]], "iscrowd": 0, "label": "a"},  # 2 vertices
            {"bbox": [0, 0, 4, 4], "segmentation": {"size": [9, 9], "counts": [81]}, "iscrowd": 1, "label": "a"},
            {"bbox": [0, 0, 4, 4], "segmentation": [[0, 0, 0.1, 0, 0.1, 0.1]], "iscrowd": 0, "label": "a"},
            {"bbox": [-5, 0, 4, 4], "segmentation": None, "iscrowd": 0, "label": "a"},
            {"bbox": [0, 0, 4], "segmentation": None, "iscrowd": 0, "label": "a"},
        ]},
        10, 10,
    )
    assert conv.objects == [Box(0, 0, 4, 4, "a")] * 3
    assert conv.object_drops == {"bad_segmentation": 1, "mask_size_mismatch": 1, "empty_mask": 1,
                                 "coords_out_of_range": 1, "degenerate_box": 1}


def test_coco_masks_off_and_missing_annotation_file(coco_dir, tmp_path_factory):
    recs = list(coco.records(str(coco_dir / "instances_mini.json"), masks=False))
    assert all(o["segmentation"] is None for r in recs for o in json.loads(r["annotation"])["objects"])
    with pytest.raises(FileNotFoundError):
        coco.find_annotation_file(str(tmp_path_factory.mktemp("empty")))
