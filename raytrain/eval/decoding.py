"""Decoding for grounding outputs: grammar-constrained generation, per-object confidence,
duplicate suppression (NMS) and calibration.

* ``PaliGemmaGrammars`` reads the token ids of each allowed label (and of the ``" ; "``
  separator after it) from a rendered training target, through the same processor call that
  builds training labels, and builds ``formats.grammar.DetectionGrammar``s from them.
* ``GrammarLogitsProcessor`` is a ``transformers.LogitsProcessor`` that masks every token the
  grammar does not allow. It recomputes each row's state from that row's generated prefix at
  every step, so beam reordering, finished rows and left padding need no bookkeeping.
* ``generate_detections`` runs a PaliGemma batch with it (or without it) and returns the text
  and the token log-probabilities, from which ``object_confidences`` gives one confidence per
  parsed object.
* ``nms``, ``correct_predictions`` and ``expected_calibration_error`` use those confidences.

Confidence of an object = GEOMETRIC MEAN of the probabilities of its tokens (its loc tokens,
then its label tokens up to, not including, the ``;`` separator or <eos>; whitespace-only
tokens are formatting and left out), i.e. ``exp(mean log p)``. The probabilities are the
model's own: softmax of the raw logits at temperature 1, before any logits processor (the
grammar mask, temperature, top-k ...), so constrained decoding does not inflate them by
renormalising over the allowed tokens. A product would penalise boxes (4 locs) against points
(2 locs) and long labels against short ones; the geometric mean does not.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from raytrain.formats import paligemma as fmt
from raytrain.formats.annotations import Box, Obj, Point, box_iou
from raytrain.formats.grammar import DetectionGrammar, query_labels

try:  # the processor is a transformers class; this module must import without torch too
    from transformers import LogitsProcessor as _LogitsProcessorBase
except ImportError:  # pragma: no cover - torch-free installs only use the numpy half
    _LogitsProcessorBase = object

KIND_OF_TASK = {"point": "point", "detect": "box"}

# ---------------------------------------------------------------------------- token ids


def suffix_token_ids(processor, suffixes: Sequence[str]) -> list[list[int]]:
    """Ids of each target ``suffix`` exactly as training sees them (the ``labels`` of
    ``models.paligemma.encode_train``), <eos> included. With a bare tokenizer instead of a
    processor: ``tokenizer(suffix + eos, add_special_tokens=False)``."""
    if hasattr(processor, "image_processor"):
        from PIL import Image

        from raytrain.models.paligemma import IGNORE_INDEX, encode_train, image_size

        h, w = image_size(processor)
        blank = Image.new("RGB", (w, h))
        enc = encode_train(processor, [blank] * len(suffixes), [""] * len(suffixes), list(suffixes), max_len=4096)
        return [[int(t) for t in row if t != IGNORE_INDEX] for row in enc["labels"]]
    tok = processor
    return [list(tok(s + tok.eos_token, add_special_tokens=False)["input_ids"]) for s in suffixes]


def label_sequences(processor, labels: Sequence[str]) -> dict[str, tuple[list[int], list[int]]]:
    """``{label: (ids of " label ; ", ids of " label")}`` as they appear inside a target.

    Each label is rendered twice, ``<loc><loc> label ; <loc><loc> label``, and read back: the
    ids between the two loc runs are the label followed by a separator, the ids after the
    second run (before <eos>) the label that ends the output. Reading them from a rendered
    target, instead of tokenizing ``" label"`` alone, keeps whatever the tokenizer does at the
    boundaries (a leading "▁", a label end merged with the separator). Raises ValueError for a
    label that cannot be rendered (``;``, ``<``, surrounding spaces)."""
    tok = getattr(processor, "tokenizer", processor)
    loc_set = set(tok.convert_tokens_to_ids([fmt.loc_token(i) for i in range(fmt.NUM_LOC)]))
    suffixes = [fmt.render_objects([Point(0, 0, lb), Point(0, 0, lb)], 1, 1) for lb in labels]
    out = {}
    for lb, ids in zip(labels, suffix_token_ids(processor, suffixes)):
        if ids and ids[-1] == tok.eos_token_id:
            ids = ids[:-1]
        is_loc = [t in loc_set for t in ids]
        # expected layout: loc loc <label ; > loc loc <label>
        runs = [i for i in range(len(ids)) if is_loc[i] and (i == 0 or not is_loc[i - 1])]
        if len(runs) != 2 or runs[0] != 0 or sum(is_loc) != 4:
            raise ValueError(f"label {lb!r}: unexpected target ids {ids} (loc runs at {runs})")
        out[lb] = (ids[2 : runs[1]], ids[runs[1] + 2 :])
        if not out[lb][0] or not out[lb][1]:
            raise ValueError(f"label {lb!r}: empty label ids in target {ids}")
    return out


class PaliGemmaGrammars:
    """Builds per-example ``DetectionGrammar``s for one processor, caching label ids.

    ``for_labels(kind, labels, max_objects)``: grammar for "point" / "box" output restricted
    to ``labels``. ``for_queries(kind, queries, max_objects)``: one per example, its labels
    read from the prompt query (``"cat ; dog"`` -> cat, dog), as ``detect`` prompts list them.
    """

    def __init__(self, processor, forbid_duplicates: bool = True):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        from raytrain.models.paligemma import loc_token_ids

        self.loc_ids = [int(i) for i in loc_token_ids(self.tokenizer)]
        self.eos_id = int(self.tokenizer.eos_token_id)
        self.forbid_duplicates = forbid_duplicates
        self._seqs: dict[str, tuple[list[int], list[int]]] = {}
        self._grammars: dict[tuple, DetectionGrammar] = {}

    def _sequences(self, labels: Sequence[str]) -> dict[str, tuple[list[int], list[int]]]:
        missing = [lb for lb in dict.fromkeys(labels) if lb not in self._seqs]
        if missing:
            self._seqs.update(label_sequences(self.processor, missing))
        return {lb: self._seqs[lb] for lb in labels}

    def for_labels(self, kind: str, labels: Sequence[str], max_objects: int | None = None) -> DetectionGrammar:
        key = (kind, tuple(labels), max_objects)
        if key not in self._grammars:  # grammars hold no per-call state: one per key is enough
            self._grammars[key] = DetectionGrammar(self.loc_ids, self._sequences(list(labels)), self.eos_id, kind,
                                                   max_objects, self.forbid_duplicates)
        return self._grammars[key]

    def for_queries(self, kind: str, queries: Sequence[str], max_objects: int | None = None) -> list[DetectionGrammar]:
        return [self.for_labels(kind, query_labels(q), max_objects) for q in queries]


# ---------------------------------------------------------------------------- logits processor


class GrammarLogitsProcessor(_LogitsProcessorBase):
    """Masks (sets to -inf) every token the grammar does not allow next.

    A grammar is anything with ``allowed(generated_ids, remaining) -> Allowed(tokens, locs)`` and
    ``loc_ids``: PaliGemma's ``formats.grammar.DetectionGrammar`` or a text answer's
    ``formats.text_grammar.TextGrammar`` (``locs`` None, every allowed id in ``tokens``).

    ``grammars``: one per example of the batch; row ``r`` of the (batch x beams x returned
    sequences) rows that ``generate`` passes belongs to example ``r // (rows // batch)``, the
    order in which ``generate`` expands inputs. ``prompt_len``: length of the (left-padded)
    prompt ids, so ``input_ids[:, prompt_len:]`` is what was generated; None takes the length
    seen at the first call, which makes one instance good for ONE ``generate`` call.
    ``max_new_tokens``: the budget, so that the output ends with <eos> before the limit.

    ``generate`` runs the processors it builds itself (``no_repeat_ngram_size``,
    ``min_new_tokens``, ...) before this one and the sampling warpers (temperature, top-k,
    top-p) after it. If no allowed token has a finite score (an earlier processor banned them
    all: ``no_repeat_ngram_size=2`` bans a second " ; " separator, ``min_new_tokens`` bans
    <eos>), the allowed tokens get a score of -1e4 each, so the row still follows the grammar
    (greedy then takes the lowest allowed id). Prefer no ``no_repeat_ngram_size`` with it:
    repeated separators and equal loc bins are legitimate in this output.
    """

    def __init__(self, grammars: Sequence[DetectionGrammar], prompt_len: int | None = None, max_new_tokens: int | None = None):
        if not grammars:
            raise ValueError("need one grammar per example")
        self.grammars = list(grammars)
        self.prompt_len = prompt_len
        self.max_new_tokens = max_new_tokens

    def __call__(self, input_ids, scores):
        import torch

        if self.prompt_len is None:
            self.prompt_len = int(input_ids.shape[1])
        rows, vocab = scores.shape
        per_example = max(1, rows // len(self.grammars))
        step = int(input_ids.shape[1]) - self.prompt_len
        remaining = None if self.max_new_tokens is None else self.max_new_tokens - step
        generated = input_ids[:, self.prompt_len :].tolist()
        # allowed (row, token) pairs as index lists: only these travel to the device, not a (rows, vocab) mask
        row_idx, col_idx = [], []
        for r in range(rows):
            g = self.grammars[min(r // per_example, len(self.grammars) - 1)]
            a = g.allowed(generated[r], remaining)
            cols = np.asarray(a.tokens, dtype=np.int64)
            if a.locs is not None:
                cols = np.concatenate([cols, g.loc_ids[a.locs]])
            cols = cols[cols < vocab]
            row_idx.append(np.full(len(cols), r, dtype=np.int64))
            col_idx.append(cols)
        mask = torch.zeros((rows, vocab), dtype=torch.bool, device=scores.device)
        mask[torch.from_numpy(np.concatenate(row_idx)).to(scores.device), torch.from_numpy(np.concatenate(col_idx)).to(scores.device)] = True
        out = scores.masked_fill(~mask, float("-inf"))
        stuck = out.amax(dim=1) == float("-inf")  # every allowed token was already -inf
        if stuck.any():
            out[stuck] = torch.where(mask[stuck], torch.tensor(-1e4, dtype=scores.dtype, device=scores.device), out[stuck])
        return out


# ---------------------------------------------------------------------------- generation


@dataclass
class Generation:
    """One example's decoded output: ``text`` (special tokens removed, as
    ``models.paligemma.generate`` returns it), generated ``token_ids`` (up to and including
    <eos>, no padding) and each token's ``logprobs`` under the raw model distribution."""

    text: str
    token_ids: list[int]
    logprobs: list[float]


