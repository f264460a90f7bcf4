"""Per-object confidence from token log-probabilities, NMS, correctness for calibration, ECE,
and the grammar's logits processor on hand-made scores."""

import math

import numpy as np
import pytest

from raytrain.eval.metrics.calibration import correct_predictions, expected_calibration_error, reliability_bins
from raytrain.formats.annotations import Box, Point, nms
from raytrain.models.paligemma_decoding import label_sequences, object_confidences
from raytrain.predict import GrammarLogitsProcessor
from raytrain.formats.grammar import DetectionGrammar
from raytrain.formats.paligemma import loc_token, parse


@pytest.fixture(scope="module")
def tok():
    from raytrain.models.tiny_paligemma import build_tokenizer

    return build_tokenizer()


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------- confidence


def test_confidence_is_geometric_mean_of_loc_and_label_tokens(tok):
    text = "<loc0010><loc0020><loc0030><loc0040> red circle ; <loc0100><loc0200><loc0300><loc0400> blue square"
    ids = ids_of(tok, text) + [tok.eos_token_id]
    pieces = tok.convert_ids_to_tokens(ids)
    # '<loc..>' x4, '▁red', '▁circle', '▁', ';', '▁', '<loc..>' x4, '▁blue', '▁square', '<eos>'
    assert pieces[4:9] == ["▁red", "▁circle", "▁", ";", "▁"]
    lp = np.log(np.linspace(0.2, 0.9, len(ids)))
    conf = object_confidences(lp, ids, tok, "box")
    first = [0, 1, 2, 3, 4, 5]  # locs + "red" "circle"; separator tokens are not the object's
    second = [9, 10, 11, 12, 13, 14]  # <eos> is not either
    assert conf == pytest.approx([math.exp(lp[first].mean()), math.exp(lp[second].mean())])


def test_confidences_stay_aligned_with_the_parser(tok):
    """Objects the parser rejects (unknown label, wrong loc count, missing label, garbage)
    get no confidence, and the rest keep their own."""
    text = ("junk <loc0001><loc0002> red circle ; <loc0003><loc0004> green star ; <loc0005> blue square ; "
            "<loc0006><loc0007> ; <loc0008><loc0009> blue square")
    ids = ids_of(tok, text) + [tok.eos_token_id]
    lp = -np.arange(1, len(ids) + 1) / 10.0
    allowed = {"red circle", "blue square"}
    objs = parse(tok.decode(ids, skip_special_tokens=True), 1, 1, "point", allowed).objects
    assert [o.label for o in objs] == ["red circle", "blue square"]
    conf = object_confidences(lp, ids, tok, "point", allowed)
    assert len(conf) == 2
    locs_of = [i for i, t in enumerate(ids) if tok.convert_ids_to_tokens(t) in (loc_token(8), loc_token(9))]
    blue_last = locs_of + [locs_of[-1] + 1, locs_of[-1] + 2]
    assert conf[1] == pytest.approx(math.exp(lp[blue_last].mean()))
    assert conf[0] > conf[1]  # earlier tokens have higher log-probs here


def test_random_token_soup_always_aligns(tok):
    rng = np.random.default_rng(0)
    vocab = ids_of(tok, " red circle ; blue square") + ids_of(tok, "<loc0001><loc0002><loc0003><seg001>") + [tok.eos_token_id]
    for _ in range(100):
        ids = rng.choice(vocab, size=rng.integers(0, 30)).tolist()
        lp = rng.uniform(-3, 0, size=len(ids))
        for kind in ("point", "box"):
            upto = ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids  # generation stops there
            n = len(parse(tok.decode(upto, skip_special_tokens=True), 1, 1, kind).objects)
            conf = object_confidences(lp, ids, tok, kind)
            assert len(conf) == n and all(0 < c <= 1 for c in conf)


