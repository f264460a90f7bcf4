"""Recipe: data-parallel fine-tuning — full fine-tuning or LoRA — one function per worker.

Runs inside Ray Train `TorchTrainer` workers (`train_fn_per_worker`), where DDP (gloo on CPU, NCCL
on GPU) is already set up. The loop itself (`train`) only needs a `Session` (rank, world size,
checkpoint in, report out) and an iterable of batches per epoch, so it also runs without Ray.

Reads top to bottom: setup -> model -> optimizer -> resume -> loop (accumulate, step, log,
checkpoint) -> final checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from raytrain import config as config_mod
from raytrain.data import preprocess
from raytrain.models import family as model_family
from raytrain.models import task_head
from raytrain.models.losses import suffix_loss, token_weights
from raytrain.training import checkpointing, new_tokens, optim

log = logging.getLogger("raytrain.recipes.lora")


@dataclass
class Session:
    """What the loop needs from its runner (Ray Train, or a plain torchrun process)."""

    rank: int
    world_size: int
    checkpoint_dir: Callable[[], "contextlib.AbstractContextManager[str] | None"]  # noqa: F821
    report: Callable[[dict, str | None], None]  # (metrics, checkpoint dir or None); every rank calls it
    epoch_batches: Callable[[int, int], Iterable[dict]]  # (epoch, micro_batch_size) -> batches of tensors
    val_examples: Callable[[], dict] | None = None  # fixed validation subset (rank 0), see training/validation.py
    broadcast_flag: Callable[[bool], bool] = lambda flag: flag  # rank 0's decision, seen by every rank


# ----------------------------------------------------------------------------------------------
# model setup


TARGET_KEYS = ("labels", "num_place")  # per-token arrays the loss reads, never the model


def batch_to_model(batch: dict, fam, device: torch.device, pixel_dtype: torch.dtype) -> tuple[dict, dict]:
    """A delivered batch -> (model keywords, loss targets), shared by every recipe: on the device,
    the padding columns the whole batch shares trimmed (rows are right-padded to a fixed length, so
    work follows the longest row), the family's layout applied (uint8 pixels normalised; Qwen:
    flat patches + grid), pixels in the dtype the vision tower computes in. Targets: `labels` and,
    where the pipeline wrote them, `num_place` (coordinate digits' place weights)."""
    inputs = {k: v.to(device) for k, v in batch.items() if k not in TARGET_KEYS}
    width = int(inputs["attention_mask"].sum(1).max())
    targets = {k: batch[k].to(device)[:, :width] for k in TARGET_KEYS if k in batch}
    targets["labels"] = targets["labels"].long()
    for k in fam.SEQ_KEYS:
        if k in inputs:
            inputs[k] = inputs[k][:, :width].long()
    inputs = fam.prepare_inputs(inputs)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(pixel_dtype)
    return inputs, targets


def training_loss(cfg: config_mod.Experiment, tokenizer, loc_ids: torch.Tensor, vocab_size: int, digit_ids: torch.Tensor | None = None):
    """`loss(logits, targets) -> (loss, stats)` with every `loss.*` option of the config (distance-aware
    <loc> targets, the number loss on coordinate digits, focal / class-weighted label tokens, GIoU on
    soft-argmax boxes): one definition for all recipes, so no strategy silently trains a different
    objective. `targets`: batch_to_model's."""
    label_w = token_weights(tokenizer, cfg.loss.class_weights, vocab_size)

    def loss(logits: torch.Tensor, targets: dict):
        return suffix_loss(logits, targets["labels"], loc_ids, cfg.loss.loc_sigma, cfg.loss.loc_weight, focal_gamma=cfg.loss.focal_gamma,
                           label_token_weights=label_w, box_iou_weight=cfg.loss.box_iou_weight, num_place=targets.get("num_place"),
                           digit_ids=digit_ids, number_weight=cfg.loss.number_weight)

    return loss


def build_model(cfg: config_mod.Experiment, model_path: str):
    """Model + processor for the configured strategy; returns (model, processor, trainable count).

    full: the freeze policy decides which parts train. lora: the base is frozen (quantized by
    bitsandbytes when quant.bits is 4/8: QLoRA), LoRA adapters go on the language model's linear
    layers, and the freeze policy can additionally unfreeze the last vision layers / projector.
    Either way model.task_head_queries > 0 adds the (trainable) task attention head."""
    fam = model_family(cfg.model.spec)
    quant = dataclasses.asdict(cfg.quant) if cfg.quant.bits else None
    if quant and cfg.train.strategy != "lora":
        raise ValueError("quant.bits needs train.strategy=lora (QLoRA): quantized weights cannot be fully fine-tuned")
    model, processor = fam.load(model_path, dtype=cfg.model.dtype, quant=quant)
    policy = dict(
        freeze_vision=cfg.model.freeze_vision,
        unfreeze_vision_layers=cfg.model.unfreeze_vision_layers,
        train_projector=cfg.model.train_projector,
    )
    if cfg.train.strategy == "full":
        fam.apply_freeze_policy(model, **policy)
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.train.strategy == "lora":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if quant:
            # casts norms/embeddings to fp32 for stability and freezes the quantized base
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=cfg.model.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False})
        elif cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        fam.apply_freeze_policy(model, **policy, train_language=False)
        extra = {n for n, p in model.named_parameters() if p.requires_grad}  # unfrozen vision layers / projector
        lcfg = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=fam.lora_target_modules(cfg.lora.target_modules),
            bias="none",
            trainable_token_indices=new_tokens.lora_token_indices(fam, model, processor),  # added <|loc|> rows
        )
        model = get_peft_model(model, lcfg)  # marks only adapter weights trainable...
        for n, p in model.base_model.model.named_parameters():
            if n in extra:
                p.requires_grad_(True)  # ...so re-enable what the freeze policy asked for
    else:
        raise ValueError(f"recipes/lora.py runs strategy full | lora, not {cfg.train.strategy!r}")
    # seed 004's task attention head, after the freeze policy and peft: it always trains
    task_head.install(model, cfg.model.task_head_queries, processor=processor)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, processor, n_train


