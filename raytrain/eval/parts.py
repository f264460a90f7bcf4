"""The writer stage of the evaluation job: one block of prediction rows -> one JSONL part.

Kept apart from eval/batch.py on purpose: Ray unpickles `write_part` by importing this module in
every worker process that runs a write task, and eval/batch.py imports the predict path (torch,
transformers, scipy: ~2.4 CPU-s per process here), which a writer never uses. This module imports
only json, numpy and raytrain.storage.
"""

from __future__ import annotations

import json
import uuid

import numpy as np

JSON_COLUMNS = ("objects", "errors", "score", "targets")
"""Row columns holding JSON text; parts and predictions JSONL store them as nested JSON."""


def row_json(batch: dict, i: int) -> str:
    """Row `i` of a columnar batch as one JSONL line (JSON columns nested, numpy scalars plain)."""
    return json.dumps({k: (json.loads(v[i]) if k in JSON_COLUMNS and isinstance(v[i], str) else _plain(v[i])) for k, v in batch.items()})


def write_part(batch: dict, *, parts_uri: str, storage: dict | None = None) -> dict:
    """Writer stage: one block of prediction rows -> <parts_uri>/part-<uuid>.jsonl (local or S3),
    returning only {"part", "rows"}: predictions never travel to the driver."""
    from raytrain import storage as storage_mod

    n = len(batch["id"])
    if n == 0:
        return {"part": np.array([], dtype=object), "rows": np.array([], dtype=np.int64)}
    uri = storage_mod.join(parts_uri, f"part-{uuid.uuid4().hex}.jsonl")
    fs = storage_mod.fsspec_fs(uri, storage_mod.StorageOptions(**(storage or {})))
    with fs.open(storage_mod.strip_scheme(uri), "w", encoding="utf-8") as f:
        f.write("".join(row_json(batch, i) + "\n" for i in range(n)))
    return {"part": np.array([uri], dtype=object), "rows": np.array([n], dtype=np.int64)}


def _plain(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v
