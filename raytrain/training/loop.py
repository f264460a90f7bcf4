"""The pieces every recipe's loop shares, so no strategy trains, reports or stops differently:

    DataPosition      the epochs' micro-batches as one stream, where the run is in them (epoch,
                      batches, the keys of the examples trained this epoch), restored from and
                      saved with checkpoints
    micro_batches     the same stream without a record (a plain skip of `skip` batches)
    batch_to_model    a delivered batch -> model keywords + labels, on the device
    training_loss     the objective with every `loss.*` option
    due               which of log / checkpoint / validate happen after an optimizer step
    MetricsWindow     loss and throughput over the steps since the last report; the report's keys
    Validation        in-training validation on the fixed val subset + the early-stopping decision
    checkpoint_state  what state.json records (position, strategy, base model, preprocessing, metrics)

Recipe plumbing: like the recipes, these read the Experiment.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from raytrain import config as config_mod
from raytrain.models.losses import suffix_loss, token_weights
from raytrain.training.session import Session

log = logging.getLogger("raytrain.training")


def micro_batches(session: Session, micro: int, epoch: int = 0, skip: int = 0) -> Iterator[tuple[int, int, dict]]:
    """(epoch, batches drawn so far in that epoch, batch) over epoch, epoch + 1, ... without end.

    The first `skip` batches of the first epoch are drawn and dropped (a checkpoint's position:
    resuming mid-epoch). An epoch that yields no batch at all is an error (a split too small for
    micro_batch_size, or everything dropped), never an endless loop."""
    return DataPosition(session, micro, epoch, skip).batches()


POSITION_FILE = "data_position.npy"
"""Checkpoint file: int64 keys (data/pipeline.py example_keys) of every example the checkpoint's
epoch has trained on, all ranks together, one entry per time trained (so a repeat would show)."""


def _flat_keys(keys) -> np.ndarray:
    if isinstance(keys, (list, tuple)):
        return np.concatenate([np.asarray(k, dtype=np.int64).reshape(-1) for k in keys]) if keys else np.zeros(0, np.int64)
    return np.asarray(keys, dtype=np.int64).reshape(-1)


class DataPosition:
    """Where a run is in its data, and the stream of micro-batches from there.

    Per rank: the epoch, the batches drawn in it, and the example keys those batches held (a
    batch's `example_keys`, taken off before it reaches the model). A checkpoint records the epoch's
    keys of EVERY rank (`snapshot` gathers them; `save` writes POSITION_FILE). A resume hands them to
    the runner (`Session.resume_data`): a runner that can leave those examples out of the epoch
    (Ray: the per-epoch stage of data/packing.py, before the split) does so, and the run continues
    with no example trained twice or skipped whatever the number of workers before and after; a
    runner that cannot (a plain Session over a fixed batch list) skips the checkpoint's batch count
    instead, which is exact when the batches come in the same order (the Ray-free tests)."""

    def __init__(self, session: Session, micro: int, epoch: int = 0, skip: int = 0, keys: np.ndarray | None = None,
                 batch_in_epoch: int | None = None):
        self.session, self.micro = session, micro
        self.epoch, self.skip = epoch, skip
        self.batch_in_epoch = skip if batch_in_epoch is None else batch_in_epoch
        self.resumed_epoch = epoch if (skip or keys is not None) else None  # may hold no batch: all trained before
        # the restored keys are carried by rank 0 only, so gathering counts them once
        self._keys: list[np.ndarray] = [keys] if keys is not None and session.rank == 0 else []
        self.keyed = keys is not None
        self.examples = 0  # examples drawn on this rank by this process (throughput)

    @classmethod
    def restore(cls, session: Session, micro: int, state: dict, ckpt_dir: str | Path) -> DataPosition:
        """The position a checkpoint recorded (state.json + POSITION_FILE in `ckpt_dir`)."""
        epoch, batch = int(state["epoch"]), int(state["batch_in_epoch"])
        f = Path(ckpt_dir) / POSITION_FILE
        keys = np.load(f) if state.get("data_keys") and f.is_file() else None
        if keys is not None and session.resume_data(epoch, keys):
            return cls(session, micro, epoch, 0, keys, batch_in_epoch=batch)  # the runner leaves them out
        skip = batch
        if state.get("world_size", session.world_size) != session.world_size and "samples_in_epoch" in state:
            skip = int(state["samples_in_epoch"]) // (micro * session.world_size)  # other shards per rank: approximate
        return cls(session, micro, epoch, skip, keys)

    def batches(self) -> Iterator[tuple[int, int, dict]]:
        """(epoch, batches drawn in it, batch) without end (module doc of micro_batches)."""
        epoch, skip = self.epoch, self.skip
        while True:
            self.session.begin_epoch(epoch)
            n = 0
            for batch in self.session.epoch_batches(epoch, self.micro):
                n += 1
                if n <= skip:
                    continue
                keys = batch.get(KEYS)
                if keys is not None:
                    batch = {k: v for k, v in batch.items() if k != KEYS}
                    k = _flat_keys(keys)
                    self._keys.append(k)
                    self.examples += len(k)
                    self.keyed = True
                else:
                    self.examples += self.micro
                self.batch_in_epoch += 1
                yield epoch, self.batch_in_epoch, batch
            if n == 0 and epoch != self.resumed_epoch:
                raise RuntimeError("the training split produced no batches: check the data (drop report) and micro_batch_size")
            epoch, skip = epoch + 1, 0
            self.epoch, self.batch_in_epoch, self._keys = epoch, 0, []

    def snapshot(self) -> dict:
        """The position for a checkpoint (every rank must call it: it gathers the ranks' keys)."""
        mine = np.concatenate(self._keys) if self._keys else np.zeros(0, np.int64)
        keys = np.concatenate([np.asarray(k, dtype=np.int64) for k in self.session.gather(mine)])
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "world_size": self.session.world_size,
                "samples_in_epoch": int(len(keys)) if self.keyed else self.batch_in_epoch * self.micro * self.session.world_size,
                "keys": keys if self.keyed else None}


def save_position(ckpt_dir: str | Path, snapshot: dict) -> None:
    """Write a snapshot's keys next to state.json (rank 0; checkpoint_state records the file)."""
    if snapshot.get("keys") is not None:
        np.save(Path(ckpt_dir) / POSITION_FILE, snapshot["keys"])


TARGET_KEYS = ("labels", "num_place")  # per-token arrays the loss reads, never the model
KEYS = "example_keys"  # which examples a row holds (data/pipeline.py example_keys): the data position's


def _to(v, device):
    return [t.to(device) for t in v] if isinstance(v, (list, tuple)) else v.to(device)


def batch_to_model(batch: dict, fam, device: torch.device, pixel_dtype: torch.dtype) -> tuple[dict, dict]:
    """A delivered batch -> (model keywords, loss targets): on the device, the padding columns the
    whole batch shares trimmed (rows are right-padded to a fixed length, so work follows the longest
    row), the family's layout applied (uint8 pixels normalised; per-image arrays of the rows, ragged
    ones as lists, joined in row order; packed rows' `position_ids`), pixels in the dtype the vision
    tower computes in. Targets: `labels` and, where the pipeline wrote them, `num_place`
    (coordinate digits' place weights, formats/numbers.py). `example_keys` (the data position's)
    never reaches the model."""
    inputs = {k: _to(v, device) for k, v in batch.items() if k not in TARGET_KEYS and k != KEYS}
    width = int(inputs["attention_mask"].sum(1).max())
    targets = {k: batch[k].to(device)[:, :width] for k in TARGET_KEYS if k in batch}
    targets["labels"] = targets["labels"].long()
    for k in fam.SEQ_KEYS:
        if k in inputs:
            inputs[k] = inputs[k][:, :width].long()
    if "position_ids" in inputs:  # packed rows: (B, T) or (B, rows, T), trimmed like the tokens
        inputs["position_ids"] = inputs["position_ids"][..., :width].long()
    inputs = fam.prepare_inputs(inputs)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(pixel_dtype)
    return inputs, targets


def training_loss(cfg: config_mod.Experiment, tokenizer, loc_ids: torch.Tensor, vocab_size: int, digit_ids: torch.Tensor | None = None):
    """`loss(logits, targets) -> (loss, stats)` with every `loss.*` option of the config (distance-aware
    <loc> targets, the number loss on coordinate digits, focal / class-weighted label tokens, GIoU on
    soft-argmax boxes): one definition for all recipes. `targets`: batch_to_model's."""
    label_w = token_weights(tokenizer, cfg.loss.class_weights, vocab_size)

    def loss(logits: torch.Tensor, targets: dict):
        return suffix_loss(logits, targets["labels"], loc_ids, cfg.loss.loc_sigma, cfg.loss.loc_weight, focal_gamma=cfg.loss.focal_gamma,
                           label_token_weights=label_w, box_iou_weight=cfg.loss.box_iou_weight, num_place=targets.get("num_place"),
                           digit_ids=digit_ids, number_weight=cfg.loss.number_weight,
                           box_iou=cfg.loss.box_iou)

    return loss


@dataclass(frozen=True)
class Due:
    log: bool
    checkpoint: bool
    validate: bool


def due(train: config_mod.TrainConfig, step: int, logged_before: bool) -> Due:
    """What happens after optimizer step `step` (1-based): a validation every train.val_every steps;
    a checkpoint every checkpoint_every steps, at the last step, and at every validation that can
    stop the run early or select the run's checkpoint (so the run's best state is on disk); with
    train.select_checkpoint every checkpoint is validated too (each is ranked by its own value); a
    report every log_every steps, on the first step and with every validation."""
    selects = train.select_checkpoint != "last"
    checkpoint = step % train.checkpoint_every == 0 or step == train.steps
    validate = bool(train.val_every) and (step % train.val_every == 0 or (selects and checkpoint))
    checkpoint = checkpoint or (validate and (bool(train.early_stop_metric) or selects))
    return Due(log=step % train.log_every == 0 or not logged_before or validate, checkpoint=checkpoint, validate=validate)


class MetricsWindow:
    """Training loss over the micro-batches since the last report, and the report's standard keys."""

    def __init__(self, *, micro_batch_size: int, world_size: int, trainable_params: int, resumed_from: int | None,
                 position: DataPosition | None = None):
        self.micro, self.world, self.n_train = micro_batch_size, world_size, trainable_params
        self.resumed_from = -1 if resumed_from is None else resumed_from
        self.position = position
        self.reported = False
        self.reset()

    def _examples(self) -> int:
        return self.position.examples if self.position is not None else 0

    def reset(self) -> None:
        """Start a new window (after a report: its validation and checkpoint time is not training time)."""
        self.loss, self.ce, self.num, self.n, self.t0 = 0.0, 0.0, 0.0, 0, time.perf_counter()
        self.examples0 = self._examples()

    def add(self, loss: float, ce: float, num_loss: float = 0.0) -> None:
        self.loss += loss
        self.ce += ce
        self.num += num_loss
        self.n += 1

    def metrics(self, *, step: int, epoch: int, lr: float, grad_norm: float) -> dict:
        """The report of optimizer step `step`: mean loss / CE per micro-batch of the window, samples/s
        (rows: packed rows count once) and examples/s (this rank's examples x ranks, an estimate when
        packed rows hold different numbers) over all ranks, trainable parameters, and the step this
        run resumed from (-1: a fresh run)."""
        dt = time.perf_counter() - self.t0
        self.reported = True
        return {
            "examples_per_s": (self._examples() - self.examples0) * self.world / max(dt, 1e-9),
            "step": step,
            "epoch": epoch,
            "loss": self.loss / max(1, self.n),
            "ce": self.ce / max(1, self.n),
            "num_loss": self.num / max(1, self.n),
            "lr": float(lr),
            "grad_norm": float(grad_norm),
            "samples_per_s": self.n * self.micro * self.world / max(dt, 1e-9),
            "trainable_params": self.n_train,
            "resumed_from": self.resumed_from,
        }


def log_step(metrics: dict) -> None:
    log.info("step %d loss %.4f ce %.4f lr %.2e %.1f samples/s", metrics["step"], metrics["loss"], metrics["ce"], metrics["lr"],
             metrics["samples_per_s"])


def finish_report(session, window, due, metrics: dict, *, validate, save_and_report) -> bool:
    """What every recipe does with a due report: validate when due (`validate(metrics)` adds the
    val metrics and returns the early-stop decision), log on rank 0, report to Ray Train with a
    checkpoint when one is due, and start a new metrics window. Returns True to stop training."""
    stop = bool(validate(metrics)) if due.validate else False
    if session.rank == 0:
        log_step(metrics)
    if due.checkpoint:
        save_and_report(metrics)
    else:
        session.report(metrics, None)
    window.reset()
    return stop


class EarlyStopping:
    """Stop after `patience` validations in a row without a better value (`mode` min | max)."""

    def __init__(self, mode: str, patience: int):
        self.mode, self.patience = mode, patience
        self.best: float | None = None
        self.since_best = 0

    def update(self, value: float) -> bool:
        better = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        self.best, self.since_best = (value, 0) if better else (self.best, self.since_best + 1)
        return self.since_best >= self.patience


class Validation:
    """In-training validation (train.val_every) on the fixed val subset, and early stopping
    (train.early_stop_metric). Scores on rank 0 only, or on every rank when the model's forward
    pass is itself a collective (ZeRO-3: `on_all_ranks`, every rank scoring the same subset in step);
    either way rank 0's decision is the one every rank acts on."""

    def __init__(self, session: Session, train: config_mod.TrainConfig, fam, processor, *, on_all_ranks: bool = False,
                 max_new_tokens: int = 32, loss_fn=None, device: torch.device | None = None, pixel_dtype: torch.dtype = torch.float32,
                 max_len: int = 0, autocast=contextlib.nullcontext):
        self.session, self.fam, self.processor, self.max_new_tokens = session, fam, processor, max_new_tokens
        self.every, self.metric = train.val_every, train.early_stop_metric
        self.select = train.select_checkpoint if train.select_checkpoint != "last" else None
        scores = on_all_ranks or session.rank == 0
        self.examples = session.val_examples() if (self.every and scores and session.val_examples) else None
        self.early = EarlyStopping(train.early_stop_mode, train.early_stop_patience) if self.metric else None
        # the teacher-forced loss on the same subset (val_loss): the training objective, as the recipe computes it
        self.loss_fn, self.device, self.pixel_dtype, self.autocast = loss_fn, device, pixel_dtype, autocast
        self.loss_batches = None
        if self.examples is not None and loss_fn is not None:
            from raytrain.training import validation

            self.loss_batches = validation.loss_batches(processor, fam, self.examples, max_len=max_len)

    def _loss_step(self, net, batch: dict):
        inputs, targets = batch_to_model(batch, self.fam, self.device, self.pixel_dtype)
        with self.autocast():
            out = net(**inputs, use_cache=False)
            return self.loss_fn(out.logits, targets)

    def __call__(self, model, metrics: dict) -> bool:
        """Add the val_* metrics (and early_stop_best, early_stopped) to `metrics`; True: stop now."""
        from raytrain.training import validation

        decision = False
        if self.examples is not None:
            with self.autocast():
                metrics.update(validation.evaluate(model, self.processor, self.fam, self.examples, max_new_tokens=self.max_new_tokens))
            if self.loss_batches is not None:
                metrics.update(validation.mean_loss(model, self.loss_batches, self._loss_step))
            if self.select is not None and self.select not in metrics:
                raise ValueError(f"train.select_checkpoint={self.select!r} is not a reported metric; "
                                 f"validation reports {sorted(k for k in metrics if k.startswith('val_'))}")
            if self.early is not None:
                if self.metric not in metrics:
                    raise ValueError(f"train.early_stop_metric={self.metric!r} is not a reported metric; "
                                     f"validation reports {sorted(k for k in metrics if k.startswith('val_'))}")
                decision = self.early.update(metrics[self.metric])
                metrics["early_stop_best"] = self.early.best
        stop = self.session.broadcast_flag(decision)
        metrics["early_stopped"] = int(stop)
        return stop

    def log_stop(self, step: int) -> None:
        if self.session.rank == 0 and self.early is not None:
            log.info("early stop at step %d: %s did not improve for %d validations (best %s)",
                     step, self.metric, self.early.patience, self.early.best)


def checkpoint_state(cfg: config_mod.Experiment, *, step: int, epoch: int | None = None, batch_in_epoch: int | None = None,
                     metrics: dict, position: dict | None = None) -> dict:
    """state.json's common record (training/checkpointing.py): where the run is (optimizer step, epoch,
    batches of that epoch consumed on each rank; with a DataPosition snapshot also the examples the
    epoch trained on, in POSITION_FILE), what trained it, and the image preprocessing that eval and
    Serve must apply as trained. Recipes add their own keys (ZeRO: stage, world size, tag)."""
    extra = {}
    if position is not None:
        epoch, batch_in_epoch = position["epoch"], position["batch_in_epoch"]
        extra = {"samples_in_epoch": position["samples_in_epoch"], "world_size": position["world_size"],
                 "data_keys": POSITION_FILE if position.get("keys") is not None else None}
    return {
        **extra,
        "step": step,
        "epoch": epoch,
        "batch_in_epoch": batch_in_epoch,
        "strategy": cfg.train.strategy,
        "base_model": cfg.model.name_or_path,
        "family": cfg.model.spec,
        "preprocess": cfg.data.preprocess.to_dict(),
        "text": cfg.data.text.to_dict(),  # prompts and negatives' answer: eval and Serve write them as trained
        "metrics": metrics,
    }
