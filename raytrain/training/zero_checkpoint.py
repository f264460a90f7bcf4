"""ZeRO checkpoints: DeepSpeed's per-rank shards plus raytrain's training state, in one directory.

Every rank writes ONLY its own files into its own local directory and reports that directory to
Ray Train. Ray Train V2 broadcasts one checkpoint folder name from rank 0, copies every rank's
directory into that same folder, and registers the checkpoint once all ranks have reported
(`ray/train/v2/_internal/execution/context.py: report -> _sync_checkpoint_dir_name_across_ranks,
storage.py: persist_current_checkpoint`, `checkpoint/report_handler.py`). So file names must not
collide across ranks; DeepSpeed's carry the rank, and so do ours.

    <ckpt>/
      state.json                      rank 0: step, epoch, data position, strategy, base model, family,
                                      zero_stage, world_size, dtype, tag, metrics (checkpointing.STATE_JSON)
      rng/rank_00000.pt               each rank: its torch / python / numpy RNG (loads with weights_only=True)
      zero/latest                     rank 0 (DeepSpeed): the tag
      zero/<tag>/zero_pp_rank_<R>_mp_rank_00_optim_states.pt
                                      each rank R: its 1/world share of the fp32 master weights and of
                                      the Adam moments (3 x 4 bytes per parameter, summed over ranks)
      zero/<tag>/zero_pp_rank_<R>_mp_rank_00_model_states.pt
                                      ZeRO-3, each rank: small (shapes, counters, lr scheduler)
      zero/<tag>/mp_rank_00_model_states.pt
                                      ZeRO-2, rank 0 only: the module weights in the compute dtype (+ lr scheduler)
      model/                          optional, added by `raytrain consolidate`: HF safetensors + processor

Same topology on resume (world size and ZeRO stage) -> `engine.load_checkpoint`, exact. Otherwise
the checkpoint is converted once per node to DeepSpeed's universal format (`ds_to_universal`:
one file per parameter with fp32 weights and Adam moments) and loaded with `load_universal`,
which keeps the optimizer state exactly across world sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

# one state.json (name and reader) for every strategy
from raytrain.training.checkpointing import STATE_JSON, read_state

log = logging.getLogger("raytrain.training.zero_checkpoint")

ZERO_DIR = "zero"
RNG_DIR = "rng"


def tag_for(step: int) -> str:
    return f"global_step{step}"


def _rng_path(ckpt_dir: str | Path, rank: int) -> Path:
    return Path(ckpt_dir) / RNG_DIR / f"rank_{rank:05d}.pt"


# ----------------------------------------------------------------------------------------------
# save


def save(ckpt_dir: str | Path, engine, *, rank: int, tag: str, state: dict | None = None) -> Path:
    """Write this rank's part of a checkpoint into ckpt_dir (every rank calls it: the DeepSpeed
    save is collective). `state` (rank 0 only) becomes state.json."""
    d = Path(ckpt_dir)
    d.mkdir(parents=True, exist_ok=True)
    # Each rank writes only its own shard files; rank 0 also writes `latest` and the module file (ZeRO-2).
    engine.save_checkpoint(str(d / ZERO_DIR), tag=tag)
    rng = _rng_path(d, rank)
    rng.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "torch": torch.get_rng_state(),
            "python": _to_plain(random.getstate()),
            "numpy": _to_plain(np.random.get_state()),
        },
        rng,
    )
    if state is not None:
        (d / STATE_JSON).write_text(json.dumps(state, indent=2, sort_keys=True))
    return d


def _to_plain(x):
    """RNG states as nested lists/ints/strs (weights_only-loadable)."""
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (tuple, list)):
        return [_to_plain(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    return x


# ----------------------------------------------------------------------------------------------
# load


def needs_universal(state: dict, *, world_size: int, stage: int) -> bool:
    """True when the checkpoint's topology differs from the current one (shards do not line up)."""
    return int(state["world_size"]) != world_size or int(state["zero_stage"]) != stage


def universal_root(ckpt_dir: str | Path, tag: str, cache_root: str | Path | None = None) -> Path:
    """Node-local directory of the universal copy of (checkpoint, tag)."""
    key = hashlib.sha1(f"{os.path.realpath(ckpt_dir)}|{tag}".encode()).hexdigest()[:16]
    return Path(cache_root or Path(tempfile.gettempdir()) / "raytrain-universal") / key


