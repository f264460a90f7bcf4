"""Suffix losses over next-token logits.

Plain token cross-entropy scores a wrong `<loc>` bin the same whether it is one bin or 900 bins off.
The distance-aware variant replaces the one-hot target of every `<loc>` position with a Gaussian over
neighbouring bins (std `loc_sigma` bins), so near misses cost less than far ones and the gradient
points towards the right place. Measured on the tiny preset (see README): plain CE collapses to a
constant location; the soft target learns.

Coordinates written as DIGITS (Qwen2.5-VL's JSON, Molmo's percent text, Qwen3-VL's 0-1000) have
the same problem: cross-entropy scores "199" vs "200" as badly as "199" vs "999". The number loss
(`number_weight`) adds, at every coordinate digit the format rendered (`num_place`, from
formats/numbers.py), the Wasserstein-1 distance between the model's distribution over the ten digit
tokens and the true digit -- the expected absolute digit error, sum_d q(d) |d - d*| -- weighted by
the digit's place value in units of the coordinate's range (100/112, 10/112, 1/112 for "105" in a
112-px frame). Summed over a number's digits it is the expected absolute error that number's digits
contribute, as a fraction of the frame; the loss is its mean per number. This is the Wasserstein
variant of the Number Token Loss (Zausinger et al., "Regress, Don't Guess: A Regression-like Loss
on Number Tokens for Language Models", ICML 2025), chosen over its MSE variant (regressing the
expected digit value) because the MSE's expected value can be right while the mass sits on two far
digits (0 and 9 averaging to 4.5), and over a single regression on the decoded number because under
teacher forcing each digit is predicted given the true digits before it, so per-digit distances
with place weights already measure the number's error without differentiating through sampling.
Cross-entropy stays on: it keeps the format and the exact digits; the number term gives it the
direction.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _bin_lookup(loc_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """vocab id -> loc bin index (0..1023), -1 for every other token."""
    lut = torch.full((vocab_size,), -1, dtype=torch.long, device=loc_ids.device)
    lut[loc_ids] = torch.arange(loc_ids.numel(), device=loc_ids.device)
    return lut


def gaussian_targets(bins: torch.Tensor, num_bins: int, sigma: float) -> torch.Tensor:
    """(N,) target bins -> (N, num_bins) Gaussian distributions centred on them (rows sum to 1)."""
    grid = torch.arange(num_bins, device=bins.device, dtype=torch.float32)
    logits = -((grid[None, :] - bins[:, None].float()) ** 2) / (2.0 * sigma * sigma)
    return torch.softmax(logits, dim=-1)


def token_weights(tokenizer, class_weights: dict[str, float], vocab_size: int) -> torch.Tensor | None:
    """(V,) per-token weights for class-weighted CE on label tokens: every token of a label, as it
    is tokenized inside a target (" red circle"), gets that label's weight; where labels share a
    token (" red"), the largest weight wins. None when no weights are given."""
    if not class_weights:
        return None
    w = torch.ones(vocab_size)
    assigned: set[int] = set()
    for label, weight in class_weights.items():
        for tid in tokenizer(" " + label, add_special_tokens=False)["input_ids"]:
            w[tid] = max(float(w[tid]), float(weight)) if tid in assigned else float(weight)
            assigned.add(tid)
    return w


def _box_runs(is_loc: torch.Tensor) -> torch.Tensor:
    """(B, T) bool of positions where a run of exactly 4 consecutive <loc> targets starts (a box)."""
    B, T = is_loc.shape
    pad = torch.zeros(B, 4, dtype=torch.bool, device=is_loc.device)
    x = torch.cat([torch.zeros(B, 1, dtype=torch.bool, device=is_loc.device), is_loc, pad], dim=1)
    start = x[:, 1 : T + 1] & ~x[:, :T]
    four = x[:, 1 : T + 1] & x[:, 2 : T + 2] & x[:, 3 : T + 3] & x[:, 4 : T + 4] & ~x[:, 5 : T + 5]
    return start & four


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - GIoU for (N, 4) boxes given as (y1, x1, y2, x2) in normalised coordinates."""
    y1 = torch.minimum(pred[:, 0], pred[:, 2])
    y2 = torch.maximum(pred[:, 0], pred[:, 2])
    x1 = torch.minimum(pred[:, 1], pred[:, 3])
    x2 = torch.maximum(pred[:, 1], pred[:, 3])
    ty1, tx1, ty2, tx2 = target.unbind(-1)
    inter = (torch.minimum(x2, tx2) - torch.maximum(x1, tx1)).clamp(min=0) * (torch.minimum(y2, ty2) - torch.maximum(y1, ty1)).clamp(min=0)
    union = (x2 - x1) * (y2 - y1) + (tx2 - tx1) * (ty2 - ty1) - inter
    iou = inter / union.clamp(min=1e-9)
    hull = (torch.maximum(x2, tx2) - torch.minimum(x1, tx1)) * (torch.maximum(y2, ty2) - torch.minimum(y1, ty1))
    return 1.0 - (iou - (hull - union) / hull.clamp(min=1e-9))


