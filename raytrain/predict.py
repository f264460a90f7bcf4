"""The one predict path: decode -> parse in the model frame -> map to source pixels -> per-object
confidence -> per-example score. Evaluation actors (eval/batch.py), Ray Serve (serve/app.py),
in-training validation (training/validation.py) and smoke runs (launch/smoke.py) all call it, so a
number means the same thing wherever it is computed.

    opts = DecodeOptions(max_new_tokens=32, constrained=True, confidence=True)
    preds = predict(model, processor, fam, images, tasks, queries, prefixes, geometries, opts)
    rows = score_rows(batch, preds)          # eval / validation: per-example metrics vs targets

* decode: greedy by default; beam search / sampling through `generate` keywords; optionally
  grammar-constrained (the family's `grammar`: valid answers by construction, labels from the
  query) and with the token log-probabilities confidences need.
* parse: the family's parser in the model input's frame, mapped back to source pixels through the
  example's `Geometry` (data/preprocess.py: stretch or letterbox, recorded with the checkpoint).
* confidence: the family's `object_confidences` (geometric mean of the raw probabilities of an
  object's tokens, read before any logits processor, so constraints do not inflate them). The
  chosen tokens' log-probabilities are recorded per decoding step (step_logprobs.py: one step's
  logits in memory); beam search keeps generate's per-step logits, which its reordering needs.
* score: the task registry's metric family (eval/metrics/*), against targets in source pixels.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raytrain import tasks as task_registry
from raytrain.data.preprocess import Geometry
from raytrain.formats.annotations import Box, CodedMask, Mask, ParseError, Point, nms, objects_from_json, objects_to_json
from raytrain.formats.grammar import DetectionGrammar, query_labels
from raytrain.step_logprobs import StepLogprobs

try:  # the logits processor is a transformers class; the rest of this module imports without torch
    from transformers import LogitsProcessor as _LogitsProcessorBase
except ImportError:  # pragma: no cover
    _LogitsProcessorBase = object


@dataclass(frozen=True)
class DecodeOptions:
    """How to decode (plain values; launchers build it from config.EvalConfig)."""

    max_new_tokens: int = 16
    constrained: bool = True
    """Grammar-constrained decoding for grounding tasks (families without a grammar decode freely)."""
    confidence: bool = True
    """Token log-probabilities -> one confidence per object."""
    max_objects: int = 0
    """With constraints: at most this many objects per answer (0 = no limit)."""
    nms_iou: float = 0.0
    """> 0: class-aware NMS over each answer's boxes at this IoU (needs confidences); 0 = off."""
    generate: dict = field(default_factory=dict)
    """Extra `model.generate` keywords: num_beams, do_sample, top_p, temperature, ..."""
    seed: int = 0
    """Sampled decoding: each batch is seeded from this and its first example (`batch_seed`)."""


# ---------------------------------------------------------------------------- decoding


DENSE_FRACTION = 4  # an answer allowing more than vocab / 4 tokens (and at least DENSE_MIN) is masked as a bool row
DENSE_MIN = 4096  # below this many ids the index path is as cheap (a tiny model's <loc> answers stay on it)
DENSE_CACHE = 64  # dense answers kept per generate call (each a (vocab,) bool row and its answer)