def universal_dir(ckpt_dir: str | Path, tag: str, cache_root: str | Path | None = None) -> tuple[str, str, bool]:
    """(load_dir, tag, converted_here) of a universal copy of the checkpoint, converted at most
    once per node.

    Every rank may call it; a file lock makes the first one convert and the others reuse its output
    (converted_here tells the converter, which removes the copy once every rank has loaded it:
    `remove_universal`). The copy lives under the local temp dir (keyed by checkpoint path and
    tag), never in the checkpoint itself, which may be read-only persisted storage. It holds about
    12 bytes per parameter: plan local disk for it."""
    from deepspeed.checkpoint import ds_to_universal

    root = universal_root(ckpt_dir, tag, cache_root)
    out_tag = f"{tag}_universal"
    done = root / f"{out_tag}.done"
    for attempt in range(3):  # another run's remove_universal may take the empty cache root away meanwhile
        try:
            root.mkdir(parents=True, exist_ok=True)
            break
        except FileNotFoundError:
            if attempt == 2:
                raise
    converted = False
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not done.exists():
                args = argparse.Namespace(
                    input_folder=str(Path(ckpt_dir) / ZERO_DIR / tag),
                    output_folder=str(root / out_tag),
                    num_extract_workers=1,  # in-process: no pool inside a Ray worker
                    num_merge_workers=1,
                    keep_temp_folder=False,
                    strict=True,
                    # ZeRO-2 shards written without Megatron's universal_checkpoint_info: add the default
                    inject_missing_state=True,
                )
                with contextlib.redirect_stdout(_LogWriter()):
                    ds_to_universal.main(args)
                done.write_text(tag)
                converted = True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return str(root), out_tag, converted


def remove_universal(load_dir: str) -> None:
    """Delete a universal copy made by `universal_dir` (call after every rank has loaded it), and
    the default cache root with it once no other copy is in it."""
    shutil.rmtree(load_dir, ignore_errors=True)
    root = Path(load_dir).parent
    if root == Path(tempfile.gettempdir()) / "raytrain-universal":
        with contextlib.suppress(OSError):  # another run's copy is in it: that run removes it
            root.rmdir()


class _LogWriter:
    """ds_to_universal prints progress; send it to the log at debug level."""

    def write(self, s: str) -> int:
        if s.strip():
            log.debug("ds_to_universal: %s", s.rstrip())
        return len(s)

    def flush(self) -> None:
        pass


def load(ckpt_dir: str | Path, engine, *, rank: int, load_dir: str | None = None, tag: str | None = None) -> None:
    """Restore weights, optimizer, lr scheduler (DeepSpeed) and this rank's RNG.

    load_dir/tag: a universal copy (from `universal_dir`) when the topology changed; the engine
    must then have been built with `checkpoint.load_universal`."""
    d = Path(ckpt_dir)
    state = read_state(d)
    load_dir = load_dir or str(d / ZERO_DIR)
    tag = tag or state["tag"]
    path, _ = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint {tag!r} under {load_dir}")
    restore_rng(d, rank)


def restore_rng(ckpt_dir: str | Path, rank: int) -> bool:
    """This rank's RNG from the checkpoint; rank 0's when the checkpoint had fewer ranks."""
    path = _rng_path(ckpt_dir, rank)
    if not path.exists():
        path = _rng_path(ckpt_dir, 0)
    if not path.exists():
        return False
    blob = torch.load(path, weights_only=True)
    torch.set_rng_state(blob["torch"])
    py = blob["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = blob["numpy"]
    np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), npst[2], npst[3], npst[4]))
    return True


# ----------------------------------------------------------------------------------------------
# inspection


def shard_files(ckpt_dir: str | Path) -> dict[str, int]:
    """{relative path: bytes} of DeepSpeed's files under <ckpt>/zero/<tag>/."""
    d = Path(ckpt_dir)
    tag = read_state(d)["tag"]
    base = d / ZERO_DIR / tag
    return {str(p.relative_to(d)): p.stat().st_size for p in sorted(base.iterdir()) if p.is_file()}


def fp32_state_dict(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights gathered from the shards (DeepSpeed's zero_to_fp32), keyed like the
    module's state_dict (tied weights included under both names)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    d = Path(ckpt_dir)
    tag = read_state(d)["tag"]
    with contextlib.redirect_stdout(_LogWriter()):
        return get_fp32_state_dict_from_zero_checkpoint(str(d / ZERO_DIR), tag=tag)