def ciou_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """1 - CIoU for (N, 4) boxes given as (y1, x1, y2, x2) in normalised coordinates: Complete IoU
    (Zheng et al., "Distance-IoU Loss", AAAI 2020) = IoU - rho^2 / c^2 - alpha * v, where rho is the
    distance between the box centres, c the diagonal of the smallest box enclosing both,
    v = 4 / pi^2 * (atan(w_t / h_t) - atan(w / h))^2 the aspect-ratio mismatch and
    alpha = v / ((1 - IoU) + v) its trade-off weight, held constant in the gradient as the paper's
    implementation does. Unlike GIoU it keeps pulling the centres together once one box contains
    the other. Aspect ratios are those of the normalised frame (the model's square input)."""
    y1 = torch.minimum(pred[:, 0], pred[:, 2])
    y2 = torch.maximum(pred[:, 0], pred[:, 2])
    x1 = torch.minimum(pred[:, 1], pred[:, 3])
    x2 = torch.maximum(pred[:, 1], pred[:, 3])
    ty1, tx1, ty2, tx2 = target.unbind(-1)
    w, h, tw, th = x2 - x1, y2 - y1, tx2 - tx1, ty2 - ty1
    inter = (torch.minimum(x2, tx2) - torch.maximum(x1, tx1)).clamp(min=0) * (torch.minimum(y2, ty2) - torch.maximum(y1, ty1)).clamp(min=0)
    union = w * h + tw * th - inter
    iou = inter / union.clamp(min=eps)
    rho2 = ((x1 + x2) - (tx1 + tx2)) ** 2 / 4 + ((y1 + y2) - (ty1 + ty2)) ** 2 / 4
    c2 = (torch.maximum(x2, tx2) - torch.minimum(x1, tx1)) ** 2 + (torch.maximum(y2, ty2) - torch.minimum(y1, ty1)) ** 2
    v = (4 / math.pi**2) * (torch.atan(tw / th.clamp(min=eps)) - torch.atan(w / h.clamp(min=eps))) ** 2
    with torch.no_grad():
        alpha = v / ((1 - iou) + v).clamp(min=eps)
    return 1.0 - (iou - rho2 / c2.clamp(min=eps) - alpha * v)


BOX_IOU_LOSSES = {"giou": giou_loss, "ciou": ciou_loss}


