"""Ray Data pipeline: shards -> decode/validate -> resize -> render targets -> tokenize.

All of it runs in CPU tasks; training workers only see ready tensors through
`ray.train.get_dataset_shard`. Every row that does not make it through is counted with its reason
in a small named actor (`DropCounter`), so a run reports what it skipped instead of losing it.

Stages (each a plain function over one numpy batch, so they are testable without Ray):
  decode_and_expand   validated image (preprocessed to the model's input: stretch, letterbox or
                      the family's native per-image size, optional edge blend;
                      raytrain/data/preprocess.py) + one example per (task, label) with
                      prefix/suffix text rendered from source-pixel objects in the frame of that
                      input; `content_box` says where the source lies in it. Images of different
                      sizes (native) make a ragged `image` column (an object array of HxWx3 arrays)
  tokenize            the model processor's encoding, fixed length; too-long rows are counted;
                      `example_keys` identifies each example (`example_keys`), for the data
                      position a checkpoint records (raytrain/data/packing.py filters it)

For training both stages run as ONE generator over a whole read block (`prepare_block`), which
Ray Data fuses with the Parquet read into a single task: no intermediate Arrow block of decoded
images between the stages, one drop-count report per block, and few, longer tasks (Ray Data
leaves a 0.1-0.3 s gap on a CPU slot between consecutive tasks). bench/data_pipeline.py measures it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from collections import Counter
from typing import Sequence

import numpy as np
from PIL import Image

from raytrain import storage
from raytrain import tasks as task_registry
from raytrain.data import preprocess as preprocess_mod
from raytrain.data import shards, validate
from raytrain.formats.numbers import NumberSpan
from raytrain.models.text_options import LABEL_SEPARATOR
from raytrain.formats.annotations import Absent, Box, Caption, Region, objects_from_json, objects_to_json
from raytrain.models import family as model_family

log = logging.getLogger(__name__)



# ----------------------------------------------------------------------------------------------
# drop accounting


def _counter_cls():
    import ray

    @ray.remote(num_cpus=0)
    class DropCounter:
        """Counts rows per (split, stage/reason); data tasks `add` (and wait) once per batch."""

        def __init__(self):
            self.counts: dict[str, Counter] = {}

        def add(self, split: str, counts: dict) -> None:
            self.counts.setdefault(split, Counter()).update(counts)

        def get(self) -> dict:
            return {k: dict(v) for k, v in self.counts.items()}

    return DropCounter


def drop_counter():
    """A counter actor owned by the driver and placed on the driver's node (a lost worker node must
    not take the run's counts, or the data tasks reporting to it, down with it); its handle travels
    to every data task of the run."""
    return _counter_cls().options(scheduling_strategy=on_this_node()).remote()


def on_this_node():
    """A scheduling strategy that places an actor on this process's node, and only there: the
    run's driver-side actors (drop counter, epoch filter, the console's report queue) must outlive
    any worker node. A soft affinity is not enough: with the driver's raylet busy starting workers,
    Ray placed such actors on other nodes (seen: 3 of 6 on a worker node, which a node loss then
    took down with the run)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


def drop_counts(counter) -> dict:
    """The run's counts per split, for the metrics. A counter lost with its node (it is placed on
    the driver's node, but placement is soft) must not fail a finished run: the loss is logged and
    recorded in place of the counts."""
    import ray

    try:
        return ray.get(counter.get.remote(), timeout=120)
    except (ray.exceptions.RayError, TimeoutError) as e:
        log.warning("drop counter unavailable (%s: %s): this run's drop counts are lost", type(e).__name__, e)
        return {"unavailable": f"drop counter lost: {type(e).__name__}"}


def _report(counter, split: str, counts: Counter) -> None:
    """Add a batch's counts and wait for the actor to take them: calls from different processes
    have no order, so a fire-and-forget `add` could land after the driver has already asked for
    the totals (seen in the test suite: a split missing from the counts). One round trip per batch.
    If the counter itself is gone, the batch still goes through and the lost counts are logged."""
    if counter is not None and counts:
        import ray

        try:
            ray.get(counter.add.remote(split, dict(counts)), timeout=120)
        except (ray.exceptions.RayError, TimeoutError) as e:  # bookkeeping never fails the data task
            log.warning("drop counter unavailable (%s); counts of this batch not recorded: %s %s", type(e).__name__, split, dict(counts))


