"""What every converter shares: source records, fetching image bytes, and one record -> one shard row.

A converter works in two steps, so the expensive one can run in parallel on Ray Data:

1. ``<converter>.records(...)`` reads the annotation files (small, on the driver) and yields one
   **record** per source row: a flat dict that Arrow can carry (see :func:`record`)::

       {"id", "image_ref" (local path, s3:// or http(s):// URL), "split_key" (the image's identity,
        for the split), "split" ("" = assign by hash), "source", "width"/"height" (declared by the
        source, 0 = unknown), "sha256" (expected image hash, "" = none),
        "annotation" (JSON of the source's own annotation for this row)}

   Rows it cannot use at all (malformed lines, no points, ...) are counted into a
   ``PrepReport`` there and never become records.
2. :func:`process_record` fetches the image, decodes and validates it, and calls the converter's
   ``to_objects(annotation, width, height)`` to get canonical objects in source pixels, which
   needs the decoded size for formats with normalised coordinates (PaliGemma <loc>, PixMo percent).
   Optional resize to a maximum side scales image and objects together.

Every row that does not come out has exactly one reason; rows kept after a change carry notes
(``converted_from_<MODE>``, ``resized``); objects left out of a kept row are counted by reason.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import logging
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from raytrain import storage
from raytrain.data import splits as splits_mod
from raytrain.data import validate
from raytrain.data.shards import PrepReport
from raytrain.formats.annotations import (
    Box,
    Caption,
    Mask,
    Obj,
    Point,
    Region,
    check_objects,
    objects_to_json,
)
from raytrain.storage import StorageOptions

log = logging.getLogger(__name__)

FETCH_REASONS = ("image_missing", "image_unreadable", "download_failed", "hash_mismatch")
"""``image_missing``: local / S3 file not found; ``image_unreadable``: other I/O error on a local
or S3 file; ``download_failed``: HTTP error, timeout or connection failure after the retries,
or a body over ``max_bytes``; ``hash_mismatch``: bytes differ from the source's sha256."""

USER_AGENT = "raytrain-prepare/0.1"
_TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}


# ---------------------------------------------------------------------------- records


def record(
    id: str,
    image_ref: str,
    annotation: Any,
    *,
    source: str,
    split_key: str | None = None,
    split: str = "",
    width: int = 0,
    height: int = 0,
    sha256: str = "",
) -> dict:
    """One source record (see module doc). ``annotation`` is serialised to JSON here."""
    return {
        "id": str(id),
        "image_ref": str(image_ref),
        "split_key": str(split_key if split_key is not None else image_ref),
        "split": str(split or ""),
        "source": str(source),
        "width": int(width or 0),
        "height": int(height or 0),
        "sha256": str(sha256 or ""),
        "annotation": json.dumps(annotation),  # NaN survives (Python reads it back); to_objects rejects it
    }


def count(report: PrepReport | None, reason: str, n: int = 1) -> None:
    """Count ``n`` input rows dropped for ``reason`` (also as rows in)."""
    if report is not None:
        report.rows_in += n
        report.dropped[reason] = report.dropped.get(reason, 0) + n


def admit(report: PrepReport | None) -> None:
    """Count one input row that became a record."""
    if report is not None:
        report.rows_in += 1


def assign_splits(
    records: Iterable[dict], splits: str | dict[str, float], seed: int, use_source_split: bool = True
) -> Iterator[dict]:
    """Fill each record's ``split``: the source's own split when it has one and
    ``use_source_split``, else by hash of ``split_key`` (``raytrain.data.splits``)."""
    fracs = splits_mod.resolve(splits)
    for rec in records:
        if not (use_source_split and rec.get("split")):
            rec = {**rec, "split": splits_mod.split_of(rec["split_key"], seed, fracs)}
        yield rec


SUBSET_UNITS = ("image", "row")
SUBSET_REASON = "not_in_subset"


def subset_indices(keys: Sequence[str | None], n: int, seed: int) -> list[int]:
    """Indices (ascending) of the rows whose key is one of the ``n`` distinct keys a seeded random
    draw picks: keys ranked by a seeded hash (``splits.unit_interval`` of ``"subset:<key>"``, a draw
    independent of the split's own hash), the first ``n`` kept. The draw does not depend on the order
    the rows come in, and adding rows to the source only displaces a proportional share of it. Rows
    without a key (``None``: a row the converter will count as unusable) are always kept, so they
    are counted for what they are. ``n <= 0`` or at least as many as there are keys: every row."""
    distinct = {k for k in keys if k is not None}
    if n <= 0 or n >= len(distinct):
        return list(range(len(keys)))
    chosen = set(sorted(distinct, key=lambda k: (splits_mod.unit_interval(f"subset:{k}", seed), k))[:n])
    return [i for i, k in enumerate(keys) if k is None or k in chosen]


