"""Seed 003's caption statistics (raytrain/data/caption_stats.py): hand-computed values, an
independent BLEU implementation (pycocoevalcap's) on RISC-style captions, merging across tasks."""

import csv
from pathlib import Path

import pytest

from raytrain.data import caption_stats
from raytrain.data.caption_stats import CaptionStats

RISC = Path(__file__).parents[2] / "assets" / "risc_mini" / "captions.csv"


def test_hand_computed_statistics():
    st = CaptionStats()
    st.add(["a b c d", "a  b c d", "a b x y"])  # the second repeats the first once whitespace is normalised
    st.add(["one caption only, twelve characters"])
    s = st.summary()
    assert (s["images"], s["captions"], s["captions_per_image"]) == (2, 4, {"1": 1, "3": 1})
    assert s["words"] == {"min": 4, "mean": 4.25, "max": 5, "p25": 4, "median": 4, "p75": 4}
    assert s["characters"]["min"] == 7 and s["characters"]["max"] == len("one caption only, twelve characters")
    assert s["duplicates"] == {"within_image": 1, "images_with_duplicates": 1, "dataset": 1}
    agree = s["caption_vs_caption"]
    assert agree["captions_scored"] == 3  # the lone caption has no other caption to be compared with
    # "a b c d" vs {"a b c d", "a b x y"}: every n-gram matches -> 1, twice. "a b x y" vs {"a b c d"} x 2:
    # p1 = 2/4, p2 = 1/3, p3 = 0/2 -> 0.1/2, p4 = 0/1 -> 0.1/1 (smoothed), same length -> no penalty
    third = (0.5 * (1 / 3) * 0.05 * 0.1) ** 0.25
    assert agree["bleu_sentence_mean"]["bleu_4"] == pytest.approx((1 + 1 + third) / 3, abs=1e-4)
    assert agree["bleu_sentence_mean"]["bleu_1"] == pytest.approx((1 + 1 + 0.5) / 3, abs=1e-4)
    # pooled: matches 10/12, 7/9, 4/6, 2/3
    assert agree["bleu_corpus"]["bleu_4"] == pytest.approx((10 / 12 * 7 / 9 * 4 / 6 * 2 / 3) ** 0.25, abs=1e-4)


def test_brevity_penalty_uses_the_closest_reference():
    m, t, hl, rl = caption_stats.bleu_counts(["a", "b"], [["a", "b", "c", "d", "e"], ["a", "b", "c"]])
    assert (hl, rl) == (2, 3)
    assert caption_stats.bleu(m, t, hl, rl, 1) == pytest.approx(2.718281828 ** (1 - 3 / 2))


def _risc_rows():
    with open(RISC) as f:
        return [[r[k] for k in r if k.startswith("caption_")] for r in csv.DictReader(f)]


def test_corpus_bleu_agrees_with_pycocoevalcap_on_risc_captions():
    from pycocoevalcap.bleu.bleu import Bleu

    st, gts, res, k = CaptionStats(), {}, {}, 0
    for caps in _risc_rows():
        caps = [" ".join(c.split()) for c in caps if c.strip()]
        st.add(caps)
        for i, c in enumerate(caps):
            refs = caps[:i] + caps[i + 1 :]
            if refs:
                res[k] = [" ".join(caption_stats.words(c))]
                gts[k] = [" ".join(caption_stats.words(r)) for r in refs]
                k += 1
    theirs, _ = Bleu(4).compute_score(gts, res, verbose=0)
    ours = st.summary()["caption_vs_caption"]["bleu_corpus"]
    assert [ours[f"bleu_{n}"] for n in range(1, 5)] == pytest.approx(theirs, abs=1e-4)


def test_merging_task_counts_equals_counting_at_once():
    rows = _risc_rows()
    whole = CaptionStats()
    for r in rows:
        whole.add(r)
    a, b = CaptionStats(), CaptionStats()
    for i, r in enumerate(rows):
        (a if i % 2 else b).add(r)
    merged = CaptionStats().merge(a.to_dict()).merge(b.to_dict())
    assert merged.summary() == whole.summary()
    assert whole.summary()["duplicates"]["dataset"] >= 5  # "a road" x 5 and RISC's repeated captions
