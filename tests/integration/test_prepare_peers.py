"""`raytrain prepare` on Ray Data for the peer formats (issue 16 item 5): ms-swift's grounding JSONL
and a LLaMA-Factory dataset from tests/assets (real photographs), through `data.source` as a user
writes it. Every valid row lands in a shard with its objects; every bad row is in the report
under its reason, and the stage table accounts for all of them."""

from pathlib import Path

import pytest

from raytrain import config
from raytrain.data import shards
from raytrain.formats.annotations import objects_from_json
from raytrain.launch import prepare

pytestmark = pytest.mark.integration

ASSETS = Path(__file__).parents[1] / "assets"
CASES = {
    "ms_swift": (
        f"ms_swift:{ASSETS / 'ms_swift_grounding'}",
        13,
        {"bad_json": 1, "multi_image": 1, "placeholder_mismatch": 1, "unknown_bbox_type": 1, "image_missing": 1, "coords_out_of_range": 1},
        {"images/coffee.jpg#1": ["spoon"], "images/astronaut.jpg#2": ["an american flag", "a model of the space shuttle"],
         "images/chelsea.jpg#3": ["cat's eye", "cat's eye"], "images/quokka.jpg#4": ["quokka's nose"],
         "images/camera.jpg#5": ["caption"], "images/quokka.jpg#6": ["quokka"], "images/astronaut.jpg#7": ["face", "helmet"]},
    ),
    "llamafactory": (
        f"llamafactory:{ASSETS / 'llamafactory_sharegpt'}#raytrain_grounding",
        10,
        {"image_tag_mismatch": 1, "bad_messages": 1, "image_missing": 1, "coords_out_of_range": 1, "unparsable_answer": 1},
        {"images/coffee.jpg#1": ["cup", "spoon"], "images/chelsea.jpg#2": ["cat's eye", "cat's eye"],
         "images/astronaut.jpg#3": ["caption"], "images/quokka.jpg#4": ["quokka"],
         "images/rocket.jpg#5": ["a rocket on the launch pad"]},
    ),
}


@pytest.mark.parametrize("fmt", list(CASES))
def test_prepare_peer_format(fmt, tmp_path, ray_cluster):
    source, rows_in, dropped, kept = CASES[fmt]
    out = tmp_path / "out"
    cfg = config.load(None, [f"data.source={source}", f"data.uri={out}", "data.rows_per_shard=4",
                             f"data.prepare.cache_dir={tmp_path / 'cache'}"])
    report = prepare.main(cfg)

    assert report["rows_in"] == rows_in
    assert report["dropped"] == dropped
    assert sum(report["rows_written"].values()) == len(kept)
    assert report["rows_in"] == sum(report["rows_written"].values()) + sum(report["dropped"].values())
    assert report["stages"][5] == ["after annotation checks", len(kept)]
    rows = {}
    for split in report["rows_written"]:
        for r in shards.read_split(str(out), split).to_pylist():
            rows[r["id"]] = r
    assert {k: [o.label or "caption" for o in objects_from_json(r["objects"])] for k, r in rows.items()} == kept
    assert all(r["source"] == fmt and r["extra"] for r in rows.values())  # the source's prompts kept beside the objects
