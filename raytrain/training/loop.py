"""The pieces every recipe's loop shares, so no strategy trains, reports or stops differently:

    micro_batches     the epochs' micro-batches as one stream, resuming at a checkpoint's position
    batch_to_model    a delivered batch -> model keywords + labels, on the device
    training_loss     the objective with every `loss.*` option
    due               which of log / checkpoint / validate happen after an optimizer step
    MetricsWindow     loss and throughput over the steps since the last report; the report's keys
    Validation        in-training validation on the fixed val subset + the early-stopping decision
    checkpoint_state  what state.json records (position, strategy, base model, preprocessing, metrics)

Recipe plumbing: like the recipes, these read the Experiment.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterator

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
    while True:
        n = 0
        for batch in session.epoch_batches(epoch, micro):
            n += 1
            if n <= skip:
                continue
            yield epoch, n, batch
        if n == 0:
            raise RuntimeError("the training split produced no batches: check the data (drop report) and micro_batch_size")
        epoch, skip = epoch + 1, 0


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
                           digit_ids=digit_ids, number_weight=cfg.loss.number_weight)

    return loss


@dataclass(frozen=True)
class Due:
    log: bool
    checkpoint: bool
    validate: bool


def due(train: config_mod.TrainConfig, step: int, logged_before: bool) -> Due:
    """What happens after optimizer step `step` (1-based): a validation every train.val_every steps;
    a checkpoint every checkpoint_every steps, at the last step, and at every validation that can
    stop the run early (so the run's best state is on disk); a report every log_every steps, on the
    first step and with every validation."""
    validate = bool(train.val_every) and step % train.val_every == 0
    checkpoint = step % train.checkpoint_every == 0 or step == train.steps or (validate and bool(train.early_stop_metric))
    return Due(log=step % train.log_every == 0 or not logged_before or validate, checkpoint=checkpoint, validate=validate)


class MetricsWindow:
    """Training loss over the micro-batches since the last report, and the report's standard keys."""

    def __init__(self, *, micro_batch_size: int, world_size: int, trainable_params: int, resumed_from: int | None):
        self.micro, self.world, self.n_train = micro_batch_size, world_size, trainable_params
        self.resumed_from = -1 if resumed_from is None else resumed_from
        self.reported = False
        self.reset()

    def reset(self) -> None:
        """Start a new window (after a report: its validation and checkpoint time is not training time)."""
        self.loss, self.ce, self.num, self.n, self.t0 = 0.0, 0.0, 0.0, 0, time.perf_counter()

    def add(self, loss: float, ce: float, num_loss: float = 0.0) -> None:
        self.loss += loss
        self.ce += ce
        self.num += num_loss
        self.n += 1

    def metrics(self, *, step: int, epoch: int, lr: float, grad_norm: float) -> dict:
        """The report of optimizer step `step`: mean loss / CE per micro-batch of the window, samples/s
        over all ranks, trainable parameters, and the step this run resumed from (-1: a fresh run)."""
        dt = time.perf_counter() - self.t0
        self.reported = True
        return {
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
                 max_new_tokens: int = 32):
        self.session, self.fam, self.processor, self.max_new_tokens = session, fam, processor, max_new_tokens
        self.every, self.metric = train.val_every, train.early_stop_metric
        scores = on_all_ranks or session.rank == 0
        self.examples = session.val_examples() if (self.every and scores and session.val_examples) else None
        self.early = EarlyStopping(train.early_stop_mode, train.early_stop_patience) if self.metric else None

    def __call__(self, model, metrics: dict) -> bool:
        """Add the val_* metrics (and early_stop_best, early_stopped) to `metrics`; True: stop now."""
        from raytrain.training import validation

        decision = False
        if self.examples is not None:
            metrics.update(validation.evaluate(model, self.processor, self.fam, self.examples, max_new_tokens=self.max_new_tokens))
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


def checkpoint_state(cfg: config_mod.Experiment, *, step: int, epoch: int, batch_in_epoch: int, metrics: dict) -> dict:
    """state.json's common record (training/checkpointing.py): where the run is (optimizer step, epoch,
    batches of that epoch consumed on each rank), what trained it, and the image preprocessing that
    eval and Serve must apply as trained. Recipes add their own keys (ZeRO: stage, world size, tag)."""
    return {
        "step": step,
        "epoch": epoch,
        "batch_in_epoch": batch_in_epoch,
        "strategy": cfg.train.strategy,
        "base_model": cfg.model.name_or_path,
        "family": cfg.model.spec,
        "preprocess": cfg.data.preprocess.to_dict(),
        "metrics": metrics,
    }
