"""Periodic validation inside training: greedy-decode a small FIXED validation subset on rank 0,
parse the text back to objects and score it through the one predict path (`raytrain/predict.py`,
what `raytrain eval` and Serve run: family parser -> source pixels -> `raytrain.eval.metrics`).

It gives sweeps (`raytrain tune`) an objective that is a grounding metric rather than the loss:

    examples = validation.load_examples(uri, "val", 32, tasks=..., image_hw=..., family=...)  # once
    ...
    metrics.update(validation.evaluate(model, processor, fam, examples))  # every N steps, rank 0

and, on the same examples, the teacher-forced loss (`val_loss`, the training objective with every
`loss.*` option; seed 003 kept the checkpoint where it was lowest):

    batches = validation.loss_batches(processor, fam, examples, max_len=...)  # once
    metrics.update(validation.mean_loss(model, batches, loss_step))           # loss_step: the recipe's forward + loss

Every returned value is a finite float (Tune's searchers and schedulers cannot rank None/NaN):
a metric that is undefined on this subset takes its WORST value, as stated per key in
`evaluate`. Components take plain arguments; the recipe reads the config.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence

import numpy as np

from raytrain import predict, storage
from raytrain.data import pipeline, shards
from raytrain.eval import batch as eval_batch
from raytrain.formats.numbers import NumberSpan

# Worst value of each objective, used when the subset leaves the metric undefined.
WORST_NORM_DISTANCE = 1.0  # a normalised distance of one image diagonal: the farthest in-image miss

Examples = dict  # columnar batch: {"id", "task", "query", "prefix", "targets", "width", "height": (N,), "image": (N, H, W, 3) uint8,
#                    "content_box": (N, 4) int32, where the source lies in the image}


# ----------------------------------------------------------------------------------------------
# the fixed subset


def load_examples(
    uri: str,
    split: str,
    limit: int,
    *,
    tasks: Sequence[str],
    image_hw,
    family: str,
    allow_convert: bool = True,
    opts: storage.StorageOptions | None = None,
    preprocess=None,
) -> Examples:
    """The first `limit` examples of `split` (shard order, then row order: the same subset on every
    call, every rank and every trial), validated, preprocessed to `image_hw` (the family's
    `input_frame`: a fixed (H, W) or per-image native sizing; `preprocess`: the
    run's data.resize / data.edge_* as a Preprocess or record; None = stretch) and expanded into
    (task, label) examples exactly as the training/eval pipeline does, without Ray Data (it runs
    inside a training worker). Reads shard by shard and stops once it has `limit` examples."""
    import pyarrow.parquet as pq

    if limit <= 0:
        raise ValueError(f"validation subset size must be positive, not {limit}")
    paths, fs = shards.shard_source(uri, split, opts)
    if not paths:
        raise FileNotFoundError(f"no shards for validation split {split!r} under {uri}")
    parts: list[dict] = []
    have = 0
    cols = ["id", "image", "width", "height", "objects"]
    for path in paths:
        table = pq.read_table(path, filesystem=fs, columns=cols)
        for start in range(0, table.num_rows, 64):
            rows = table.slice(start, 64).to_pydict()
            out = pipeline.decode_and_expand(rows, split=split, tasks=list(tasks), image_hw=image_hw,
                                             family=family, allow_convert=allow_convert, preprocess=preprocess)
            if len(out["id"]):
                parts.append(out)
                have += len(out["id"])
            if have >= limit:
                break
        if have >= limit:
            break
    if not parts:
        raise ValueError(f"validation split {split!r} under {uri} has no usable examples (see the drop report)")
    return {k: v[:limit] for k, v in pipeline.concat_batches(parts).items()}


# ----------------------------------------------------------------------------------------------
# scoring


def _unwrap(model):
    """The module that generates: DDP wraps it in `.module` (a peft model generates as is)."""
    return getattr(model, "module", model)


def evaluate(model, processor, family_module, examples: Examples, *, batch_size: int = 32, max_new_tokens: int = 16,
             prefix: str = "val_", options: predict.DecodeOptions | None = None) -> dict[str, float]:
    """Decode `examples` (greedy and unconstrained unless `options` say otherwise: the model's own
    answers, at the cost of plain generation), parse, score; returns flat metrics `<prefix><key>`.

    Call on ONE rank (rank 0): it runs no collective, so the other ranks simply wait for it at
    the next gradient all-reduce. The model is put in eval mode (no dropout) and restored to its
    previous mode; torch's RNG state is saved and restored, so a run with validation draws the
    same random numbers as one without (exact resume stays exact).

    Keys (all finite floats; undefined -> worst):
      n                         examples scored
      valid_rate                examples whose output parsed to at least one object
      mean_norm_distance        pointing: mean distance / image diagonal over VALID point outputs
                                (as `raytrain eval`); 1.0 when none is valid
      norm_distance_all         pointing: mean over ALL point examples, an unparsed or empty output
                                counting 1.0 (a diagonal; misses are capped there): the robust
                                objective, a model cannot improve it by answering less
      success_rate              pointing: share of valid point outputs within 5% of the diagonal; 0 if none
      success_rate_all          pointing: the same over all point examples (invalid = miss)
      box_f1, box_precision, box_recall, box_mean_iou
                                detection at IoU 0.5, micro-averaged (as `raytrain eval`); 0 if undefined
      seconds                   wall time of this call
    """
    import torch

    t0 = time.perf_counter()
    net = _unwrap(model)
    device = next(net.parameters()).device
    was_training = net.training
    n = len(examples["id"])
    opts = options or predict.DecodeOptions(max_new_tokens=max_new_tokens, constrained=False, confidence=False)
    rows: list[dict] = []
    rng_devices = [device] if device.type == "cuda" else []
    net.eval()
    try:
        with torch.random.fork_rng(devices=rng_devices):
            for start in range(0, n, batch_size):
                chunk = {k: v[start : start + batch_size] for k, v in examples.items()}
                # the same decode -> parse -> score path as `raytrain eval`, so the numbers mean the same
                out = predict.predict_batch(net, processor, family_module, chunk, opts)
                rows.extend({k: out[k][i] for k in out} for i in range(len(out["id"])))
    finally:
        net.train(was_training)
    metrics = summarize(rows)
    metrics["seconds"] = time.perf_counter() - t0
    return {f"{prefix}{k}": float(v) for k, v in metrics.items()}


def summarize(rows: list[dict]) -> dict[str, float]:
    """Per-example eval rows (`raytrain.eval.batch` format) -> the flat, always-defined metrics
    documented in `evaluate` (without `seconds`)."""
    import json

    agg = eval_batch.aggregate(rows)
    point_scores = [json.loads(r["score"]) for r in rows if r["task"] == "point"]
    n = len(rows)
    n_valid = sum(1 for r in rows if json.loads(r["objects"]))
    out: dict[str, float] = {"n": float(n), "valid_rate": n_valid / n if n else 0.0}

    def val(d: dict, key: str, worst: float) -> float:
        v = d.get(key)
        return worst if v is None or not np.isfinite(v) else float(v)

    out["mean_norm_distance"] = val(agg, "mean_norm_distance", WORST_NORM_DISTANCE)
    dists = [WORST_NORM_DISTANCE if s.get("norm_distance") is None else min(float(s["norm_distance"]), WORST_NORM_DISTANCE)
             for s in point_scores]
    out["norm_distance_all"] = float(np.mean(dists)) if dists else WORST_NORM_DISTANCE
    out["success_rate"] = val(agg, "success_rate", 0.0)
    out["success_rate_all"] = val(agg, "success_rate_all", 0.0)
    boxes = agg.get("boxes", {})
    for key in ("f1", "precision", "recall", "mean_iou"):
        out[f"box_{key}"] = val(boxes, key, 0.0)
    return out


# ----------------------------------------------------------------------------------------------
# the teacher-forced loss


def loss_batches(processor, family_module, examples: Examples, *, max_len: int, batch_size: int = 8) -> list[dict]:
    """The fixed subset encoded as training encodes it (the family's `encode_train`: prefix, answer,
    labels, coordinate-digit places), in batches of torch tensors; examples longer than `max_len`
    are left out, as training drops them. Once per run: the subset never changes."""
    import torch
    from PIL import Image

    n = len(examples["id"])
    if n == 0:
        return []
    images = [Image.fromarray(a) for a in examples["image"]]
    numbers = [[NumberSpan(*x) for x in json.loads(str(js))] for js in examples["numbers"]]
    enc = family_module.encode_train(processor, images, [str(p) for p in examples["prefix"]], [str(s) for s in examples["suffix"]],
                                     max_len, numbers)
    fits = enc.pop("length") <= max_len
    enc = {k: np.asarray(v)[fits] for k, v in enc.items()}
    kept = int(fits.sum())
    return [{k: torch.as_tensor(v[i : i + batch_size]) for k, v in enc.items()} for i in range(0, kept, batch_size)]


def mean_loss(model, batches: list[dict], loss_step: Callable, *, prefix: str = "val_") -> dict[str, float]:
    """The loss over `batches` (`loss_step(module, batch) -> (loss, stats)`: the recipe's forward and
    objective, a mean over each batch's answer tokens), averaged over batches weighted by their
    examples; in eval mode (no dropout), without gradients, torch's RNG untouched: `<prefix>loss`,
    `<prefix>ce` (plain token cross-entropy) and `<prefix>loss_examples`. With no example that fits,
    the losses are the largest float, a finite worst value (Tune and Ray's checkpoint ranking need one)."""
    import torch

    net = _unwrap(model)
    device = next(net.parameters()).device
    was_training = net.training
    total = ce = 0.0
    n = 0
    net.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for batch in batches:
                k = int(batch["input_ids"].shape[0])
                loss, stats = loss_step(net, batch)
                total += float(loss) * k
                ce += float(stats["ce"]) * k
                n += k
    finally:
        net.train(was_training)
    worst = float(np.finfo(np.float64).max)
    return {f"{prefix}loss": total / n if n else worst, f"{prefix}ce": ce / n if n else worst, f"{prefix}loss_examples": float(n)}
