"""`raytrain prepare` end to end on Ray Data: a COCO folder of real photographs (scikit-image's
data, imgaug's quokka with its own box and polygon) plus corrupt, truncated, grayscale, RGBA,
CMYK images and annotations pointing at missing files -> shards per split + a prep report
whose counts are checked exactly. Local disk, and S3 (moto on 127.0.0.1) for both source and output."""

import importlib.util
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from raytrain import config, storage
from raytrain.data import shards, splits
from raytrain.formats.annotations import Box, Mask, objects_from_json
from raytrain.launch import prepare

pytestmark = pytest.mark.integration
skdata = pytest.importorskip("skimage.data")

MAX_SIDE = 256
SPLITS = "70/20/10"
SEED = 3


def _jpeg(arr_or_img, fmt="JPEG", **kw) -> bytes:
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _quokka():
    """imgaug's quokka photo and its annotation file, read from the installed package's data
    (imgaug 0.4 itself does not import under numpy 2, so it is not imported)."""
    spec = importlib.util.find_spec("imgaug")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / "quokka.jpg").exists():
        return None
    ann = json.loads((folder / "quokka_annotations.json").read_text())
    return (folder / "quokka.jpg").read_bytes(), ann


def make_coco_source(root: Path) -> dict:
    """Writes images + instances.json under root; returns what prepare must report."""
    astronaut, coffee, chelsea, camera = skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.camera()
    files = {
        "astronaut.jpg": _jpeg(astronaut),
        "coffee.jpg": _jpeg(coffee),
        "chelsea.jpg": _jpeg(chelsea),
        "camera.png": _jpeg(camera, "PNG"),  # grayscale ("L")
        "chelsea_rgba.png": _jpeg(Image.fromarray(chelsea).convert("RGBA"), "PNG"),
        "coffee_cmyk.jpg": _jpeg(Image.fromarray(coffee).convert("CMYK")),
        "corrupt.jpg": b"this is not an image, whatever the name says",
        "truncated.jpg": _jpeg(astronaut)[:20_000],
        "wrong_size.jpg": _jpeg(chelsea),
        "no_annotations.jpg": _jpeg(coffee[:64, :64]),
    }
    images = [  # (file, declared w, h, [(category, bbox xywh, polygon or None)])
        ("astronaut.jpg", 512, 512, [(1, [170, 20, 120, 150], [170, 20, 290, 20, 290, 170, 170, 170])]),
        ("coffee.jpg", 600, 400, [(2, [170, 20, 300, 240], None)]),
        ("chelsea.jpg", 451, 300, [(3, [80, 10, 250, 280], None)]),
        ("camera.png", 512, 512, [(1, [250, 60, 150, 300], None)]),
        ("chelsea_rgba.png", 451, 300, [(3, [80, 10, 250, 280], None)]),
        ("coffee_cmyk.jpg", 600, 400, [(2, [170, 20, 300, 240], None)]),
        ("corrupt.jpg", 64, 64, [(2, [1, 1, 10, 10], None)]),
        ("truncated.jpg", 512, 512, [(1, [1, 1, 10, 10], None)]),
        ("missing.jpg", 64, 64, [(2, [1, 1, 10, 10], None)]),
        ("wrong_size.jpg", 500, 300, [(3, [1, 1, 10, 10], None)]),
        ("no_annotations.jpg", 64, 64, []),
    ]
    quokka = _quokka()
    if quokka is not None:
        data, ann = quokka
        files["quokka.jpg"] = data
        b = ann["bounding_boxes"][0]
        poly = [v for p in ann["polygons"][0]["keypoints"] for v in (p["x"], p["y"])]
        w, h = Image.open(io.BytesIO(data)).size
        images.append(("quokka.jpg", w, h, [(4, [b["x1"], b["y1"], b["x2"] - b["x1"], b["y2"] - b["y1"]], poly)]))
    for name, data in files.items():
        (root / name).write_bytes(data)
    coco = {"images": [], "annotations": [], "categories": [
        {"id": 1, "name": "person"}, {"id": 2, "name": "cup"}, {"id": 3, "name": "cat"}, {"id": 4, "name": "quokka"}]}
    for i, (name, w, h, anns) in enumerate(images, start=1):
        coco["images"].append({"id": i, "file_name": name, "width": w, "height": h})
        for cat, bbox, poly in anns:
            coco["annotations"].append({"id": 100 * i + len(coco["annotations"]), "image_id": i, "category_id": cat,
                                        "bbox": bbox, "iscrowd": 0, "area": bbox[2] * bbox[3],
                                        "segmentation": [poly] if poly else []})
    coco["images"].append({"id": 999, "width": 10, "height": 10})  # no file_name
    (root / "instances.json").write_text(json.dumps(coco))

    kept = ["astronaut.jpg", "coffee.jpg", "chelsea.jpg", "camera.png", "chelsea_rgba.png", "coffee_cmyk.jpg"]
    kept += ["quokka.jpg"] if quokka is not None else []
    ids = {name: f"coco-{i}" for i, (name, *_) in enumerate(images, start=1)}
    per_split = {s: 0 for s in ("train", "val", "test")}
    for name in kept:
        per_split[splits.split_of(name, SEED, SPLITS)] += 1
    n_in = len(images) + 1
    return {
        "kept": {ids[n] for n in kept},
        "ids": ids,
        "rows_in": n_in,
        "rows_written": per_split,
        "dropped": {"corrupt_image": 2, "empty_annotations": 1, "image_missing": 1, "missing_field": 1, "size_mismatch": 1},
        "converted": {"converted_from_CMYK": 1, "converted_from_L": 1, "converted_from_RGBA": 1, "resized": len(kept)},
        "stages": [
            ["rows in", n_in],
            ["after reading annotations", n_in - 1],
            ["after fetching images", n_in - 2],
            ["after filtering empty annotations", n_in - 3],
            ["after image validation", len(kept)],
            ["after annotation checks", len(kept)],
        ],
        "quokka": quokka is not None,
    }


