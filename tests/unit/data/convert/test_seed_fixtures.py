"""Each seed's own data format (tests/assets/seed00*, risc_mini; real photographs, annotations true
for them: tests/assets/README.md) through the EXISTING converter: what it keeps, what it drops and
why, counted exactly.

Issue 14 closed the design gaps these fixtures showed: negatives (PixMo rows without points,
JSONL rows answering nothing or "Normal") are kept as `Absent` objects, segment rows keep their
<loc>+<seg> tokens as `CodedMask` objects that render segment examples, and "detect a ; b" can be
one example (data.text.multi_label).
"""

import functools
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from raytrain.data.convert import captions, common, jsonl, pixmo_points, visual_genome
from raytrain.data.convert.common import FetchOptions
from raytrain.data.pipeline import examples_for
from raytrain.data.shards import PrepReport
from raytrain.formats.annotations import Absent, Caption, CodedMask, Point, Region, objects_from_json
from raytrain.models import family

ASSETS = Path(__file__).parents[3] / "assets"
PIXMO_ORIGIN = "http://images.fixture.test"  # tests/assets/make_fixtures.py: rows name this host


def _convert(recs_of, to_objects, **kw):
    """(report, {id: row}, object drops, notes) of records_of(report) through common.iter_rows."""
    report, drops, notes = PrepReport(), Counter(), Counter()
    rows = {r["id"]: r for r in common.iter_rows(recs_of(report), to_objects, report, object_drops=drops, notes=notes, **kw)}
    report.check()  # rows in == written + dropped
    return report, rows, drops, notes


def _objs(row):
    return objects_from_json(row["objects"])


# ---------------------------------------------------------------------------------------- seed 000


@pytest.fixture
def pixmo(image_server, tmp_path):
    """seed000_pixmo_points served from 127.0.0.1 (the rows' own URLs name an unresolvable host)."""
    folder = ASSETS / "seed000_pixmo_points"
    for f in (folder / "images").iterdir():
        image_server.files[f.name] = f.read_bytes()
    text = (folder / "rows.jsonl").read_text().replace(PIXMO_ORIGIN, f"{image_server.url}/img")
    (tmp_path / "rows.jsonl").write_text(text)
    fetch = FetchOptions(cache_dir=str(tmp_path / "cache"), timeout_s=2.0, retries=0)
    report, rows, drops, notes = _convert(
        lambda r: pixmo_points.records(pixmo_points.load_rows(str(tmp_path / "rows.jsonl")), r), pixmo_points.to_objects, fetch=fetch,
    )
    return report, rows, drops, image_server


def test_seed000_pixmo_points(pixmo):
    report, rows, drops, server = pixmo
    assert report.rows_in == 10
    # gone.jpg is a dead URL; "dog" has no points: a negative (seed 000 dropped such rows: its job
    # sets data.prepare.keep_negatives=false, tested in test_seed000_negatives_dropped_on_request)
    assert report.dropped == {"download_failed": 1}
    assert report.converted == {"converted_from_L": 1}  # coins.jpg is grayscale
    assert sorted(rows) == [f"pixmo-{i:08d}" for i in (0, 1, 2, 3, 4, 5, 6, 7, 8)]
    assert drops == {}
    # percent -> pixels of the 320-px images: the astronaut's eyes, read off the 512-px photo
    eyes = _objs(rows["pixmo-00000000"])
    assert [(round(p.x, 1), round(p.y, 1)) for p in eyes] == [(125.6, 62.5), (153.8, 64.4)]
    assert all(isinstance(p, Point) and p.label == "eye" for p in eyes)
    coins = _objs(rows["pixmo-00000004"])
    assert len(coins) == 24 and {p.label for p in coins} == {"coin"}  # the many-points row
    assert (rows["pixmo-00000004"]["width"], rows["pixmo-00000004"]["height"]) == (320, 252)
    # one image, one split, one download
    assert rows["pixmo-00000005"]["split"] == rows["pixmo-00000006"]["split"]
    assert server.hits["/img/quokka.jpg"] == 1


def test_seed000_count0_row_is_a_negative(pixmo):
    _, rows, _, _ = pixmo
    assert _objs(rows["pixmo-00000003"]) == [Absent("dog")]
    r = rows["pixmo-00000003"]
    (e,) = examples_for(_objs(r), ["point"], r["width"], r["height"], "paligemma+molmo")
    assert (e["query"], e["suffix"], e["targets"]) == ("dog", "There are none.", "[]")


