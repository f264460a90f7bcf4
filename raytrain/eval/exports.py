"""What an evaluation leaves for other tools, next to metrics.json in `<run>/eval/`:

    predictions_<split>.jsonl          one example per line: id, task, query, text, objects (source
                                       pixels, each with its confidence "score"), errors, score,
                                       targets, width, height, worker
    coco_gt_<split>.json               COCO ground truth of the detect examples: one image per detect
                                       example (file_name = the source id, "query" = the asked label),
                                       int ids, categories = labels (1..K), bbox [x, y, w, h], area, iscrowd 0
    coco_results_<split>.json          COCO results: [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]
                                       -- `COCO(gt).loadRes(results)` reads it, and COCOeval over the two
                                       files gives the mAP raytrain reports

    rows = read_predictions(uri)                        # an iterator, one line at a time
    dets = detections(uri)                              # {source id: supervision.Detections}

The COCO files are written while the evaluation streams (CocoFiles: callbacks of
aggregate.Aggregator, spooled to local temporary files, then copied to the destination, local or
S3), so no step holds the split in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from raytrain import storage


def read_predictions(uri: str, opts: storage.StorageOptions | None = None) -> Iterator[dict]:
    """The rows of a predictions JSONL file (local or S3), one at a time; blank lines are skipped."""
    with storage.fsspec_fs(uri, opts).open(storage.strip_scheme(uri), "r", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


class CocoFiles:
    """COCO ground-truth and results files built from `aggregate.Aggregator`'s callbacks
    (`on_image`, `on_annotation`, `on_result`), written out by `close(categories)`.

    The spool is a local temporary directory, removed by `close` (also when writing fails) or by
    `discard`; used as a context manager, an error before `close` discards it too."""

    def __init__(self, gt_uri: str, results_uri: str, opts: storage.StorageOptions | None = None):
        self.gt_uri, self.results_uri, self.opts = gt_uri, results_uri, opts
        self._dir = Path(tempfile.mkdtemp(prefix="raytrain-coco-"))
        self._files = {}
        try:
            for k in ("images", "annotations", "results"):
                self._files[k] = open(self._dir / f"{k}.jsonl", "w", encoding="utf-8")
        except BaseException:
            self.discard()
            raise

    def __enter__(self) -> CocoFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()

    def discard(self) -> None:
        """Drop the spool without writing anything (idempotent; after `close` there is nothing left)."""
        for f in self._files.values():
            f.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def on_image(self, entry: dict) -> None:
        self._files["images"].write(json.dumps(entry) + "\n")

    def on_annotation(self, ann: dict) -> None:
        self._files["annotations"].write(json.dumps(ann) + "\n")

    def on_result(self, det: dict) -> None:
        self._files["results"].write(json.dumps(det) + "\n")

    def callbacks(self) -> dict:
        return {"on_image": self.on_image, "on_annotation": self.on_annotation, "on_result": self.on_result}

    def close(self, categories: list[dict], info: dict | None = None) -> tuple[str, str]:
        """Write both files (streamed from the spool, line by line); returns their URIs."""
        try:
            for f in self._files.values():
                f.close()
            gt_local = self._dir / "gt.json"
            with open(gt_local, "w", encoding="utf-8") as out:
                out.write('{"info": ' + json.dumps(info or {}) + ', "images": ')
                _json_list(self._dir / "images.jsonl", out)
                out.write(', "annotations": ')
                _json_list(self._dir / "annotations.jsonl", out)
                out.write(', "categories": ' + json.dumps(categories) + "}\n")
            res_local = self._dir / "results.json"
            with open(res_local, "w", encoding="utf-8") as out:
                _json_list(self._dir / "results.jsonl", out)
                out.write("\n")
            _put(gt_local, self.gt_uri, self.opts)
            _put(res_local, self.results_uri, self.opts)
        finally:
            self.discard()
        return self.gt_uri, self.results_uri


def _json_list(jsonl: Path, out) -> None:
    """The JSON objects of a JSONL file as one JSON list, copied line by line."""
    out.write("[")
    with open(jsonl, encoding="utf-8") as f:
        for i, line in enumerate(f):
            out.write(("," if i else "") + line.rstrip("\n"))
    out.write("]")


def _put(local: Path, uri: str, opts) -> None:
    if storage.is_s3(uri):
        storage.fsspec_fs(uri, opts).put(str(local), storage.strip_scheme(uri))
    else:
        os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
        shutil.copyfile(local, uri)


def detections(rows: Iterable[dict] | str, opts: storage.StorageOptions | None = None, classes: list[str] | None = None) -> dict:
    """`supervision.Detections` per source image from prediction rows (or a predictions JSONL URI):
    every box of its detect (and dense-caption) answers, `xyxy` in source pixels, `confidence` (NaN
    where the answer had none), `class_id` = the label's index in `classes` (default: the sorted labels
    seen; -1 for a label outside a given list) and `data["class_name"]` = the label."""
    import numpy as np
    import supervision as sv

    if isinstance(rows, str):
        rows = read_predictions(rows, opts)
    per_image: dict[str, list[tuple[list[float], float, str]]] = {}
    for r in rows:
        objs = json.loads(r["objects"]) if isinstance(r["objects"], str) else r["objects"]
        boxes = per_image.setdefault(str(r["id"]), [])
        for o in objs or []:
            if o.get("type") in ("box", "region"):
                score = o.get("score")
                boxes.append(([o["x1"], o["y1"], o["x2"], o["y2"]], float("nan") if score is None else float(score),
                              str(o.get("label", o.get("phrase", "")))))
    names = list(classes) if classes is not None else sorted({lab for bs in per_image.values() for *_, lab in bs})
    index = {n: i for i, n in enumerate(names)}
    out = {}
    for image_id, bs in per_image.items():
        if not bs:
            out[image_id] = sv.Detections.empty()
            continue
        out[image_id] = sv.Detections(
            xyxy=np.asarray([b for b, _, _ in bs], dtype=np.float32).reshape(-1, 4),
            confidence=np.asarray([c for _, c, _ in bs], dtype=np.float32),
            class_id=np.asarray([index.get(lab, -1) for *_, lab in bs], dtype=int),
            data={"class_name": np.asarray([lab for *_, lab in bs])},
        )
    return out
