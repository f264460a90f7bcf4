"""Smoke mode on a job's own data: a small local copy of its source (tests/assets/ holds one per
seed) through the job's converter and text, instead of synthetic shapes.

`fixture_data` keeps the job's data section as it is — converter (`data.source` format), tasks,
prompts / system prompt / "nothing found" answer and multi-label grouping (`data.text`),
preprocessing, source options (`data.prepare`: subset, negatives, cleaning, sha256 checks) — and
changes only what a few-row local copy needs:

* the source path becomes the fixture (a file or a folder, as the converter takes it);
* every row goes to one split, `FIXTURE_SPLIT`, which training reads and the smoke evaluation
  decodes (a fixture has 3-10 rows: a hashed 80/10/10 split would leave the evaluation empty, and
  the run proves the path, not generalisation); the job's own split options are set aside;
* downloads are cached under the smoke run's root, not the user's cache;
* a CLIP caption selection whose weights folder is not on this machine (a cluster path) selects
  by n-gram consensus instead, and says so.

`prepare_fixture` runs `raytrain prepare`'s own code (launch/prepare.py, `local=True`: the same
batches, no Ray) into the run's data folder; `fixture_examples` reads the shards back through the
pipeline's example rendering (`training.validation.load_examples`, the Ray-free reader the
in-training validation uses: decode, validate, preprocess, render prefix / suffix in the family's
format).
"""

from __future__ import annotations

import dataclasses
import os

from raytrain import config as config_mod
from raytrain import storage
from raytrain.config import Experiment

FIXTURE_SPLIT = "train"


def fixture_data(data: config_mod.DataConfig, path: str | os.PathLike, root: str) -> tuple[config_mod.DataConfig, list[str]]:
    """(the job's data section pointed at the local copy `path`, notes on what changed)."""
    fmt, sep, _ = data.source.partition(":")
    if not sep or fmt not in config_mod.PREPARE_FORMATS:
        raise ValueError(f"a smoke run on local data needs a job whose data.source is <format>:<path> "
                         f"(format in {config_mod.PREPARE_FORMATS}), this one reads {data.source!r}")
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"smoke data not found: {path}")
    notes = [(f"data: {fmt} converter on {path} (the job reads {data.source}); every row in split {FIXTURE_SPLIT!r}, "
              "trained on and decoded by the smoke evaluation")]
    prep = dataclasses.replace(data.prepare, use_source_split=False, cache_dir=storage.join(root, "image-cache"))
    if prep.caption_select == "clip" and not os.path.isdir(prep.clip_path):
        notes.append(f"caption selection: no CLIP weights at {prep.clip_path!r} on this machine; selecting by n-gram consensus")
        prep = dataclasses.replace(prep, caption_select="consensus")
    new = dataclasses.replace(data, source=f"{fmt}:{path}", uri="", splits={FIXTURE_SPLIT: 1.0}, rows_per_shard=64, prepare=prep)
    return new, notes


def prepare_fixture(cfg: Experiment) -> dict:
    """The job's converter on its fixture, Ray-free, into the smoke run's data folder (reused while
    its parameters are unchanged, as `raytrain prepare` does). Returns the prep report."""
    from raytrain.launch import prepare

    return prepare.prepare(prepare.prepare_config(cfg), local=True)


def fixture_examples(cfg: Experiment, processor, split: str = FIXTURE_SPLIT, limit: int = 10_000, prep=None) -> dict:
    """Every example of the prepared `split`, rendered as training renders them: the image as the
    model sees it (data.preprocess), prefix / suffix in the job's format and text, number spans,
    targets in source pixels, content box (a columnar batch, pipeline layout). `prep`: the
    preprocessing to apply (default data.preprocess; eval passes a checkpoint's recorded one)."""
    from raytrain.data import preprocess
    from raytrain.launch import job
    from raytrain.training import validation

    fam, prep = cfg.model_family(), prep or cfg.data.preprocess
    return validation.load_examples(job.data_uri(cfg), split, limit, tasks=cfg.data.tasks,
                                    image_hw=preprocess.frame_for(fam, processor, prep), family=fam,
                                    allow_convert=cfg.data.allow_convert, preprocess=prep, opts=job.storage_opts(cfg))