# ----------------------------------------------------------------------------------------------
# the loop


def train(cfg: config_mod.Experiment, model_path: str, session: Session, device: torch.device, wrap_ddp: Callable) -> dict:
    torch.manual_seed(cfg.train.seed)  # same init on every rank (DDP also broadcasts from rank 0)
    model, processor, n_train = build_model(cfg, model_path)
    n_total = sum(p.numel() for p in model.parameters())
    if session.rank == 0:
        log.info("strategy=%s trainable params %d / %d (%.2f%%)", cfg.train.strategy, n_train, n_total, 100 * n_train / n_total)
    fam = model_family(cfg.model.spec)
    loc_ids = torch.as_tensor(fam.loc_token_ids(processor.tokenizer), device=device)
    if not cfg.quant.bits:
        model.to(device)  # quantized models are placed by from_pretrained's device_map
    warmup = new_tokens.NewTokenWarmup(model, new_tokens.token_rows(fam, processor), cfg.train.new_token_warmup_steps)
    model.train()
    # images enter in the vision tower's dtype (bf16 runs; QLoRA keeps the tower in fp32)
    pixel_dtype = next(p.dtype for n, p in model.named_parameters() if "patch_embed" in n)

    optimizer = optim.build_optimizer(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, name=cfg.train.optimizer)
    digits = fam.digit_token_ids(processor.tokenizer)
    loss_fn = training_loss(cfg, processor.tokenizer, loc_ids, model.get_output_embeddings().weight.shape[0],
                            None if digits is None else torch.as_tensor(digits, device=device))
    scheduler = optim.build_scheduler(optimizer, warmup=cfg.train.warmup_steps, total=cfg.train.steps, kind=cfg.train.schedule)

    # ---- resume: weights, optimizer, scheduler, RNG and the data position ---------------------
    step, epoch, skip_batches, resumed_from = 0, 0, 0, None
    ctx = session.checkpoint_dir()
    if ctx is not None:
        with ctx as ckpt_dir:
            state = checkpointing.load_training_state(ckpt_dir, model=model, optimizer=optimizer, scheduler=scheduler)
        step, epoch, skip_batches = state["step"], state["epoch"], state["batch_in_epoch"]
        resumed_from = step
        if session.rank == 0:
            log.info("resumed from step %d (epoch %d, batch %d)", step, epoch, skip_batches)
    model = wrap_ddp(model)

    def save_and_report(metrics: dict, batch_in_epoch: int) -> None:
        if session.rank != 0:
            session.report(metrics, None)
            return
        with tempfile.TemporaryDirectory(prefix="raytrain-ckpt-") as d:
            state = {
                "step": step,
                "epoch": epoch,
                "batch_in_epoch": batch_in_epoch,
                "strategy": cfg.train.strategy,
                "base_model": cfg.model.name_or_path,
                "family": cfg.model.spec,
                "preprocess": preprocess.from_data_config(cfg.data).to_dict(),  # eval/serve apply it as trained
                "metrics": metrics,
            }
            checkpointing.save(d, model=model, optimizer=optimizer, scheduler=scheduler, state=state,
                               save_processor=lambda out: fam.save_inference_files(processor, out),
                               save_adapter_files=(lambda out: fam.save_adapter_files(processor, out)) if hasattr(fam, "save_adapter_files") else None)
            session.report(metrics, d)

    val_set = session.val_examples() if (cfg.train.val_every and session.rank == 0 and session.val_examples) else None
    best, since_best, stop = None, 0, False

    def validate_and_decide(metrics: dict) -> bool:
        """Rank 0 scores the val subset and decides early stopping; every rank gets the decision."""
        nonlocal best, since_best
        decision = False
        if val_set is not None:
            from raytrain.training import validation

            metrics.update(validation.evaluate(model, processor, fam, val_set, max_new_tokens=32))
            key = cfg.train.early_stop_metric
            if key:
                value = metrics[key]
                better = best is None or (value < best if cfg.train.early_stop_mode == "min" else value > best)
                best, since_best = (value, 0) if better else (best, since_best + 1)
                decision = since_best >= cfg.train.early_stop_patience
                metrics["early_stop_best"] = best
        return session.broadcast_flag(decision)

    accum = cfg.train.grad_accum
    micro = cfg.train.micro_batch_size
    window_loss, window_ce, window_num, window_n, t_window = 0.0, 0.0, 0.0, 0, time.perf_counter()
    first_step_logged = False
    # Micro-batches of the optimizer step being accumulated. Kept across epochs (as DeepSpeed's engine
    # does in recipes/zero.py): an epoch's tail joins the next step instead of leaking its gradients
    # into a step of accum + tail micro-batches, and an epoch shorter than one step (fewer than
    # grad_accum micro-batches per worker) still makes progress instead of looping forever.
    # Checkpoints are written at step boundaries only, where it is 0.
    micro_in_step = 0
    while step < cfg.train.steps:
        batch_in_epoch = 0
        for batch in session.epoch_batches(epoch, micro):
            if batch_in_epoch < skip_batches:  # resuming mid-epoch: skip what the checkpoint consumed
                batch_in_epoch += 1
                continue
            batch_in_epoch += 1
            inputs, targets = batch_to_model(batch, fam, device, pixel_dtype)

            micro_in_step += 1
            sync = micro_in_step == accum
            # Only all-reduce gradients on the last micro-batch of an optimizer step.
            no_sync = getattr(model, "no_sync", None)
            ctx_sync = no_sync() if (no_sync is not None and not sync) else _null()
            with ctx_sync:
                out = model(**inputs, use_cache=False)
                loss, stats = loss_fn(out.logits, targets)
                del out  # free logits before backward: they dominate activation memory
                (loss / accum).backward()  # each backward sums grads => normalise by accumulation here
            window_loss += float(loss.detach())
            window_ce += stats["ce"]
            window_num += stats.get("num_loss", 0.0)
            window_n += 1
            if not sync:
                continue

            micro_in_step = 0
            warmup.before_step(step, optimizer)  # warm-up steps: only the added token rows update
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
            optimizer.step()
            warmup.after_step(optimizer)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            if cfg.train.fail_at_step == step and session.rank == 0 and resumed_from is None:
                raise RuntimeError(f"injected failure at step {step} (train.fail_at_step)")

            is_val = bool(cfg.train.val_every) and step % cfg.train.val_every == 0
            is_ckpt = step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps or (is_val and bool(cfg.train.early_stop_metric))
            is_log = step % cfg.train.log_every == 0 or not first_step_logged or is_val
            if is_log or is_ckpt:
                dt = time.perf_counter() - t_window
                metrics = {
                    "step": step,
                    "epoch": epoch,
                    "loss": window_loss / max(1, window_n),
                    "ce": window_ce / max(1, window_n),
                    "num_loss": window_num / max(1, window_n),
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm),
                    "samples_per_s": window_n * micro * session.world_size / max(dt, 1e-9),
                    "trainable_params": n_train,
                    "resumed_from": -1 if resumed_from is None else resumed_from,
                }
                first_step_logged = True
                if is_val:
                    stop = validate_and_decide(metrics)
                    metrics["early_stopped"] = int(stop)
                if session.rank == 0:
                    log.info("step %d loss %.4f ce %.4f lr %.2e %.1f samples/s", step, metrics["loss"], metrics["ce"], metrics["lr"], metrics["samples_per_s"])
                if is_ckpt:
                    save_and_report(metrics, batch_in_epoch)
                else:
                    session.report(metrics, None)
                window_loss, window_ce, window_num, window_n, t_window = 0.0, 0.0, 0.0, 0, time.perf_counter()
            if step >= cfg.train.steps or stop:
                break
        skip_batches = 0
        if batch_in_epoch == 0:
            raise RuntimeError("the training split produced no batches: check the data (drop report) and micro_batch_size")
        if stop:
            if session.rank == 0:
                log.info("early stop at step %d: %s did not improve for %d validations (best %s)",
                         step, cfg.train.early_stop_metric, cfg.train.early_stop_patience, best)
            break
        if step < cfg.train.steps:
            epoch += 1
    return {"step": step, "epoch": epoch, "early_stopped": stop}


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ----------------------------------------------------------------------------------------------
# Ray Train entry point