def test_label_sequences_with_a_bare_tokenizer(tok):
    seqs = label_sequences(tok, ["red circle"])
    assert tok.convert_ids_to_tokens(seqs["red circle"][0]) == ["▁red", "▁circle", "▁", ";", "▁"]
    assert tok.convert_ids_to_tokens(seqs["red circle"][1]) == ["▁red", "▁circle"]
    with pytest.raises(ValueError, match="cannot be rendered"):
        label_sequences(tok, ["a ; b"])


# ---------------------------------------------------------------------------- NMS


def test_box_nms_greedy_by_score():
    a = Box(0, 0, 10, 10, "cat")
    b = Box(1, 1, 11, 11, "cat")  # IoU with a = 81/119 = 0.68
    c = Box(50, 50, 60, 60, "cat")
    d = Box(0, 0, 10, 10, "dog")  # same place, other label
    assert nms([a, b, c, d], [0.5, 0.9, 0.7, 0.1]) == [1, 2, 3]
    assert nms([a, b, c, d], [0.5, 0.9, 0.7, 0.1], class_aware=False) == [1, 2]
    assert nms([a, b], [0.5, 0.9], iou_threshold=0.7) == [1, 0]  # 0.68 is not > 0.7
    assert nms([a, b], [float("nan"), 0.1]) == [1]  # NaN ranks last
    assert nms([], []) == []


def test_point_nms_by_distance():
    p = [Point(10, 10, "x"), Point(13, 14, "x"), Point(30, 10, "x")]  # 0-1: 5 px apart
    assert nms(p, [0.2, 0.8, 0.5], distance_threshold=5) == [1, 2]
    assert nms(p, [0.2, 0.8, 0.5], distance_threshold=4.9) == [1, 2, 0]
    with pytest.raises(ValueError, match="distance_threshold"):
        nms(p, [1, 1, 1])
    with pytest.raises(TypeError):
        nms([p[0], Box(0, 0, 1, 1)], [1, 1])
    with pytest.raises(ValueError):
        nms(p, [1])


# ---------------------------------------------------------------------------- correctness and ECE


def test_correct_predictions_match_one_to_one_by_score():
    gt = [Box(0, 0, 10, 10, "cat")]
    pred = [Box(0, 0, 10, 9, "cat"), Box(0, 0, 10, 10, "cat"), Box(0, 0, 10, 10, "dog")]
    # the best-scored duplicate takes the GT box, the other is a false positive
    assert correct_predictions(pred, gt, 100, 100, scores=[0.9, 0.3, 0.8]) == [True, False, False]
    assert correct_predictions(pred, gt, 100, 100, scores=[0.1, 0.3, 0.8]) == [False, True, False]
    assert correct_predictions([Box(0, 0, 10, 4)], gt, 100, 100) == [False]  # IoU 0.4
    pts = [Point(3, 4), Point(50, 50)]
    r = 0.05 * math.hypot(100, 100)  # 7.07 px
    assert correct_predictions(pts, [Point(0, 0), Point(50, 50 + r)], 100, 100) == [True, False]


def test_ece_by_hand():
    conf = [0.95, 0.85, 0.75, 0.72, 0.15, 0.12]
    correct = [1, 0, 1, 1, 0, 1]
    # bins (0.9,1]: acc 1 conf .95 | (0.8,0.9]: acc 0 conf .85 | (0.7,0.8]: acc 1 conf .735
    # (0.1,0.2]: acc .5 conf .135  ->  (1*.05 + 1*.85 + 2*.265 + 2*.365) / 6 = 2.16 / 6
    assert expected_calibration_error(conf, correct) == pytest.approx(0.36)
    bins = reliability_bins(conf, correct)
    assert [b["count"] for b in bins] == [0, 2, 0, 0, 0, 0, 0, 2, 1, 1]
    assert bins[0]["accuracy"] is None
    assert expected_calibration_error(conf, correct, n_bins=1) == pytest.approx(abs(4 / 6 - np.mean(conf)))
    assert expected_calibration_error([1.0, 1.0, 0.0], [1, 1, 0]) == 0.0  # edges land in the end bins
    assert expected_calibration_error([], []) is None
    with pytest.raises(ValueError):
        expected_calibration_error([1.2], [1])
    with pytest.raises(ValueError):
        expected_calibration_error([0.5, 0.5], [1])