def take_subset(records: Iterable[dict], n: int, seed: int, unit: str, report: PrepReport | None) -> tuple[list[dict], dict]:
    """The records of a seeded random subset of ``n`` images (``unit`` "image": every record of a
    chosen image, by ``split_key``) or ``n`` records ("row"); the others are counted into ``report``
    as ``not_in_subset`` drops (they were counted in when read). Returns ``(records, summary)`` with
    the summary the prep report prints: unit, requested, available, chosen, rows_kept, rows_left_out."""
    if unit not in SUBSET_UNITS:
        raise ValueError(f"subset_unit must be one of {list(SUBSET_UNITS)}, got {unit!r}")
    recs = list(records)
    keys = [r["split_key"] if unit == "image" else r["id"] for r in recs]
    keep = subset_indices(keys, n, seed)
    left_out = len(recs) - len(keep)
    if left_out and report is not None:
        report.dropped[SUBSET_REASON] = report.dropped.get(SUBSET_REASON, 0) + left_out
    return [recs[i] for i in keep], subset_summary(keys, keep, n, unit)


def subset_summary(keys: Sequence[str | None], keep: Sequence[int], n: int, unit: str) -> dict:
    """What a subset did, for the prep report: images (or rows) requested, available and chosen,
    source rows kept and left out."""
    return {"unit": unit, "requested": n, "available": len({k for k in keys if k is not None}),
            "chosen": len({keys[i] for i in keep if keys[i] is not None}), "rows_kept": len(keep), "rows_left_out": len(keys) - len(keep)}


def parent(uri: str) -> str:
    """Folder of a file URI (local path or s3://bucket/key)."""
    if storage.is_s3(uri):
        return uri.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(uri))


def resolve_ref(root: str, name: str) -> str:
    """``name`` (absolute path, URL, s3:// URI, or relative to ``root``) -> a fetchable ref."""
    if "://" in name or os.path.isabs(name):
        return name
    return storage.join(root, name)


# ---------------------------------------------------------------------------- fetching


@dataclass(frozen=True)
class FetchOptions:
    """How image bytes are fetched. Picklable: travels to every Ray Data task."""

    cache_dir: str | None = None
    """Local folder caching downloaded URLs by sha256(url); None = no cache. Only successful
    downloads are cached, so a rerun retries the failures."""
    timeout_s: float = 10.0
    """Socket timeout of one HTTP attempt (connect, and each read)."""
    retries: int = 2
    """Extra attempts after a timeout, connection error or HTTP 408/425/429/5xx (not 404 & co)."""
    backoff_s: float = 0.5
    """Sleep before retry k is backoff_s * 2**k."""
    max_bytes: int = 64 * 1024 * 1024
    """Larger bodies count as download_failed (a web image bigger than this is not a photo)."""
    storage: StorageOptions | None = None
    """Endpoint / region for s3:// image refs."""


class _Permanent(Exception):
    pass


class _Transient(Exception):
    pass


def _cache_path(cache_dir: str, url: str) -> str:
    h = hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()
    return os.path.join(cache_dir, h[:2], h)


def _http_get(url: str, opts: FetchOptions) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(req, timeout=opts.timeout_s) as resp:
            data = resp.read(opts.max_bytes + 1)
    except urllib.error.HTTPError as e:
        raise (_Transient if e.code in _TRANSIENT_HTTP else _Permanent)(f"HTTP {e.code}") from None
    except ValueError as e:  # unknown URL type, malformed URL
        raise _Permanent(str(e)) from None
    except (urllib.error.URLError, OSError) as e:  # timeouts, refused / reset connections
        raise _Transient(f"{type(e).__name__}: {e}") from None
    except http.client.HTTPException as e:  # bad status line, incomplete read, ...
        raise _Transient(f"{type(e).__name__}: {e}") from None
    if len(data) > opts.max_bytes:
        raise _Permanent(f"body larger than {opts.max_bytes} bytes")
    return data


def download(url: str, opts: FetchOptions) -> tuple[bytes | None, str | None]:
    """``(bytes, None)`` or ``(None, "download_failed")``, through the on-disk cache."""
    path = _cache_path(opts.cache_dir, url) if opts.cache_dir else None
    if path is not None:
        try:
            with open(path, "rb") as f:
                return f.read(), None
        except FileNotFoundError:
            pass
    for attempt in range(opts.retries + 1):
        try:
            data = _http_get(url, opts)
            break
        except _Permanent as e:
            log.debug("download of %s failed for good: %s", url, e)
            return None, "download_failed"
        except _Transient as e:
            log.debug("download of %s failed (attempt %d): %s", url, attempt + 1, e)
            if attempt == opts.retries:
                return None, "download_failed"
            time.sleep(opts.backoff_s * 2**attempt)
    if path is not None:
        # write-then-rename: concurrent tasks on one node never read a half-written file
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".part-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return data, None