# ---------------------------------------------------------------------------------------- seed 001

D001 = ASSETS / "seed001_datature_jsonl"


def test_seed001_caption():
    report, rows, drops, notes = _convert(lambda r: jsonl.records(str(D001 / "caption.jsonl"), report=r), jsonl.to_objects)
    assert report.rows_in == 5 and report.dropped == {} and len(rows) == 5
    assert _objs(rows["quokka.jpg#5"]) == [Caption("a quokka standing on its hind legs in front of a green fence.")]


def test_seed001_detect_multiclass():
    report, rows, drops, notes = _convert(lambda r: jsonl.records(str(D001 / "detect.jsonl"), report=r), jsonl.to_objects)
    assert report.rows_in == 4
    assert report.dropped == {}  # quokka.jpg: none of the four classes, empty suffix: a negative
    assert notes == {"negative": 1}
    assert report.converted == {"converted_from_L": 1}  # camera.jpg is grayscale
    assert sorted(rows) == ["camera.jpg#3", "chelsea.jpg#2", "coffee.jpg#1", "quokka.jpg#4"]
    cup, spoon = _objs(rows["coffee.jpg#1"])  # both classes of "detect cup ; spoon ; cat ; camera" in one row
    assert (cup.label, spoon.label) == ("cup", "spoon")
    # the cup as drawn on the 600x400 photo, (172, 17, 411, 305), at 320/600, within a loc bin
    assert (cup.x1, cup.y1, cup.x2, cup.y2) == pytest.approx((91.7, 9.1, 219.2, 162.7), abs=0.35)
    assert drops == {}


def test_seed001_segment():
    report, rows, drops, notes = _convert(lambda r: jsonl.records(str(D001 / "segment.jsonl"), report=r), jsonl.to_objects)
    assert report.rows_in == 3 and report.dropped == {} and len(rows) == 3
    assert drops == {}
    # each object keeps its box and its 16 <seg> codes as given
    assert all(isinstance(o, CodedMask) for r in rows.values() for o in _objs(r))
    seg = _objs(rows["chelsea.jpg#2"])
    assert [s.label for s in seg] == ["eye", "eye"] and all(len(s.codes) == 16 for s in seg)
    sidecar = json.loads((D001 / "masks.json").read_text())  # the polygons the codes were made from
    assert [o["label"] for o in sidecar["objects"]] == ["quokka", "eye", "eye", "patch"]


def test_seed001_detect_negative_kept():
    _, rows, _, _ = _convert(lambda r: jsonl.records(str(D001 / "detect.jsonl"), report=r), jsonl.to_objects)
    assert _objs(rows["quokka.jpg#4"]) == [Absent(c) for c in ("cup", "spoon", "cat", "camera")]


def test_seed001_segment_rows_render_segment_examples():
    """The rows train on their own tokens: the rendered answer IS the source suffix (no codec)."""
    _, rows, _, _ = _convert(lambda r: jsonl.records(str(D001 / "segment.jsonl"), report=r), jsonl.to_objects)
    source = {f"{d['image']}#{i}": d for i, d in enumerate(map(json.loads, (D001 / "segment.jsonl").read_text().splitlines()), start=1)}
    for key, r in rows.items():
        exs = examples_for(_objs(r), ["segment"], r["width"], r["height"], "paligemma")
        assert exs and all(e["prefix"].startswith("segment ") for e in exs)
        for e in exs:  # every rendered object is one of the source's, token for token
            for part in e["suffix"].split(" ; "):
                assert part in source[key]["suffix"], (part, source[key]["suffix"])


def test_seed001_multiclass_prefix_is_one_example():
    _, rows, _, _ = _convert(lambda r: jsonl.records(str(D001 / "detect.jsonl"), report=r), jsonl.to_objects)
    r = rows["coffee.jpg#1"]
    assert len(examples_for(_objs(r), ["detect"], r["width"], r["height"], "paligemma")) == 2  # one per label by default
    (e,) = examples_for(_objs(r), ["detect"], r["width"], r["height"], family("paligemma").with_text(multi_label=True))
    assert e["prefix"] == "detect cup ; spoon" and e["suffix"].count("<loc") == 8


# ---------------------------------------------------------------------------------------- seed 002