# ----------------------------------------------------------------------------------------------
# stage 1: decode, validate, resize, expand into (task, label) examples


def examples_for(objs: Sequence, tasks: Sequence[str], width: int, height: int, family, image_hw=None,
                 geometry: preprocess_mod.Geometry | None = None) -> list[dict]:
    """One example per task and distinct label: the target is every object of that label and of
    the task's kind (points for 'point', boxes for 'detect'), rendered in the family's format; with
    the family's `multi_label` one example per task with every label ("detect cat ; dog", objects
    in the query's label order). A label the image is marked `Absent` for (a negative) gives an
    example whose answer is the format's "nothing found" answer and whose targets are empty.
    `family`: a spec or a family object (its prompts, empty answer and grouping bound by `with_text`).
    `geometry` (source -> model input): targets are rendered in the frame the model sees (a
    letterbox's padded input); None = the image fills the input. "targets" stay in source pixels;
    "numbers" (JSON [[start, end, range], ...]) are the suffix's coordinates written as digits, as
    the format rendered them (the number loss's positions; [] for <loc> formats).
    Raises ValueError for labels the format cannot carry (e.g. PaliGemma: empty, ';' or '<')."""
    fam = model_family(family)

    def example(task, query, targets):
        args = (targets, width, height) if geometry is None else geometry.target_frame(targets)
        prefix, suffix = fam.render_example(task, query, *args, image_hw)
        numbers = json.dumps([list(n) for n in fam.answer_numbers(task, query, *args, image_hw)])
        return {"task": task, "query": query, "prefix": prefix, "suffix": suffix, "numbers": numbers, "targets": objects_to_json(targets)}

    out = []
    labels = sorted({o.label for o in objs if not isinstance(o, (Caption, Region))})
    absent = {o.label for o in objs if isinstance(o, Absent)}
    for task in tasks:
        spec = task_registry.get(task)
        kind = spec.object_type
        # per-image tasks (caption, dense caption) ask once about all the image's objects of the kind;
        # a caption trains on the image's first caption (the one `prepare`'s selection kept) and
        # keeps all captions as references for evaluation
        if spec.per_image:
            targets = [o for o in objs if isinstance(o, kind)]
            if targets:
                out.append(example(task, "", targets))
            continue
        asked = [lb for lb in labels if lb in absent or any(isinstance(o, kind) and o.label == lb for o in objs)]
        groups = [asked] if (fam.multi_label and asked) else [[lb] for lb in asked]
        for group in groups:
            targets = [o for lb in group for o in objs if isinstance(o, kind) and o.label == lb]
            out.append(example(task, LABEL_SEPARATOR.join(group), targets))
    return out