def train_fn_per_worker(config: dict) -> None:
    """TorchTrainer's train_loop_per_worker: config = {"experiment": dict, "model_path": str,
    "data_uri": str (shards, for in-training validation)}."""
    import ray.train
    import ray.train.torch
    import ray.util

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = config_mod.from_dict(config["experiment"])
    ctx = ray.train.get_context()
    # Fractional CPUs per worker: one intra-op thread each, or workers fight over the cores.
    torch.set_num_threads(max(1, int(cfg.scale.cpus_per_worker)))
    shard = ray.train.get_dataset_shard("train")

    def epoch_batches(epoch: int, micro: int):
        return shard.iter_torch_batches(
            batch_size=micro,
            drop_last=True,
            local_shuffle_buffer_size=micro * 8,
            local_shuffle_seed=cfg.train.seed * 100_003 + epoch,
        )

    def checkpoint_dir():
        ckpt = ray.train.get_checkpoint()
        return ckpt.as_directory() if ckpt is not None else None

    node_ip = ray.util.get_node_ip_address()

    def report(metrics: dict, ckpt_dir: str | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
        ray.train.report(dict(metrics, node_ip=node_ip), checkpoint=ckpt)

    def val_examples():
        from raytrain import storage
        from raytrain.training import validation

        fam = model_family(cfg.model.spec)
        proc = fam.load_processor(config["model_path"])
        return validation.load_examples(config["data_uri"], cfg.train.val_split, cfg.train.val_examples, tasks=cfg.data.tasks,
                                        image_hw=fam.image_size(proc), family=cfg.model.spec, allow_convert=cfg.data.allow_convert,
                                        preprocess=preprocess.from_data_config(cfg.data),
                                        opts=storage.StorageOptions(cfg.storage.endpoint_url, cfg.storage.region))

    def broadcast_flag(flag: bool) -> bool:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return flag
        t = torch.tensor([int(flag)])
        dist.broadcast(t, src=0)
        return bool(t.item())

    session = Session(
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        checkpoint_dir=checkpoint_dir,
        report=report,
        epoch_batches=epoch_batches,
        val_examples=val_examples if config.get("data_uri") else None,
        broadcast_flag=broadcast_flag,
    )
    device = ray.train.torch.get_device()
    train(cfg, config["model_path"], session, device, wrap_ddp=lambda m: ray.train.torch.prepare_model(m, move_to_device=False))


if __name__ == "__main__":
    raise SystemExit(f"run through `raytrain train` (this module is the worker side); cwd={os.getcwd()}")