def test_seed002_visual_genome():
    report, rows, drops, notes = _convert(
        lambda r: visual_genome.records(str(ASSETS / "seed002_visual_genome"), report=r), visual_genome.to_objects
    )
    assert report.rows_in == 5 and report.dropped == {} and len(rows) == 5
    assert report.converted == {"converted_from_L": 1}  # 4.jpg (the cameraman) is grayscale
    assert notes == {"regions_clipped": 1}  # image 1: the shuttle's box starts 2 px above it, the helmet's ends 4 px right of it
    assert drops == {}
    regions = {k: _objs(r) for k, r in rows.items()}
    assert sum(len(v) for v in regions.values()) == 26 and all(isinstance(o, Region) for v in regions.values() for o in v)
    astro = {o.phrase: o for o in regions["visual_genome-1"]}
    assert astro["white model of the space shuttle"].y1 == 0 and astro["black helmet with a white stripe"].x2 == 320
    # VG-style near-duplicates stay: removing them is seed 002's optional cleaning (RegionCleaner)
    assert [o.phrase for o in regions["visual_genome-2"]].count("red cup of espresso") == 1
    assert {"red cup of espresso", "a cup of coffee"} <= {o.phrase for o in regions["visual_genome-2"]}


# ---------------------------------------------------------------------------------------- seed 003


def test_seed003_risc_captions(tmp_path):
    """The folder as it is: the three real photos have their files; the edge-case rows
    (airport / harbor / missing, tests/unit/data/convert/test_captions_vg.py) do not."""
    shutil.copytree(ASSETS / "risc_mini", tmp_path / "risc")
    report, rows, drops, notes = _convert(lambda r: captions.records(str(tmp_path / "risc" / "captions.csv"), report=r), captions.to_objects)
    assert report.rows_in == 7
    assert report.dropped == {"image_missing": 3, "missing_field": 1}
    assert {k: r["split"] for k, r in rows.items()} == {
        "captions-moon_004.jpg": "train", "captions-galaxies_005.jpg": "val", "captions-gravel_006.jpg": "test"}
    assert all((r["width"], r["height"]) == (224, 224) for r in rows.values())
    moon = _objs(rows["captions-moon_004.jpg"])
    assert len(moon) == 5 and moon[0] == moon[4]  # RISC repeats captions; all five are kept (selection is clean.CaptionSelector's)
    assert drops == {}
    # issue 14 item 7 adds seed 003's statistics (caption lengths, duplicates, caption-vs-caption
    # BLEU) to the prep report: not a converter change, so no xfail here


# ---------------------------------------------------------------------------------------- seed 004

D004 = ASSETS / "seed004_fracture_jsonl"


def test_seed004_fracture_jsonl():
    # without the job's empty answer a "Normal" suffix means nothing readable
    report, rows, drops, notes = _convert(lambda r: jsonl.records(str(D004 / "data.jsonl"), report=r), jsonl.to_objects)
    assert report.rows_in == 5 and report.dropped == {"unparsable_suffix": 2}
    # the seed-004 jobs set data.text.empty_answer: Normal -> the Normal rows are negatives
    normal = functools.partial(jsonl.to_objects, empty_answer="Normal")
    report, rows, drops, notes = _convert(lambda r: jsonl.records(str(D004 / "data.jsonl"), report=r), normal)
    assert report.rows_in == 5 and report.dropped == {} and notes == {"negative": 2}
    assert report.converted == {"converted_from_L": 5}  # grayscale, like radiographs
    assert sorted(rows) == [f"study_00{i}.jpeg#{i}" for i in range(1, 6)]
    # "Detect Fracture" -> task detect, class "Fracture"; the seed's trailing ";" is read
    assert [len(_objs(r)) for r in rows.values()] == [1, 1, 2, 1, 1]
    assert _objs(rows["study_002.jpeg#2"]) == [Absent("Fracture")]
    assert {o.label for r in rows.values() for o in _objs(r)} == {"Fracture"}
    assert drops == {}


def test_seed004_normal_rows_train_and_score_as_negatives():
    normal = functools.partial(jsonl.to_objects, empty_answer="Normal")
    _, rows, _, _ = _convert(lambda r: jsonl.records(str(D004 / "data.jsonl"), report=r), normal)
    fam = family("paligemma").with_text(prompts={"detect": "Detect {query}"}, empty_answer="Normal")
    r = rows["study_002.jpeg#2"]
    (e,) = examples_for(_objs(r), ["detect"], r["width"], r["height"], fam)
    assert (e["prefix"], e["suffix"], e["targets"]) == ("Detect Fracture", "Normal", "[]")
