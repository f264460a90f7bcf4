import io
import itertools
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from raytrain.data import synthetic
from raytrain.formats.annotations import Box, Point, check_objects


def _pixels(example) -> np.ndarray:
    im = Image.open(io.BytesIO(example["image"]))
    assert im.format == "PNG" and im.mode == "RGB"
    assert im.size == (example["width"], example["height"])
    return np.asarray(im)


def _pairs(objs):
    boxes = [o for o in objs if isinstance(o, Box)]
    points = [o for o in objs if isinstance(o, Point)]
    assert len(boxes) == len(points)
    assert objs[: 2 * len(boxes)] == [*boxes, *points]  # all boxes, then the points in the same shape order
    caption, *regions = objs[2 * len(boxes):]  # then one caption and a region per shape
    assert all(b.label in caption.text for b in boxes)
    assert [(r.x1, r.y1, r.x2, r.y2, r.phrase) for r in regions] == [(b.x1, b.y1, b.x2, b.y2, b.label) for b in boxes]
    return list(zip(boxes, points))


def test_deterministic_bytes_and_objects():
    a = synthetic.make_example(7, seed=3, image_size=64, shapes_per_image=2)
    b = synthetic.make_example(7, seed=3, image_size=64, shapes_per_image=2)
    assert a["image"] == b["image"]
    assert a["objects"] == b["objects"]
    assert a["id"] == b["id"]


def test_different_seeds_and_indices_differ():
    base = synthetic.make_example(0, seed=0)
    assert synthetic.make_example(0, seed=1)["image"] != base["image"]
    assert synthetic.make_example(1, seed=0)["image"] != base["image"]
    assert synthetic.make_example(0, seed=1)["id"] != base["id"]


@pytest.mark.parametrize("image_size,shapes", [(64, 1), (64, 3), (96, 4), (32, 2)])
def test_objects_inside_and_drawn_where_annotated(image_size, shapes):
    for index in range(25):
        ex = synthetic.make_example(index, seed=11, image_size=image_size, shapes_per_image=shapes)
        px = _pixels(ex)
        assert check_objects(ex["objects"], ex["width"], ex["height"]) is None
        pairs = _pairs(ex["objects"])
        assert len(pairs) == shapes
        for box, point in pairs:
            assert box.label == point.label and box.label in synthetic.LABELS
            assert 0 <= box.x1 < box.x2 <= image_size and 0 <= box.y1 < box.y2 <= image_size
            assert box.x1 <= point.x <= box.x2 and box.y1 <= point.y <= box.y2
            colour = np.array(synthetic.COLOURS[box.label.split(" ")[0]])
            # the pixel under the point is the shape's flat colour: the shape is really there
            assert (px[int(point.y), int(point.x)] == colour).all()
            # the box is tight: each of its four edges touches a shape-coloured pixel
            inside = (px[int(box.y1):int(box.y2), int(box.x1):int(box.x2)] == colour).all(-1)
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
        # every shape-coloured pixel belongs to some annotated box: nothing drawn unannotated
        stray = np.zeros(px.shape[:2], bool)
        for colour in synthetic.COLOURS.values():
            stray |= (px == np.array(colour)).all(-1)
        for box, _ in pairs:
            stray[int(box.y1):int(box.y2), int(box.x1):int(box.x2)] = False
        assert not stray.any()


def test_labels_distinct_and_boxes_disjoint():
    for index in range(40):
        ex = synthetic.make_example(index, seed=5, image_size=64, shapes_per_image=4)
        boxes = [b for b, _ in _pairs(ex["objects"])]
        assert len({b.label for b in boxes}) == 4
        for a, b in itertools.combinations(boxes, 2):
            assert a.x2 <= b.x1 or b.x2 <= a.x1 or a.y2 <= b.y1 or b.y2 <= a.y1


def test_sizes_in_range_and_background_is_not_a_shape_colour():
    sides = []
    for index in range(60):
        ex = synthetic.make_example(index, seed=2, image_size=64)
        (box, _), = _pairs(ex["objects"])
        sides.append(max(box.x2 - box.x1, box.y2 - box.y1))
        px = _pixels(ex).astype(int)
        corner = px[0, 0] if box.x1 > 0 or box.y1 > 0 else px[-1, -1]
        for colour in synthetic.COLOURS.values():
            assert np.abs(corner - np.array(colour)).sum() > 100
    assert 0.15 * 64 - 1 <= min(sides) and max(sides) <= 0.40 * 64 + 1
    assert max(sides) - min(sides) > 8  # sizes actually vary


def test_all_labels_occur():
    seen = {synthetic.make_example(i, seed=0, shapes_per_image=3)["objects"][0].label for i in range(300)}
    assert len(seen) > 0.8 * len(synthetic.LABELS)


def test_split_fractions_and_rows():
    splits = {"train": 0.8, "val": 0.1, "test": 0.1}
    counts = Counter(synthetic.split_of(i, 0, splits) for i in range(2000))
    assert abs(counts["train"] - 1600) <= 20 and abs(counts["val"] - 200) <= 20 and abs(counts["test"] - 200) <= 20
    # growing n never moves an example; different seeds give different assignments
    assert [synthetic.split_of(i, 0, splits) for i in range(50)] == [synthetic.split_of(i, 0, splits) for i in range(50)]
    assert [synthetic.split_of(i, 0, splits) for i in range(50)] != [synthetic.split_of(i, 1, splits) for i in range(50)]
    assert Counter(synthetic.split_of(i, 0, {"train": 1.0, "val": 0.0}) for i in range(100)) == {"train": 100}

    rows = list(synthetic.generate_rows(20, seed=4, image_size=32, shapes_per_image=1, splits=splits))
    assert [r["id"] for r in rows] == [synthetic.make_example(i, 4, 32)["id"] for i in range(20)]
    assert all(r["source"] == "synthetic" and r["split"] in splits for r in rows)
    assert rows[3]["image"] == synthetic.make_example(3, 4, 32)["image"]


def test_bad_arguments():
    with pytest.raises(ValueError):
        synthetic.make_example(0, 0, shapes_per_image=0)
    with pytest.raises(ValueError):
        synthetic.make_example(0, 0, image_size=4)
    with pytest.raises(ValueError):
        synthetic.split_of(0, 0, {})