@pytest.mark.parametrize("where", ["local", "s3"])
def test_prepare_coco_folder(where, tmp_path, request, ray_cluster):
    src = tmp_path / "coco"
    src.mkdir()
    expected = make_coco_source(src)
    if where == "s3":
        bucket, opts = request.getfixturevalue("s3_bucket"), request.getfixturevalue("s3_opts")
        fs = storage.fsspec_fs(bucket, opts)
        for f in src.iterdir():
            fs.put_file(str(f), storage.strip_scheme(storage.join(bucket, "src", f.name)))
        source, out = storage.join(bucket, "src"), storage.join(bucket, "out")
    else:
        opts, source, out = None, str(src), str(tmp_path / "out")
    pc = config.PrepareConfig(
        format="coco", path=source, out=out, splits=SPLITS, seed=SEED, rows_per_shard=4,
        max_side=MAX_SIDE, cache_dir=str(tmp_path / "cache"), storage=opts,
    )
    cfg = config.load(None, [f"data.uri={out}"])
    report = prepare.main(cfg, pc)

    # ---- the report: every row accounted for, exactly
    assert report["rows_in"] == expected["rows_in"]
    assert report["rows_written"] == expected["rows_written"]
    assert report["dropped"] == expected["dropped"]
    assert report["converted"] == expected["converted"]
    assert report["rows_in"] == sum(report["rows_written"].values()) + sum(report["dropped"].values())
    assert report["stages"][:6] == expected["stages"]
    assert [n for _, n in report["stages"][6:]] == list(expected["rows_written"].values())
    ids = expected["ids"]
    assert report["examples"]["corrupt_image"] == sorted([ids["corrupt.jpg"], ids["truncated.jpg"]])
    assert report["examples"]["image_missing"] == [ids["missing.jpg"]]
    assert report["examples"]["size_mismatch"] == [ids["wrong_size.jpg"]]
    stored = storage.read_json(storage.join(out, shards.REPORT_NAME), opts)
    assert stored["rows_in"] == report["rows_in"] and shards.PrepReport.read(out, opts).rows_written == report["rows_written"]

    # ---- the shards: kept rows, RGB, at most MAX_SIDE, objects scaled with the image
    rows = {}
    for split, n in expected["rows_written"].items():
        table = shards.read_split(out, split, opts)
        assert table.num_rows == n
        assert report["shards"][split] == len(shards.shard_paths(out, split, opts))
        for r in table.to_pylist():
            rows[r["id"]] = r
    assert set(rows) == expected["kept"]
    for r in rows.values():
        img = Image.open(io.BytesIO(r["image"]))
        img.load()
        assert img.mode == "RGB" and max(img.size) == MAX_SIDE and img.size == (r["width"], r["height"])
    astro = objects_from_json(rows[ids["astronaut.jpg"]]["objects"])
    assert astro[0] == Box(85, 10, 145, 85, "person")  # [170, 20, 290, 170] / 2
    assert isinstance(astro[1], Mask) and astro[1].size == (256, 256)
    b = astro[1].box
    assert abs(b.x1 - 85) <= 1 and abs(b.y2 - 85) <= 1.5
    (coffee,) = objects_from_json(rows[ids["coffee.jpg"]]["objects"])
    sx, sy = 256 / 600, 171 / 400  # 600x400 -> 256x171: each axis by its own ratio
    assert (coffee.x1, coffee.y1, coffee.x2, coffee.y2) == pytest.approx((170 * sx, 20 * sy, 470 * sx, 260 * sy))
    if expected["quokka"]:
        box, mask = objects_from_json(rows[ids["quokka.jpg"]]["objects"])
        assert box.label == mask.label == "quokka" and mask.size == (171, 256)  # 960x643 -> 256x171
        assert 0.5 < mask.area / box.area < 1  # the polygon fills most of its box

    # ---- a second run with the same parameters reuses the shards
    again = prepare.prepare(pc)
    assert again["reused"] is True and again["rows_written"] == report["rows_written"]


def test_prepare_config_from_experiment():
    cfg = config.load(None, ["data.source=coco:/data/coco_val", "data.uri=s3://b/x", "data.seed=5", "data.rows_per_shard=10"])
    pc = prepare.prepare_config(cfg)
    assert (pc.format, pc.path, pc.out, pc.seed, pc.rows_per_shard) == ("coco", "/data/coco_val", "s3://b/x", 5, 10)
    assert pc.splits == cfg.data.splits
    on_s3 = prepare.prepare_config(config.load(None, ["data.source=jsonl:s3://bucket/ft/data.jsonl"]))
    assert (on_s3.format, on_s3.path, on_s3.out) == ("jsonl", "s3://bucket/ft/data.jsonl", "checkpoints/data/shapes")
    for bad in ("coco", "nope:/x", "coco:"):
        with pytest.raises(ValueError):
            prepare.prepare_config(config.load(None, [f"data.source={bad}"]))
