import io

import numpy as np
import pytest
from PIL import Image

from raytrain.data import synthetic, validate
from raytrain.formats.annotations import Box, Point, objects_to_json


def _encode(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _row(image: bytes, width=8, height=6, objects=None) -> dict:
    objs = objects if objects is not None else objects_to_json([Box(1, 1, 4, 4, "a"), Point(2.5, 2.5, "a")])
    return {"id": "r0", "image": image, "width": width, "height": height, "split": "train", "source": "t", "objects": objs}


RGB = _encode(Image.new("RGB", (8, 6), (10, 20, 30)))


def test_valid_row_kept_unchanged():
    ex = synthetic.make_example(3, seed=0, shapes_per_image=2)
    row = {**ex, "split": "val", "source": "synthetic", "objects": objects_to_json(ex["objects"])}
    out, reason, note = validate.check_row(row)
    assert reason is None and note is None
    pil = out.pop("pil")
    assert out == row and out is not row
    assert pil.mode == "RGB" and pil.size == (64, 64)
    assert (np.asarray(pil) == np.asarray(Image.open(io.BytesIO(ex["image"])))).all()
    # objects as a list of Point/Box work too
    out, reason, _ = validate.check_row({**row, "objects": ex["objects"]})
    assert reason is None and out["objects"] == ex["objects"]


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty_image"),
        (None, "empty_image"),
        (b"definitely not an image", "corrupt_image"),
        (RGB[:40], "corrupt_image"),  # header only
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "corrupt_image"),  # PNG magic, garbage body
    ],
)
def test_image_drop_reasons(data, reason):
    assert validate.decode_image(data) == (None, reason, None)
    assert validate.check_row(_row(data)) == (None, reason, None)


def test_truncated_png_is_corrupt():
    # noisy pixels so the compressed body is long; cut it in half: header parses, load() fails
    noisy = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(noisy, "RGB"))
    assert Image.open(io.BytesIO(data[: len(data) // 2])).size == (64, 64)  # open() alone would accept it
    assert validate.decode_image(data[: len(data) // 2]) == (None, "corrupt_image", None)


def test_truncated_jpeg_is_corrupt():
    noisy = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(noisy, "RGB"), "JPEG")
    assert validate.decode_image(data[: len(data) // 2])[1] == "corrupt_image"


def test_decompression_bomb(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 8x6 = 48 > 2x limit
    assert validate.decode_image(RGB) == (None, "image_too_large", None)


@pytest.mark.parametrize(
    "image,note",
    [
        (Image.new("L", (8, 6), 200), "converted_from_L"),
        (Image.new("LA", (8, 6), (200, 255)), "converted_from_LA"),
        (Image.new("RGBA", (8, 6), (10, 20, 30, 255)), "converted_from_RGBA"),
        (Image.new("RGB", (8, 6), (10, 20, 30)).convert("P"), "converted_from_P"),
        (Image.new("1", (8, 6), 1), "converted_from_1"),
    ],
)
def test_conversions_png(image, note):
    data = _encode(image)
    pil, reason, got = validate.decode_image(data)
    assert reason is None and got == note
    assert pil.mode == "RGB" and pil.size == (8, 6)
    out, reason, got = validate.check_row(_row(data))
    assert reason is None and got == note and out["pil"].mode == "RGB"
    assert out["image"] == data  # bytes are passed on as they were
    assert validate.decode_image(data, allow_convert=False) == (None, "non_rgb", None)
    assert validate.check_row(_row(data), allow_convert=False) == (None, "non_rgb", None)


def test_rgba_transparent_pixels_become_white():
    im = Image.new("RGBA", (8, 6), (10, 20, 30, 255))
    im.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red
    pil, _, note = validate.decode_image(_encode(im))
    assert note == "converted_from_RGBA"
    assert pil.getpixel((0, 0)) == (255, 255, 255)
    assert pil.getpixel((1, 1)) == (10, 20, 30)


def test_cmyk_jpeg():
    data = _encode(Image.new("CMYK", (8, 6), (0, 255, 255, 0)), "JPEG")  # red in CMYK
    pil, reason, note = validate.decode_image(data)
    assert reason is None and note == "converted_from_CMYK"
    r, g, b = pil.getpixel((4, 3))
    assert r > 200 and g < 60 and b < 60


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    arr = np.array([[0, 32896, 65535, 1000]], dtype=np.uint16).repeat(2, 0)
    data = _encode(Image.fromarray(arr))  # PIL picks mode "I;16" for uint16
    pil, reason, note = validate.decode_image(data)
    assert reason is None and note.startswith("converted_from_I")
    assert [pil.getpixel((x, 0))[0] for x in range(4)] == [0, 128, 255, 3]


def test_float_image_has_no_safe_conversion():
    data = _encode(Image.new("F", (8, 6), 0.5), "TIFF")
    assert validate.decode_image(data) == (None, "non_rgb", None)


@pytest.mark.parametrize(
    "changes,reason",
    [
        ({"width": 9}, "size_mismatch"),
        ({"height": 5}, "size_mismatch"),
        ({"objects": "not json"}, "bad_annotations"),
        ({"objects": '[{"type": "blob", "x": 1}]'}, "bad_annotations"),
        ({"objects": '{"type": "point"}'}, "bad_annotations"),
        ({"objects": [{"x": 1, "y": 2}]}, "bad_annotations"),  # dicts, not Point/Box
        ({"objects": "[]"}, "empty_annotations"),
        ({"objects": []}, "empty_annotations"),
        ({"objects": objects_to_json([Point(9, 2, "a")])}, "coords_out_of_range"),
        ({"objects": objects_to_json([Point(2, -0.5, "a")])}, "coords_out_of_range"),
        ({"objects": objects_to_json([Box(1, 1, 4, 7, "a")])}, "coords_out_of_range"),
        ({"objects": objects_to_json([Box(4, 1, 4, 3, "a")])}, "degenerate_box"),
    ],
)
def test_row_drop_reasons(changes, reason):
    row = {**_row(RGB), **changes}
    assert validate.check_row(row) == (None, reason, None)
    assert reason in validate.REASONS


def test_missing_size_is_filled_in():
    row = _row(RGB)
    del row["width"], row["height"]
    out, reason, _ = validate.check_row(row)
    assert reason is None and (out["width"], out["height"]) == (8, 6)


def test_reasons_complete_and_unique():
    assert len(set(validate.REASONS)) == len(validate.REASONS)
    assert {"empty_image", "corrupt_image", "non_rgb", "size_mismatch", "bad_annotations",
            "empty_annotations", "coords_out_of_range", "degenerate_box"} <= set(validate.REASONS)