def fetch_bytes(ref: str, opts: FetchOptions | None = None) -> tuple[bytes | None, str | None]:
    """Bytes of an image ref: http(s) URL (cached, retried), s3:// URI, or local path.

    Returns ``(bytes, None)`` or ``(None, reason)`` with a reason from ``FETCH_REASONS``; never raises
    for a bad ref.
    """
    opts = opts or FetchOptions()
    if ref.startswith(("http://", "https://")):
        return download(ref, opts)
    try:
        if storage.is_s3(ref):
            return storage.fsspec_fs(ref, opts.storage).cat_file(storage.strip_scheme(ref)), None
        with open(ref, "rb") as f:
            return f.read(), None
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None, "image_missing"
    except OSError:
        return None, "image_unreadable"


# ---------------------------------------------------------------------------- one record -> one row


@dataclass
class Converted:
    """What a converter's ``to_objects`` makes of one record's annotation."""

    objects: list[Obj] = field(default_factory=list)
    reason: str | None = None
    """Set when the whole row must be dropped (e.g. a PaliGemma suffix with nothing readable)."""
    object_drops: dict[str, int] = field(default_factory=dict)
    """Objects left out of a kept row, by reason (e.g. an unknown label, a zero-size box)."""
    extra: dict | None = None
    """Source data with no canonical type yet (PaliGemma <seg> codes), kept as JSON in the row."""
    notes: list[str] = field(default_factory=list)
    """Row-level notes that are not drops (e.g. "seg_tokens")."""


ToObjects = Callable[[dict, int, int], Converted]
Refine = Callable[[list, Image.Image], tuple[list, dict]]
"""Optional step after conversion that may drop objects with the image at hand:
``(objects, rgb_image) -> (objects_kept, {reason: objects_dropped})``
(``raytrain.data.clean.RegionCleaner`` / ``CaptionSelector``)."""


@dataclass
class Outcome:
    """Result of :func:`process_record`: a shard row, or the reason there is none."""

    row: dict | None
    reason: str | None = None
    notes: list[str] = field(default_factory=list)
    """``converted_from_<MODE>``, ``resized``, plus the converter's notes."""
    object_drops: dict[str, int] = field(default_factory=dict)
    """Objects left out of the kept row (empty for a dropped row: its reason says it all)."""
    captions: list[str] = field(default_factory=list)
    """The kept row's caption texts as converted, before any selection (the prep report's caption
    statistics, `raytrain.data.caption_stats`)."""


def _scale(o: Obj, sx: float, sy: float, w: int, h: int) -> Obj:
    # clamp: x == old width times (new_w / old_w) may land a hair beyond new_w in floating point
    def cx(v: float) -> float:
        return min(max(v * sx, 0.0), float(w))

    def cy(v: float) -> float:
        return min(max(v * sy, 0.0), float(h))

    if isinstance(o, Point):
        return Point(cx(o.x), cy(o.y), o.label)
    if isinstance(o, Box):
        return Box(cx(o.x1), cy(o.y1), cx(o.x2), cy(o.y2), o.label)
    if isinstance(o, Region):
        return Region(cx(o.x1), cy(o.y1), cx(o.x2), cy(o.y2), o.phrase)
    if isinstance(o, Mask):
        small = Image.fromarray(o.to_array().astype(np.uint8) * 255).resize((w, h), Image.NEAREST)
        return Mask.from_array(np.asarray(small) > 127, o.label)
    if isinstance(o, Caption):
        return o
    raise TypeError(f"cannot scale {type(o).__name__}")


