"""PaliGemma answering Molmo percent text: the number loss sees exactly the coordinate digits, with
their place values, through the real encoder and tokenizer (the tiny preset's sentencepiece).

Written while looking into why `paligemma+molmo` stays at the centre baseline in the digits
ablation (README): these pin down that the loss's inputs are right, so the cause lies elsewhere."""

import numpy as np
import pytest
import torch
from PIL import Image

from raytrain.formats.annotations import Point
from raytrain.models import family
from raytrain.models.losses import suffix_loss

# 64-px frame: (0, 0) -> "0.0", (64, 64) -> "100.0", (3.4, 40) -> "5.3" / "62.5", (12.85, 42.9) -> "20.1" / "67.0"
POINTS = [[Point(12.85, 42.9, "red circle")], [Point(64, 64, "red circle")], [Point(0, 0, "red circle")], [Point(3.4, 40, "red circle")]]
# (digit, signed place / 100) per coordinate digit, in answer order
EXPECTED = [
    [("2", -0.1), ("0", 0.01), ("1", 0.001), ("6", -0.1), ("7", 0.01), ("0", 0.001)],
    [("1", -1.0), ("0", 0.1), ("0", 0.01), ("0", 0.001)] * 2,
    [("0", -0.01), ("0", 0.001)] * 2,
    [("5", -0.01), ("3", 0.001), ("6", -0.1), ("2", 0.01), ("5", 0.001)],
]


@pytest.fixture(scope="module")
def encoded(tiny_model_path):
    fam = family("paligemma+molmo")
    proc = fam.load_processor(tiny_model_path)
    hw = fam.image_size(proc)
    rows = [(*fam.render_example("point", "red circle", pts, 64, 64, hw), fam.answer_numbers("point", "red circle", pts, 64, 64, hw))
            for pts in POINTS]
    enc = fam.encode_train(proc, [Image.new("RGB", (hw[1], hw[0]))] * len(rows), [r[0] for r in rows], [r[1] for r in rows], 128,
                           [r[2] for r in rows])
    return fam, proc, rows, enc


def test_place_values_sit_on_the_digit_labels(encoded):
    fam, proc, rows, enc = encoded
    assert rows[0][1].startswith('<point x="20.1" y="67.0"') and rows[1][1].startswith('<point x="100.0" y="100.0"')
    for i, want in enumerate(EXPECTED):
        pos = np.nonzero(enc["num_place"][i])[0]
        got = [(proc.tokenizer.decode([int(enc["labels"][i, p])]), float(enc["num_place"][i, p])) for p in pos]
        assert [d for d, _ in got] == [d for d, _ in want], rows[i][1]
        assert [w for _, w in got] == pytest.approx([w for _, w in want]), rows[i][1]
        # the token right before each number's first digit is the opening quote: nothing else is weighted
        firsts = pos[enc["num_place"][i, pos] < 0]
        assert all(proc.tokenizer.decode([int(enc["labels"][i, p - 1])]) == '"' for p in firsts)


def test_number_loss_reads_the_digit_the_model_predicts_for_each_position(encoded):
    """Logits that copy the labels exactly (shifted as the model predicts them) except one digit:
    the number loss is that digit's |error| x place, averaged over the batch's numbers."""
    fam, proc, rows, enc = encoded
    labels = torch.from_numpy(enc["labels"]).long()
    place = torch.from_numpy(enc["num_place"])
    digit_ids = torch.as_tensor(fam.digit_token_ids(proc.tokenizer))
    B, T = labels.shape
    V = len(proc.tokenizer)
    logits = torch.full((B, T, V), -30.0)
    nxt = labels[:, 1:].clamp(min=0)
    logits[:, :-1].scatter_(2, nxt[..., None], 30.0)  # position t predicts label t+1
    exact, _ = suffix_loss(logits, labels, torch.zeros(0, dtype=torch.long), num_place=place, digit_ids=digit_ids, number_weight=1.0)
    # row 0's x tens digit is '2': predict '7' instead (5 digits off at place 10/100 -> 0.5 for that number)
    t = int(np.nonzero(enc["num_place"][0] < 0)[0][0])
    logits[0, t - 1] = -30.0
    logits[0, t - 1, digit_ids[7]] = 30.0
    loss, stats = suffix_loss(logits, labels, torch.zeros(0, dtype=torch.long), num_place=place, digit_ids=digit_ids, number_weight=1.0)
    n_numbers = sum(len(r[2]) for r in rows)
    assert n_numbers == 8
    assert stats["num_loss"] == pytest.approx(0.5 / n_numbers, rel=1e-4)
    assert float(exact) < 1e-6
