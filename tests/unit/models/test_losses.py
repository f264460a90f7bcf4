"""Loss functions on hand-built logits: the properties each loss exists for."""

import pytest
import torch
import torch.nn.functional as F

from raytrain.models import losses

V, LOC0 = 1100, 50  # vocab with <loc> ids 50..1073
LOC = torch.arange(LOC0, LOC0 + 1024)


def _setup(target_bins, other_targets=(7,)):
    """One sequence: position t predicts labels[t+1]; suffix = locs then text tokens."""
    suffix = [LOC0 + b for b in target_bins] + list(other_targets)
    labels = torch.tensor([[losses.IGNORE_INDEX] + suffix])
    logits = torch.zeros(1, labels.shape[1], V)
    return logits, labels


def _peak(logits, pos, token, height=8.0):
    logits[0, pos, token] = height


def test_plain_ce_matches_torch_when_sigma_is_zero():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, V)
    labels = torch.randint(0, V, (2, 6))
    labels[:, :2] = losses.IGNORE_INDEX
    loss, stats = losses.suffix_loss(logits, labels, LOC, loc_sigma=0.0)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=losses.IGNORE_INDEX)
    assert torch.allclose(loss, ref, atol=1e-6) and abs(stats["ce"] - float(ref)) < 1e-5


def test_distance_aware_loss_grows_with_distance_plain_ce_does_not():
    grid = torch.arange(1024.0)
    soft, ce = [], []
    for centre in (520, 640, 950):  # the same confident blob, 20 / 140 / 450 bins from the target
        logits, labels = _setup([500])
        logits[0, 0, LOC] = 12.0 * torch.exp(-((grid - centre) ** 2) / (2 * 30.0**2))
        loss, st = losses.suffix_loss(logits, labels, LOC, loc_sigma=60.0)
        soft.append(float(loss))
        ce.append(st["ce"])
    assert soft[0] < soft[1] - 1.0 and soft[1] < soft[2] - 0.2
    assert abs(ce[1] - ce[2]) < 1e-3  # plain CE: 140 bins off costs what 450 bins off costs


def test_gaussian_targets_are_distributions_centred_on_the_bin():
    q = losses.gaussian_targets(torch.tensor([0, 512, 1023]), 1024, 20.0)
    assert torch.allclose(q.sum(-1), torch.ones(3))
    assert q.argmax(-1).tolist() == [0, 512, 1023]


def test_focal_down_weights_easy_text_tokens():
    logits, labels = _setup([], other_targets=(7, 9))
    _peak(logits, 0, 7, 10.0)  # easy token
    plain, _ = losses.suffix_loss(logits, labels, LOC)
    focal, _ = losses.suffix_loss(logits, labels, LOC, focal_gamma=2.0)
    assert focal < plain
    # the hard token (uniform logits, p ~ 1/V) keeps almost its whole CE
    hard_ce = torch.log(torch.tensor(float(V)))
    assert focal > 0.49 * hard_ce


class _Tok:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": {" boat": [9], " person": [7]}[text]}


def test_class_weights_weight_label_tokens():
    w = losses.token_weights(_Tok(), {"boat": 3.0, "person": 1.0}, V)
    assert w[9] == 3.0 and w[7] == 1.0 and w[0] == 1.0
    logits, labels = _setup([], other_targets=(7, 9))
    _peak(logits, 0, 7, 5.0)
    per = F.cross_entropy(logits[0, :2], torch.tensor([7, 9]), reduction="none")
    loss, _ = losses.suffix_loss(logits, labels, LOC, label_token_weights=w)
    assert torch.allclose(loss, (per[0] * 1 + per[1] * 3) / 4)


def test_box_runs_find_boxes_not_points():
    is_loc = torch.tensor([[0, 1, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1]], dtype=torch.bool)
    assert losses._box_runs(is_loc).nonzero()[:, 1].tolist() == [1, 9]


def test_box_iou_loss_is_zero_at_target_and_pulls_towards_it():
    bins = [200, 300, 600, 700]
    logits, labels = _setup(bins)
    for i, b in enumerate(bins):
        _peak(logits, i, LOC0 + b, 40.0)
    _, st = losses.suffix_loss(logits, labels, LOC, box_iou_weight=1.0)
    assert st["box_loss"] < 1e-3
    # a box predicted off-target: one gradient step moves the expected y2 towards the target
    logits, labels = _setup(bins)
    for i, b in enumerate([200, 300, 400, 700]):
        _peak(logits, i, LOC0 + b, 5.0)
    logits.requires_grad_(True)
    loss, st = losses.suffix_loss(logits, labels, LOC, box_iou_weight=1.0)
    assert st["box_loss"] > 0.1
    loss.backward()
    grid = torch.arange(1024.0)
    before = (torch.softmax(logits[0, 2, LOC].detach(), -1) * grid).sum()
    after = (torch.softmax((logits - 50.0 * logits.grad)[0, 2, LOC].detach(), -1) * grid).sum()
    assert abs(after - 600) < abs(before - 600)