# ---------------------------------------------------------------------------- logits processor


def test_logits_processor_masks_per_row_and_maps_beams_to_examples():
    import torch

    loc0, eos, vocab = 10, 1, 10 + 1024 + 5
    locs = list(range(loc0, loc0 + 1024))
    g_red = DetectionGrammar(locs, {"red": ([3, 4], [3])}, eos, "point", max_objects=1)
    g_blue = DetectionGrammar(locs, {"blue": ([5, 4], [5])}, eos, "point", max_objects=1)
    proc = GrammarLogitsProcessor([g_red, g_blue], prompt_len=2)
    prompt = [[7, 7]] * 4
    # 2 examples x 2 beams: rows 0-1 are example 0 (red), rows 2-3 example 1 (blue)
    gen = [[loc0, loc0 + 1], [loc0 + 5, loc0 + 6], [loc0, loc0 + 1], [loc0 + 2, loc0 + 3]]
    input_ids = torch.tensor([p + g for p, g in zip(prompt, gen)])
    out = proc(input_ids, torch.zeros(4, vocab))
    finite = [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in out]
    assert finite == [{3}, {3}, {5}, {5}]  # the label, and at max_objects=1 no separator
    # a row whose every allowed token was banned by an earlier processor still follows the grammar
    scores = torch.zeros(4, vocab)
    scores[:, 3] = float("-inf")
    out = proc(input_ids, scores)
    assert out[0, 3] == -1e4 and torch.isinf(out[0, :3]).all() and out[2, 5] == 0


class _FreshAnswers:
    """A grammar the way text grammars answer: a NEW Allowed per call (no answer cache), here
    allowing every id but the first `banned` of a large vocabulary (a free phrase's answer)."""

    loc_ids = np.zeros(0, dtype=np.int64)

    def __init__(self, vocab: int, banned: int):
        self.vocab, self.banned = vocab, banned

    def allowed(self, prefix, remaining=None):
        from raytrain.formats.grammar import Allowed

        return Allowed(np.arange(self.banned + len(prefix) % 3, self.vocab, dtype=np.int64), None)


def test_phrase_sized_answers_mask_one_row_with_the_same_result_and_a_bounded_cache():
    import torch

    from raytrain import predict

    vocab = 40_000
    proc = GrammarLogitsProcessor([_FreshAnswers(vocab, 7), None], prompt_len=1)
    scores = torch.randn(2, vocab)
    out = proc(torch.tensor([[0, 5], [0, 6]]), scores.clone())
    expect = torch.full((vocab,), float("-inf"))
    expect[8:] = scores[0, 8:]  # prefix of length 1: ids from 7 + 1 on
    assert torch.equal(out[0], expect) and torch.equal(out[1], scores[1])  # the None row decodes freely
    # the old index path gives the same row
    old_min = predict.DENSE_MIN
    try:
        predict.DENSE_MIN = 10**9
        sparse = GrammarLogitsProcessor([_FreshAnswers(vocab, 7), None], prompt_len=1)(torch.tensor([[0, 5], [0, 6]]), scores.clone())
    finally:
        predict.DENSE_MIN = old_min
    assert torch.equal(out, sparse)
    # every step of a long phrase builds a new answer: the processor keeps a bounded number of them
    for step in range(3 * predict.DENSE_CACHE):
        proc(torch.tensor([[0] + [5] * (step + 1), [0] + [6] * (step + 1)]), scores.clone())
    assert len(proc._dense) <= predict.DENSE_CACHE and len(proc._converted) == 0
