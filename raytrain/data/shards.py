"""The one shard schema, its writer and reader helpers, and the prep report.

Layout of a prepared dataset at ``<uri>`` (local dir or ``s3://bucket/prefix``)::

    <uri>/prep_report.json            written LAST: its presence means the shards are complete
    <uri>/<split>/shard-00000.parquet one folder per split, each file <= rows_per_shard rows
    <uri>/<split>/shard-00001.parquet

Writes go through fsspec (s3fs for S3): small files are one PutObject, large ones a multipart
upload that boto parses leniently. Reads (``shard_source``) use pyarrow's native S3 filesystem,
which is what ``ray.data.read_parquet(paths, filesystem=fs)`` wants (see ``raytrain.storage``).
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raytrain import storage
from raytrain.data import synthetic, validate
from raytrain.formats.annotations import objects_to_json
from raytrain.storage import StorageOptions

log = logging.getLogger(__name__)

SHARD_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False, metadata={"doc": "unique example id within the dataset"}),
        pa.field("image", pa.binary(), nullable=False, metadata={"doc": "encoded image bytes as given (PNG/JPEG/...)"}),
        pa.field("width", pa.int32(), nullable=False, metadata={"doc": "source image width in pixels"}),
        pa.field("height", pa.int32(), nullable=False, metadata={"doc": "source image height in pixels"}),
        pa.field("split", pa.string(), nullable=False, metadata={"doc": "train / val / test / ..."}),
        pa.field("source", pa.string(), nullable=False, metadata={"doc": "dataset the row came from"}),
        pa.field(
            "objects",
            pa.string(),
            nullable=False,
            metadata={"doc": "annotations.objects_to_json: Points/Boxes in SOURCE-IMAGE pixels"},
        ),
        pa.field(
            "extra",
            pa.string(),
            nullable=True,
            metadata={"doc": "JSON of source data kept verbatim that has no canonical type yet (e.g. PaliGemma <seg> codes)"},
        ),
    ]
)
"""Columns: ``id``, ``image`` (encoded bytes, never decoded pixels: 10-50x smaller), ``width`` and
``height`` (of the encoded image, in pixels; ``validate.check_row`` checks them), ``split``,
``source`` (dataset name, e.g. "synthetic"), ``objects`` (JSON of ``Point``/``Box`` in source pixels),
``extra`` (nullable JSON: source data kept verbatim, so nothing a user gave is lost)."""

REPORT_NAME = "prep_report.json"
REPORT_VERSION = 1
_ROW_GROUP_ROWS = 128  # bounds reader memory per row group when images are large


# ---------------------------------------------------------------------------- writing


def _shard_uri(uri: str, split: str, prefix: str, k: int) -> str:
    return storage.join(uri, split, f"{prefix}-{k:05d}.parquet")


def _to_table(rows: list[dict]) -> pa.Table:
    cols: dict[str, list] = {f.name: [] for f in SHARD_SCHEMA}
    for row in rows:
        objs = row["objects"]
        cols["id"].append(str(row["id"]))
        cols["image"].append(bytes(row["image"]))
        cols["width"].append(int(row["width"]))
        cols["height"].append(int(row["height"]))
        cols["split"].append(str(row["split"]))
        cols["source"].append(str(row.get("source") or ""))
        cols["objects"].append(objs if isinstance(objs, str) else objects_to_json(objs))
        extra = row.get("extra")
        cols["extra"].append(extra if extra is None or isinstance(extra, str) else json.dumps(extra))
    return pa.table(cols, schema=SHARD_SCHEMA)


def _write_table(table: pa.Table, uri: str, opts: StorageOptions | None) -> None:
    fs = storage.fsspec_fs(uri, opts)
    with fs.open(storage.strip_scheme(uri), "wb") as f:
        # Images are already compressed (PNG/JPEG): don't spend CPU re-compressing them.
        pq.write_table(
            table,
            f,
            row_group_size=_ROW_GROUP_ROWS,
            compression={**{name: "zstd" for name in SHARD_SCHEMA.names}, "image": "none"},
        )


def write_shards(
    rows: Iterable[dict],
    uri: str,
    *,
    rows_per_shard: int = 1000,
    opts: StorageOptions | None = None,
    prefix: str = "shard",
) -> list[str]:
    """Write ``rows`` as Parquet shards ``<uri>/<split>/<prefix>-00000.parquet`` ...

    Rows need ``id, image, width, height, split, objects`` (a list of ``Point``/``Box`` or its
    JSON string) and optionally ``source``; extra keys are ignored. Rows are buffered per split,
    so at most ``rows_per_shard`` rows per split are held in memory. Existing files of the same
    name are overwritten; others are left alone. Returns the written file URIs, sorted.
    """
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    buffers: dict[str, list[dict]] = {}
    counters: dict[str, int] = {}
    written: list[str] = []

    def flush(split: str) -> None:
        out = _shard_uri(uri, split, prefix, counters.get(split, 0))
        _write_table(_to_table(buffers.pop(split)), out, opts)
        counters[split] = counters.get(split, 0) + 1
        written.append(out)

    for row in rows:
        split = str(row["split"])
        if not split or "/" in split or split in (".", ".."):
            raise ValueError(f"split must be a single path segment, got {split!r}")
        buffers.setdefault(split, []).append(row)
        if len(buffers[split]) >= rows_per_shard:
            flush(split)
    for split in list(buffers):
        flush(split)
    return sorted(written)


# ---------------------------------------------------------------------------- reading


def _as_uri(uri: str, path: str) -> str:
    return storage.S3_SCHEME + path if storage.is_s3(uri) else path


def shard_paths(uri: str, split: str, opts: StorageOptions | None = None) -> list[str]:
    """Sorted URIs of the Parquet files of one split (empty if the split has none)."""
    split_uri = storage.join(uri, split)
    fs = storage.fsspec_fs(split_uri, opts)
    root = storage.strip_scheme(split_uri)
    fs.invalidate_cache(root)  # files may have been written by another process since
    paths = [p for p in fs.glob(posixpath.join(root, "*.parquet"))] if fs.isdir(root) else []
    return sorted(_as_uri(uri, p) for p in paths)


def shard_source(uri: str, split: str, opts: StorageOptions | None = None):
    """``(paths, pyarrow_filesystem)`` for ``ray.data.read_parquet(paths, filesystem=fs)``
    or ``pyarrow.parquet.read_table(path, filesystem=fs)``: paths carry no ``s3://``."""
    fs, _ = storage.pyarrow_fs(uri, opts)
    return [storage.strip_scheme(p) for p in shard_paths(uri, split, opts)], fs


