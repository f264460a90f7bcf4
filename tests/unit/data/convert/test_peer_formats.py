"""Data formats of the tools users come from (issue 16 item 5): ms-swift's grounding JSONL and
LLaMA-Factory's ShareGPT-with-images, on fixtures of real photographs (tests/assets/README.md):
every valid row kept with its objects in pixels, every bad row counted by reason; plus the
placement rules of each format on small rows written here."""

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from raytrain import config
from raytrain.data.convert import common, llamafactory, ms_swift
from raytrain.data.shards import PrepReport
from raytrain.formats.annotations import Box, Caption, Point, Region, objects_from_json
from raytrain.launch import prepare

ASSETS = Path(__file__).parents[3] / "assets"
SWIFT = ASSETS / "ms_swift_grounding"
LF = ASSETS / "llamafactory_sharegpt"


def _convert(recs_of, to_objects):
    report, drops, notes = PrepReport(), Counter(), Counter()
    rows = {r["id"]: r for r in common.iter_rows(recs_of(report), to_objects, report, object_drops=drops, notes=notes)}
    report.check()
    return report, {k: objects_from_json(r["objects"]) for k, r in rows.items()}, rows, drops


def _approx(objs):
    """Objects as comparable tuples, coordinates to 0.1 px."""
    out = []
    for o in objs:
        if isinstance(o, Point):
            out.append(("point", round(o.x, 1), round(o.y, 1), o.label))
        elif isinstance(o, (Box, Region)):
            out.append((type(o).__name__.lower(), round(o.x1, 1), round(o.y1, 1), round(o.x2, 1), round(o.y2, 1), o.label))
        else:
            out.append(o)
    return out


# ---------------------------------------------------------------------------------------- ms-swift


def test_ms_swift_fixture_keeps_every_valid_row():
    report, objs, rows, drops = _convert(lambda r: ms_swift.records(ms_swift.find_file(str(SWIFT)), report=r), ms_swift.to_objects)
    assert report.rows_in == 13
    assert report.dropped == {
        "bad_json": 1, "multi_image": 1, "placeholder_mismatch": 1, "unknown_bbox_type": 1,  # while reading
        "image_missing": 1, "coords_out_of_range": 1,  # with the image: missing file; x2 = 900 on a 320-px image
    }
    assert report.converted == {"converted_from_L": 1}  # the cameraman photo is grayscale
    assert drops == {}
    assert _approx(objs["images/coffee.jpg#1"]) == [("box", 173.9, 35.1, 226.1, 173.1, "spoon")]
    # "<ref-object><bbox> and <ref-object><bbox>": each phrase with its own box
    assert [o.label for o in objs["images/astronaut.jpg#2"]] == ["an american flag", "a model of the space shuttle"]
    # "Find the <ref-object>" -> "<bbox><bbox>": both boxes are the one phrase's; norm1 -> pixels of 320 x 213
    assert _approx(objs["images/chelsea.jpg#3"]) == [("box", 95.8, 61.8, 150.4, 102.9, "cat's eye"), ("box", 209.3, 79.5, 244.8, 115.0, "cat's eye")]
    assert _approx(objs["images/quokka.jpg#4"]) == [("point", 104.3, 89.9, "quokka's nose")]  # a 2-number bbox is a point
    assert objs["images/camera.jpg#5"] == [Caption("A man in a dark coat looks through a camera on a tripod in a grassy field.")]
    assert [o.label for o in objs["images/quokka.jpg#6"]] == ["quokka"]  # objects given as a JSON string
    assert [o.label for o in objs["images/astronaut.jpg#7"]] == ["face", "helmet"]  # two turns, one box each
    extra = json.loads(rows["images/astronaut.jpg#2"]["extra"])["ms_swift"]
    assert extra["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}  # the prompts travel along


def _swift(user, answer, objects=None, **more):
    row = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}
    if objects is not None:
        row["objects"] = objects
    return {**row, **more}


def _swift_rows(rows, tmp_path, images):
    (tmp_path / "a.jpg").write_bytes(images.encode(images.photo(100, 50)))
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps({"images": ["a.jpg"], **r}) for r in rows))
    return _convert(lambda r: ms_swift.records(str(tmp_path / "data.jsonl"), report=r), ms_swift.to_objects)


