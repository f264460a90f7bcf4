"""PaliGemma JSONL (tests/assets/paligemma_mini, the primer's prefix/suffix schema) -> rows."""

import shutil
from collections import Counter
from pathlib import Path

import pytest

from raytrain.data.convert import common, jsonl
from raytrain.data.shards import PrepReport
from raytrain.formats.annotations import Absent, Box, Caption, CodedMask, Point, objects_from_json

ASSET = Path(__file__).parents[3] / "assets" / "paligemma_mini" / "data.jsonl"
SIZES = {"a.jpg": (100, 80), "b.jpg": (200, 100), "c.jpg": (64, 64)}


@pytest.fixture
def jsonl_dir(tmp_path, images):
    shutil.copy(ASSET, tmp_path / "data.jsonl")
    for i, (name, (w, h)) in enumerate(SIZES.items()):
        (tmp_path / name).write_bytes(images.encode(images.photo(w, h, seed=i)))
    return tmp_path


def _box(bins, w, h, label):
    y1, x1, y2, x2 = bins
    return Box(x1 / 1023 * w, y1 / 1023 * h, x2 / 1023 * w, y2 / 1023 * h, label)


def test_jsonl_rows_and_counts(jsonl_dir):
    report, drops, notes = PrepReport(), Counter(), Counter()
    path = jsonl.find_jsonl(str(jsonl_dir))

    recs = jsonl.records(path, report=report)
    rows = {r["id"]: r for r in common.iter_rows(recs, jsonl.to_objects, report, object_drops=drops, notes=notes)}
    assert report.rows_in == 12  # 13 lines, one blank
    assert report.dropped == {
        "bad_json": 1, "unsupported_task": 1, "missing_field": 1,  # read
        "image_missing": 1, "unparsable_suffix": 1,  # processed
    }
    report.check()
    # b.jpg#10 answers nothing: a negative for its class
    assert sorted(rows) == ["a.jpg#1", "a.jpg#4", "b.jpg#10", "b.jpg#2", "c.jpg#12", "c.jpg#13", "c.jpg#3"]
    assert sum(report.rows_written.values()) == 7
    # rows of one image share a split
    assert rows["a.jpg#1"]["split"] == rows["a.jpg#4"]["split"]
    assert len({rows[k]["split"] for k in ("c.jpg#3", "c.jpg#12", "c.jpg#13")}) == 1

    obj = {k: objects_from_json(r["objects"]) for k, r in rows.items()}
    assert obj["a.jpg#1"] == [Caption("a tall crane stands in the heart of the city.")]
    assert obj["a.jpg#4"] == [Point(256 / 1023 * 100, 512 / 1023 * 80, "cat")]  # y before x
    assert obj["b.jpg#2"] == [_box((429, 22, 949, 592), 200, 100, "butterfly"), _box((2, 104, 429, 456), 200, 100, "butterfly")]
    assert obj["c.jpg#12"] == [_box((44, 150, 1005, 1011), 64, 64, "squirrel")]  # "dog" is not in the prompt

    assert obj["b.jpg#10"] == [Absent("squirrel")]

    # segment rows keep each object's box with its 16 <seg> codes as given (trained on as they are)
    b = _box((277, 241, 782, 809), 64, 64, "butterfly")
    assert obj["c.jpg#3"] == [CodedMask(b.x1, b.y1, b.x2, b.y2, "butterfly", (102, 10, 12, 98, 7, 56, 89, 47, 34, 77, 61, 23, 5, 4, 99, 73))]
    assert len(obj["c.jpg#13"]) == 1  # its second object has 15 codes: no mask to train on
    assert drops == {"suffix_unknown_label": 1, "seg_tokens_incomplete": 1}
    assert notes == {"negative": 1}


def test_task_of():
    assert jsonl.task_of("detect squirrel ; butterfly") == ("detect", ["squirrel", "butterfly"])
    assert jsonl.task_of("caption en") == ("caption", [])
    assert jsonl.task_of("point to red cup") == ("point", ["red cup"])
    assert jsonl.task_of("Segment cat") == ("segment", ["cat"])
    assert jsonl.task_of("answer en why?") == (None, [])
    assert jsonl.task_of("") == (None, [])
