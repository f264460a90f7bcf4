"""One column of an evaluation (a model or a baseline over a split), streamed end to end:

    predictions Dataset (eval/batch.py) --writer stage--> <eval dir>/parts/<column>_<split>/part-*.jsonl
    driver: each part, line by line --> Aggregator (every metric; COCO in bounded chunks)
                                   \\--> predictions_<split>[_<column>].jsonl, coco_gt / coco_results files

The Ray Data job writes the predictions as they are produced; the driver never holds more than one
line of them (plus what corpus metrics need: captions), so its memory does not grow with the split
(bench/eval_memory.py). The parts are removed once the predictions file is complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time

from raytrain import storage
from raytrain.eval import batch as eval_batch
from raytrain.eval import exports
from raytrain.eval.aggregate import Aggregator

log = logging.getLogger(__name__)


def file_names(split: str, column: str, main: bool) -> dict[str, str]:
    """File names of one column in the eval directory (the main column without a suffix)."""
    tag = split if main else f"{split}_{column}"
    return {"predictions": f"predictions_{tag}.jsonl", "coco_gt": f"coco_gt_{tag}.json", "coco_results": f"coco_results_{tag}.json"}


def evaluate_column(predictions, out_dir: str, split: str, column: str, opts: storage.StorageOptions | None = None, *,
                    main: bool = False, calibration_bins: int = 10, coco_files: bool | None = None) -> dict:
    """Run the predictions job of one column and score it; returns its metrics (with "files" and
    "seconds": {"predict", "score"}). `main`: the column whose files carry no column suffix (what
    the report reads; it alone gets COCO files unless `coco_files` says otherwise)."""
    storage_dict = {"endpoint_url": opts.endpoint_url, "region": opts.region} if opts else None
    parts_uri = storage.join(out_dir, "parts", f"{column}_{split}")
    _remove(parts_uri, opts)  # left by an interrupted run
    t0 = time.perf_counter()
    parts = eval_batch.write_predictions_job(predictions, parts_uri, storage_dict)
    t1 = time.perf_counter()
    metrics = collect([p for p, _ in parts], out_dir, split, column, opts, main=main, calibration_bins=calibration_bins,
                      coco_files=main if coco_files is None else coco_files)
    if sum(n for _, n in parts) != metrics["examples"]:
        raise RuntimeError(f"{column}: the writer stage reported {sum(n for _, n in parts)} rows, {metrics['examples']} were read back")
    _remove(parts_uri, opts)
    metrics["seconds"] = {"predict": round(t1 - t0, 2), "score": round(time.perf_counter() - t1, 2)}
    return metrics


def collect(parts: list[str], out_dir: str, split: str, column: str, opts: storage.StorageOptions | None = None, *,
            main: bool = False, calibration_bins: int = 10, coco_files: bool = True) -> dict:
    """Read the written parts back line by line (in part-name order): every metric, the one
    predictions JSONL file, and the COCO ground-truth / results files of the detect examples."""
    names = file_names(split, column, main)
    uris = {k: storage.join(out_dir, v) for k, v in names.items()}
    # the COCO spool (a local temp dir) goes away with close, or with the block on an error
    with exports.CocoFiles(uris["coco_gt"], uris["coco_results"], opts) if coco_files else contextlib.nullcontext() as coco:
        agg = Aggregator(calibration_bins=calibration_bins, **(coco.callbacks() if coco else {}))
        out_fs = storage.fsspec_fs(uris["predictions"], opts)
        with out_fs.open(storage.strip_scheme(uris["predictions"]), "w", encoding="utf-8") as out:
            for part in sorted(parts):
                for row in exports.read_predictions(part, opts):
                    agg.add(row)
                    out.write(json.dumps(row) + "\n")
        metrics = agg.result()
        files = {"predictions": uris["predictions"]}
        if coco is not None:
            if agg.n_detect:
                files["coco_gt"], files["coco_results"] = coco.close(agg.coco.categories_json(), {"description": f"raytrain {column} {split}"})
            else:
                coco.discard()
                for k in ("coco_gt", "coco_results"):  # no detect examples: no COCO files
                    fs = storage.fsspec_fs(uris[k], opts)
                    if fs.exists(storage.strip_scheme(uris[k])):
                        fs.rm(storage.strip_scheme(uris[k]))
    metrics["files"] = files
    return metrics


def _remove(parts_uri: str, opts) -> None:
    """Delete a column's parts folder, and the parts/ folder once it is empty (local)."""
    fs = storage.fsspec_fs(parts_uri, opts)
    path = storage.strip_scheme(parts_uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    parent = path.rstrip("/").rsplit("/", 1)[0]
    if not storage.is_s3(parts_uri) and fs.exists(parent) and not fs.ls(parent):
        fs.rmdir(parent)