def read_split(uri: str, split: str, opts: StorageOptions | None = None) -> pa.Table:
    """One split as a single in-memory table (for tests and small eval sets, not training)."""
    paths, fs = shard_source(uri, split, opts)
    if not paths:
        return SHARD_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(p, filesystem=fs, schema=SHARD_SCHEMA) for p in paths])


# ---------------------------------------------------------------------------- prep report


@dataclass
class PrepReport:
    """Counts of one dataset preparation, stage by stage (cf. seed report 000, Table 1).

    Invariant: ``rows_in == sum(rows_written.values()) + sum(dropped.values())``: every row
    that came in was either written to some split or dropped with a reason.
    """

    rows_in: int = 0
    rows_written: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    converted: dict[str, int] = field(default_factory=dict)
    """Rows kept after a conversion (``converted_from_RGBA`` ...): counted, not dropped."""
    stages: list[tuple[str, int]] = field(default_factory=list)
    """Ordered ``(stage_name, rows_after_stage)``: the table a paper would print."""
    shards: dict[str, int] = field(default_factory=dict)
    """Number of Parquet files per split."""
    params: dict[str, Any] = field(default_factory=dict)
    """Everything that determines the output; equal params => the prepared data is reused."""
    subset: dict[str, Any] = field(default_factory=dict)
    """The random subset (data.prepare.subset): unit, requested, available, chosen, rows kept / left out."""
    statistics: dict[str, Any] = field(default_factory=dict)
    """Dataset statistics of what was kept: "captions" (seed 003's: lengths, duplicates, caption vs
    caption BLEU; `raytrain.data.caption_stats`)."""
    reused: bool = False
    """True when this report was read back instead of preparing again (not persisted)."""

    def check(self) -> None:
        out = sum(self.rows_written.values()) + sum(self.dropped.values())
        if self.rows_in != out:
            raise ValueError(
                f"prep report does not add up: rows_in={self.rows_in} != written "
                f"{sum(self.rows_written.values())} + dropped {sum(self.dropped.values())}"
            )

    def to_dict(self) -> dict:
        self.check()
        return {
            "version": REPORT_VERSION,
            "params": self.params,
            "rows_in": self.rows_in,
            "rows_written": dict(self.rows_written),
            "dropped": dict(sorted(self.dropped.items())),
            "converted": dict(sorted(self.converted.items())),
            "shards": dict(self.shards),
            "stages": [[name, count] for name, count in self.stages],
            **({"subset": dict(self.subset)} if self.subset else {}),
            **({"statistics": dict(self.statistics)} if self.statistics else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> PrepReport:
        report = cls(
            rows_in=int(d["rows_in"]),
            rows_written={k: int(v) for k, v in d["rows_written"].items()},
            dropped={k: int(v) for k, v in d["dropped"].items()},
            converted={k: int(v) for k, v in d.get("converted", {}).items()},
            stages=[(str(n), int(c)) for n, c in d["stages"]],
            shards={k: int(v) for k, v in d.get("shards", {}).items()},
            params=d.get("params", {}),
            subset=d.get("subset", {}),
            statistics=d.get("statistics", {}),
        )
        report.check()
        return report

    def write(self, uri: str, opts: StorageOptions | None = None) -> str:
        """Write ``<uri>/prep_report.json``; returns its URI."""
        return storage.write_json(storage.join(uri, REPORT_NAME), self.to_dict(), opts)

    @classmethod
    def read(cls, uri: str, opts: StorageOptions | None = None) -> PrepReport:
        return cls.from_dict(storage.read_json(storage.join(uri, REPORT_NAME), opts))

    def format_table(self) -> str:
        """Plain-text table: stages with counts, then drop reasons and conversions."""
        lines = [(name, count) for name, count in self.stages]
        lines += [(f"dropped: {reason}", n) for reason, n in sorted(self.dropped.items())]
        lines += [(f"kept, {note}", n) for note, n in sorted(self.converted.items())]
        width = max([len("stage")] + [len(n) for n, _ in lines])
        out = [f"{'stage':<{width}}  {'rows':>9}", f"{'-' * width}  {'-' * 9}"]
        out += [f"{name:<{width}}  {count:>9,}" for name, count in lines]
        out += statistics_lines(self.statistics)
        if self.reused:
            out.append("(reused: shards with these parameters already existed)")
        return "\n".join(out)


def statistics_lines(statistics: dict) -> list[str]:
    """The prep report's dataset statistics as printed lines (after the stage table)."""
    from raytrain.data import caption_stats

    lines = caption_stats.summary_lines(statistics.get("captions", {}))
    if not lines:
        return []
    width = max(len(k) for k, _ in lines)
    return ["", "caption statistics (before selection):"] + [f"  {k:<{width}}  {v}" for k, v in lines]


def validate_rows(rows: Iterable[dict], report: PrepReport, *, allow_convert: bool = True) -> Iterator[dict]:
    """Yield the rows that pass ``validate.check_row``, counting every row into ``report``.

    Converted images are re-encoded as PNG so the shards hold RGB only and readers never
    convert again; rows are otherwise passed on unchanged (without the decoded image).
    """
    for row in rows:
        report.rows_in += 1
        out, reason, note = validate.check_row(row, allow_convert=allow_convert)
        if reason is not None:
            report.dropped[reason] = report.dropped.get(reason, 0) + 1
            continue
        pil = out.pop("pil")
        if note is not None:
            report.converted[note] = report.converted.get(note, 0) + 1
            buf = io.BytesIO()
            pil.save(buf, format="PNG")
            out["image"] = buf.getvalue()
        yield out


def _normalise(params: dict) -> dict:
    # JSON round trip: tuples become lists, int keys strings, so stored == fresh compares fairly.
    return json.loads(json.dumps(params))


def prepare_rows(
    rows: Iterable[dict],
    uri: str,
    *,
    params: dict,
    first_stage: str = "rows in",
    rows_per_shard: int = 1000,
    opts: StorageOptions | None = None,
    allow_convert: bool = True,
) -> PrepReport:
    """Validate ``rows`` and write them as shards plus ``prep_report.json`` under ``uri``.

    Idempotent: when ``<uri>/prep_report.json`` already records the same ``params``, nothing is
    read or written and the stored report comes back with ``reused=True``. Otherwise the old
    report is removed first and written again last, so an interrupted run is never mistaken
    for a finished one; stale shards of earlier runs are deleted.
    """
    splits = list(params.get("splits") or [])  # in the caller's order, for the report
    params = _normalise({**params, "rows_per_shard": rows_per_shard, "allow_convert": allow_convert})
    report_uri = storage.join(uri, REPORT_NAME)
    fs = storage.fsspec_fs(uri, opts)
    fs.invalidate_cache(storage.strip_scheme(uri))
    old_splits: list[str] = []
    if fs.exists(storage.strip_scheme(report_uri)):
        try:
            old = PrepReport.read(uri, opts)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable %s: %s", report_uri, e)
        else:
            if old.params == params:
                old.reused = True
                log.info("prepared data at %s matches the requested parameters; reusing it", uri)
                return old
            old_splits = list(old.rows_written)
        fs.rm(storage.strip_scheme(report_uri))

    for split in dict.fromkeys(old_splits + splits):
        for stale in shard_paths(uri, split, opts):
            fs.rm(storage.strip_scheme(stale))

    report = PrepReport(params=params)
    kept: dict[str, int] = {}

    def counted(rows: Iterable[dict]) -> Iterator[dict]:
        for row in rows:
            kept[row["split"]] = kept.get(row["split"], 0) + 1
            yield row

    files = write_shards(
        counted(validate_rows(rows, report, allow_convert=allow_convert)),
        uri,
        rows_per_shard=rows_per_shard,
        opts=opts,
    )
    order = splits + sorted(set(kept) - set(splits))
    report.rows_written = {s: kept.get(s, 0) for s in order}
    report.shards = {s: sum(1 for f in files if f.startswith(storage.join(uri, s) + "/")) for s in order}
    report.stages = [(first_stage, report.rows_in), ("after validation", sum(kept.values()))]
    report.stages += [(f"split: {s}", report.rows_written[s]) for s in order]
    report.write(uri, opts)
    log.debug("prepared %s:\n%s", uri, report.format_table())  # the launcher prints the report (once)
    return report


def prepare_synthetic(
    uri: str,
    *,
    n: int,
    seed: int = 0,
    image_size: int = 64,
    shapes_per_image: int = 1,
    splits: dict[str, float] | None = None,
    rows_per_shard: int = 1000,
    opts: StorageOptions | None = None,
) -> PrepReport:
    """Generate the synthetic shapes dataset, validate it and write shards + report to ``uri``."""
    splits = splits if splits is not None else {"train": 0.9, "val": 0.05, "test": 0.05}
    params = {
        "dataset": synthetic.SOURCE,
        "n": n,
        "seed": seed,
        "image_size": image_size,
        "shapes_per_image": shapes_per_image,
        "splits": splits,
    }
    rows = synthetic.generate_rows(n, seed, image_size, shapes_per_image, splits)
    return prepare_rows(rows, uri, params=params, first_stage="generated", rows_per_shard=rows_per_shard, opts=opts)
