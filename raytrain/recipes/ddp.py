"""Recipe: data-parallel fine-tuning — full fine-tuning, LoRA or QLoRA — one function per worker.

Runs inside Ray Train `TorchTrainer` workers (`train_fn_per_worker`), where DDP (gloo on CPU, NCCL
on GPU) is already set up. The loop itself (`train`) only needs a `Session` (rank, world size,
checkpoint in, report out) and an iterable of batches per epoch, so it also runs without Ray.
Shared with recipes/zero.py through raytrain/training/ only.

Reads top to bottom: setup -> model -> optimizer -> resume -> loop (accumulate, step, log,
validate, checkpoint) -> final checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from typing import Callable

import torch

from raytrain import config as config_mod
from raytrain.training import checkpointing, loop, new_tokens, optim
from raytrain.training.model import build_model
from raytrain.training.session import Session, from_ray_train

log = logging.getLogger("raytrain.recipes.ddp")

STRATEGIES = ("full", "lora")


def train(cfg: config_mod.Experiment, model_path: str, session: Session, device: torch.device, wrap_ddp: Callable) -> dict:
    """Train to cfg.train.steps (or an early stop); returns {"step", "epoch", "early_stopped"}."""
    if cfg.train.strategy not in STRATEGIES:
        raise ValueError(f"recipes/ddp.py runs strategy {' | '.join(STRATEGIES)}, not {cfg.train.strategy!r}")
    torch.manual_seed(cfg.train.seed)  # same init on every rank (DDP also broadcasts from rank 0)
    model, processor, n_train = build_model(cfg, model_path)
    n_total = sum(p.numel() for p in model.parameters())
    if session.rank == 0:
        log.info("strategy=%s trainable params %d / %d (%.2f%%)", cfg.train.strategy, n_train, n_total, 100 * n_train / n_total)
    fam = cfg.model_family()
    loc_ids = torch.as_tensor(fam.loc_token_ids(processor.tokenizer), device=device)
    if optim.is_fp16(cfg.model.dtype):
        optim.master_weights_fp32(model)  # float16: frozen weights fp16, trainable ones fp32 (mixed precision)
    if not cfg.quant.bits:
        model.to(device)  # quantized models are placed by from_pretrained's device_map
    warmup = new_tokens.NewTokenWarmup(model, new_tokens.token_rows(fam, processor), cfg.train.new_token_warmup_steps)
    model.train()
    # images enter in the vision tower's dtype (bf16 runs; QLoRA keeps the tower in fp32)
    pixel_dtype = next(p.dtype for n, p in model.named_parameters() if "patch_embed" in n)

    optimizer = optim.build_optimizer(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, name=cfg.train.optimizer,
                                      betas=cfg.train.betas, momentum=cfg.train.momentum)
    scaler = optim.grad_scaler(cfg.model.dtype, device)  # float16: dynamic loss scaling; otherwise a pass-through
    digits = fam.digit_token_ids(processor.tokenizer)
    loss_fn = loop.training_loss(cfg, processor.tokenizer, loc_ids, model.get_output_embeddings().weight.shape[0],
                                 None if digits is None else torch.as_tensor(digits, device=device))
    scheduler = optim.build_scheduler(optimizer, warmup=cfg.train.warmup_steps, total=cfg.train.steps, kind=cfg.train.schedule)

    # ---- resume: weights, optimizer, scheduler, RNG and the data position ---------------------
    step, epoch, resumed_from = 0, 0, None
    position = loop.DataPosition(session, cfg.train.micro_batch_size)
    ctx = session.checkpoint_dir()
    if ctx is not None:
        with ctx as ckpt_dir:
            state = checkpointing.load_training_state(ckpt_dir, model=model, optimizer=optimizer, scheduler=scheduler)
            position = loop.DataPosition.restore(session, cfg.train.micro_batch_size, state, ckpt_dir)
        if "grad_scaler" in state and scaler.is_enabled():
            scaler.load_state_dict(state["grad_scaler"])
        step, epoch = state["step"], state["epoch"]
        resumed_from = step
        if session.rank == 0:
            log.info("resumed from step %d (epoch %d, batch %d)", step, epoch, state["batch_in_epoch"])
    model = wrap_ddp(model)

    def save_and_report(metrics: dict) -> None:
        snapshot = position.snapshot()  # every rank: the epoch's example keys are gathered to rank 0
        if session.rank != 0:
            session.report(metrics, None)
            return
        with tempfile.TemporaryDirectory(prefix="raytrain-ckpt-") as d:
            state = loop.checkpoint_state(cfg, step=step, metrics=metrics, position=snapshot)
            if scaler.is_enabled():
                state["grad_scaler"] = scaler.state_dict()  # the loss scale, so a resumed run does not re-learn it
            checkpointing.save(d, model=model, optimizer=optimizer, scheduler=scheduler, state=state,
                               save_processor=lambda out: fam.save_inference_files(processor, out),
                               save_adapter_files=lambda out: fam.save_adapter_files(processor, out))
            loop.save_position(d, snapshot)
            session.report(metrics, d)

    amp = lambda: optim.autocast(cfg.model.dtype, device)  # noqa: E731
    # rank 0 scores (decoding metrics and the teacher-forced val loss), every rank gets its decision
    validate = loop.Validation(session, cfg.train, fam, processor, loss_fn=loss_fn, device=device, pixel_dtype=pixel_dtype,
                               max_len=cfg.data.max_seq_len, autocast=amp)
    window = loop.MetricsWindow(micro_batch_size=cfg.train.micro_batch_size, world_size=session.world_size,
                                trainable_params=n_train, resumed_from=resumed_from, position=position)
    accum = cfg.train.grad_accum
    stop = False
    # Micro-batches of the optimizer step being accumulated. Kept across epochs (as DeepSpeed's engine
    # does in recipes/zero.py): an epoch's tail joins the next step instead of leaking its gradients
    # into a step of accum + tail micro-batches, and an epoch shorter than one step (fewer than
    # grad_accum micro-batches per worker) still makes progress instead of looping forever.
    # Checkpoints are written at step boundaries only, where it is 0.
    micro_in_step = 0
    batches = position.batches() if step < cfg.train.steps else ()
    for epoch, _, batch in batches:
        inputs, targets = loop.batch_to_model(batch, fam, device, pixel_dtype)

        micro_in_step += 1
        sync = micro_in_step == accum
        # Only all-reduce gradients on the last micro-batch of an optimizer step.
        no_sync = getattr(model, "no_sync", None)
        with no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext():
            with amp():
                out = model(**inputs, use_cache=False)
                loss, stats = loss_fn(out.logits, targets)
            del out  # free logits before backward: they dominate activation memory
            scaler.scale(loss / accum).backward()  # each backward sums grads => normalise by accumulation here
        window.add(float(loss.detach()), stats["ce"], stats.get("num_loss", 0.0))
        if not sync:
            continue

        micro_in_step = 0
        warmup.before_step(step, optimizer)  # warm-up steps: only the added token rows update
        scaler.unscale_(optimizer)  # float16: true gradients before clipping
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
        scaler.step(optimizer)  # float16: skipped when the gradients overflowed (the scale then halves)
        scaler.update()
        warmup.after_step(optimizer)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        if cfg.train.fail_at_step == step and session.rank == 0 and resumed_from is None:
            raise RuntimeError(f"injected failure at step {step} (train.fail_at_step)")

        due = loop.due(cfg.train, step, window.reported)
        if due.log or due.checkpoint:
            metrics = window.metrics(step=step, epoch=epoch, lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm))
            stop = loop.finish_report(session, window, due, metrics, validate=lambda m: validate(model, m),
                                      save_and_report=save_and_report)
        if stop:
            validate.log_stop(step)
            break
        if step >= cfg.train.steps:
            break
    return {"step": step, "epoch": epoch, "early_stopped": stop}


# ----------------------------------------------------------------------------------------------
# Ray Train entry point


def train_fn_per_worker(config: dict) -> None:
    """TorchTrainer's train_loop_per_worker (launch/trainer.py): config = {"experiment": dict,
    "model_path": str, "data_uri": str (shards, for in-training validation)}."""
    import ray.train.torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = config_mod.from_dict(config["experiment"])
    session, device = from_ray_train(cfg, config)
    train(cfg, config["model_path"], session, device, wrap_ddp=lambda m: ray.train.torch.prepare_model(m, move_to_device=False))


if __name__ == "__main__":
    raise SystemExit(f"run through `raytrain train` (this module is the worker side); cwd={os.getcwd()}")