def suffix_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loc_ids: torch.Tensor,
    loc_sigma: float = 0.0,
    loc_weight: float = 1.0,
    focal_gamma: float = 0.0,
    label_token_weights: torch.Tensor | None = None,
    box_iou_weight: float = 0.0,
    num_place: torch.Tensor | None = None,
    digit_ids: torch.Tensor | None = None,
    number_weight: float = 0.0,
    box_iou: str = "giou",
) -> tuple[torch.Tensor, dict]:
    """Mean loss over supervised (suffix) positions.

    logits: (B, T, V) from the model for input positions 0..T-1; labels: (B, T) with IGNORE_INDEX
    outside the suffix. Position t predicts labels[t+1] (shifted here). Returns (loss, stats) where
    stats holds detached numbers for logging: tokens, loc_tokens, ce (plain CE, comparable across
    loss settings), box_loss.

    - loc_sigma > 0: Gaussian soft targets over neighbouring bins on <loc> positions.
    - focal_gamma > 0: focal modulation (1 - p)^gamma on the other (label/text) tokens (seed 004).
    - label_token_weights (V,): class-weighted CE on those tokens (see `token_weights`).
    - box_iou_weight > 0: adds an IoU loss (`box_iou`: giou | ciou, seed 004's) on boxes decoded by
      soft-argmax over the <loc> logits of each run of 4 <loc> targets (expected bin = sum_i p_i * i):
      it sees how far a box is off, not only which token is wrong.
    - number_weight > 0 with num_place (B, T) (signed digit place weights aligned with labels,
      negative on each number's first digit) and digit_ids (10,): the number loss (module doc).
    """
    iou_loss = BOX_IOU_LOSSES.get(box_iou)
    if iou_loss is None:
        raise ValueError(f"box_iou must be one of {sorted(BOX_IOU_LOSSES)}, got {box_iou!r}")
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:]
    keep = shift_labels != IGNORE_INDEX
    # Select supervised positions first: (N, V) instead of (B, T, V) keeps backward memory small.
    sel_logits = shift_logits[keep].float()
    sel_labels = shift_labels[keep].long()
    n = sel_labels.numel()
    if n == 0:
        zero = logits.sum() * 0.0
        return zero, {"tokens": 0, "loc_tokens": 0, "ce": 0.0}

    logp = F.log_softmax(sel_logits, dim=-1)
    ce_tok = -logp.gather(1, sel_labels[:, None]).squeeze(1)  # (N,)

    lut = _bin_lookup(loc_ids, logits.shape[-1])
    bins = lut[sel_labels]  # -1 for non-<loc> targets (and everywhere when loc_ids is empty)
    is_loc = bins >= 0
    per_tok = ce_tok.clone()
    if loc_sigma > 0 and is_loc.any():
        q = gaussian_targets(bins[is_loc], loc_ids.numel(), loc_sigma)
        per_tok[is_loc] = -(q * logp[is_loc][:, loc_ids]).sum(-1)
    text = ~is_loc
    if focal_gamma > 0 and text.any():
        p_true = torch.exp(-ce_tok[text])
        per_tok[text] = per_tok[text] * (1.0 - p_true).pow(focal_gamma)
    weights = torch.where(is_loc, torch.full_like(per_tok, loc_weight), torch.ones_like(per_tok))
    if label_token_weights is not None:
        weights = torch.where(text, label_token_weights.to(weights.device)[sel_labels], weights)
    loss = (per_tok * weights).sum() / weights.sum()

    box_loss = 0.0
    if box_iou_weight > 0 and loc_ids.numel() > 0:
        all_bins = torch.where(keep, lut[shift_labels.clamp(min=0)], torch.full_like(shift_labels, -1))
        starts = _box_runs(all_bins >= 0).nonzero()  # (K, 2): (b, t) of each box's first <loc>
        if len(starts):
            idx_t = starts[:, 1:2] + torch.arange(4, device=logits.device)[None, :]  # (K, 4)
            box_logits = shift_logits[starts[:, :1], idx_t][..., loc_ids].float()  # (K, 4, 1024)
            grid = torch.arange(loc_ids.numel(), device=logits.device, dtype=torch.float32)
            expected = (torch.softmax(box_logits, -1) * grid).sum(-1) / (loc_ids.numel() - 1)
            target = all_bins[starts[:, :1], idx_t].float() / (loc_ids.numel() - 1)
            gl = iou_loss(expected, target).mean()
            loss = loss + box_iou_weight * gl
            box_loss = float(gl.detach())
    num_loss = 0.0
    if number_weight > 0 and num_place is not None and digit_ids is not None and digit_ids.numel() == 10:
        term = number_loss(sel_logits, sel_labels, num_place[:, 1:][keep].float(), digit_ids)
        if term is not None:
            loss = loss + number_weight * term
            num_loss = float(term.detach())
    stats = {"tokens": int(n), "loc_tokens": int(is_loc.sum()), "ce": float(ce_tok.mean().detach()), "box_loss": box_loss,
             "num_loss": num_loss}
    return loss, stats


def number_loss(logits: torch.Tensor, labels: torch.Tensor, place: torch.Tensor, digit_ids: torch.Tensor) -> torch.Tensor | None:
    """Mean per number of sum_digits |place| * W1(q, true digit) (module doc). logits (N, V) and
    labels (N,) at supervised positions, place (N,) their signed place weights; None when no
    position is a coordinate digit."""
    is_num = place != 0
    if not bool(is_num.any()):
        return None
    lut = torch.full((logits.shape[-1],), -1, dtype=torch.long, device=logits.device)
    lut[digit_ids.to(logits.device)] = torch.arange(10, device=logits.device)
    true = lut[labels[is_num]]
    ok = true >= 0  # a position marked as a digit whose label is a digit token (always, for our renderers)
    q = torch.softmax(logits[is_num][:, digit_ids.to(logits.device)], dim=-1)  # (M, 10): the digit distribution
    dist = (torch.arange(10, device=logits.device)[None, :] - true[:, None]).abs().float()
    w1 = (q * dist).sum(-1)
    n_numbers = (place < 0).sum().clamp(min=1)
    return (place[is_num].abs() * w1 * ok).sum() / n_numbers
