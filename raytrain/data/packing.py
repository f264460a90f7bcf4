"""The training data's per-epoch stage: drop examples the epoch already trained on, pack the rest.

Runs in Ray Data on the tokenized examples (data/pipeline.py, materialized once when
data.cache_preprocessed), once per epoch, before the split across training workers:

  filter   a resumed epoch leaves out the examples its checkpoint says were trained on
           (`EpochFilter`: the keys are published by rank 0 when it restores the checkpoint). The
           position is a set of example keys, not a batch count, so it holds whatever the number
           of workers before and after, and the split hands the rest out evenly again.
  pack     data.packing > 0: examples are grouped into rows of at most `packing` tokens
           (first-fit decreasing by length, within a block), each row built by the family's
           `pack` (per-token arrays concatenated, positions restarting per example, per-image
           arrays joined), so a batch computes few pad tokens while every example attends to
           itself only (bench/packing.py measures the useful-token share).

A row of either kind carries `example_keys` (the examples it holds), which the training loop
records (training/loop.py DataPosition) and checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from raytrain.models import family as model_family

log = logging.getLogger(__name__)

KEYS = "example_keys"
STAGE_CPUS = 0.25  # per epoch-stage task (see epoch_dataset)


# ----------------------------------------------------------------------------------------------
# which examples go together


def assign_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices grouped into rows of at most `capacity` tokens: first-fit decreasing (longest first,
    each into the first row with room), ties broken by index so the result is deterministic. An
    example longer than `capacity` raises (the pipeline drops those before, at max_seq_len)."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"an example of {n} tokens does not fit a packed row of {capacity}")
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(capacity - n)
    return [sorted(r) for r in rows]


def _example(batch: dict, i: int, n: int, seq_keys: set) -> dict:
    """Row i of a tokenized batch, per-token arrays cut to its n tokens."""
    return {k: (v[i][:n] if k in seq_keys else v[i]) for k, v in batch.items() if k != KEYS}


def pack_batch(batch: dict, *, family: str, length: int, pad_id: int) -> dict:
    """Tokenized examples (one per row, fixed length) -> packed rows of `length` tokens."""
    n = len(batch["input_ids"])
    if n == 0:
        return {}
    fam = model_family(family)
    lengths = np.asarray(batch["attention_mask"]).sum(axis=1).astype(np.int64)
    seq_keys = {"labels", "num_place", *fam.SEQ_KEYS}  # per-token (B, T) arrays; the rest is per example
    groups = assign_rows(lengths, length)
    rows = [fam.pack([_example(batch, i, int(lengths[i]), seq_keys) for i in idx], length, pad_id) for idx in groups]
    out = {k: _column([r[k] for r in rows]) for k in rows[0]}
    if KEYS in batch:
        keys = np.asarray(batch[KEYS]).reshape(n, -1)
        out[KEYS] = _column([keys[idx].reshape(-1) for idx in groups])
    return out


def _column(arrays: list) -> np.ndarray:
    if all(np.shape(a) == np.shape(arrays[0]) for a in arrays):
        return np.stack(arrays)
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = np.asarray(a)
    return out


# ----------------------------------------------------------------------------------------------
# the per-epoch stage


def drop_trained(batch: dict, skip: np.ndarray) -> dict:
    """The rows of a tokenized batch (one example per row) whose example key is not in `skip`."""
    if not len(skip) or KEYS not in batch or not len(batch[KEYS]):
        return batch
    keys = np.asarray(batch[KEYS]).reshape(len(batch[KEYS]), -1)[:, 0]
    keep = ~np.isin(keys, skip)
    if keep.all():
        return batch
    return {k: _take(v, keep) for k, v in batch.items()}


def _take(v: np.ndarray, keep: np.ndarray) -> np.ndarray:
    v = v[keep]
    return _column(list(v)) if v.dtype == object and len(v) else v


def epoch_stage(block: dict, *, family: str, model_path: str, packing: int, position=None) -> dict:
    """One block of tokenized examples -> the epoch's rows: trained examples dropped (a resumed
    epoch), then packed into rows of `packing` tokens when packing > 0."""
    if position is not None:
        import ray

        block = drop_trained(block, ray.get(position.skip.remote()))
    if not packing or not len(block.get("input_ids", ())):
        return block
    from raytrain.data import pipeline

    pad_id = int(pipeline._processor(family, model_path).tokenizer.pad_token_id)  # cached per process
    return pack_batch(block, family=family, length=packing, pad_id=pad_id)


def epoch_dataset(ds, *, family: str, model_path: str, packing: int, position=None):
    """The per-epoch view of the tokenized train split that training iterates (module doc).
    `position`: the run's EpochFilter (None: nothing is ever skipped, e.g. to count rows)."""
    if not packing and position is None:
        return ds
    # A light stage (a key lookup, array concatenation) that runs every epoch while the trainers
    # hold their CPUs: a quarter CPU per task, so it fits beside them.
    return ds.map_batches(epoch_stage, batch_size=None, batch_format="numpy", num_cpus=STAGE_CPUS,
                          fn_kwargs={"family": family, "model_path": model_path, "packing": int(packing), "position": position})


def _filter_cls():
    import ray

    @ray.remote(num_cpus=0)
    class EpochFilter:
        """The examples a resumed epoch leaves out. Rank 0 publishes a checkpoint's (epoch, keys)
        (`resume`) before it starts iterating; every rank says which epoch it is about to iterate
        (`begin`); the epoch stage asks `skip` once per block. Ray Data starts an epoch's execution
        only when every worker has asked for it, i.e. after all of them called `begin`, so the
        stage never sees a stale answer."""

        def __init__(self):
            self.epoch, self.keys, self.current = None, np.zeros(0, np.int64), None

        def resume(self, epoch: int, keys) -> None:
            self.epoch, self.keys = int(epoch), np.unique(np.asarray(keys, dtype=np.int64))

        def begin(self, epoch: int) -> None:
            self.current = int(epoch)

        def skip(self):
            return self.keys if self.current is not None and self.current == self.epoch else np.zeros(0, np.int64)

    return EpochFilter


def epoch_filter():
    """A run's EpochFilter actor, owned by the caller (the process that runs the trainer's fit) and
    placed on its node (a lost worker node must not take it down)."""
    from raytrain.data.pipeline import on_this_node

    return _filter_cls().options(scheduling_strategy=on_this_node()).remote()