class GrammarLogitsProcessor(_LogitsProcessorBase):
    """Masks (sets to -inf) every token the grammar does not allow next.

    ``grammars``: one per example of the batch (None: that example decodes unconstrained); row
    ``r`` of the (batch x beams x returned
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
        self._converted: dict[int, tuple] = {}
        self._dense: dict[int, tuple] = {}

    def __call__(self, input_ids, scores):
        import torch

        if self.prompt_len is None:
            self.prompt_len = int(input_ids.shape[1])
        rows, vocab = scores.shape
        per_example = max(1, rows // len(self.grammars))
        step = int(input_ids.shape[1]) - self.prompt_len
        remaining = None if self.max_new_tokens is None else self.max_new_tokens - step
        generated = input_ids[:, self.prompt_len :].tolist()
        # allowed (row, token) pairs as index lists: only these travel to the device, not a (rows, vocab)
        # mask. Rows of one grammar with the same output so far allow the same tokens: asked once
        # (every row of a label at the first step, beams that agree so far).
        # An answer that allows most of the vocabulary (a free phrase: Allowed.vocab) travels as a
        # (vocab,) bool row instead, made once per answer object.
        memo: dict[tuple, Any] = {}
        rows_in, cols_in, free, dense_rows, dense = [], [], [], [], []
        for r in range(rows):
            g = self.grammars[min(r // per_example, len(self.grammars) - 1)]
            if g is None:
                free.append(r)
                continue
            key = (id(g), tuple(generated[r]))
            cols = memo.get(key)
            if cols is None:
                cols = memo[key] = self._ids(g, g.allowed(generated[r], remaining), vocab, scores.device)
            if isinstance(cols, np.ndarray):
                rows_in.append(r)
                cols_in.append(cols)
            else:
                dense_rows.append(r)
                dense.append(cols)
        if not rows_in and not dense_rows:
            return scores
        out = torch.full_like(scores, float("-inf"))
        if free:
            out[free] = scores[free]
        if dense_rows:
            mask = torch.stack(dense)
            vals = torch.where(mask, scores[dense_rows], float("-inf"))
            stuck = ~torch.isfinite(vals).any(dim=1)  # as below: every allowed token banned by an earlier processor
            if bool(stuck.any()):
                vals[stuck] = torch.where(mask[stuck], -1e4, float("-inf")).to(scores.dtype)
            out[dense_rows] = vals
        if not rows_in:
            return out
        ri = torch.from_numpy(np.repeat(np.asarray(rows_in, dtype=np.int64), [len(c) for c in cols_in])).to(scores.device)
        ci = torch.from_numpy(np.concatenate(cols_in)).to(scores.device)
        vals = scores[ri, ci]
        if bool(torch.isfinite(vals).all()):  # the usual case: no earlier processor banned anything allowed
            out[ri, ci] = vals
            return out
        # a row whose allowed tokens are all -inf already (an earlier processor banned them all):
        # they get -1e4 each, so the row still follows the grammar
        finite = torch.zeros(rows, dtype=scores.dtype, device=scores.device).index_add_(0, ri, torch.isfinite(vals).to(scores.dtype))
        stuck = (finite == 0)[ri]
        out[ri, ci] = torch.where(stuck, torch.tensor(-1e4, dtype=scores.dtype, device=scores.device), vals)
        return out

    def _ids(self, g, a, vocab: int, device=None):
        """Token ids of an `Allowed` (tokens, then the allowed <loc> ids), below `vocab`; for an
        answer that allows much of the vocabulary (a vocabulary mask, `Allowed.vocab`, or a free
        phrase's id array: ~148k of Qwen's 151k tokens), a (vocab,) bool tensor on `device` instead,
        so that the step masks one row rather than indexing every allowed (row, token) pair.
        Grammars that cache their answers hand the same object back for the same state: converted
        once per generate call (the object is kept, so its id is not reused). Text grammars build a
        fresh answer per call, so the dense conversions are kept in a small bounded cache: keeping
        each phrase step's ~1 MB array for a whole 768-token generate would hold gigabytes."""
        got = self._converted.get(id(a)) or self._dense.get(id(a))
        if got is not None:
            return got[1]
        cols = np.asarray(a.tokens, dtype=np.int64)
        if a.locs is not None:
            cols = np.concatenate([cols, g.loc_ids[a.locs]])
        cols = cols[cols < vocab]
        if a.vocab is not None or len(cols) > max(vocab // DENSE_FRACTION, DENSE_MIN):
            import torch

            row = np.zeros(vocab, dtype=bool)
            if a.vocab is not None:
                n = min(vocab, len(a.vocab))
                row[:n] = a.vocab[:n]
            row[cols] = True
            if len(self._dense) >= DENSE_CACHE:
                self._dense.clear()
            self._dense[id(a)] = (a, torch.from_numpy(row).to(device))
            return self._dense[id(a)][1]
        if len(self._converted) > 100_000:  # an instance reused across many calls stays bounded
            self._converted.clear()
        self._converted[id(a)] = (a, cols)
        return cols



@dataclass
class Generation:
    """One example's decoded output: ``text`` (special tokens removed), generated ``token_ids``
    (up to and including the stop token, no padding) and each token's ``logprobs`` under the raw
    model distribution (empty when they were not asked for)."""

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


def decode(model, processor, fam, images: Sequence, prefixes: Sequence[str], *, grammars: Sequence | None = None,
           max_new_tokens: int = 16, logprobs: bool = False, **generate_kwargs: Any) -> list[Generation]:
    """Generate one answer per (image, prefix) with the family's prompt encoding and stop tokens.

    ``grammars``: one per example (a None entry decodes that example freely) or None for none.
    ``logprobs``: also return each generated token's log-probability under the raw model
    distribution. ``generate_kwargs``: any ``model.generate`` keywords (greedy by default)."""
    import torch
    from transformers import LogitsProcessorList

    enc = fam.encode_prompts(processor, images, prefixes)
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    prompt_len = int(enc["input_ids"].shape[1])
    tok = processor.tokenizer
    stop = fam.stop_token_ids(tok)
    kwargs = dict(generate_kwargs)
    kwargs.setdefault("do_sample", False)
    procs = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
    if grammars is not None and any(g is not None for g in grammars):
        if len(grammars) != len(prefixes):
            raise ValueError(f"{len(grammars)} grammars for {len(prefixes)} examples")
        procs.append(GrammarLogitsProcessor(grammars, prompt_len, max_new_tokens))
    # log-probabilities: recorded step by step (one step's logits held, not all of them), except
    # for beam search, whose reordered beams compute_transition_scores follows (step_logprobs.py)
    beams = kwargs.get("num_beams", getattr(getattr(model, "generation_config", None), "num_beams", 1))
    steps = StepLogprobs(model) if logprobs and int(beams or 1) == 1 else None
    with torch.inference_mode(), steps if steps is not None else contextlib.nullcontext():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=stop,
                             logits_processor=procs, output_logits=logprobs and steps is None, return_dict_in_generate=True,
                             **kwargs)
    if steps is not None:
        lp = steps.values(out.sequences, prompt_len)
    else:
        lp = token_logprobs(model, out, prompt_len) if logprobs else None
    gens = []
    for r, ids in enumerate(out.sequences[:, prompt_len:].tolist()):
        n = next((i + 1 for i, t in enumerate(ids) if t in stop), len(ids))
        text = tok.decode(ids[:n], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        gens.append(Generation(text, ids[:n], [] if lp is None else [float(v) for v in lp[r, :n]]))
    return gens


# ---------------------------------------------------------------------------- parse, map, confidence


@dataclass
class Prediction:
    """One answer read back: objects in SOURCE pixels, one confidence per object (None where the
    family has none or the object could not be placed in the tokens), the parser's rejections."""

    text: str
    objects: list
    scores: list
    errors: list[ParseError]


def identity_geometry(width: int, height: int) -> Geometry:
    """The model saw the width x height image itself (its processor resizes as it likes)."""
    return Geometry(int(width), int(height), int(width), int(height), 0, 0, int(width), int(height))


def read_answer(fam, processor, task: str, query: str, gen: Generation, geometry: Geometry, *, confidence: bool = True,
                nms_iou: float = 0.0) -> Prediction:
    """Parse `gen` in the model input's frame, map the objects to source pixels, attach confidences."""
    image_hw = (geometry.out_h, geometry.out_w)
    res = fam.parse_output(gen.text, task, *geometry.parse_size, image_hw)
    objects = geometry.from_frame(res.objects)  # source pixels (clipped) for scoring and output
    scores: list = [None] * len(objects)
    if confidence and gen.logprobs and objects:
        spec = task_registry.get(task)
        labels = [] if spec.per_image else query_labels(str(query))
        conf = fam.object_confidences(gen.logprobs, gen.token_ids, processor, spec.kind, labels, image_hw)
        if len(conf) == len(objects):  # same parser, same order; NaN = an object it could not place
            scores = [None if (c is None or math.isnan(c)) else float(c) for c in conf]
    if nms_iou > 0 and objects and all(isinstance(o, Box) for o in objects) and all(s is not None for s in scores):
        keep = sorted(nms(objects, scores, iou_threshold=nms_iou))
        objects, scores = [objects[i] for i in keep], [scores[i] for i in keep]
    return Prediction(gen.text, objects, scores, list(res.errors))


def grammars_for(fam, processor, task_names: Sequence[str], queries: Sequence[str], image_hw, max_objects: int = 0) -> list:
    """One grammar per example (None for tasks or formats without one): labels from the query."""
    out = []
    for task, query in zip(task_names, queries):
        spec = task_registry.get(task)
        labels = [] if spec.per_image else query_labels(str(query))
        out.append(fam.grammar(processor, spec.kind, labels, image_hw, max_objects or None) if spec.grounding else None)
    return out


def predict(model, processor, fam, images: Sequence, task_names: Sequence[str], queries: Sequence[str], prefixes: Sequence[str],
            geometries: Sequence[Geometry], options: DecodeOptions) -> list[Prediction]:
    """The whole path for one batch: decode (constrained / with log-probs as `options` say), then
    `read_answer` per example. Images are what the model sees (already preprocessed)."""
    grammars = None
    if options.constrained and geometries:
        # each example's own model-input size: formats writing pixels of the resized image (Qwen's
        # absolute coordinates) bound their numbers by it, and a Serve batch mixes image sizes
        grammars = [grammars_for(fam, processor, [t], [q], (g.out_h, g.out_w), options.max_objects)[0]
                    for t, q, g in zip(task_names, queries, geometries)]
    want_lp = options.confidence or options.nms_iou > 0
    gens = decode(model, processor, fam, images, prefixes, grammars=grammars, max_new_tokens=options.max_new_tokens,
                  logprobs=want_lp, **options.generate)
    return [read_answer(fam, processor, t, q, g, geom, confidence=want_lp, nms_iou=options.nms_iou)
            for t, q, g, geom in zip(task_names, queries, gens, geometries)]


# ---------------------------------------------------------------------------- scoring


def score_example(task: str, pred: Sequence | None, targets_json: str, width: int, height: int) -> dict:
    """Per-example metrics for one task; pred None = the output did not parse to any object."""
    from raytrain.eval.metrics import boxes as box_metrics
    from raytrain.eval.metrics import pointing as point_metrics
    from raytrain.eval.metrics import segmentation as seg_metrics

    gt = objects_from_json(targets_json)
    metric = task_registry.get(task).metrics
    if metric == "pointing":
        pts = None if pred is None else [o for o in pred if isinstance(o, Point)]
        return point_metrics.score_points(pts, [o for o in gt if isinstance(o, Point)], width, height)
    if metric == "boxes":
        bxs = None if pred is None else [o for o in pred if isinstance(o, Box)]
        return box_metrics.score_boxes(bxs, [o for o in gt if isinstance(o, Box)])
    if metric == "segmentation":
        gt_all = [o for o in gt if isinstance(o, (Mask, CodedMask))]
        if any(isinstance(o, CodedMask) for o in (pred or [])) or (gt_all and not any(isinstance(o, Mask) for o in gt_all)):
            # no pixels on one side (answers read without the mask codec, or targets given as codes):
            # box and seg-token metrics only, and the aggregate says why
            boxes = [o for o in (pred or []) if isinstance(o, (Mask, CodedMask))]
            return seg_metrics.score_segmentation_tokens(None if pred is None else boxes, gt_all[0].box if len(gt_all) == 1 else None)

        # big_vision's referring-segmentation scores: mask IoU of the union of predicted masks vs
        # the union of GT masks (= big_vision's when the model answers one object), box IoU of
        # the first predicted box (its locs) vs the GT box when there is exactly one GT object.
        def union(ms):
            return np.logical_or.reduce([m.to_array() for m in ms]) if ms else np.zeros((height, width), bool)

        masks = None if pred is None else [o for o in pred if isinstance(o, Mask)]
        gts = [o for o in gt if isinstance(o, Mask)]
        return seg_metrics.score_segmentation(union(masks) if masks else None, union(gts),
                                              masks[0].box if masks else None, gts[0].box if len(gts) == 1 else None)
    if metric == "captions":  # corpus-level metrics (CIDEr, BLEU): keep hypothesis and references
        hyp = "" if not pred else pred[0].text
        return {"valid": int(bool(pred)), "hyp": hyp, "refs": [c.text for c in gt]}
    if metric == "dense_captions":  # matched by box IoU at aggregation time
        regions = [] if not pred else [[r.x1, r.y1, r.x2, r.y2, r.phrase] for r in pred]
        return {"valid": int(bool(pred)), "pred": regions, "gt": [[r.x1, r.y1, r.x2, r.y2, r.phrase] for r in gt]}
    raise ValueError(f"no metrics for task {task!r}")


def objects_json(objects: Sequence, scores: Sequence | None = None) -> str:
    """Objects JSON (formats/annotations.py) with each object's confidence as "score" where known."""
    plain = json.loads(objects_to_json(objects))
    for d, s in zip(plain, scores or []):
        if s is not None:
            d["score"] = float(s)
    return json.dumps(plain)


ROW_KEYS = ("id", "task", "query", "text", "objects", "errors", "score", "targets", "width", "height")


def score_rows(batch: dict, predictions: Sequence[Prediction]) -> dict:
    """Per-example output rows (columns of object arrays): id, task, query, text, objects (JSON,
    source pixels, with scores), errors (parser rejections, JSON), score (per-example metrics, JSON),
    and the example's targets (JSON, source pixels) and source width / height, so a row is scored
    (COCO, point P/R/F1, calibration) without going back to the data.
    An output counts as valid when at least one object parsed, or when it is the format's "nothing
    found" answer (zero objects, nothing rejected: a negative's right answer); rejected fragments
    are reported but do not void the objects that did parse."""
    out: dict[str, list] = {k: [] for k in ROW_KEYS}
    for i, p in enumerate(predictions):
        task = str(batch["task"][i])
        w, h = int(batch["width"][i]), int(batch["height"][i])
        out["id"].append(str(batch["id"][i]))
        out["task"].append(task)
        out["query"].append(str(batch["query"][i]))
        out["text"].append(p.text)
        out["objects"].append(objects_json(p.objects, p.scores))
        out["errors"].append(json.dumps([[e.reason, e.text] for e in p.errors]))
        pred = p.objects if (p.objects or not p.errors) else None
        out["score"].append(json.dumps(score_example(task, pred, batch["targets"][i], w, h)))
        out["targets"].append(str(batch["targets"][i]))
        out["width"].append(w)
        out["height"].append(h)
    return {k: np.array(v, dtype=object) for k, v in out.items()}


def batch_geometries(batch: dict, image_hw: tuple[int, int] | None = None) -> list[Geometry]:
    """Each example's source -> model-input map; batches without `content_box` were stretched.
    image_hw: the model input of every example (default: each example's own image shape, which
    differs per example under the native resize)."""
    n = len(batch["id"])
    out = []
    for i in range(n):
        hw = tuple(image_hw) if image_hw is not None else tuple(np.shape(batch["image"][i])[:2])
        box = batch["content_box"][i] if "content_box" in batch else (0, 0, int(hw[1]), int(hw[0]))
        out.append(Geometry.from_content_box(int(batch["width"][i]), int(batch["height"][i]), hw, box))
    return out


def batch_images(batch: dict) -> list:
    """PIL images of a columnar batch's `image` (N, H, W, 3) uint8: what the model sees."""
    from PIL import Image

    return [Image.fromarray(np.asarray(a, dtype=np.uint8)) for a in batch["image"]]


def predict_batch(model, processor, fam, batch: dict, options: DecodeOptions) -> dict:
    """A columnar batch of examples (data/pipeline.py's eval layout: image as the model sees it,
    prefix, task, query, targets, width, height, content_box) -> `score_rows`."""
    preds = predict(model, processor, fam, batch_images(batch), [str(t) for t in batch["task"]],
                    [str(q) for q in batch["query"]], [str(p) for p in batch["prefix"]], batch_geometries(batch), options)
    return score_rows(batch, preds)


def texts_to_rows(fam, batch: dict, texts: Sequence[str], image_hw: tuple[int, int] | None = None) -> dict:
    """Score given answer texts (a blind baseline's, a reference parser's) through the same
    parse -> source pixels -> score path as model answers (image_hw: see batch_geometries)."""
    geoms = batch_geometries(batch, image_hw)
    preds = [read_answer(fam, None, str(t), str(q), Generation(text, [], []), g, confidence=False)
             for t, q, text, g in zip(batch["task"], batch["query"], texts, geoms)]
    return score_rows(batch, preds)


def bucket_order(tasks_: Sequence[str], prompt_lengths: Sequence[int]) -> list[int]:
    """Length bucketing: example indices ordered by task, then prompt length (stable), so that
    consecutive batches hold answers of one task (they stop together) and prompts of similar
    length (little left padding)."""
    return sorted(range(len(tasks_)), key=lambda i: (str(tasks_[i]), int(prompt_lengths[i])))


def prompt_lengths(processor, prefixes: Sequence[str]) -> list[int]:
    """Token count of each prompt text (the image tokens, the same for all, left out)."""
    tok = getattr(processor, "tokenizer", processor)
    return [len(ids) for ids in tok([str(p) for p in prefixes], add_special_tokens=False)["input_ids"]]


def inference_device(dtype: str = "auto", device: str | None = None) -> tuple[str, str]:
    """(device, dtype) a predictor runs with: cuda when this process sees a GPU (Ray sets
    CUDA_VISIBLE_DEVICES to the GPUs it reserved), else cpu; dtype "auto" = bfloat16 on cuda,
    float32 on cpu (CPU kernels are slow or missing in half precision)."""
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
    return device, dtype


# ---------------------------------------------------------------------------- reproducibility


def batch_seed(seed: int, first_id: str) -> int:
    """A sampled batch's seed: from the run's seed and the batch's first example, so a batch decodes
    the same whichever actor takes it."""
    import zlib

    return zlib.crc32(f"{seed}:{first_id}".encode()) ^ (seed & 0xFFFFFFFF)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and (when installed) torch, so sampled decoding repeats."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    torch.manual_seed(seed)