def decode_and_expand(
    batch: dict,
    *,
    split: str,
    tasks: Sequence[str],
    image_hw: tuple[int, int],
    family: str,
    allow_convert: bool = True,
    counter=None,
    preprocess: preprocess_mod.Preprocess | dict | None = None,
    counts: Counter | None = None,
) -> dict:
    """Shard rows -> examples. Images are preprocessed to the model input size here, once, on CPU
    (`preprocess`: a Preprocess, its record dict, or None = stretch without edges); "targets" stay
    in source pixels, the target TEXT is rendered in the model input's frame, and "content_box"
    (x0, y0, x1, y1) records where the source image lies in the input, for parsing back.
    `counts` (optional): add the drop counts there and leave reporting to the caller."""
    prep = preprocess_mod.coerce(preprocess)
    fam = model_family(family)
    report = counts is None
    counts = Counter() if counts is None else counts
    cols: dict[str, list] = {k: [] for k in ("id", "task", "query", "prefix", "suffix", "numbers", "targets", "width", "height", "image",
                                             "content_box")}
    n = len(batch["id"])
    counts["rows_read"] += n
    for i in range(n):
        row = {k: batch[k][i] for k in ("id", "image", "width", "height", "objects")}
        row["image"] = bytes(row["image"]) if row["image"] is not None else None
        checked, reason, note = validate.check_row(row, allow_convert=allow_convert)
        if reason is not None:
            counts[f"dropped:{reason}"] += 1
            continue
        if note:
            counts[f"converted:{note}"] += 1
        objs = objects_from_json(row["objects"]) if isinstance(row["objects"], str) else row["objects"]
        geom = preprocess_mod.geometry_for(fam, prep, image_hw, checked["width"], checked["height"])
        try:
            exs = examples_for(objs, tasks, checked["width"], checked["height"], family, (geom.out_h, geom.out_w), geom)
        except ValueError as e:
            if type(e).__name__ == "MaskCodecMissing":
                raise  # a configuration error, not a bad row: every segment row would be dropped
            counts["dropped:unrenderable_label"] += 1
            continue
        if not exs:
            counts["dropped:no_target_for_tasks"] += 1
            continue
        arr = preprocess_mod.apply(prep, checked["pil"], geom)
        counts["rows_kept"] += 1
        for ex in exs:
            cols["id"].append(str(row["id"]))
            cols["width"].append(int(checked["width"]))
            cols["height"].append(int(checked["height"]))
            cols["image"].append(arr)
            cols["content_box"].append(geom.content_box)
            for k in ("task", "query", "prefix", "suffix", "numbers", "targets"):
                cols[k].append(ex[k])
        counts["examples"] += len(exs)
    if report:
        _report(counter, split, counts)
    out = {k: np.array(v, dtype=object) for k, v in cols.items() if k not in ("image", "content_box")}
    out["content_box"] = np.array(cols["content_box"], dtype=np.int32).reshape(-1, 4)
    out["width"] = np.array(cols["width"], dtype=np.int32)
    out["height"] = np.array(cols["height"], dtype=np.int32)
    out["image"] = _column(cols["image"]) if cols["image"] else np.zeros((0, 1, 1, 3), np.uint8)
    return out


def _column(arrays: list) -> np.ndarray:
    """Stacked when every array has one shape; else a 1-D object array (a ragged Ray Data column)."""
    if all(a.shape == arrays[0].shape for a in arrays):
        return np.stack(arrays)
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


