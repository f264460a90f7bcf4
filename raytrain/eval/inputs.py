"""The examples an evaluation scores: a split's shards through the data pipeline's eval stage
(decode, validate, preprocess, expand into one example per task and label), optionally only some
of its rows (the first N, or a seeded random N: `select_ids`), never materialized.

Selection reads only the shards' `id` column on the driver; the kept ids travel to the read tasks,
which drop the other rows before any image is decoded.
"""

from __future__ import annotations

import random

import numpy as np

from raytrain import storage


def count_rows(uri: str, split: str, opts: storage.StorageOptions | None = None) -> int:
    """Rows (images) of a split, from the Parquet footers only."""
    import pyarrow.parquet as pq

    from raytrain.data import shards

    paths, fs = shards.shard_source(uri, split, opts)
    return sum(pq.ParquetFile(fs.open_input_file(p)).metadata.num_rows for p in paths)


def select_ids(uri: str, split: str, n: int, seed: int | None = None, opts: storage.StorageOptions | None = None) -> list[str]:
    """Ids of `n` rows of the split: the first n in shard order (seed None), or a random n drawn
    with `seed` from the sorted ids (the same rows whatever the shard layout)."""
    import pyarrow.parquet as pq

    from raytrain.data import shards

    paths, fs = shards.shard_source(uri, split, opts)
    ids: list[str] = []
    for p in paths:
        ids += [str(i) for i in pq.read_table(p, filesystem=fs, columns=["id"]).column("id").to_pylist()]
        if seed is None and len(ids) >= n:
            break
    if seed is None:
        return ids[:n]
    return random.Random(seed).sample(sorted(ids), min(n, len(ids)))


def keep_ids(batch: dict, *, ids: frozenset) -> dict:
    """Read stage filter: only the rows whose id is in `ids`."""
    keep = np.array([str(i) in ids for i in batch["id"]], dtype=bool)
    return {k: np.asarray(v)[keep] for k, v in batch.items()}


def examples(uri: str, split: str, *, tasks, image_hw, family: str, allow_convert: bool = True, opts=None, counter=None,
             preprocess=None, ids: list[str] | None = None, batch_size: int = 64):
    """The lazy examples Dataset (pipeline.examples_dataset's layout); `ids`: only those rows."""
    from raytrain.data import pipeline
    from raytrain.data import preprocess as preprocess_mod

    if ids is None:
        return pipeline.examples_dataset(uri, split, tasks=tasks, image_hw=image_hw, family=family, allow_convert=allow_convert,
                                         opts=opts, counter=counter, preprocess=preprocess, batch_size=batch_size)
    rows = pipeline.read_split(uri, split, opts).map_batches(keep_ids, fn_kwargs={"ids": frozenset(ids)}, batch_format="numpy")
    return rows.map_batches(
        pipeline.decode_and_expand,
        batch_size=batch_size,
        batch_format="numpy",
        fn_kwargs={"split": split, "tasks": list(tasks), "image_hw": pipeline.stage_frame(image_hw), "family": family,
                   "allow_convert": allow_convert, "counter": counter, "preprocess": preprocess_mod.coerce(preprocess).to_dict()},
    )