def test_ms_swift_tag_rules(tmp_path, images):
    report, objs, _, drops = _swift_rows([
        # a box with no <ref-object> before it, a 3-number box, and a box no tag uses
        _swift("<image>Find <ref-object>", "<bbox> <bbox>", {"ref": ["cat"], "bbox": [[1, 2, 3, 4], [1, 2, 3], [5, 5, 9, 9]]}),
        _swift("<image>Click it", "click(<bbox>)", {"ref": [], "bbox": [[10, 20]]}),  # ms-swift's GUI example: no phrase
        _swift("<image>What is in <bbox>?", "a cat", {"ref": [], "bbox": [[1, 1, 5, 5]]}),  # a region query
        _swift("<image>Find <ref-object>", "<bbox>", {"ref": ["cat"], "bbox": [[-0.5, 0, 100.4, 50]]}),  # within 1 px: snapped
        {"messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "A."},
                      {"role": "user", "content": "More?"}, {"role": "assistant", "content": "B."}]},  # a chat, not a caption
        {"messages": [{"role": "user", "content": "<image>Find <ref-object>"}, {"role": "assistant", "content": "<bbox>"},
                      {"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "Grey."}],
         "objects": {"ref": ["dog"], "bbox": [[0.1, 0.2, 0.5, 0.6]], "bbox_type": "norm1"}},
        _swift("<image>Find <ref-object>", "<bbox>", {"ref": ["cat"], "bbox": [[1, 2, 3, 4]], "image_id": [1]}),
        _swift("<image>Find <ref-object>", "<bbox>", "{not json"),
        {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": "not a list"},
    ], tmp_path, images)
    assert report.rows_in == 10
    assert report.dropped == {
        "region_query": 1, "bad_objects": 2, "bad_messages": 1, "missing_field": 1,  # while reading
        "empty_annotations": 1,  # the GUI click: its only box has no phrase
        "multi_turn_text": 1,
    }
    assert sorted(objs) == ["a.jpg#1", "a.jpg#4", "a.jpg#6"]
    assert _approx(objs["a.jpg#1"]) == [("box", 1, 2, 3, 4, "cat")]
    assert _approx(objs["a.jpg#4"]) == [("box", 0, 0, 100, 50, "cat")]
    assert _approx(objs["a.jpg#6"]) == [("box", 10, 10, 50, 30, "dog")]
    assert drops == {"bad_bbox": 1, "unreferenced_bbox": 1, "text_turn": 1}


def test_ms_swift_walk_pairs_refs_and_boxes_in_order():
    w = ms_swift.walk(
        [{"role": "user", "content": "<image>Where are <ref-object> and <ref-object>?"},
         {"role": "assistant", "content": "<bbox><bbox> and <bbox>"}],
        {"ref": ["sheep", "dog"], "bbox": [[1, 1, 2, 2], [3, 3, 4, 4], [5, 5, 6, 6]]},
    )
    # a box takes the LAST phrase before it, in any turn: here "dog" for all three, as ms-swift fills them
    assert [label for _, label in w.targets] == ["dog", "dog", "dog"]
    assert w.answers == ["and"] and w.grounded == [True]  # the answer's text around its boxes
    assert ms_swift.walk([{"role": "user", "content": "<ref-object>"}, {"role": "assistant", "content": "x"}], {"ref": []}).reason == "placeholder_mismatch"


# ---------------------------------------------------------------------------------------- LLaMA-Factory


def test_llamafactory_fixture_keeps_every_valid_row():
    report, objs, rows, drops = _convert(lambda r: llamafactory.records(f"{LF}#raytrain_grounding", report=r), llamafactory.to_objects)
    assert report.rows_in == 10
    assert report.dropped == {
        "image_tag_mismatch": 1, "bad_messages": 1,  # while reading: no <image> tag; an answer before the question
        "image_missing": 1, "coords_out_of_range": 1, "unparsable_answer": 1,  # a JSON answer cut before its first box
    }
    assert drops == {}
    assert _approx(objs["images/coffee.jpg#1"]) == [("box", 92, 9, 219, 162, "cup"), ("box", 174, 35, 226, 173, "spoon")]
    assert _approx(objs["images/chelsea.jpg#2"]) == [("point", 123, 82, "cat's eye"), ("point", 227, 97, "cat's eye")]
    assert objs["images/astronaut.jpg#3"] == [
        Caption("A smiling astronaut in an orange suit in front of an American flag and a model of the space shuttle.")]
    assert _approx(objs["images/quokka.jpg#4"]) == [("box", 49, 17, 183, 214, "quokka")]
    assert _approx(objs["images/rocket.jpg#5"]) == [("region", 154, 64, 168, 206, "a rocket on the launch pad")]  # seed 002's pairs
    msgs = json.loads(rows["images/astronaut.jpg#3"]["extra"])["llamafactory"]["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]


def test_llamafactory_default_sharegpt_tags():
    report, objs, rows, _ = _convert(
        lambda r: llamafactory.records(f"{LF}/dataset_info.json#raytrain_grounding_sharegpt", report=r), llamafactory.to_objects
    )
    assert report.rows_in == 2 and report.dropped == {}
    assert _approx(objs["images/coffee.jpg#1"]) == [("box", 40, 51, 256, 207, "saucer")]
    assert objs["images/chelsea.jpg#2"] == [Caption("A close-up of a tabby cat with green eyes.")]
    # the "system" column of the dataset_info entry becomes the system turn
    assert json.loads(rows["images/chelsea.jpg#2"]["extra"])["llamafactory"]["messages"][0] == {"role": "system", "content": "Answer briefly."}


def test_llamafactory_dataset_resolution(tmp_path):
    shutil.copytree(LF, tmp_path / "lf")
    root = tmp_path / "lf"
    with pytest.raises(ValueError, match="2 local sharegpt datasets"):
        llamafactory.dataset(str(root))
    with pytest.raises(ValueError, match="not in"):
        llamafactory.dataset(f"{root}#nope")
    ds = llamafactory.dataset(f"{root}#raytrain_grounding")
    assert ds.file == str(root / "grounding.json") and ds.tags["role_tag"] == "role" and ds.media_dir == str(root)
    # a data file on its own: OpenAI-style tags detected from its first row, images next to it
    bare = llamafactory.dataset(str(root / "grounding.json"))
    assert bare.columns["messages"] == "messages" and bare.tags["user_tag"] == "user"
    assert llamafactory.dataset(str(root / "grounding_sharegpt.json")).tags == llamafactory.DEFAULT_TAGS
    info = json.loads((root / "dataset_info.json").read_text())
    (root / "dataset_info.json").write_text(json.dumps({
        "only": info["raytrain_grounding"],
        "alpaca": {"file_name": "grounding.json"},
        "hub": {"hf_hub_url": "someone/data", "formatting": "sharegpt"},
    }))
    assert llamafactory.dataset(str(root)).name == "only"  # the one local sharegpt dataset
    with pytest.raises(ValueError, match="only sharegpt"):
        llamafactory.dataset(f"{root}#alpaca")
    with pytest.raises(ValueError, match="only local files"):
        llamafactory.dataset(f"{root}#hub")


def _lf_rows(rows, tmp_path, images):
    (tmp_path / "a.jpg").write_bytes(images.encode(images.photo(100, 50)))
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return _convert(lambda r: llamafactory.records(str(tmp_path / "data.jsonl"), report=r), llamafactory.to_objects)


def _conv(*turns, images=("a.jpg",)):
    roles = ("human", "gpt")
    return {"conversations": [{"from": roles[i % 2], "value": t} for i, t in enumerate(turns)], "images": list(images)}


def test_llamafactory_answers(tmp_path, images):
    report, objs, _, drops = _lf_rows([
        # a truncated answer keeps its complete boxes; the cut one is counted
        _conv("<image>Find the cats", '[{"bbox_2d": [1, 2, 30, 40], "label": "cat"}, {"bbox_2d": [50, 2'),
        _conv("<image>Find the dogs", "```json\n[]\n```"),  # an answer with no objects: nothing to train on today
        _conv("<image>Find it", "<image>no", images=("a.jpg",)),  # two <image> tags for one image
        _conv("<image>Find it", '{"bbox_2d": [1, 2, 3, 4], "label": "x"}', images=("a.jpg", "a.jpg")),
        _conv("<image>Find it", '{"bbox_2d": [1, 2, 3, 4], "label": "x"}', images=()),
        {"conversations": [{"from": "human", "value": "<image>call"}, {"from": "function_call", "value": "{}"}], "images": ["a.jpg"]},
        _conv("<image>Find the cat", '{"bbox_2d": [1, 2, 30, 40], "label": "cat"}', "Its colour?", "Grey."),
        _conv("<image>Point", '[{"point_2d": [10, 20], "label": "nose"}, {"point_2d": [1e9, 2], "label": "nose"}]'),
    ], tmp_path, images)
    assert report.rows_in == 8
    assert report.dropped == {
        "image_tag_mismatch": 1, "multi_image": 1, "missing_field": 1, "unsupported_role": 1,  # while reading
        "empty_annotations": 1, "coords_out_of_range": 1,  # "[]"; a point a billion pixels to the right
    }
    assert _approx(objs["a.jpg#1"]) == [("box", 1, 2, 30, 40, "cat")]
    assert _approx(objs["a.jpg#7"]) == [("box", 1, 2, 30, 40, "cat")]
    assert drops == {"answer_truncated_object": 1, "text_turn": 1}


# ---------------------------------------------------------------------------------------- registration


def test_prepare_knows_the_peer_formats(tmp_path):
    for fmt in ("ms_swift", "llamafactory"):
        assert fmt in config.PREPARE_FORMATS
    cfg = config.load(None, [f"data.source=llamafactory:{LF}#raytrain_grounding", f"data.uri={tmp_path}/out"])
    pc = prepare.prepare_config(cfg)
    assert (pc.format, pc.path) == ("llamafactory", f"{LF}#raytrain_grounding")
    report = PrepReport()
    recs, to_objects = prepare.source_records(pc, report, Counter())
    # records: the rows that passed reading (10 in, 2 dropped there); the rest is decided with the image
    assert to_objects is llamafactory.to_objects and len(list(recs)) == 8 and report.rows_in == 10
    pc = prepare.prepare_config(config.load(None, [f"data.source=ms_swift:{SWIFT}", f"data.uri={tmp_path}/out"]))
    report = PrepReport()
    recs, to_objects = prepare.source_records(pc, report, Counter())
    assert to_objects is ms_swift.to_objects and len(list(recs)) == 9 and report.rows_in == 13