def test_giou_matches_hand_values():
    a = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    assert torch.allclose(losses.giou_loss(a, a), torch.zeros(1), atol=1e-6)
    b = torch.tensor([[0.5, 0.5, 1.0, 1.0]])  # disjoint, hull area 1, union 0.5 -> giou = 0 - 0.5
    assert torch.allclose(losses.giou_loss(a, b), torch.tensor([1.5]))


# ---------------------------------------------------------------------------- numbers written as digits

DIG = torch.arange(10, 20)  # vocab ids of the digits "0".."9"


def _number_case(digits: str, place_range: float, guess: dict[int, int], other: int = 7):
    """One sequence whose suffix writes `digits` then a text token; `guess` maps a digit position to
    the digit the logits peak on (elsewhere the true digit)."""
    suffix = [int(DIG[int(c)]) for c in digits] + [other]
    labels = torch.tensor([[losses.IGNORE_INDEX] + suffix])
    place = torch.zeros(labels.shape, dtype=torch.float32)
    for k in range(len(digits)):
        w = 10.0 ** (len(digits) - 1 - k) / place_range
        place[0, 1 + k] = -w if k == 0 else w  # label-aligned, negative on the first digit
    logits = torch.zeros(1, labels.shape[1], V)
    for k, c in enumerate(digits):
        logits[0, k, DIG[guess.get(k, int(c))]] = 9.0
    logits[0, len(digits), other] = 9.0
    return logits, labels, place


def _num(logits, labels, place, weight=1.0):
    return losses.suffix_loss(logits, labels, LOC, num_place=place, digit_ids=DIG, number_weight=weight)


def test_number_loss_is_zero_ish_when_right_and_grows_with_the_numeric_error():
    right = _num(*_number_case("105", 112.0, {}))[1]["num_loss"]
    near = _num(*_number_case("105", 112.0, {2: 6}))[1]["num_loss"]  # 106 for 105
    far_unit = _num(*_number_case("105", 112.0, {2: 9}))[1]["num_loss"]  # 109
    tens = _num(*_number_case("105", 112.0, {1: 1}))[1]["num_loss"]  # 115
    hundreds = _num(*_number_case("105", 112.0, {0: 0}))[1]["num_loss"]  # 005
    assert right < 0.01 < near < far_unit < tens < hundreds
    # place-value weighting: one unit at the tens place costs ~10x one at the units place
    assert 8 < (tens - right) / (near - right) < 12
    # plain cross-entropy cannot tell them apart: the same per-token CE wherever the wrong digit is
    ces = [_num(*_number_case("105", 112.0, g), weight=0.0)[1]["ce"] for g in ({2: 6}, {2: 9}, {1: 1}, {0: 0})]
    assert max(ces) - min(ces) < 1e-5


def test_number_loss_is_a_fraction_of_the_range_per_number():
    # all mass on a digit d away at the units place: the loss is ~d / range for one number
    loss = _num(*_number_case("50", 100.0, {1: 3}))[1]["num_loss"]
    assert abs(loss - 3 / 100) < 2e-3
    # two numbers, one off by 3 units and one exact: the mean per number halves it
    logits, labels, place = _number_case("5050", 100.0, {1: 3})
    place[0, 1:5] = torch.tensor([-10 / 100, 1 / 100, -10 / 100, 1 / 100])  # "50" then another "50"
    assert abs(_num(logits, labels, place)[1]["num_loss"] - 3 / 200) < 2e-3


def test_number_loss_off_without_weights_or_places():
    logits, labels, place = _number_case("105", 112.0, {0: 0})
    base, st0 = losses.suffix_loss(logits, labels, LOC)
    off, st1 = _num(logits, labels, place, weight=0.0)
    none, st2 = _num(logits, labels, torch.zeros_like(place))
    assert torch.equal(base, off) and torch.equal(base, none) and st0["ce"] == st1["ce"] == st2["ce"]
    assert st1["num_loss"] == st2["num_loss"] == 0.0
    on, _ = _num(logits, labels, place)
    assert on > base