def resize_max_side(pil: Image.Image, objs: list[Obj], max_side: int) -> tuple[Image.Image, list[Obj]]:
    """Shrink so the longer side is ``max_side`` pixels (aspect kept), objects scaled with it;
    images already small enough come back unchanged. Masks are resampled nearest-neighbour."""
    w, h = pil.size
    if max_side <= 0 or max(w, h) <= max_side:
        return pil, objs
    s = max_side / max(w, h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    out = pil.resize((nw, nh), Image.BICUBIC)
    return out, [_scale(o, nw / w, nh / h, nw, nh) for o in objs]


def encode(pil: Image.Image, like: bytes) -> bytes:
    """Re-encode an RGB image: JPEG (quality 95) if the original was a JPEG, else PNG."""
    try:
        fmt = Image.open(io.BytesIO(like)).format
    except (OSError, SyntaxError, ValueError):  # only a hint: PNG when unknown
        fmt = None
    buf = io.BytesIO()
    if fmt == "JPEG":
        pil.save(buf, format="JPEG", quality=95)
    else:
        pil.save(buf, format="PNG")
    return buf.getvalue()


def process_record(
    rec: dict,
    to_objects: ToObjects,
    *,
    fetch: FetchOptions | None = None,
    allow_convert: bool = True,
    max_side: int = 0,
    check_sha256: bool = True,
    refine: Refine | None = None,
) -> Outcome:
    """Fetch, decode, validate, convert (and maybe resize) one record into a shard row.

    The row has the shard columns (``raytrain.data.shards.SHARD_SCHEMA``) with ``objects`` as
    JSON in the pixels of the stored image, plus ``extra`` (JSON string or None). Drop reasons,
    in order: ``FETCH_REASONS``; the image reasons of ``validate.decode_image``; ``size_mismatch``
    (declared size differs from the image, so the annotations are in another frame); the
    converter's own; then ``annotations.check_objects``'s.
    """
    data, reason = fetch_bytes(rec["image_ref"], fetch)
    if reason is not None:
        return Outcome(None, reason)
    if check_sha256 and rec.get("sha256") and hashlib.sha256(data).hexdigest() != rec["sha256"].lower():
        return Outcome(None, "hash_mismatch")
    pil, reason, note = validate.decode_image(data, allow_convert=allow_convert)
    if reason is not None:
        return Outcome(None, reason)
    notes = [note] if note else []
    w, h = pil.size
    if (rec.get("width") and int(rec["width"]) != w) or (rec.get("height") and int(rec["height"]) != h):
        return Outcome(None, "size_mismatch")
    try:
        conv = to_objects(json.loads(rec["annotation"]), w, h)
    except (ValueError, KeyError, TypeError) as e:  # a converter bug or a record it did not expect
        log.warning("record %s: cannot convert annotation: %s", rec.get("id"), e)
        return Outcome(None, "bad_annotations")
    if conv.reason is not None:
        return Outcome(None, conv.reason)
    drops = Counter(conv.object_drops)
    reason = check_objects(conv.objects, w, h)
    if reason is not None:
        return Outcome(None, reason)
    objs = conv.objects
    captions = [o.text for o in objs if isinstance(o, Caption)]
    if refine is not None:
        objs, refined = refine(objs, pil)
        drops.update(refined)
    if max_side and max(w, h) > max_side:
        pil, objs = resize_max_side(pil, objs, max_side)
        notes.append("resized")
    image = encode(pil, data) if notes else data
    row = {
        "id": rec["id"],
        "image": image,
        "width": pil.width,
        "height": pil.height,
        "split": rec["split"],
        "source": rec["source"],
        "objects": objects_to_json(objs),
        "extra": json.dumps(conv.extra) if conv.extra is not None else None,
    }
    return Outcome(row, None, notes + list(conv.notes), dict(drops), captions)


def tally(report: PrepReport, outcome: Outcome, object_drops: Counter | None = None, notes: Counter | None = None) -> None:
    """Count a processed record into ``report`` (drops and conversions) and the side counters."""
    if outcome.reason is not None:
        report.dropped[outcome.reason] = report.dropped.get(outcome.reason, 0) + 1
    else:
        for n in outcome.notes:
            if n.startswith("converted_from_") or n == "resized":
                report.converted[n] = report.converted.get(n, 0) + 1
            elif notes is not None:
                notes[n] += 1
    if object_drops is not None:
        object_drops.update(outcome.object_drops)


def iter_rows(
    records: Iterable[dict],
    to_objects: ToObjects,
    report: PrepReport,
    *,
    splits: str | dict[str, float] = "90/10",
    seed: int = 0,
    use_source_split: bool = True,
    fetch: FetchOptions | None = None,
    allow_convert: bool = True,
    max_side: int = 0,
    check_sha256: bool = True,
    refine: Refine | None = None,
    object_drops: Counter | None = None,
    notes: Counter | None = None,
    captions=None,
) -> Iterator[dict]:
    """Sequential (no Ray) records -> canonical shard rows, counting every drop into ``report``.

    For small datasets and tests; ``raytrain.launch.prepare`` runs the same steps on Ray Data.
    The records generator has already counted its rows into ``report.rows_in``; objects left
    out of kept rows and the converters' row notes go to ``object_drops`` / ``notes``, kept rows'
    captions to ``captions`` (a ``caption_stats.CaptionStats``, as `prepare` fills). Write the result
    with ``shards.write_shards`` (not ``prepare_rows``, which would validate and count again).
    """
    for rec in assign_splits(records, splits, seed, use_source_split):
        out = process_record(
            rec, to_objects, fetch=fetch, allow_convert=allow_convert, max_side=max_side,
            check_sha256=check_sha256, refine=refine,
        )
        tally(report, out, object_drops, notes)
        if out.row is not None and captions is not None:
            captions.add(out.captions)
        if out.row is not None:
            report.rows_written[out.row["split"]] = report.rows_written.get(out.row["split"], 0) + 1
            yield out.row
