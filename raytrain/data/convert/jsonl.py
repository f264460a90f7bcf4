"""PaliGemma fine-tuning JSONL (big_vision / Roboflow / Datature style) -> canonical rows.

One line per (image, task)::

    {"image": "crane.jpg", "prefix": "caption en", "suffix": "a tall crane stands ..."}
    {"image": "b.jpg", "prefix": "detect squirrel ; butterfly", "suffix": "<loc0429><loc0022><loc0949><loc0592> butterfly ; ..."}
    {"image": "c.jpg", "prefix": "segment butterfly", "suffix": "<loc0277>...<loc0809><seg102>...<seg073> butterfly"}
    {"image": "d.jpg", "prefix": "point to cat", "suffix": "<loc0500><loc0250> cat"}

Tasks (first word of the prefix): ``caption`` -> one :class:`Caption`; ``detect`` -> boxes;
``segment`` -> :class:`CodedMask` objects (the box and the 16 ``<seg>`` codes as given: training
writes them back as they are, no mask codec needed; pixels come only through big_vision's VQ-VAE
decoder at evaluation, when its weights are configured); ``point`` -> points. Suffixes are read
with ``raytrain.formats.paligemma.parse`` (bins / 1023 * size, big_vision's decoding) into pixels of
the decoded image, with the prefix's class list as the allowed labels.

Negatives: a suffix with no object that is the "nothing found" answer -- empty, or the job's
``data.text.empty_answer`` (seed 004's "Normal") -- marks the image :class:`Absent` for every class
of the prefix (counted as the ``negative`` note), so it trains and evaluates as a negative.

Row reasons: ``bad_json``, ``missing_field`` (no string image / prefix / suffix),
``unsupported_task``; ``unparsable_suffix`` (nothing readable, and not a "nothing found" answer).
Object reasons (row kept): ``suffix_<parse reason>`` per rejected fragment, ``seg_tokens_incomplete``
(a segment object without exactly 16 ``<seg>`` codes: a segment target needs its mask).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator

from raytrain import storage
from raytrain.data.convert.common import (
    Converted,
    admit,
    count,
    parent,
    record,
    resolve_ref,
)
from raytrain.data.shards import PrepReport
from raytrain.formats import paligemma
from raytrain.formats.annotations import Absent, Caption, CodedMask
from raytrain.storage import StorageOptions

SOURCE = "paligemma_jsonl"
TASKS = {"caption": None, "detect": "box", "segment": "box", "point": "point"}
"""Prefix task word -> the ``paligemma.parse`` kind (None: the suffix is text)."""

# one segment object: 4 locs, its <seg> codes, its label up to the next ";" or "<"
_SEG_OBJECT = re.compile(r"((?:<loc[0-9]{4}>){4})((?:\s*<seg[0-9]{3}>)*)\s*([^;<]*)")
_NUM = re.compile(r"[0-9]+")


def find_jsonl(folder: str, opts: StorageOptions | None = None) -> str:
    """The single ``*.jsonl`` file in ``folder``."""
    fs = storage.fsspec_fs(folder, opts)
    found = sorted(fs.glob(storage.strip_scheme(storage.join(folder, "*.jsonl"))))
    if len(found) != 1:
        raise FileNotFoundError(f"expected exactly one *.jsonl in {folder}, found {found}")
    return storage.S3_SCHEME + found[0] if storage.is_s3(folder) else found[0]


def task_of(prefix: str) -> tuple[str | None, list[str]]:
    """``("detect", ["squirrel", "butterfly"])`` for ``"detect squirrel ; butterfly"``;
    ``(None, [])`` for a prefix whose task is not supported."""
    words = prefix.strip().split(None, 1)
    if not words or words[0].lower() not in TASKS:
        return None, []
    task, rest = words[0].lower(), words[1] if len(words) > 1 else ""
    if task == "point" and rest.lower().startswith("to "):
        rest = rest[3:]
    if task == "caption":
        return task, []  # "caption en": the rest is a language code, not classes
    return task, [c.strip() for c in rest.split(";") if c.strip()]


def records(
    path: str,
    image_root: str | None = None,
    report: PrepReport | None = None,
    *,
    source: str = SOURCE,
    opts: StorageOptions | None = None,
) -> Iterator[dict]:
    """One record per non-blank line of ``path`` (local or s3://); images resolved against
    ``image_root`` (default: the JSONL's folder). Record ids are ``<image>#<line number>``."""
    root = image_root or parent(path)
    with storage.fsspec_fs(path, opts).open(storage.strip_scheme(path), "r", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                count(report, "bad_json")
                continue
            if not isinstance(d, dict) or not all(isinstance(d.get(k), str) for k in ("image", "prefix", "suffix")) or not d["image"]:
                count(report, "missing_field")
                continue
            task, _ = task_of(d["prefix"])
            if task is None:
                count(report, "unsupported_task")
                continue
            admit(report)
            yield record(
                f"{d['image']}#{line_no}",
                resolve_ref(root, d["image"]),
                {"prefix": d["prefix"], "suffix": d["suffix"]},
                source=source,
                split_key=d["image"],
            )


def _coded_masks(suffix: str, boxes: list, width: int, height: int) -> tuple[list[CodedMask], int]:
    """The segment objects of a suffix as CodedMasks (each parsed box with its 16 <seg> codes, in
    suffix order), and how many objects lack exactly 16 codes."""
    out, incomplete = [], 0
    for m in _SEG_OBJECT.finditer(suffix):
        codes = [int(c) for c in _NUM.findall(m.group(2))]
        bins = [int(c) for c in _NUM.findall(m.group(1))]
        label = m.group(3).strip()
        if len(codes) != 16:
            incomplete += 1
            continue
        y1, x1, y2, x2 = (paligemma.decode_bin(b) * s for b, s in zip(bins, (height, width, height, width)))
        box = next((b for b in boxes if b.label == label and abs(b.x1 - x1) < 1e-6 and abs(b.y1 - y1) < 1e-6), None)
        if box is not None:  # the parser accepted it (label allowed, box valid)
            out.append(CodedMask(box.x1, box.y1, box.x2, box.y2, box.label, tuple(codes)))
    return out, incomplete


def to_objects(annotation: dict, width: int, height: int, empty_answer: str = "") -> Converted:
    """Objects of one JSONL line, in pixels of a ``width`` x ``height`` image; a suffix that is
    the "nothing found" answer (empty, or `empty_answer`) makes the image a negative for the
    prefix's classes."""
    prefix, suffix = annotation["prefix"], annotation["suffix"]
    task, classes = task_of(prefix)
    if task is None:
        return Converted(reason="unsupported_task")
    if task == "caption":
        return Converted([Caption(suffix.strip())])
    if classes and suffix.strip().casefold() in {"", empty_answer.strip().casefold()}:
        return Converted([Absent(c) for c in classes], notes=["negative"])
    res = paligemma.parse(suffix, width, height, TASKS[task], allowed_labels=classes or None)
    drops = Counter(f"suffix_{e.reason}" for e in res.errors if e.reason != "empty_output")
    if not res.objects:
        empty = all(e.reason == "empty_output" for e in res.errors)
        return Converted(reason="empty_annotations" if empty else "unparsable_suffix", object_drops=dict(drops))
    if task != "segment":
        return Converted(list(res.objects), object_drops=dict(drops))
    masks, incomplete = _coded_masks(suffix, list(res.objects), width, height)
    if incomplete:
        drops["seg_tokens_incomplete"] += incomplete
    if not masks:
        return Converted(reason="unparsable_suffix", object_drops=dict(drops))
    return Converted(masks, object_drops=dict(drops))