def test_number_loss_gradient_points_towards_the_right_digit():
    logits, labels, place = _number_case("105", 112.0, {0: 4})  # 405 for 105
    logits.requires_grad_(True)
    loss, _ = losses.suffix_loss(logits, labels, LOC, num_place=place, digit_ids=DIG, number_weight=1.0)
    loss.backward()
    g = -logits.grad[0, 0, DIG]  # descent direction on the hundreds digit's logits
    assert g[1] > 0 and g[4] < 0  # raise the true "1", lower the guessed "4"
    assert g[2] > g[3] > 0  # and closer digits more than farther ones (the distance-aware part)


# ---------------------------------------------------------------------------- CIoU (seed 004)


def test_ciou_matches_a_hand_computed_value():
    # target x 0..0.4, y 0..0.2; prediction x 0.2..0.4, y 0..0.4 (both as (y1, x1, y2, x2))
    target = torch.tensor([[0.0, 0.0, 0.2, 0.4]])
    pred = torch.tensor([[0.0, 0.2, 0.4, 0.4]])
    # by hand: intersection 0.2 x 0.2 = 0.04, union 0.08 + 0.08 - 0.04 = 0.12 -> IoU 1/3;
    # centres (0.2, 0.1) and (0.3, 0.2): rho^2 = 0.02; enclosing box 0.4 x 0.4: c^2 = 0.32;
    # v = 4/pi^2 (atan(0.4/0.2) - atan(0.2/0.4))^2 = 0.167826; alpha = v / (2/3 + v) = 0.201112
    # CIoU = 1/3 - 0.0625 - 0.201112 * 0.167826 = 0.237081 -> loss 0.762919
    assert losses.ciou_loss(pred, target).item() == pytest.approx(0.762919, abs=1e-5)
    assert losses.ciou_loss(target, target).item() == pytest.approx(0.0, abs=1e-6)
    # GIoU of the same pair: hull = enclosing box area 0.16 -> 1 - (1/3 - (0.16 - 0.12) / 0.16)
    assert losses.giou_loss(pred, target).item() == pytest.approx(1 - (1 / 3 - 0.25), abs=1e-5)


def test_ciou_sees_the_centre_of_a_contained_box_where_giou_does_not():
    target = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    inside = torch.tensor([[0.25, 0.25, 0.75, 0.75], [0.0, 0.0, 0.5, 0.5]])  # same size, centred / in a corner
    g, c = losses.giou_loss(inside, target), losses.ciou_loss(inside, target)
    assert g[0].item() == pytest.approx(g[1].item())  # GIoU: both are IoU 0.25, hull = union
    assert c[1] - c[0] == pytest.approx(0.0625, abs=1e-6)  # rho^2 / c^2 = (0.25^2 + 0.25^2) / (1 + 1)


def test_suffix_loss_uses_the_chosen_box_iou():
    bins = [200, 300, 600, 700]
    logits, labels = _setup(bins)
    for i, b in enumerate([100, 300, 500, 900]):
        _peak(logits, i, LOC0 + b, 40.0)  # a confident box: expected bins = these
    pred = torch.tensor([[100, 300, 500, 900]]) / 1023.0
    target = torch.tensor([bins]) / 1023.0
    _, g = losses.suffix_loss(logits, labels, LOC, box_iou_weight=1.0)
    _, c = losses.suffix_loss(logits, labels, LOC, box_iou_weight=1.0, box_iou="ciou")
    assert g["box_loss"] == pytest.approx(losses.giou_loss(pred, target).item(), abs=1e-4)
    assert c["box_loss"] == pytest.approx(losses.ciou_loss(pred, target).item(), abs=1e-4)
    assert abs(c["box_loss"] - g["box_loss"]) > 0.01
    with pytest.raises(ValueError, match="box_iou"):
        losses.suffix_loss(logits, labels, LOC, box_iou_weight=1.0, box_iou="diou")


def test_the_job_option_reaches_the_training_loss():
    from raytrain import config
    from raytrain.training import loop

    bins = [200, 300, 600, 700]
    logits, labels = _setup(bins)
    for i, b in enumerate([100, 300, 500, 900]):
        _peak(logits, i, LOC0 + b, 40.0)
    pred, target = torch.tensor([[100, 300, 500, 900]]) / 1023.0, torch.tensor([bins]) / 1023.0
    for name, fn in (("giou", losses.giou_loss), ("ciou", losses.ciou_loss)):
        cfg = config.load(None, ["loss.box_iou_weight=1.0", f"loss.box_iou={name}"])
        _, st = loop.training_loss(cfg, None, LOC, V)(logits, {"labels": labels})
        assert st["box_loss"] == pytest.approx(fn(pred, target).item(), abs=1e-4)
