"""Caption metrics against pycocoevalcap's own scorers; dense captioning matching by hand.

Tests that need Java share one METEOR subprocess (``captions._meteor`` is cached per
process): starting it loads a 60 MB paraphrase table, several seconds of CPU.
"""

import shutil

import numpy as np
import pytest

from raytrain.eval.metrics import captions
from raytrain.eval.metrics.captions import (
    CAPTION_KEYS,
    JavaMissingError,
    caption_metrics,
    dense_caption_metrics,
)
from raytrain.formats.annotations import Box

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="METEOR / PTB tokenizer need java")

REFS = {
    1: ["A man is riding a brown horse on the beach.", "Someone rides a horse along the shore"],
    2: ["Two dogs are playing in the snow!", "dogs play in snow"],
    3: ["A red car parked next to a tall tree", "a car by a tree"],
}


@pytest.fixture
def no_java(monkeypatch):
    monkeypatch.setattr(captions, "_java_available", lambda: False)


def direct_pycocoevalcap(refs, hyps):
    """The standard coco-caption recipe, by hand: tokenize refs and hyps, run each scorer."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": hyps[k]}] for k in refs})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor, _ = captions._meteor().compute_score(gts, res)  # pycocoevalcap's Meteor, shared JVM
    return {
        "bleu_1": bleu[0],
        "bleu_2": bleu[1],
        "bleu_3": bleu[2],
        "bleu_4": bleu[3],
        "meteor": meteor,
        "rouge_l": Rouge().compute_score(gts, res)[0],
        "cider": Cider().compute_score(gts, res)[0],
    }


@needs_java
def test_identical_captions():
    r = caption_metrics(REFS, {k: v[0] for k, v in REFS.items()})
    assert r["bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert r["bleu_1"] == pytest.approx(1.0, abs=1e-6)
    assert r["rouge_l"] == pytest.approx(1.0)
    assert r["meteor"] > 0.9  # METEOR keeps a small fragmentation penalty even for a perfect match
    assert r["cider"] > 1.0
    assert (r["n"], r["tokenizer"], r["warnings"]) == (3, "ptb", [])


@needs_java
def test_equals_direct_pycocoevalcap_and_counts_problems():
    refs = dict(REFS)
    refs[4] = []  # cannot be scored
    hyps = {
        1: "a man rides a horse on a beach",
        2: "A dog\r\nplays in the SNOW.",  # a line break would shift every later caption
        # 3 missing: scored as an empty caption
        9: "no references for this one",
    }
    r = caption_metrics(refs, hyps)
    assert (r["n"], r["n_missing_hyp"], r["n_hyp_without_ref"], r["n_empty_refs"]) == (3, 1, 1, 1)
    expected = direct_pycocoevalcap(REFS, {1: hyps[1], 2: "A dog plays in the SNOW.", 3: ""})
    for k in CAPTION_KEYS:
        assert r[k] == pytest.approx(expected[k], abs=1e-12), k
    assert 0 < r["bleu_4"] < r["bleu_1"] < 1 and 0 < r["meteor"] < 1 and r["cider"] > 0


def test_nothing_to_score():
    r = caption_metrics({1: []}, {2: "x"}, on_missing_java="skip")
    assert all(r[k] is None for k in CAPTION_KEYS)
    assert (r["n"], r["n_empty_refs"], r["n_hyp_without_ref"]) == (0, 1, 1)


def test_missing_java_raises_or_is_explicit(no_java):
    from pycocoevalcap.bleu.bleu import Bleu

    with pytest.raises(JavaMissingError, match="java"):
        caption_metrics(REFS, {1: "x"})
    with pytest.raises(JavaMissingError):
        dense_caption_metrics([], [])
    hyps = {1: "A man rides a horse, on the beach.", 2: "Dogs play in snow!", 3: "a car"}
    r = caption_metrics(REFS, hyps, on_missing_java="skip")
    assert r["meteor"] is None and r["tokenizer"] == "simple" and "java not found" in r["warnings"][0]
    # the fallback tokenizer lower-cases and drops PTB's punctuation list, like the real one
    tok = captions._simple_tokenize({1: [hyps[1]]})
    assert tok == {1: ["a man rides a horse on the beach"]}
    gts = captions._simple_tokenize(REFS)
    res = captions._simple_tokenize({k: [v] for k, v in hyps.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert r["bleu_4"] == pytest.approx(bleu[3]) and 0 < r["bleu_4"] < 1
    with pytest.raises(ValueError, match="on_missing_java"):
        caption_metrics(REFS, hyps, on_missing_java="ignore")


def test_dense_matching_is_one_to_one_by_iou(no_java):
    gt = [
        ("a", Box(0, 0, 100, 100), "car"),
        ("a", Box(0, 0, 100, 100), "the same car"),  # two GT regions on one box
        ("b", Box(0, 0, 10, 10), "dog"),  # no prediction on image b
    ]
    pred = [
        ("a", Box(0, 0, 100, 60), "car", 0.9),  # IoU 0.6 with both GT boxes
        ("c", Box(0, 0, 10, 10), "cat", 0.1),  # image without GT
    ]
    r = dense_caption_metrics(gt, pred, on_missing_java="skip")
    assert (r["n_images"], r["n_gt"], r["n_pred"]) == (3, 3, 2)
    for t, m in ((30, 1), (50, 1), (60, 1), (70, 0)):  # 0.6 is inclusive; one prediction, one match
        assert r[f"recall_{t}"] == pytest.approx(m / 3)
        assert r[f"precision_{t}"] == pytest.approx(m / 2)
        assert (r[f"unmatched_gt_{t}"], r[f"unmatched_pred_{t}"]) == (3 - m, 2 - m)
        assert r[f"meteor_{t}"] is None
    assert r["recall_mean"] == pytest.approx((4 / 3) / 5)
    assert r["meteor_mean"] is None and r["warnings"]


@needs_java
def test_dense_meteor_by_hand():
    gt = [
        ("a", Box(0, 0, 100, 100), "A red car."),
        ("a", Box(200, 200, 300, 300), "a tall green tree"),
        ("b", Box(0, 0, 50, 50), "a small dog"),
    ]
    pred = [
        ("a", Box(0, 0, 100, 80), "a red car", 0.9),  # IoU 0.8
        ("a", Box(200, 200, 300, 250), "a big tree", 0.8),  # IoU 0.5
        ("a", Box(400, 400, 450, 450), "sky", 0.7),  # overlaps nothing
    ]
    r = dense_caption_metrics(gt, pred)
    same, _ = captions._meteor().compute_score({0: ["a red car"]}, {0: ["a red car"]})
    tree, _ = captions._meteor().compute_score({0: ["a tall green tree"]}, {0: ["a big tree"]})
    assert 0 < tree < same
    for t in (30, 40, 50):
        assert r[f"recall_{t}"] == pytest.approx(2 / 3) and r[f"precision_{t}"] == pytest.approx(2 / 3)
        assert r[f"meteor_{t}"] == pytest.approx((same + tree) / 2)
        assert r[f"meteor_per_gt_{t}"] == pytest.approx((same + tree) / 3)
        assert (r[f"unmatched_gt_{t}"], r[f"unmatched_pred_{t}"]) == (1, 1)
    for t in (60, 70):
        assert r[f"recall_{t}"] == pytest.approx(1 / 3)
        assert r[f"meteor_{t}"] == pytest.approx(same)
        assert r[f"meteor_per_gt_{t}"] == pytest.approx(same / 3)
    assert r["meteor_mean"] == pytest.approx(np.mean([(same + tree) / 2] * 3 + [same] * 2))
    assert r["warnings"] == []
