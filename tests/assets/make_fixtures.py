"""Rebuild the seed and peer-format fixtures in tests/assets/ from photographs shipped in installed
packages (scikit-image's ``skimage.data``, imgaug's quokka). See tests/assets/README.md.

    python tests/assets/make_fixtures.py                 # rewrite every fixture folder
    python tests/assets/make_fixtures.py --check         # exit 1 if any file would change
    python tests/assets/make_fixtures.py --preview /tmp/p  # the photos with their annotations drawn

Every annotation below is written by hand in the SOURCE photo's pixels (read off the photo, or
taken from imgaug's own quokka annotation file) and scaled to the stored, downscaled image, so
each fixture says something true about its photo. Output is deterministic for a given Pillow /
scikit-image / torch: no clock, no unseeded randomness. The <seg> codes of the segment rows come
from ``MaskCodec.random(seed=0)`` unless ``--mask-codec vae-oid.npz`` gives big_vision's weights
(README: why the checked-in codes are placeholders).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import io
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ASSETS = Path(__file__).resolve().parent
MAX_SIDE = 320
JPEG_QUALITY = 85
PIXMO_ORIGIN = "http://images.fixture.test"  # .test never resolves: tests serve the files on 127.0.0.1

# ------------------------------------------------------------------------------------------------
# annotations, in source-photo pixels: boxes (x1, y1, x2, y2), points (x, y)

ASTRONAUT = {  # skimage.data.astronaut(), 512 x 512
    "face": (178, 68, 272, 177), "head": (152, 14, 297, 177), "flag": (0, 0, 95, 300),
    "shuttle": (355, 0, 462, 278), "patch": (134, 347, 210, 423), "helmet": (278, 342, 512, 512),
    "eyes": [(201, 100), (246, 103)], "patch_centre": (172, 385), "patch_radius": 38,
}
COFFEE = {  # skimage.data.coffee(), 600 x 400
    "cup": (172, 17, 411, 305), "spoon": (326, 66, 424, 325), "saucer": (75, 95, 481, 389),
    "crema": (203, 95, 371, 193), "spoon_bowl": (366, 288),
}
CHELSEA = {  # skimage.data.chelsea(), 451 x 300
    "head": (0, 0, 390, 300), "eye_left": (135, 87, 212, 145), "eye_right": (295, 112, 345, 162),
    "nose": (230, 225, 295, 262), "nose_tip": (262, 240),
}
ROCKET = {"rocket": (308, 127, 336, 410), "rocket_centre": (322, 260)}  # skimage.data.rocket(), 640 x 427
CAMERA = {  # skimage.data.camera(), 512 x 512, grayscale
    "man": (0, 63, 334, 512), "head": (168, 64, 266, 196), "camera": (258, 137, 326, 180),
    "tripod": (228, 196, 408, 512),
}
# skimage.data.coins(), 384 x 303, grayscale: every coin's (centre x, centre y, x1, y1, x2, y2),
# from a watershed on Sobel edges (markers < 30 background, > 150 coin) + hole filling, checked by eye
COINS = [
    (44.2, 54.4, 22, 35, 67, 74), (100.2, 56.1, 81, 39, 120, 74), (155.3, 50.8, 132, 28, 179, 74),
    (215.2, 51.1, 192, 30, 240, 73), (276.1, 52.4, 255, 34, 297, 72), (334.7, 43.5, 305, 16, 365, 72),
    (44.7, 124.3, 25, 104, 67, 145), (102.3, 125.6, 84, 108, 122, 145), (153.5, 127.2, 134, 110, 173, 145),
    (205.3, 123.7, 186, 105, 226, 144), (270.6, 118.8, 245, 95, 296, 144), (336.2, 124.5, 317, 106, 356, 145),
    (43.7, 197.4, 26, 179, 63, 217), (101.7, 195.6, 80, 175, 124, 217), (154.1, 197.7, 135, 179, 174, 217),
    (212.4, 193.1, 189, 170, 237, 217), (273.5, 193.6, 251, 172, 297, 217), (347.0, 186.7, 315, 156, 380, 218),
    (45.9, 259.8, 18, 233, 75, 288), (113.9, 265.5, 93, 245, 136, 287), (172.3, 261.2, 144, 236, 201, 288),
    (244.0, 263.3, 220, 240, 269, 288), (300.6, 263.2, 276, 239, 326, 289), (358.2, 267.9, 336, 248, 382, 289),
]
QUOKKA_EXTRA = {  # imgaug quokka.jpg, 960 x 643 (box, keypoints and polygon come from quokka_annotations.json)
    "nose": (283, 240, 345, 300), "ear_left": (152, 62, 235, 160), "fence": (0, 0, 960, 290),
    "shelter": (678, 192, 960, 350),
}


# ------------------------------------------------------------------------------------------------
# photos


def _quokka_dir() -> Path:
    # imgaug 0.4 does not import under numpy 2 (and wants cv2): read its data files directly
    spec = importlib.util.find_spec("imgaug")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("imgaug is not installed: its quokka photo is one of the fixtures' sources")
    return Path(next(iter(spec.submodule_search_locations)))


def quokka_annotation() -> dict:
    return json.loads((_quokka_dir() / "quokka_annotations.json").read_text())


def source_photo(name: str) -> Image.Image:
    """The full-size photo: an skimage.data image by name, or "quokka"."""
    if name == "quokka":
        return Image.open(_quokka_dir() / "quokka.jpg").convert("RGB")
    import skimage.data

    arr = getattr(skimage.data, name)()
    return Image.fromarray(arr).convert("L" if arr.ndim == 2 else "RGB")


class Photo:
    """A downscaled photo (longer side <= max_side) and the per-axis scale of its annotations."""

    def __init__(self, name: str, max_side: int = MAX_SIDE, square: int = 0):
        src = source_photo(name)
        self.name, self.src_w, self.src_h = name, src.width, src.height
        if square:  # centre crop to a square, then resize (RISC's 224 x 224 images)
            side = min(src.size)
            x0, y0 = (src.width - side) // 2, (src.height - side) // 2
            src = src.crop((x0, y0, x0 + side, y0 + side))
            w = h = square
        else:
            s = min(1.0, max_side / max(src.size))
            w, h = max(1, round(src.width * s)), max(1, round(src.height * s))
        self.image = src.resize((w, h), Image.LANCZOS) if (w, h) != src.size else src
        self.w, self.h = w, h
        self.sx, self.sy = w / src.width, h / src.height

    def box(self, b, nd: int = 1) -> list[float]:
        x1, y1, x2, y2 = b
        return [round(x1 * self.sx, nd), round(y1 * self.sy, nd), round(x2 * self.sx, nd), round(y2 * self.sy, nd)]

    def point(self, p, nd: int = 1) -> list[float]:
        return [round(p[0] * self.sx, nd), round(p[1] * self.sy, nd)]

    def percent(self, p) -> dict:
        """A PixMo point: percent of the image (scale-free, so the source pixels give it directly)."""
        return {"x": round(100 * p[0] / self.src_w, 2), "y": round(100 * p[1] / self.src_h, 2)}

    def jpeg(self, image: Image.Image | None = None) -> bytes:
        buf = io.BytesIO()
        (image or self.image).save(buf, format="JPEG", quality=JPEG_QUALITY)
        return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# small helpers


def _jsonl(rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def _ellipse(cx, cy, rx, ry, n: int = 32) -> list[float]:
    return [round(v, 1) for k in range(n) for v in (cx + rx * math.cos(2 * math.pi * k / n), cy + ry * math.sin(2 * math.pi * k / n))]


def _box_obj(photo: Photo, b, label: str):
    from raytrain.formats.annotations import Box

    return Box(*(v for v in photo.box(b, nd=6)), label=label)


def _crack(img: Image.Image, seed: int, start, heading: float, steps: int, width: int = 2, shade: int = 25):
    """Draw a dark, jagged crack (a seeded random walk) into a grayscale image in place; returns
    the tight box (x1, y1, x2, y2) of the pixels it changed, so the label is exact."""
    rng = np.random.default_rng(seed)
    before = np.asarray(img).copy()
    pts, (x, y), a = [], start, heading
    for _ in range(steps):
        pts.append((x, y))
        a += rng.normal(0.0, 0.35) - 0.3 * (a - heading)  # jagged, but keeps its course
        step = rng.uniform(3.0, 6.0)
        x, y = x + step * math.cos(a), y + step * math.sin(a)
    pts.append((x, y))
    draw = ImageDraw.Draw(img)
    draw.line(pts, fill=shade, width=width, joint="curve")
    k = len(pts) // 2  # one short branch, as real cracks fork
    b = rng.uniform(0.6, 1.0) * (1 if rng.random() < 0.5 else -1)
    bx, by = pts[k]
    draw.line([pts[k], (bx + 12 * math.cos(heading + b), by + 12 * math.sin(heading + b))], fill=shade, width=1)
    ys, xs = np.nonzero(np.asarray(img) != before)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# ------------------------------------------------------------------------------------------------
# seed 000: PixMo-Points rows (hub schema), images fetched by URL


def build_pixmo(files: dict) -> None:
    d = "seed000_pixmo_points"
    photos = {n: Photo(n) for n in ("astronaut", "chelsea", "coins", "quokka", "coffee", "rocket")}
    blobs = {n: p.jpeg() for n, p in photos.items()}
    for n, b in blobs.items():
        files[f"{d}/images/{n}.jpg"] = b
    q = {k["label"]: (k["x"], k["y"]) for k in quokka_annotation()["keypoints"]}

    def row(name, label, points, method="pointing"):
        blob = blobs.get(name)
        return {"image_url": f"{PIXMO_ORIGIN}/{name}.jpg", "image_sha256": hashlib.sha256(blob).hexdigest() if blob else None,
                "points": [photos[name].percent(p) for p in points] if name in photos else [{"x": 50.0, "y": 50.0}],
                "count": len(points), "label": label, "collection_method": method}

    rows = [
        row("astronaut", "eye", ASTRONAUT["eyes"]),
        row("astronaut", "mission patch", [ASTRONAUT["patch_centre"]]),
        row("chelsea", "cat's nose", [CHELSEA["nose_tip"]]),
        row("chelsea", "dog", []),  # nothing to point at: PixMo's count-0 rows
        row("coins", "coin", [c[:2] for c in COINS], "counting"),  # 24 points, a grayscale image
        row("quokka", "quokka's eye", [q["eye_left"], q["eye_right"]]),
        row("quokka", "quokka's paw", [q["paw_left"], q["paw_right"]]),
        row("coffee", "spoon", [COFFEE["spoon_bowl"]]),
        row("rocket", "rocket", [ROCKET["rocket_centre"]]),
        row("gone", "cat", [(1, 1)]),  # the URL is dead (404), as 0.4 % of the seed's were
    ]
    files[f"{d}/rows.jsonl"] = _jsonl(rows)


# ------------------------------------------------------------------------------------------------
# seed 001: Datature-style PaliGemma JSONL: caption, multi-class detect, segment with <seg> codes


def _codec(path: str | None):
    from raytrain.formats import paligemma_masks as pm

    return pm.MaskCodec.from_checkpoint(path) if path else pm.MaskCodec.random(seed=0)


def build_datature(files: dict, mask_codec: str | None) -> None:
    from raytrain.formats import paligemma as pg
    from raytrain.formats import paligemma_masks as pm
    from raytrain.formats.annotations import Mask

    d = "seed001_datature_jsonl"
    ph = {n: Photo(n) for n in ("astronaut", "coffee", "chelsea", "rocket", "quokka", "camera")}
    for n, p in ph.items():
        files[f"{d}/{n}.jpg"] = p.jpeg()
    captions = [
        ("astronaut", "a smiling astronaut in an orange flight suit in front of an american flag and a model of the space shuttle."),
        ("coffee", "a red cup of espresso on a red saucer with a silver spoon, on a wooden table."),
        ("chelsea", "a close-up of a tabby cat with green eyes and a pink nose looking at the camera."),
        ("rocket", "a white rocket stands on the launch pad between two towers under a dark blue evening sky."),
        ("quokka", "a quokka standing on its hind legs in front of a green fence."),
    ]
    files[f"{d}/caption.jsonl"] = _jsonl({"image": f"{n}.jpg", "prefix": "caption en", "suffix": s} for n, s in captions)

    prefix = "detect cup ; spoon ; cat ; camera"
    detect = [
        ("coffee", [_box_obj(ph["coffee"], COFFEE["cup"], "cup"), _box_obj(ph["coffee"], COFFEE["spoon"], "spoon")]),
        ("chelsea", [_box_obj(ph["chelsea"], CHELSEA["head"], "cat")]),
        ("camera", [_box_obj(ph["camera"], CAMERA["camera"], "camera")]),
        ("quokka", []),  # none of the four classes: an empty suffix, the format's negative
    ]
    files[f"{d}/detect.jsonl"] = _jsonl(
        {"image": f"{n}.jpg", "prefix": prefix, "suffix": pg.render_objects(objs, ph[n].w, ph[n].h)} for n, objs in detect
    )

    qa = quokka_annotation()
    quokka_poly = [v for k in qa["polygons"][0]["keypoints"] for v in (k["x"], k["y"])]
    cl, cr = CHELSEA["eye_left"], CHELSEA["eye_right"]
    pc, pr = ASTRONAUT["patch_centre"], ASTRONAUT["patch_radius"]
    shapes = {  # source-pixel polygons: imgaug's quokka outline, the cat's eyes, the round patch
        "quokka": [("quokka", quokka_poly)],
        "chelsea": [("eye", _ellipse((cl[0] + cl[2]) / 2, (cl[1] + cl[3]) / 2, (cl[2] - cl[0]) / 2, (cl[3] - cl[1]) / 2)),
                    ("eye", _ellipse((cr[0] + cr[2]) / 2, (cr[1] + cr[3]) / 2, (cr[2] - cr[0]) / 2, (cr[3] - cr[1]) / 2))],
        "astronaut": [("patch", _ellipse(pc[0], pc[1], pr, pr))],
    }
    codec = _codec(mask_codec)
    seg_rows, sidecar = [], []
    for n, objs in shapes.items():
        p, masks = ph[n], []
        for label, poly in objs:
            scaled = [round(v * (p.sx if i % 2 == 0 else p.sy), 2) for i, v in enumerate(poly)]
            masks.append(Mask.from_polygons([scaled], p.h, p.w, label))
            sidecar.append({"image": f"{n}.jpg", "label": label, "polygon": scaled})
        seg_rows.append({"image": f"{n}.jpg", "prefix": "segment quokka ; eye ; patch",
                         "suffix": pm.render_segments(masks, p.w, p.h, codec)})
    files[f"{d}/segment.jsonl"] = _jsonl(seg_rows)
    files[f"{d}/masks.json"] = json.dumps({"codec": codec.source, "objects": sidecar}, indent=1) + "\n"


# ------------------------------------------------------------------------------------------------
# seed 002: Visual Genome region descriptions


def build_visual_genome(files: dict) -> None:
    d = "seed002_visual_genome"
    qa = quokka_annotation()
    qb = qa["bounding_boxes"][0]
    regions = {  # image id -> (photo, [(phrase, source box)])
        1: ("astronaut", [("woman with short brown hair", ASTRONAUT["head"]), ("woman smiling at the camera", ASTRONAUT["face"]),
                          ("the woman is smiling", (176, 66, 274, 180)), ("american flag behind the woman", ASTRONAUT["flag"]),
                          ("white model of the space shuttle", ASTRONAUT["shuttle"]), ("round mission patch on the suit", ASTRONAUT["patch"]),
                          ("black helmet with a white stripe", ASTRONAUT["helmet"])]),
        2: ("coffee", [("red cup of espresso", COFFEE["cup"]), ("a cup of coffee", COFFEE["cup"]),
                       ("silver spoon on the saucer", COFFEE["spoon"]), ("red saucer on the table", COFFEE["saucer"]),
                       ("brown crema on the coffee", COFFEE["crema"]), ("wooden table", (0, 0, 600, 400))]),
        3: ("chelsea", [("green eye of the cat", CHELSEA["eye_left"]), ("green eye of the cat", CHELSEA["eye_right"]),
                        ("pink nose of the cat", CHELSEA["nose"]), ("tabby cat looking at the camera", CHELSEA["head"])]),
        4: ("camera", [("man looking through a camera", CAMERA["man"]), ("video camera on a tripod", CAMERA["camera"]),
                       ("metal tripod", CAMERA["tripod"]), ("man with dark hair", CAMERA["head"])]),
        5: ("quokka", [("a quokka", (qb["x1"], qb["y1"], qb["x2"], qb["y2"])), ("black nose of the quokka", QUOKKA_EXTRA["nose"]),
                       ("round ear of the quokka", QUOKKA_EXTRA["ear_left"]), ("green fence behind the quokka", QUOKKA_EXTRA["fence"]),
                       ("small wooden shelter", QUOKKA_EXTRA["shelter"])]),
    }
    descs, data, rid = [], [], 1000
    for image_id, (name, regs) in regions.items():
        p = Photo(name)
        files[f"{d}/VG_100K/{image_id}.jpg"] = p.jpeg()
        data.append({"width": p.w, "height": p.h, "url": f"{PIXMO_ORIGIN}/VG_100K/{image_id}.jpg",
                     "coco_id": None, "flickr_id": None, "image_id": image_id})
        out = []
        for phrase, b in regs:
            x1, y1, x2, y2 = (int(round(v)) for v in p.box(b))
            if phrase == "white model of the space shuttle":
                y1 -= 2  # VG boxes often stick out of the image by a few pixels: this one above it
            if phrase == "black helmet with a white stripe":
                x2 += 4  # and this one past its right edge
            rid += 1
            out.append({"region_id": rid, "width": x2 - x1, "height": y2 - y1, "image_id": image_id,
                        "phrase": phrase, "y": y1, "x": x1})
        descs.append({"regions": out, "id": image_id})
    files[f"{d}/region_descriptions.json"] = json.dumps(descs, indent=1) + "\n"
    files[f"{d}/image_data.json"] = json.dumps(data, indent=1) + "\n"


# ------------------------------------------------------------------------------------------------
# seed 003: RISC captions.csv (extends tests/assets/risc_mini; its first rows are the edge cases)

RISC_HEADER = "source,split,image,caption_1,caption_2,caption_3,caption_4,caption_5"
RISC_EDGE_ROWS = [  # kept verbatim: unit tests read them for blank captions and a missing image name
    "ucm,train,airport_001.png,a plane is parked at the airport .,an airplane parked near the terminal of an airport .,"
    "a plane parked at the airport near a runway .,many green trees around a small pond .,a white plane at the airport .",
    'ucm,val,harbor_002.png,many boats are docked in the harbor .,"boats docked in a harbor, next to a pier .",,   ,'
    "several boats are moored in the harbor .",
    "ucm,test,missing_003.png,a road,a road,a road,a road,a road",
    "sydney,train,,no image name,,,,",
]
RISC_PHOTOS = [  # (photo, file, split, five captions: one repeated, as RISC repeats 14,632 of its captions)
    ("moon", "moon_004.jpg", "train", [
        "the grey surface of the moon with a few small craters .", "a grey lunar plain with small round craters and dark patches .",
        "a bright round crater in the upper left of a grey plain .", "dark spots lie in the middle of the grey ground of the moon .",
        "the grey surface of the moon with a few small craters ."]),
    ("hubble_deep_field", "galaxies_005.jpg", "val", [
        "many small galaxies are scattered across a black sky .", "hundreds of colourful galaxies on a dark background .",
        "a deep field of space full of tiny stars and galaxies .", "small orange , white and blue galaxies on a black sky .",
        "many galaxies of different colours in dark space ."]),
    ("gravel", "gravel_006.jpg", "test", [
        "a lot of small grey stones packed closely together .", "a gravel surface made of many small rocks .",
        "many small stones of a similar size seen from above .", "grey gravel covers the whole image .",
        "a lot of small grey stones packed closely together ."]),
]


def build_risc(files: dict) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for name, fname, split, caps in RISC_PHOTOS:
        p = Photo(name, square=224)  # RISC's images are 224 x 224 RGB
        files[f"risc_mini/{fname}"] = p.jpeg(p.image.convert("RGB"))
        w.writerow(["skimage", split, fname, *caps])
    files["risc_mini/captions.csv"] = "\n".join([RISC_HEADER, *RISC_EDGE_ROWS]) + "\n" + buf.getvalue()


# ------------------------------------------------------------------------------------------------
# seed 004: fracture-style JSONL, "Detect Fracture" with boxes or "Normal"


def build_fracture(files: dict) -> None:
    from raytrain.formats import paligemma as pg
    from raytrain.formats.annotations import Box

    d = "seed004_fracture_jsonl"
    # (file, photo, cracks as (seed, start, heading, steps)): grayscale, like radiographs
    studies = [
        ("study_001.jpeg", "brick", [(1, (40, 60), 0.5, 22)]),
        ("study_002.jpeg", "brick", []),
        ("study_003.jpeg", "moon", [(2, (30, 150), -0.4, 18), (3, (150, 40), 1.7, 14)]),
        ("study_004.jpeg", "moon", []),
        ("study_005.jpeg", "moon", [(4, (120, 120), 0.9, 20)]),
    ]
    rows = []
    for fname, name, cracks in studies:
        p = Photo(name, max_side=224)  # the seed's input size
        img = p.image.convert("L").copy()
        boxes = [_crack(img, s, start, heading, steps) for s, start, heading, steps in cracks]
        files[f"{d}/{fname}"] = p.jpeg(img)
        # the seed's layout: each box "<loc>x4 Fracture;", boxes space-separated; "Normal" when none
        suffix = " ".join(pg.render_objects([Box(*b, label="Fracture")], p.w, p.h) + ";" for b in boxes) or "Normal"
        rows.append({"image": fname, "prefix": "Detect Fracture", "suffix": suffix})
    files[f"{d}/data.jsonl"] = _jsonl(rows)


# ------------------------------------------------------------------------------------------------
# peers: ms-swift grounding JSONL and LLaMA-Factory ShareGPT-with-images


def build_ms_swift(files: dict) -> None:
    d = "ms_swift_grounding"
    ph = {n: Photo(n) for n in ("coffee", "astronaut", "chelsea", "quokka", "camera")}
    for n, p in ph.items():
        files[f"{d}/images/{n}.jpg"] = p.jpeg()
    q = {k["label"]: (k["x"], k["y"]) for k in quokka_annotation()["keypoints"]}
    qb = quokka_annotation()["bounding_boxes"][0]
    co, ast, ch, qu = ph["coffee"], ph["astronaut"], ph["chelsea"], ph["quokka"]

    def msg(user, answer, *more, system=None):
        """Messages: [system], user, assistant, then (user, assistant) pairs of later turns."""
        out = [{"role": "system", "content": system}] if system else []
        for u, a in [(user, answer), *more]:
            out += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        return out

    def norm1(p, b):
        return [round(b[0] / p.src_w, 4), round(b[1] / p.src_h, 4), round(b[2] / p.src_w, 4), round(b[3] / p.src_h, 4)]

    rows = [
        {"messages": msg("<image>Find the <ref-object> in the image.", "<bbox>"), "images": ["images/coffee.jpg"],
         "objects": {"ref": ["spoon"], "bbox": [co.box(COFFEE["spoon"])]}},
        {"messages": msg("<image>What is behind the astronaut?", "<ref-object><bbox> and <ref-object><bbox>.",
                         system="You are a helpful assistant."), "images": ["images/astronaut.jpg"],
         "objects": {"ref": ["an american flag", "a model of the space shuttle"],
                     "bbox": [ast.box(ASTRONAUT["flag"]), ast.box(ASTRONAUT["shuttle"])]}},
        {"messages": msg("<image>Find the <ref-object> in the image.", "<bbox><bbox>"), "images": ["images/chelsea.jpg"],
         "objects": {"ref": ["cat's eye"], "bbox": [norm1(ch, CHELSEA["eye_left"]), norm1(ch, CHELSEA["eye_right"])],
                     "bbox_type": "norm1"}},
        {"messages": msg("<image>Point to the <ref-object>.", "<bbox>"), "images": ["images/quokka.jpg"],
         "objects": {"ref": ["quokka's nose"], "bbox": [qu.point(q["nose"])]}},
        {"messages": msg("<image>Describe the image.", "A man in a dark coat looks through a camera on a tripod in a grassy field."),
         "images": ["images/camera.jpg"]},
        # objects as a JSON string, as datasets on the hub store the column
        {"messages": msg("<image>Find the <ref-object> in the image.", "<bbox>"), "images": ["images/quokka.jpg"],
         "objects": json.dumps({"ref": ["quokka"], "bbox": [qu.box((qb["x1"], qb["y1"], qb["x2"], qb["y2"]))]})},
        {"messages": msg("<image>Find the <ref-object>.", "<bbox>", ("And the <ref-object>?", "<bbox>")),
         "images": ["images/astronaut.jpg"],
         "objects": {"ref": ["face", "helmet"], "bbox": [ast.box(ASTRONAUT["face"]), ast.box(ASTRONAUT["helmet"])]}},
        # bad rows, one reason each
        {"messages": msg("<image>Find the <ref-object> in the image.", "<bbox>"), "images": ["images/missing.jpg"],
         "objects": {"ref": ["cup"], "bbox": [[10, 10, 50, 50]]}},
        {"messages": msg("<image>Find the <ref-object> in the image.", "<bbox>"), "images": ["images/coffee.jpg"],
         "objects": {"ref": ["cup"], "bbox": [co.box(COFFEE["cup"])[:2] + [900.0, co.box(COFFEE["cup"])[3]]]}},
        {"messages": msg("<image>Find the <ref-object> in the image.", "<bbox><bbox>"), "images": ["images/coffee.jpg"],
         "objects": {"ref": ["cup"], "bbox": [co.box(COFFEE["cup"])]}},
        '{"messages": [{"role": "user", "content": "<image>Find the cup"}, {"role": "assistant", "content": "<bbox>"}], "images": ["images/cof',
        {"messages": msg("<image><image>Find the <ref-object> in the images.", "<bbox>"),
         "images": ["images/coffee.jpg", "images/chelsea.jpg"], "objects": {"ref": ["spoon"], "bbox": [co.box(COFFEE["spoon"])]}},
        {"messages": msg("<image>Find the <ref-object> in the image.", "<bbox>"), "images": ["images/coffee.jpg"],
         "objects": {"ref": ["cup"], "bbox": [[287, 28, 685, 762]], "bbox_type": "norm1000"}},
    ]
    files[f"{d}/data.jsonl"] = _jsonl(rows)


def build_llamafactory(files: dict) -> None:
    d = "llamafactory_sharegpt"
    ph = {n: Photo(n) for n in ("coffee", "chelsea", "astronaut", "quokka", "rocket")}
    for n, p in ph.items():
        files[f"{d}/images/{n}.jpg"] = p.jpeg()
    qb = quokka_annotation()["bounding_boxes"][0]
    co, ch, qu, ro = ph["coffee"], ph["chelsea"], ph["quokka"], ph["rocket"]

    def ibox(p, b):
        return [int(round(v)) for v in p.box(b)]

    def fenced(objs):
        return "```json\n[\n" + ",\n".join("\t" + json.dumps(o) for o in objs) + "\n]\n```"

    def conv(user, answer, image, system=None):
        m = [{"role": "system", "content": system}] if system else []
        return {"messages": m + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], "images": [image]}

    cup, spoon = ibox(co, COFFEE["cup"]), ibox(co, COFFEE["spoon"])
    eyes = [[int(round(v)) for v in ch.point(((b[0] + b[2]) / 2, (b[1] + b[3]) / 2))] for b in (CHELSEA["eye_left"], CHELSEA["eye_right"])]
    rows = [
        conv("<image>Locate the cup and the spoon in the image and output their bbox coordinates in JSON format.",
             fenced([{"bbox_2d": cup, "label": "cup"}, {"bbox_2d": spoon, "label": "spoon"}]), "images/coffee.jpg"),
        conv("<image>Point to the cat's eyes and output their coordinates in JSON format.",
             json.dumps([{"point_2d": e, "label": "cat's eye"} for e in eyes]), "images/chelsea.jpg"),
        conv("<image>Describe this image.", "A smiling astronaut in an orange suit in front of an American flag and a model of the space shuttle.",
             "images/astronaut.jpg", system="You are a helpful assistant."),
        conv("<image>Outline the position of the quokka and output its bbox in JSON format.",
             fenced([{"bbox_2d": ibox(qu, (qb["x1"], qb["y1"], qb["x2"], qb["y2"])), "label": "quokka"}]), "images/quokka.jpg"),
        conv("<image>Please return the phrase and bounding box pairs for each unique object you see in the image.",
             str([("a rocket on the launch pad", ibox(ro, ROCKET["rocket"]))]), "images/rocket.jpg"),
        # bad rows, one reason each
        conv("<image>Locate the cup in JSON format.", fenced([{"bbox_2d": cup, "label": "cup"}]), "images/missing.jpg"),
        conv("<image>Locate the cup in JSON format.", fenced([{"bbox_2d": cup[:2] + [900, cup[3]], "label": "cup"}]), "images/coffee.jpg"),
        conv("<image>Locate the spoon in JSON format.", '```json\n[\n\t{"bbox_2d": [' + ", ".join(map(str, spoon[:2])), "images/coffee.jpg"),
        conv("Locate the spoon in JSON format.", fenced([{"bbox_2d": spoon, "label": "spoon"}]), "images/coffee.jpg"),
        {"messages": [{"role": "assistant", "content": "A cat."}, {"role": "user", "content": "<image>Describe it."}],
         "images": ["images/chelsea.jpg"]},
    ]
    files[f"{d}/grounding.json"] = json.dumps(rows, indent=1) + "\n"
    sharegpt = [  # LLaMA-Factory's default sharegpt tags: conversations / from / value / human / gpt
        {"conversations": [{"from": "human", "value": "<image>Where is the saucer? Answer in JSON."},
                           {"from": "gpt", "value": fenced([{"bbox_2d": ibox(co, COFFEE["saucer"]), "label": "saucer"}])}],
         "images": ["images/coffee.jpg"]},
        {"conversations": [{"from": "human", "value": "<image>What is in the picture?"},
                           {"from": "gpt", "value": "A close-up of a tabby cat with green eyes."}],
         "system": "Answer briefly.", "images": ["images/chelsea.jpg"]},
    ]
    files[f"{d}/grounding_sharegpt.json"] = json.dumps(sharegpt, indent=1) + "\n"
    info = {
        "raytrain_grounding": {"file_name": "grounding.json", "formatting": "sharegpt",
                               "columns": {"messages": "messages", "images": "images"},
                               "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                        "assistant_tag": "assistant", "system_tag": "system"}},
        "raytrain_grounding_sharegpt": {"file_name": "grounding_sharegpt.json", "formatting": "sharegpt",
                                        "columns": {"messages": "conversations", "images": "images", "system": "system"}},
    }
    files[f"{d}/dataset_info.json"] = json.dumps(info, indent=2) + "\n"


# ------------------------------------------------------------------------------------------------


def build_all(mask_codec: str | None = None) -> dict[str, bytes | str]:
    files: dict[str, bytes | str] = {}
    build_pixmo(files)
    build_datature(files, mask_codec)
    build_visual_genome(files)
    build_risc(files)
    build_fracture(files)
    build_ms_swift(files)
    build_llamafactory(files)
    return files


def preview(out: Path) -> None:
    """Every photo with the boxes / points of its annotations, to check them by eye."""
    out.mkdir(parents=True, exist_ok=True)
    qa = quokka_annotation()
    qb = qa["bounding_boxes"][0]
    sets = {
        "astronaut": ([ASTRONAUT[k] for k in ("face", "head", "flag", "shuttle", "patch", "helmet")], ASTRONAUT["eyes"]),
        "coffee": ([COFFEE[k] for k in ("cup", "spoon", "saucer", "crema")], [COFFEE["spoon_bowl"]]),
        "chelsea": ([CHELSEA[k] for k in ("head", "eye_left", "eye_right", "nose")], [CHELSEA["nose_tip"]]),
        "rocket": ([ROCKET["rocket"]], [ROCKET["rocket_centre"]]),
        "camera": ([CAMERA[k] for k in ("man", "head", "camera", "tripod")], []),
        "coins": ([c[2:] for c in COINS], [c[:2] for c in COINS]),
        "quokka": ([(qb["x1"], qb["y1"], qb["x2"], qb["y2"]), *QUOKKA_EXTRA.values()], [(k["x"], k["y"]) for k in qa["keypoints"]]),
    }
    for name, (boxes, points) in sets.items():
        img = source_photo(name).convert("RGB")
        dr = ImageDraw.Draw(img)
        for b in boxes:
            dr.rectangle(b, outline=(255, 0, 0), width=2)
        for x, y in points:
            dr.ellipse([x - 4, y - 4, x + 4, y + 4], outline=(0, 255, 255), width=2)
        img.save(out / f"{name}.png")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the files on disk; write nothing")
    ap.add_argument("--preview", metavar="DIR", help="write the photos with their annotations drawn")
    ap.add_argument("--mask-codec", metavar="NPZ", help="big_vision's vae-oid.npz for true <seg> codes")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ASSETS.parents[1]))  # the raytrain checkout this file belongs to
    if args.preview:
        preview(Path(args.preview))
        return 0
    files = build_all(args.mask_codec)
    changed = []
    for rel, content in sorted(files.items()):
        data = content.encode("utf-8") if isinstance(content, str) else content
        path = ASSETS / rel
        if path.exists() and path.read_bytes() == data:
            continue
        changed.append(rel)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as f:
                f.write(data)
            os.chmod(f.name, 0o644)  # mkstemp's 0600 is not what a checkout has
            Path(f.name).replace(path)
    for rel in changed:
        print(("differs: " if args.check else "wrote: ") + rel)
    return 1 if (args.check and changed) else 0


if __name__ == "__main__":
    raise SystemExit(main())
