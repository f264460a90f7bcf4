"""`raytrain prepare`: a source dataset -> Parquet shards per split + a prep report, on Ray Data.

    records       driver: read the annotation files (COCO JSON, JSONL, PixMo rows, VG, captions),
                  count unusable rows, assign each image its split (seeded hash of the image)
      -> ray.data.from_items(records)
      -> map_batches(prepare_batch)    per batch of rows_per_shard records, in parallel tasks:
                  fetch image bytes (threads; URL downloads cached on local disk, retried)
                  -> decode / validate (grayscale, RGBA, CMYK ... -> RGB, counted)
                  -> convert annotations to canonical objects in source pixels
                  -> [clean: VG region de-duplication / caption selection] -> [resize to max side]
                  -> write <out>/<split>/shard-<hash of the batch's ids>-00000.parquet
                  -> return only counts (images never travel back to the driver)
      -> driver: sum the counts -> PrepReport -> <out>/prep_report.json (written last)

The report holds the stage table of seed 000 (Table 1): rows in, after reading annotations,
after fetching images, after filtering empty annotations, after image validation, after
annotation checks, then one line per split, plus every drop reason, conversion, objects left
out of kept rows, and a few example ids per drop reason. Checked invariant: rows in == rows
written + rows dropped, exactly (``PrepReport.check``).

Idempotent like ``shards.prepare_rows``: if ``prep_report.json`` exists with the same parameters
nothing runs; otherwise the old report and shards are removed first and the report written last.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from raytrain import storage
from raytrain.config import PREPARE_FORMATS, Experiment, PrepareConfig
from raytrain.data import caption_stats, shards, validate
from raytrain.data import splits as splits_mod
from raytrain.data.convert import (
    captions,
    coco,
    common,
    jsonl,
    llamafactory,
    ms_swift,
    pixmo_points,
    visual_genome,
)
from raytrain.data.convert.common import Converted
from raytrain.data.shards import REPORT_NAME, PrepReport
from raytrain.formats.annotations import Absent
from raytrain.launch import job
from raytrain.launch.ray_runtime import init_ray
from raytrain.storage import StorageOptions

log = logging.getLogger("raytrain.launch.prepare")

EXAMPLES_PER_REASON = 20


def prepare_config(cfg: Experiment) -> PrepareConfig:
    """What `prepare` runs for ``cfg.data.source = "<format>:<path>"`` (e.g. ``"coco:/data/coco_val"``):
    the output goes to ``cfg.data.uri`` or ``<storage.root>/data/<name>``; splits, seed, rows_per_shard
    and allow_convert come from ``cfg.data``, the source options from ``cfg.data.prepare``."""
    fmt, sep, path = cfg.data.source.partition(":")
    if not sep or fmt not in PREPARE_FORMATS or not path:
        raise ValueError(f"data.source must be synthetic | shards | <format>:<path> with format in {PREPARE_FORMATS}, got {cfg.data.source!r}")
    return PrepareConfig(
        format=fmt,
        path=path,
        out=job.data_uri(cfg),
        splits=dict(cfg.data.splits),
        seed=cfg.data.seed,
        rows_per_shard=cfg.data.rows_per_shard,
        allow_convert=cfg.data.allow_convert,
        storage=job.storage_opts(cfg),
        empty_answer=cfg.data.text.empty_answer,
        **dataclasses.asdict(cfg.data.prepare),
    )


def prepare_data(cfg: Experiment) -> str:
    """The job's shards, ready to read; returns their URI. Synthetic source: generated once
    (idempotent); 'shards': checked to exist; "<format>:<path>": converted once by `prepare` (a Ray
    Data job, reused while its parameters are unchanged). Train and tune call it first."""
    uri = job.data_uri(cfg)
    opts = job.storage_opts(cfg)
    if cfg.data.source == "synthetic":
        report = shards.prepare_synthetic(
            uri,
            n=cfg.data.num_images,
            seed=cfg.data.seed,
            image_size=cfg.data.image_size,
            shapes_per_image=cfg.data.shapes_per_image,
            splits=cfg.data.splits,
            rows_per_shard=cfg.data.rows_per_shard,
            opts=opts,
        )
        print(f"data: {uri}\n{report.format_table()}", flush=True)
    elif cfg.data.source == "shards":
        for split in cfg.train.splits:
            if not shards.shard_paths(uri, split, opts):
                raise FileNotFoundError(f"data.source=shards but no {split!r} shards (train.splits) under {uri} (run `raytrain prepare`)")
    else:
        prepare(prepare_config(cfg))
    return uri


# ----------------------------------------------------------------------------------------------
# source -> records


def source_records(pc: PrepareConfig, report: PrepReport, object_drops: Counter, info: dict | None = None):
    """``(records, to_objects)`` for the configured source; records are counted into ``report``.
    ``subset`` > 0: a seeded random subset of images (or rows, ``subset_unit``), the rest counted as
    ``not_in_subset`` (``common.take_subset``; its summary goes to ``info["subset"]``). Rows that
    come out as negatives only (every object `Absent`) are dropped as ``negative_dropped`` unless
    ``keep_negatives``."""
    info = {} if info is None else info
    recs, to_objects = _source_records(pc, report, object_drops, info)
    if pc.subset and "subset" not in info:
        recs, info["subset"] = common.take_subset(recs, pc.subset, pc.seed, pc.subset_unit, report)
    if pc.keep_negatives:
        return recs, to_objects

    def without_negatives(annotation: dict, width: int, height: int) -> Converted:
        out = to_objects(annotation, width, height)
        if out.objects and all(isinstance(o, Absent) for o in out.objects):
            return Converted(reason="negative_dropped")
        return out

    return recs, without_negatives


def _pixmo_subset(pc: PrepareConfig, rows, report: PrepReport, info: dict):
    """PixMo's subset, drawn on the source rows before any becomes a record (the hub source has
    2.4M rows): the same draw `common.take_subset` makes on records, by image URL or row id."""
    keys = pixmo_points.subset_keys(rows, pc.subset_unit)
    index = common.subset_indices(keys, pc.subset, pc.seed)
    left_out = len(keys) - len(index)
    if left_out:
        common.count(report, common.SUBSET_REASON, left_out)  # never read: counted in and out here
    info["subset"] = common.subset_summary(keys, index, pc.subset, pc.subset_unit)
    return (rows.select(index) if hasattr(rows, "select") else [rows[i] for i in index]), index


def _source_records(pc: PrepareConfig, report: PrepReport, object_drops: Counter, info: dict):
    opts, root = pc.storage, pc.image_root or None
    is_file = pc.path.endswith((".json", ".jsonl", ".csv", ".parquet"))
    if pc.subset_unit not in common.SUBSET_UNITS:
        raise ValueError(f"data.prepare.subset_unit must be one of {list(common.SUBSET_UNITS)}, got {pc.subset_unit!r}")
    if pc.format == "coco":
        ann = pc.path if is_file else coco.find_annotation_file(pc.path, opts)
        recs = coco.records(ann, root, report, masks=pc.masks, opts=opts, object_drops=object_drops)
        return recs, coco.to_objects
    if pc.format == "jsonl":
        path = pc.path if is_file else jsonl.find_jsonl(pc.path, opts)
        return jsonl.records(path, root, report, opts=opts), functools.partial(jsonl.to_objects, empty_answer=pc.empty_answer)
    if pc.format == "pixmo_points":
        rows, index = pixmo_points.load_rows(pc.path, pc.hf_split, opts), None
        if pc.subset:
            rows, index = _pixmo_subset(pc, rows, report, info)
        return pixmo_points.records(rows, report, index=index), pixmo_points.to_objects
    if pc.format == "visual_genome":
        return visual_genome.records(pc.path, None, root, report, opts=opts), visual_genome.to_objects
    if pc.format == "captions":
        path = pc.path
        if not is_file:
            path = next((storage.join(pc.path, n) for n in ("captions.csv", "captions.json") if storage.exists(storage.join(pc.path, n), opts)), "")
            if not path:
                raise FileNotFoundError(f"no captions.csv / captions.json in {pc.path}")
        return captions.records(path, root, report, opts=opts), captions.to_objects
    if pc.format == "ms_swift":
        path = pc.path if is_file else ms_swift.find_file(pc.path, opts)
        return ms_swift.records(path, root, report, opts=opts), ms_swift.to_objects
    if pc.format == "llamafactory":  # resolves its own path: folder, dataset_info.json#name or data file
        return llamafactory.records(pc.path, root, report, opts=opts), llamafactory.to_objects
    raise ValueError(f"unknown format {pc.format!r}, expected one of {PREPARE_FORMATS}")


def build_refine(pc: PrepareConfig):
    """The optional cleaning step (``common.Refine``) for this source, or None."""
    from raytrain.data import clean

    if pc.clean_regions:
        embedder = clean.Embedder(pc.embedder_path or None)
        return clean.RegionCleaner(pc.region_iou, pc.phrase_similarity, embedder)
    if pc.caption_select == "all":
        return None
    if pc.caption_select == "consensus":
        return clean.CaptionSelector(clean.NgramConsensus())
    if pc.caption_select == "consensus_embedding":
        return clean.CaptionSelector(clean.EmbeddingConsensus(clean.Embedder(pc.embedder_path or None)))
    if pc.caption_select == "clip":
        return clean.CaptionSelector(clean.ClipScorer(pc.clip_path))
    raise ValueError(f"caption_select must be all | consensus | consensus_embedding | clip, got {pc.caption_select!r}")


# ----------------------------------------------------------------------------------------------
# the Ray Data stage


def prepare_batch(
    batch: dict,
    *,
    to_objects,
    refine,
    out: str,
    opts: StorageOptions | None,
    fetch: common.FetchOptions,
    allow_convert: bool,
    max_side: int,
    check_sha256: bool,
    threads: int,
) -> dict:
    """One batch of records -> one Parquet file per split under ``out``; returns a single row
    ``{"stats": JSON}`` of counts (drops, conversions, notes, objects left out, rows written,
    files, example ids per drop reason)."""
    n = len(batch["id"])
    recs = [{k: batch[k][i] for k in batch} for i in range(n)]

    def process(rec):
        return common.process_record(
            rec, to_objects, fetch=fetch, allow_convert=allow_convert, max_side=max_side,
            check_sha256=check_sha256, refine=refine,
        )

    with ThreadPoolExecutor(max_workers=max(1, min(threads, n))) as ex:
        outcomes = list(ex.map(process, recs))
    dropped, converted, notes, objs, written = Counter(), Counter(), Counter(), Counter(), Counter()
    examples: dict[str, list[str]] = {}
    caps = caption_stats.CaptionStats()
    rows = []
    for rec, o in zip(recs, outcomes):
        objs.update(o.object_drops)
        if o.reason is not None:
            dropped[o.reason] += 1
            examples.setdefault(o.reason, []).append(str(rec["id"]))
            continue
        caps.add(o.captions)
        for note in o.notes:
            (converted if note.startswith("converted_from_") or note == "resized" else notes)[note] += 1
        written[o.row["split"]] += 1
        rows.append(o.row)
    files: list[str] = []
    if rows:
        # deterministic name per batch content: a retried task overwrites its own file
        digest = hashlib.sha1("\n".join(str(r["id"]) for r in rows).encode()).hexdigest()[:16]
        files = shards.write_shards(rows, out, rows_per_shard=len(rows), opts=opts, prefix=f"shard-{digest}")
    stats = {
        "dropped": dropped, "converted": converted, "notes": notes, "objects_dropped": objs,
        "written": written, "files": files, "examples": {k: v[:EXAMPLES_PER_REASON] for k, v in examples.items()},
        "captions": caps.to_dict() if caps.captions else None,
    }
    return {"stats": np.array([json.dumps(stats)], dtype=object)}


# ----------------------------------------------------------------------------------------------
# report


_STAGES = (
    ("after reading annotations", None),  # reasons counted while reading the annotation files
    ("after random subset", {common.SUBSET_REASON}),  # only with data.prepare.subset
    ("after fetching images", set(common.FETCH_REASONS)),
    ("after filtering empty annotations", {"empty_annotations"}),
    ("after image validation", set(validate.IMAGE_REASONS) | {"size_mismatch"}),
    ("after annotation checks", None),  # everything else
)


def stage_table(report: PrepReport, read_reasons: set[str], order: list[str], subset: bool = False) -> list[tuple[str, int]]:
    """Seed 000's Table 1 for this run: rows left after each stage (the random subset's only when
    one was drawn), then rows per split."""
    last = len(_STAGES) - 1
    stage_of = {}
    for reason in report.dropped:
        k = next((k for k, (_, reasons) in enumerate(_STAGES) if reasons is not None and reason in reasons), None)
        stage_of[reason] = k if k is not None else 0 if reason in read_reasons else last
    rows = [("rows in", report.rows_in)]
    left = report.rows_in
    for k, (name, _) in enumerate(_STAGES):
        left -= sum(n for r, n in report.dropped.items() if stage_of[r] == k)
        if k != 1 or subset:
            rows.append((name, left))
    total = sum(report.rows_written.values()) or 1
    rows += [(f"split: {s} ({100 * report.rows_written.get(s, 0) / total:.0f}%)", report.rows_written.get(s, 0)) for s in order]
    return rows


def _remove_old(out: str, opts: StorageOptions | None) -> None:
    fs = storage.fsspec_fs(out, opts)
    root = storage.strip_scheme(out)
    fs.invalidate_cache(root)
    report = storage.join(out, REPORT_NAME)
    if fs.exists(storage.strip_scheme(report)):
        fs.rm(storage.strip_scheme(report))
    for stale in fs.glob(root.rstrip("/") + "/*/shard-*.parquet"):
        fs.rm(stale)


def _batch_stats(records: list[dict], pc: PrepareConfig, fn_kwargs: dict, local: bool):
    """The per-batch stats rows of `prepare_batch` over `records`: on Ray Data, or (local) in this
    process, batch after batch of rows_per_shard records (the smoke mode's Ray-free run; the same
    function on the same batches, so the same shards and counts)."""
    if local:
        keys = list(dict.fromkeys(k for r in records for k in r))
        for start in range(0, len(records), pc.rows_per_shard):
            chunk = records[start:start + pc.rows_per_shard]
            yield from ({"stats": s} for s in prepare_batch({k: [r.get(k) for r in chunk] for k in keys}, **fn_kwargs)["stats"])
        return
    import ray

    ds = ray.data.from_items(records, override_num_blocks=max(1, math.ceil(len(records) / pc.rows_per_shard)))
    yield from ds.map_batches(prepare_batch, batch_size=pc.rows_per_shard, batch_format="numpy", fn_kwargs=fn_kwargs).iter_rows()


def prepare(pc: PrepareConfig, *, local: bool = False) -> dict:
    """Run the preparation (Ray must be initialised, or Ray Data starts a local instance; with
    `local`, no Ray: the batches run one after another in this process). Returns the report dict
    written to ``<out>/prep_report.json`` (with ``"reused": True`` when shards with the same
    parameters were already there)."""
    params = json.loads(json.dumps(pc.params()))
    opts = pc.storage
    report_uri = storage.join(pc.out, REPORT_NAME)
    if storage.exists(report_uri, opts):
        try:
            old = storage.read_json(report_uri, opts)
            PrepReport.from_dict(old)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable %s: %s", report_uri, e)
        else:
            if old.get("params") == params:
                log.info("prepared data at %s matches the requested parameters; reusing it", pc.out)
                return {**old, "reused": True}
    _remove_old(pc.out, opts)

    # --- records, on the driver
    report, object_drops, info = PrepReport(params=params), Counter(), {}
    recs, to_objects = source_records(pc, report, object_drops, info)
    records = list(common.assign_splits(recs, pc.splits, pc.seed, pc.use_source_split))
    read_reasons = set(report.dropped)
    log.info("%d records from %s (%d rows dropped while reading)", len(records), pc.path, sum(report.dropped.values()))

    # --- fetch / decode / validate / convert / write, on Ray Data
    fetch = common.FetchOptions(
        cache_dir=pc.cache_dir or os.path.expanduser("~/.cache/raytrain/images"),
        timeout_s=pc.timeout_s, retries=pc.retries, storage=opts,
    )
    notes: Counter = Counter()
    written: Counter = Counter()
    examples: dict[str, list[str]] = {}
    files: list[str] = []
    caps = caption_stats.CaptionStats()
    if records:
        fn_kwargs = {
            "to_objects": to_objects, "refine": build_refine(pc), "out": pc.out, "opts": opts,
            "fetch": fetch, "allow_convert": pc.allow_convert, "max_side": pc.max_side,
            "check_sha256": pc.check_sha256, "threads": pc.fetch_threads,
        }
        for row in _batch_stats(records, pc, fn_kwargs, local):
            s = json.loads(row["stats"])
            for k, v in s["dropped"].items():
                report.dropped[k] = report.dropped.get(k, 0) + v
            for k, v in s["converted"].items():
                report.converted[k] = report.converted.get(k, 0) + v
            notes.update(s["notes"])
            object_drops.update(s["objects_dropped"])
            written.update(s["written"])
            files += s["files"]
            for k, v in s["examples"].items():
                examples.setdefault(k, []).extend(v)
            if s.get("captions"):
                caps.merge(s["captions"])

    # --- report, written last
    order = list(splits_mod.resolve(pc.splits)) + sorted(set(written) - set(splits_mod.resolve(pc.splits)))
    report.rows_written = {s: written.get(s, 0) for s in order}
    report.shards = {s: sum(1 for f in files if f.startswith(storage.join(pc.out, s) + "/")) for s in order}
    report.stages = stage_table(report, read_reasons, order, subset=bool(pc.subset))
    report.subset = info.get("subset", {})
    report.statistics = {"captions": caps.summary()} if caps.captions else {}
    report.check()  # rows in == written + dropped, exactly
    if "extra" not in shards.SHARD_SCHEMA.names and notes.get("seg_tokens"):
        notes["seg_tokens_not_stored"] = notes["seg_tokens"]  # the shard schema has no column for them yet
    out = {
        **report.to_dict(),
        "objects_dropped": {k: v for k, v in sorted(object_drops.items()) if v},
        "notes": {k: v for k, v in sorted(notes.items()) if v},
        "examples": {k: sorted(v)[:EXAMPLES_PER_REASON] for k, v in sorted(examples.items())},
    }
    storage.write_json(report_uri, out, opts)
    print(f"data: {pc.out}\n{format_report(out)}", flush=True)
    return out


def format_report(d: dict) -> str:
    """Plain-text table of a report dict: stages (seed 000's Table 1), drop reasons, conversions,
    objects left out of kept rows, notes."""
    lines = [(str(name), int(n)) for name, n in d["stages"]]
    lines += [(f"dropped: {k}", n) for k, n in d.get("dropped", {}).items()]
    lines += [(f"kept, {k}", n) for k, n in d.get("converted", {}).items()]
    lines += [(f"objects left out: {k}", n) for k, n in d.get("objects_dropped", {}).items()]
    lines += [(f"note: {k}", n) for k, n in d.get("notes", {}).items()]
    sub = d.get("subset")
    if sub:
        lines.append((f"random subset: {sub['unit']}s chosen of {sub['available']:,}", sub["chosen"]))
    width = max([len("stage")] + [len(k) for k, _ in lines])
    out = [f"{'stage':<{width}}  {'rows':>9}", f"{'-' * width}  {'-' * 9}"]
    out += [f"{k:<{width}}  {n:>9,}" for k, n in lines]
    return "\n".join(out + shards.statistics_lines(d.get("statistics", {})))


def main(cfg: Experiment, prep: PrepareConfig | None = None) -> dict[str, Any] | str:
    """`raytrain prepare --config ...`: ``data.source`` synthetic / shards go through
    :func:`prepare_data`; ``<format>:<path>`` runs :func:`prepare` on Ray."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if prep is None and cfg.data.source in ("synthetic", "shards"):
        return prepare_data(cfg)
    pc = prep or prepare_config(cfg)
    init_ray(cfg.ray)
    return prepare(pc)