def example_keys(ids, task_names, queries) -> np.ndarray:
    """(n,) int64 key of each example: 8 bytes of BLAKE2b over (image id, task, query), the same in
    every process and on every run (Python's hash() is salted per process), so a checkpoint can
    record which examples an epoch has trained on whatever the number of workers that read them."""
    out = np.empty(len(ids), dtype=np.int64)
    for i, (a, t, q) in enumerate(zip(ids, task_names, queries)):
        h = hashlib.blake2b(f"{a}\x1f{t}\x1f{q}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(h, "little", signed=True)
    return out


# ----------------------------------------------------------------------------------------------
# stage 2: tokenize with the model's processor


@functools.lru_cache(maxsize=2)
def _processor(family: str, model_path: str):
    # Cached per worker process: Ray reuses task workers, so the processor loads once per process.
    return model_family(family).load_processor(model_path)


def tokenize(batch: dict, *, split: str, model_path: str, max_len: int, family: str, counter=None,
             counts: Counter | None = None) -> dict:
    """Examples -> fixed-length model inputs. Examples longer than max_len are dropped and counted
    (cutting them would teach the model truncated objects). `counts`: as in decode_and_expand."""
    n = len(batch["prefix"])
    if n == 0:
        return {}
    proc = _processor(family, model_path)
    images = [Image.fromarray(a) for a in batch["image"]]
    numbers = [[NumberSpan(*n) for n in json.loads(str(js))] for js in batch["numbers"]] if "numbers" in batch else None
    enc = model_family(family).encode_train(proc, images, list(batch["prefix"]), list(batch["suffix"]), max_len, numbers)
    fits = enc.pop("length") <= max_len
    if "id" in batch:  # (n, 1): one example per row; packed rows hold several (data/packing.py)
        enc["example_keys"] = example_keys(batch["id"], batch["task"], batch["query"])[:, None]
    mine = Counter({"tokenized": int(fits.sum())})
    if (~fits).any():
        mine["dropped:too_long"] += int((~fits).sum())
    if counts is None:
        _report(counter, split, mine)
    else:
        counts.update(mine)
    return {k: _take(v, fits) for k, v in enc.items()}


def _take(v: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Rows of a column; a ragged column whose kept rows share a shape becomes a stacked one."""
    v = v[keep]
    return _column(list(v)) if v.dtype == object and len(v) else v


def _chunks(batch: dict, size: int):
    n = len(next(iter(batch.values()))) if batch else 0
    for start in range(0, n, size):
        yield {k: v[start:start + size] for k, v in batch.items()}


# Output block size raytrain asks Ray Data for (launch.train.configure_ray_data sets it as the
# DataContext's target_max_block_size): a training task then hands its examples over as it goes,
# in several blocks, rather than in one 128 MiB block at its end. ~110 examples at 224 px, ~1,300
# at the tiny preset's 64 px.
BLOCK_BYTES = 16 * 1024**2

# prepare_block hands its examples to Ray in pieces of at least this size. Ray converts every
# yielded batch to an Arrow table and concatenates batches into output blocks, so 64-example pieces
# cost ~0.05 CPU ms/image more than ~1,000-example ones (bench/data_pipeline.py, 64 px); pieces of
# a whole block are emitted as they are, with no concatenation (+1-2 % images/s over half-block
# pieces in an interleaved A/B, bench/README.md).
YIELD_BYTES = BLOCK_BYTES


def prepare_block(block: dict, *, split: str, tasks, image_hw, model_path: str, max_len: int, family: str,
                  allow_convert: bool = True, counter=None, preprocess=None, batch_size: int = 64, yield_bytes: int = YIELD_BYTES):
    """A whole read block (any number of shard rows) -> tokenized examples: decode_and_expand then
    tokenize, `batch_size` rows / examples at a time, yielded in pieces of about `yield_bytes`. The
    block's drop counts are reported once, after its last example (so before the task ends, and
    before the driver can ask for the totals)."""
    counts: Counter = Counter()
    pending: list[dict] = []
    size = 0
    for rows in _chunks(block, batch_size):
        examples = decode_and_expand(rows, split=split, tasks=tasks, image_hw=image_hw, family=family, allow_convert=allow_convert,
                                     preprocess=preprocess, counts=counts)
        for part in _chunks(examples, batch_size):
            out = tokenize(part, split=split, model_path=model_path, max_len=max_len, family=family, counts=counts)
            if not out or not len(out["input_ids"]):
                continue
            pending.append(out)
            size += sum(v.nbytes for v in out.values())
            if size >= yield_bytes:
                yield concat_batches(pending)
                pending, size = [], 0
    if pending:
        yield concat_batches(pending)
    _report(counter, split, counts)


def concat_batches(parts: list[dict]) -> dict:
    """Batches -> one; a column ragged in any part, or shaped differently between parts, stays ragged."""
    if len(parts) == 1:
        return parts[0]
    out = {}
    for k in parts[0]:
        cols = [p[k] for p in parts]
        if all(c.dtype != object and c.shape[1:] == cols[0].shape[1:] for c in cols):
            out[k] = np.concatenate(cols)
        else:
            out[k] = _column([row for c in cols for row in c])
    return out


# ----------------------------------------------------------------------------------------------
# datasets


# Files per read task when a split has at least one file per CPU: 5 shards of the default 1,000
# rows take ~3.5 s per task at 64 px (bench/data_pipeline.py), long enough that Ray Data's gap
# between consecutive tasks on a CPU slot (0.1-0.3 s) costs a few percent, short enough that a
# lost node re-runs little and output streams to the trainer in several blocks per CPU.
FILES_PER_TASK = 5
MIN_ROWS_PER_BLOCK = 64  # small splits: no read block under this many rows (see read_blocks)


def read_blocks(n_files: int, n_cpus: int, n_rows: int | None = None) -> int:
    """Read blocks for `n_files` shards on `n_cpus` CPUs. With a file per CPU or more, whole files
    per block (at least one block per CPU): the read then fuses with the training stage into one
    task per block. Fewer files than CPUs (small splits): each file is split into blocks, so
    several CPUs share the work (Ray does not fuse a split read with what follows), but into no
    more blocks than `n_rows` (when known) fills at MIN_ROWS_PER_BLOCK each: every block is a Ray
    task, often in a fresh worker process (1-2.5 CPU-s), so a 54-row split read as 4 blocks per CPU
    paid for 8 processes on 2 CPUs and would pay for 256 on 64."""
    n_cpus = max(1, int(n_cpus))
    if n_files >= n_cpus:
        return min(n_files, max(n_cpus, math.ceil(n_files / FILES_PER_TASK)))
    blocks = 4 * n_cpus
    if n_rows is not None:
        blocks = min(blocks, max(n_files, math.ceil(n_rows / MIN_ROWS_PER_BLOCK)))
    return blocks


def split_rows(paths: list[str], fs) -> int:
    """Rows of a split's shards, from their Parquet footers (no data read)."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p, filesystem=fs).metadata.num_rows for p in paths)


def read_split(uri: str, split: str, opts: storage.StorageOptions | None = None):
    import ray

    paths, fs = shards.shard_source(uri, split, opts)
    if not paths:
        raise FileNotFoundError(f"no shards for split {split!r} under {uri}")
    cpus = ray.cluster_resources().get("CPU", 1)
    # the row count matters only for splits of fewer files than CPUs: a few footers
    blocks = read_blocks(len(paths), cpus, split_rows(paths, fs) if len(paths) < max(1, int(cpus)) else None)
    return ray.data.read_parquet(paths, filesystem=fs, columns=["id", "image", "width", "height", "objects"], override_num_blocks=blocks)


def stage_frame(image_hw):
    """The model input frame as a Ray Data stage takes it: a native frame (a dict of smart_resize
    bounds, preprocess.frame_for) as it is, a fixed (height, width) as a tuple."""
    return image_hw if isinstance(image_hw, dict) else tuple(image_hw)


def examples_dataset(uri: str, split: str, *, tasks, image_hw, family: str, allow_convert=True, opts=None, counter=None, batch_size=64,
                     preprocess=None):
    """Validated, preprocessed, expanded examples of one split (no tokens): the eval input."""
    ds = read_split(uri, split, opts)
    return ds.map_batches(
        decode_and_expand,
        batch_size=batch_size,
        batch_format="numpy",
        fn_kwargs={"split": split, "tasks": list(tasks), "image_hw": stage_frame(image_hw), "family": family,
                   "allow_convert": allow_convert, "counter": counter, "preprocess": preprocess_mod.coerce(preprocess).to_dict()},
    )


def train_dataset(uri: str, split: str, *, tasks, model_path: str, image_hw, max_len: int, family: str, allow_convert=True, opts=None, counter=None, batch_size=64,
                  preprocess=None):
    """Tokenized training examples of one split: read + prepare_block in one Ray task per block
    (batch_size=None hands the whole read block over, which is what lets Ray fuse the two)."""
    return read_split(uri, split, opts).map_batches(
        prepare_block,
        batch_size=None,
        batch_format="numpy",
        fn_kwargs={"split": split, "tasks": list(tasks), "image_hw": stage_frame(image_hw), "model_path": model_path, "max_len": max_len,
                   "family": family, "allow_convert": allow_convert, "counter": counter,
                   "preprocess": preprocess_mod.coerce(preprocess).to_dict(), "batch_size": batch_size},
    )


def train_box_sizes(uri: str, split: str, opts=None, limit: int = 5000) -> list[tuple[float, float]]:
    """Normalised (w, h) of training boxes, for the centred-mean-box baseline (first `limit` rows)."""
    table = shards.read_split(uri, split, opts).slice(0, limit)
    sizes = []
    for w, h, objs in zip(table["width"].to_pylist(), table["height"].to_pylist(), table["objects"].to_pylist()):
        try:
            for o in objects_from_json(objs):
                if isinstance(o, Box) and w and h:
                    sizes.append((o.width / w, o.height / h))
        except ValueError:
            continue  # counted by the pipeline's validation; the baseline just skips it
    return sizes