def token_logprobs(model, out, prompt_len: int) -> np.ndarray:
    """(rows, generated) log-probabilities of the chosen tokens under the model's raw
    distribution, from ``generate(..., output_logits=True, return_dict_in_generate=True)``;
    beam search is followed back through ``beam_indices`` by ``model.compute_transition_scores``.
    Positions after a beam ended are 0."""
    logits = getattr(out, "logits", None)
    if logits is None:
        raise ValueError("generate must be called with output_logits=True and return_dict_in_generate=True")
    beam_indices = getattr(out, "beam_indices", None)
    lp = model.compute_transition_scores(out.sequences, logits, beam_indices, normalize_logits=True)
    lp = lp.float().cpu().numpy()
    n_new = out.sequences.shape[1] - prompt_len
    # compute_transition_scores aligns to the END of the sequences; pad/trim to the generated length
    if lp.shape[1] < n_new:
        lp = np.concatenate([lp, np.zeros((lp.shape[0], n_new - lp.shape[1]), lp.dtype)], axis=1)
    return lp[:, :n_new]


def generate_detections(
    model,
    processor,
    images: Sequence,
    prefixes: Sequence[str],
    *,
    grammars: Sequence[DetectionGrammar] | None = None,
    max_new_tokens: int = 32,
    **decoding: Any,
) -> list[Generation]:
    """PaliGemma generation with the grammar (``grammars``: one per example, None =
    unconstrained) and token log-probabilities for ``object_confidences``.

    ``decoding``: any ``model.generate`` keywords (num_beams, do_sample, top_p, ...); greedy by
    default, as ``models.paligemma.generate``."""
    import torch

    from raytrain.models.paligemma import encode_prompts

    enc = encode_prompts(processor, images, prefixes)
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    prompt_len = int(enc["input_ids"].shape[1])
    decoding.setdefault("do_sample", False)
    from transformers import LogitsProcessorList

    procs = LogitsProcessorList(decoding.pop("logits_processor", None) or [])
    if grammars is not None:
        if len(grammars) != len(prefixes):
            raise ValueError(f"{len(grammars)} grammars for {len(prefixes)} examples")
        procs.append(GrammarLogitsProcessor(grammars, prompt_len, max_new_tokens))
    tok = processor.tokenizer
    with torch.inference_mode():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            logits_processor=procs,
            output_logits=True,
            return_dict_in_generate=True,
            **decoding,
        )
    lp = token_logprobs(model, out, prompt_len)
    new = out.sequences[:, prompt_len:].tolist()
    gens = []
    for ids, row_lp in zip(new, lp):
        n = ids.index(tok.eos_token_id) + 1 if tok.eos_token_id in ids else len(ids)
        text = tok.decode(ids[:n], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        gens.append(Generation(text, ids[:n], [float(v) for v in row_lp[:n]]))
    return gens


# ---------------------------------------------------------------------------- confidence


def _token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    return [tokenizer.decode([t], skip_special_tokens=True, clean_up_tokenization_spaces=False) for t in ids]


def object_confidences(
    logprobs: Sequence[float],
    token_ids: Sequence[int],
    tokenizer,
    kind: str,
    allowed_labels: Collection[str] | None = None,
) -> list[float]:
    """One confidence per object of ``fmt.parse(text, w, h, kind, allowed_labels).objects``
    (same order, same length), where ``text`` is ``token_ids`` up to the first <eos> (what
    follows is padding), decoded without special tokens, as ``Generation.text`` is.

    ``logprobs[i]``: log-probability of ``token_ids[i]`` (``Generation.logprobs``). Confidence =
    geometric mean of the object's token probabilities (module docstring). The ids are split
    into objects at each run of loc tokens, each piece is parsed on its own, and its object is
    matched to the parse of the whole text; an object that cannot be matched (text that spells
    a loc token out of ordinary tokens) gets NaN.
    """
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    ids = [int(t) for t in token_ids]
    if len(logprobs) < len(ids):
        raise ValueError(f"{len(logprobs)} log-probs for {len(ids)} tokens")
    if tok.eos_token_id in ids:
        ids = ids[: ids.index(tok.eos_token_id)]
    texts = _token_texts(tok, ids)
    loc_set = set(tok.convert_tokens_to_ids([fmt.loc_token(i) for i in range(fmt.NUM_LOC)]))
    seg_set = set(tok.convert_tokens_to_ids([fmt.seg_token(i) for i in range(fmt.NUM_SEG)]))

    # start of each object: a loc token not preceded (whitespace aside) by a loc token, as
    # the parser's loc runs ("<loc>(\s*<loc>)*(\s*<seg>)*") are delimited
    starts, prev = [], None
    for i, t in enumerate(ids):
        if t in loc_set:
            if prev != "loc":
                starts.append(i)
            prev = "loc"
        elif t in seg_set:
            prev = "seg" if prev in ("loc", "seg") else "text"
        elif texts[i].strip():
            prev = "text"
    pieces: list[tuple[Obj, float]] = []
    for j, s in enumerate(starts):
        e = starts[j + 1] if j + 1 < len(starts) else len(ids)
        lps, in_label = [], False
        for i in range(s, e):
            t = ids[i]
            if t in loc_set or t in seg_set:
                if in_label:
                    break
                lps.append(logprobs[i])
                continue
            in_label = True
            if ";" in texts[i]:
                break
            if texts[i].strip():
                lps.append(logprobs[i])
        conf = float(math.exp(sum(lps) / len(lps))) if lps else float("nan")
        text = tok.decode(ids[s:e], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        for o in fmt.parse(text, 1, 1, kind, allowed_labels).objects:
            pieces.append((o, conf))
    full = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    out, k = [], 0
    for o in fmt.parse(full, 1, 1, kind, allowed_labels).objects:
        j = k
        while j < len(pieces) and pieces[j][0] != o:
            j += 1
        if j < len(pieces):
            out.append(pieces[j][1])
            k = j + 1
        else:
            out.append(float("nan"))
    return out


# ---------------------------------------------------------------------------- NMS


def _order(scores: Sequence[float]) -> list[int]:
    # best first; NaN ranks last; ties keep the input order
    key = [(-s if s is not None and math.isfinite(s) else math.inf) for s in (float(v) for v in scores)]
    return sorted(range(len(key)), key=lambda i: (key[i], i))


def nms(
    objects: Sequence[Obj],
    scores: Sequence[float],
    iou_threshold: float = 0.5,
    distance_threshold: float | None = None,
    class_aware: bool = True,
) -> list[int]:
    """Greedy non-maximum suppression; returns the indices kept, best score first.

    Boxes: a box is dropped when its IoU with an already kept box is > ``iou_threshold``
    (as ``torchvision.ops.nms``). Points: a point is dropped when it lies within
    ``distance_threshold`` pixels (<=) of a kept point; required for points. With
    ``class_aware`` only objects with the same label suppress each other. NaN scores rank last.
    """
    if len(objects) != len(scores):
        raise ValueError(f"{len(objects)} objects but {len(scores)} scores")
    if not objects:
        return []
    if all(isinstance(o, Box) for o in objects):
        def overlaps(a, b):
            return box_iou(a, b) > iou_threshold
    elif all(isinstance(o, Point) for o in objects):
        if distance_threshold is None:
            raise ValueError("nms over points needs distance_threshold (pixels)")

        def overlaps(a, b):
            return math.hypot(a.x - b.x, a.y - b.y) <= distance_threshold
    else:
        raise TypeError("nms needs all boxes or all points")
    kept: list[int] = []
    for i in _order(scores):
        o = objects[i]
        if not any((not class_aware or objects[k].label == o.label) and overlaps(objects[k], o) for k in kept):
            kept.append(i)
    return kept


# ---------------------------------------------------------------------------- calibration


def correct_predictions(
    pred: Sequence[Obj],
    gt: Sequence[Obj],
    width: float,
    height: float,
    scores: Sequence[float] | None = None,
    iou_threshold: float = 0.5,
    success_frac: float = 0.05,
) -> list[bool]:
    """Which predictions are correct, for calibration: greedy one-to-one matching in order of
    ``scores`` (best first; the given order when None), as COCO evaluation matches. A box is
    correct when it takes a not yet matched GT box with IoU >= ``iou_threshold`` (the highest
    such); a point when it takes a GT point closer than ``success_frac`` x image diagonal (the
    closest), the success radius of ``metrics.pointing``. Labels must agree when both are
    non-empty (case- and space-insensitive), as in ``metrics.boxes``."""
    order = _order(scores) if scores is not None else list(range(len(pred)))
    radius = success_frac * math.hypot(width, height)
    used = [False] * len(gt)
    correct = [False] * len(pred)

    def same(a: str, b: str) -> bool:
        a, b = a.strip().casefold(), b.strip().casefold()
        return not a or not b or a == b

    for i in order:
        p, best, best_v = pred[i], None, None
        for j, g in enumerate(gt):
            if used[j] or not same(p.label, g.label) or type(p) is not type(g):
                continue
            if isinstance(p, Box):
                v = box_iou(p, g)
                ok = v >= iou_threshold
            else:
                v = -math.hypot(p.x - g.x, p.y - g.y)
                ok = -v < radius
            if ok and (best_v is None or v > best_v):
                best, best_v = j, v
        if best is not None:
            used[best] = True
            correct[i] = True
    return correct


def reliability_bins(confidences: Sequence[float], correct: Sequence[bool], n_bins: int = 10) -> list[dict]:
    """Equal-width confidence bins ``(k/n, (k+1)/n]`` (confidence 0 in the first): per bin
    ``count``, mean ``confidence`` and ``accuracy`` (None for an empty bin)."""
    c = np.asarray(confidences, dtype=np.float64).reshape(-1)
    y = np.asarray(correct, dtype=np.float64).reshape(-1)
    if c.shape != y.shape:
        raise ValueError(f"{c.size} confidences but {y.size} correctness values")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if not np.all(np.isfinite(c)) or np.any((c < 0) | (c > 1)):
        raise ValueError("confidences must be finite and in [0, 1]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, c, side="left") - 1, 0, n_bins - 1)
    out = []
    for k in range(n_bins):
        sel = idx == k
        n = int(sel.sum())
        out.append({
            "lo": float(edges[k]),
            "hi": float(edges[k + 1]),
            "count": n,
            "confidence": float(c[sel].mean()) if n else None,
            "accuracy": float(y[sel].mean()) if n else None,
        })
    return out


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], n_bins: int = 10) -> float | None:
    """Standard ECE (Guo et al. 2017): ``sum_b |B_b| / N * |accuracy(B_b) - confidence(B_b)|``
    over ``reliability_bins``; None when there are no predictions."""
    bins = reliability_bins(confidences, correct, n_bins)
    total = sum(b["count"] for b in bins)
    if total == 0:
        return None
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]))


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and (when installed) torch, so sampled decoding repeats."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    torch.manual_seed(seed)
