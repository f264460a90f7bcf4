"""Run report: one static HTML page plus PNGs next to it, from what a finished run wrote.

Inputs (all local paths or ``s3://``)::

    <run>/history.jsonl                   training reports (raytrain.training.metrics)
    <run>/eval/metrics.json               trained / untrained / centre_baseline (raytrain.launch.train)
    <run>/eval/predictions_<split>.jsonl  per example: id, task, query, text, objects, errors, score
    <data>/<split>/shard-*.parquet        source images and ground truth (raytrain.data.shards)

Output, in the local folder ``out_dir``::

    index.html       no external CSS / JS / fonts; images referenced by relative path
    report.json      every number the figures plot (tests and other tools read this, not pixels)
    curves.png       loss / ce, lr, grad norm, throughput vs step; restarts marked
    errors.png       parse failures by reason, per model column
    bias_points.png  pred - GT dx / dy of points (closest prediction to each GT, as the metric)
    bias_boxes.png   the same for box centres (one-to-one matched pairs that overlap)
    distance.png     per-sample distance error, source pixels and normalised by the diagonal
    calibration.png  reliability diagram per model column, when metrics.json has "calibration"
    overlays/*.png   GT (blue circle / box) vs prediction (red cross / box) on the source image,
                     best, median and worst examples by per-sample score

Every piece is optional: a missing file, a task that was not evaluated, or predictions that
never parsed give a note on the page instead of an exception. Ground truth for the overlays
and the bias comes from the shards, filtered exactly as ``pipeline.examples_for`` builds
targets: objects of the task's kind (``raytrain.tasks``) whose label equals the query.

The package, by concern: ``read`` (run files, shards), ``analysis`` (the numbers, with the
pairings of ``raytrain.eval.metrics``), ``draw`` (overlays, PIL), ``figures`` (matplotlib
PNGs), ``page`` (HTML). ``python -m raytrain.eval.report`` / ``raytrain report`` run ``main``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from raytrain import storage
from raytrain.eval.metrics.values import finite
from raytrain.eval.report import analysis, figures
from raytrain.eval.report.draw import (
    GT_COLOUR,
    HALO_COLOUR,
    OVERLAY_SIDE,
    PRED_COLOUR,
    overlays,
)
from raytrain.eval.report.page import page
from raytrain.eval.report.read import (
    load_ground_truth,
    load_images,
    read_jsonl,
    read_text,
)

__all__ = ["GT_COLOUR", "HALO_COLOUR", "OVERLAY_SIDE", "PRED_COLOUR", "build_report", "main"]

log = logging.getLogger(__name__)

FIGURES = ("curves.png", "errors.png", "bias_points.png", "bias_boxes.png", "distance.png", "calibration.png")


def build_report(run_uri: str, data_uri: str | None, out_dir, opts: storage.StorageOptions | None = None,
                 split: str = "test", max_overlays: int = 24) -> Path:
    """Render the report of the run at ``run_uri`` (``<root>/runs/<name>``, local or s3://)
    into the local folder ``out_dir``; returns the path of ``index.html``.

    ``data_uri`` is the prepared dataset (shards) the run evaluated on; None takes the one
    recorded in ``eval/metrics.json``. ``max_overlays`` caps the overlay images, shared
    between tasks, each task's share split into best / median / worst thirds.
    Never raises on missing or malformed run files: each gap is a note on the page.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(exist_ok=True)
    for stale in [*(out / "overlays").glob("*.png"), *(out / f for f in FIGURES)]:  # ours, from an earlier report
        stale.unlink(missing_ok=True)
    notes: list[str] = []

    def guarded(what: str, fn: Callable, default: Any) -> Any:
        try:
            return fn()
        except Exception as e:  # the page says what failed; the rest still renders
            log.exception("report: %s failed", what)
            notes.append(f"{what} failed: {type(e).__name__}: {e}")
            return default

    # ---------------------------------------------------------------- read
    eval_dir = storage.join(run_uri, "eval")
    metrics = guarded("reading eval/metrics.json", lambda: json.loads(read_text(storage.join(eval_dir, "metrics.json"), opts) or "null"), None)
    if not isinstance(metrics, dict):
        metrics = None
        notes.append("No eval/metrics.json: no metrics table.")
    run_info = metrics.get("run") if metrics and isinstance(metrics.get("run"), dict) else {}
    if not data_uri:
        data_uri = run_info.get("data")
    pred_uri = storage.join(eval_dir, f"predictions_{split}.jsonl")
    rows = guarded("reading predictions", lambda: read_jsonl(pred_uri, opts, notes), None)
    if rows is None:
        notes.append(f"No eval/predictions_{split}.jsonl: no overlays or error analytics.")
        rows = []
    history = guarded("reading history.jsonl", lambda: read_jsonl(storage.join(run_uri, "history.jsonl"), opts, notes), None)
    if not history:
        notes.append("No training history (history.jsonl missing or empty): no curves.")
        history = []

    gt = None
    if not data_uri:
        notes.append("No data URI given or recorded in metrics.json: no ground truth, overlays or bias.")
    elif rows:
        gt = guarded(f"reading ground truth from {data_uri} ({split})", lambda: load_ground_truth(data_uri, split, opts), None)
        if gt is not None and not gt:
            notes.append(f"No shards for split {split!r} under {data_uri}: no ground truth, overlays or bias.")
            gt = None

    # ---------------------------------------------------------------- analyse
    examples, missing = analysis.examples(rows, gt)
    if missing:
        notes.append(f"{missing} prediction(s) refer to ids not in the {split!r} shards: no ground truth for them.")
    if rows and not any(ex.pred for ex in examples):
        notes.append("No output of the trained model parsed to any object: only ground truth is drawn, no bias or distance plots.")
    tasks = sorted({ex.task for ex in examples})
    for task in ("point", "detect"):
        if rows and task not in tasks:
            notes.append(f"No {task!r} examples in the predictions: no {analysis.kind(task)} analytics.")

    rep: dict[str, Any] = {
        "name": run_info.get("name") or run_uri.rstrip("/").rsplit("/", 1)[-1],
        "run": run_uri, "data": data_uri, "split": split, "n_predictions": len(rows), "tasks": tasks,
    }
    rep["errors"] = analysis.error_stats(examples)
    rep["parse_errors"] = {"trained": rep["errors"]["reasons"]} if rows else {}
    for c in analysis.COLUMNS[1:]:
        pe = (metrics or {}).get(c, {}).get("parse_errors") if isinstance((metrics or {}).get(c), dict) else None
        if isinstance(pe, dict):
            rep["parse_errors"][c] = {str(k): int(finite(v) or 0) for k, v in pe.items()}
    rep["bias"] = {"points": analysis.bias(examples, "point", analysis.point_offsets),
                   "box_centres": analysis.bias(examples, "box", analysis.box_offsets)}
    rep["distance"] = analysis.distance(examples)
    rep["curves"] = analysis.curves(history)
    rep["summary"] = analysis.summary(metrics)
    rep["calibration"] = guarded("reading calibration from metrics.json", lambda: analysis.calibration(metrics, notes), {})

    # ---------------------------------------------------------------- draw
    images: list[str] = []
    for name, fn in (
        ("curves.png", lambda p: figures.plot_curves(rep["curves"], p)),
        ("errors.png", lambda p: figures.plot_errors(rep["parse_errors"], p)),
        ("bias_points.png", lambda p: figures.plot_bias(rep["bias"]["points"], "points", p)),
        ("bias_boxes.png", lambda p: figures.plot_bias(rep["bias"]["box_centres"], "box centres", p)),
        ("distance.png", lambda p: figures.plot_distance(rep["distance"], p)),
        ("calibration.png", lambda p: figures.plot_reliability(rep["calibration"], p)),
    ):
        if guarded(f"plotting {name}", lambda fn=fn, name=name: fn(out / name), False):
            images.append(name)

    # only examples whose image is in the shards can be drawn (the others are noted above)
    selected = analysis.select([ex for ex in examples if ex.gt is not None], max_overlays) if gt is not None else []
    records: list[dict] = []
    if selected:
        imgs = guarded("reading overlay images", lambda: load_images(data_uri, split, {ex.id for *_, ex in selected}, opts), {})
        records, more = guarded("drawing overlays", lambda: overlays(selected, imgs, out), ([], []))
        notes += more
    rep["overlays"] = records
    images += [r["file"] for r in records]
    rep["images"] = images
    rep["notes"] = notes

    # ---------------------------------------------------------------- write
    (out / "report.json").write_text(json.dumps(rep, indent=1, default=str) + "\n", encoding="utf-8")
    index = out / "index.html"
    index.write_text(page(rep, metrics), encoding="utf-8")
    return index


def main(argv: Sequence[str] | None = None) -> str:
    """``python -m raytrain.eval.report --run <uri> --data <uri> --out <dir>``."""
    import argparse

    ap = argparse.ArgumentParser(prog="raytrain report", description=build_report.__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="run directory: <storage.root>/runs/<name> (local or s3://)")
    ap.add_argument("--data", default=None, help="prepared dataset URI (default: the one in eval/metrics.json)")
    ap.add_argument("--out", required=True, help="local output folder (index.html, report.json, PNGs)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--max-overlays", type=int, default=24)
    ap.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (MinIO / moto)")
    ap.add_argument("--region", default=None)
    a = ap.parse_args(argv)
    index = build_report(a.run, a.data, a.out, storage.StorageOptions(a.endpoint_url, a.region), a.split, a.max_overlays)
    print(index)
    return str(index)
