"""Recipe: full fine-tuning sharded with DeepSpeed ZeRO-2 / ZeRO-3 — one function per worker.

ZeRO-2 shards the fp32 master weights, Adam moments and gradients across the data-parallel ranks;
ZeRO-3 also shards the parameters themselves (each layer is gathered just before it runs). Per rank
that is (4 + 4 + 4) bytes x params / world for the optimizer side instead of all of it on every
rank, which is what makes 10B-72B full fine-tuning fit.

Runs inside Ray Train `TorchTrainer` workers (`train_fn_per_worker`), where torch.distributed is
already initialised (gloo on CPU, NCCL on GPU): DeepSpeed wraps that process group instead of
creating its own. `train` only needs a `Session` (raytrain/training/session.py), so it also runs
without Ray.

Reads top to bottom: setup -> DeepSpeed config -> model (partitioned at load for ZeRO-3) ->
optimizer -> resume -> loop (micro-batch, engine.step, log, validate, checkpoint) -> final checkpoint.

Same model setup, loss, lr schedule, data iteration, metrics, report cadence, in-training validation
and early stopping as recipes/ddp.py: both take them from raytrain/training/ (loop.py, model.py,
session.py). The switches only DeepSpeed has are the config's `zero:` section (offload).
Checkpoint layout: raytrain/training/zero_checkpoint.py.

Note: DeepSpeed's CPU accelerator JIT-compiles a small op (deepspeed_shm_comm) the first time
it runs on a machine (1-3 min on 2 cores). torch caches it under $TORCH_EXTENSIONS_DIR
(default ~/.cache/torch_extensions); later runs load it in well under a second.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time

import torch

from raytrain import config as config_mod
from raytrain.training import loop, optim, zero_checkpoint
from raytrain.training.model import build_model
from raytrain.training.session import Session, from_ray_train

log = logging.getLogger("raytrain.recipes.zero")

STAGES = config_mod.ZERO_STAGES  # strategy -> ZeRO stage


# ----------------------------------------------------------------------------------------------
# DeepSpeed config (built from raytrain's config; nothing else reads it)


def ds_config(cfg: config_mod.Experiment, *, load_universal: bool = False) -> dict:
    stage = STAGES[cfg.train.strategy]
    zopt: dict = {"stage": stage}
    if cfg.zero.offload_optimizer:
        zopt["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.zero.offload_param:  # the config allows it with zero3 only
        zopt["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    conf = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.train.max_grad_norm,
        "zero_optimization": zopt,
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        # float16: DeepSpeed's own mixed precision (fp32 masters in the optimizer, dynamic loss scale)
        "fp16": {"enabled": cfg.model.dtype == "float16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 1 << 30,  # raytrain logs; DeepSpeed's own step log stays quiet
        "wall_clock_breakdown": False,
    }
    if cfg.model.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"ZeRO recipes run model.dtype float32 | bfloat16 | float16, not {cfg.model.dtype!r}")
    if load_universal:
        conf["checkpoint"] = {"load_universal": True}
    return conf


@contextlib.contextmanager
def _hf_zero3(conf: dict):
    """transformers' ZeRO-3 switch, on for the block: from_pretrained then partitions while loading
    (zero.Init), and generate() keeps every rank stepping until all ranks finished (synced_gpus),
    since each ZeRO-3 forward is a collective. transformers keeps only a weakref: hold it here."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    hf_ds = HfDeepSpeedConfig(conf)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del hf_ds


def _ensure_process_group(session: Session, device: torch.device) -> None:
    """Ray Train (and torchrun) set up torch.distributed; a plain single process gets a 1-rank group."""
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if session.world_size != 1:
            raise RuntimeError("recipes.zero.train needs torch.distributed initialised for world_size > 1")
        single_rank_group(backend)
        os.environ.setdefault("LOCAL_RANK", "0")  # what a launcher sets; DeepSpeed's zero.Init reads it while the model loads
    import deepspeed

    if device.type == "cpu":
        clear_stale_build_locks()  # DeepSpeed compiles its CPU shared-memory op on first use
    # Wraps the existing process group (DeepSpeed only creates one when none exists).
    deepspeed.init_distributed(dist_backend=backend)


def single_rank_group(backend: str) -> None:
    """Initialise torch.distributed as a 1-rank group of this process.

    One rank needs no rendezvous server: a file store opens no socket, where torch's TCP store
    listens on every interface whatever host its URL names (and stays up with the process). The
    group outlives `train` (callers gather the engine's weights, then destroy it, or never do), so
    the store's directory is removed when the process exits; torch deletes the file itself when the
    group is destroyed."""
    import torch.distributed as dist

    from raytrain import tempdirs

    store = tempdirs.until_exit("raytrain-pg-") / "store"
    dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)


STALE_BUILD_LOCK_S = 1800.0
"""A torch extension build lock older than this is left by a killed build (a build takes minutes)."""


def clear_stale_build_locks(root: str | None = None, max_age_s: float = STALE_BUILD_LOCK_S) -> list[str]:
    """Remove torch JIT-extension build locks (`<root>/<python-cpu>/<op>/lock`) older than `max_age_s`.
    torch takes that lock file while it compiles an op and waits, without a time limit, for it to go
    away; a build that was killed leaves it behind, and every later ZeRO run on the machine then
    hangs in `deepspeed.init_distributed`. Returns the locks removed (each one logged)."""
    import glob
    import os
    import time

    if root is None:
        from torch.utils.cpp_extension import get_default_build_root

        root = get_default_build_root()
    removed = []
    for lock in glob.glob(os.path.join(root, "*", "*", "lock")):
        try:
            age = time.time() - os.path.getmtime(lock)
            if age > max_age_s:
                os.remove(lock)
                removed.append(lock)
                log.warning("removed a stale torch extension build lock (%.0f min old, left by a killed build): %s", age / 60, lock)
        except FileNotFoundError:
            continue  # another process finished or removed it meanwhile
    return removed


def _numel(p) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 params are empty placeholders locally


def _ndim(p) -> int:
    return len(getattr(p, "ds_shape", p.shape))


def build_optimizer(model, cfg: config_mod.Experiment):
    """train.optimizer adamw | sgd, no decay on 1-D params (optim.build_optimizer, grouped by the FULL
    shape, since ZeRO-3 params are 1-D placeholders locally). DeepSpeedCPUAdam when the optimizer is
    offloaded (AdamW only)."""
    if cfg.train.optimizer not in ("adamw", "sgd"):
        raise ValueError(f"ZeRO recipes run train.optimizer adamw | sgd (torch), not {cfg.train.optimizer!r}")
    if cfg.zero.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        if cfg.train.optimizer != "adamw":
            raise ValueError("zero.offload_optimizer steps with DeepSpeedCPUAdam: it needs train.optimizer=adamw")
        groups = optim.param_groups(model.parameters(), cfg.train.weight_decay, ndim=_ndim)
        return DeepSpeedCPUAdam(groups, lr=cfg.train.lr, betas=tuple(cfg.train.betas), adamw_mode=True)
    return optim.build_optimizer(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, name=cfg.train.optimizer,
                                 betas=cfg.train.betas, momentum=cfg.train.momentum, ndim=_ndim)


# ----------------------------------------------------------------------------------------------
# the loop


def train(cfg: config_mod.Experiment, model_path: str, session: Session, device: torch.device) -> dict:
    """Train to cfg.train.steps (or an early stop); returns {"step", "epoch", "early_stopped",
    "engine"} (the engine for callers that want the final weights, e.g. tests and notebooks)."""
    import deepspeed

    if cfg.train.strategy not in STAGES:
        raise ValueError(f"recipes/zero.py runs strategy {' | '.join(STAGES)}, not {cfg.train.strategy!r}")
    stage = STAGES[cfg.train.strategy]
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    _ensure_process_group(session, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.train.seed)

    # ---- what are we resuming from? (decides the DeepSpeed config: universal load or not) ------
    ctx = session.checkpoint_dir()
    # the checkpoint resumed from (Ray's download of it) and a universal copy converted here stay
    # until the engine has loaded them, and go away then or on any error on the way (a retry that
    # found a converted copy left by a failed attempt would otherwise never remove it)
    with contextlib.ExitStack() as stack:
        ckpt_dir = stack.enter_context(ctx) if ctx is not None else None
        state, load_dir, load_tag, converted_here = None, None, None, False
        if ckpt_dir is not None:
            state = zero_checkpoint.read_state(ckpt_dir)
            if "zero_stage" not in state:
                raise ValueError(f"checkpoint {ckpt_dir} was written by strategy {state.get('strategy')!r}; the ZeRO recipe resumes ZeRO checkpoints only")
            if zero_checkpoint.needs_universal(state, world_size=session.world_size, stage=stage):
                # topology changed: shards do not line up; convert (once per node) to per-parameter files
                t = time.perf_counter()
                load_dir, load_tag, converted_here = zero_checkpoint.universal_dir(ckpt_dir, state["tag"])
                if converted_here:
                    stack.callback(zero_checkpoint.remove_universal, load_dir)
                if session.rank == 0:
                    log.info("checkpoint from %d ranks (ZeRO-%d) -> universal for %d ranks (ZeRO-%d) in %.1f s",
                             state["world_size"], state["zero_stage"], session.world_size, stage, time.perf_counter() - t)
        conf = ds_config(cfg, load_universal=load_dir is not None)

        # ---- model: the full fine-tuning model, sharded by the engine below; ZeRO-3 partitions it
        # while loading (transformers' zero.Init) -------------------------------------------------
        with _hf_zero3(conf) if stage == 3 else contextlib.nullcontext():
            model, processor, _ = build_model(cfg, model_path, strategy="full")
        n_train = sum(_numel(p) for p in model.parameters() if p.requires_grad)
        n_total = sum(_numel(p) for p in model.parameters())
        if session.rank == 0:
            log.info("strategy=%s world=%d trainable params %d / %d", cfg.train.strategy, session.world_size, n_train, n_total)
        fam = cfg.model_family()
        loc_ids = torch.as_tensor(fam.loc_token_ids(processor.tokenizer), device=device)
        # images enter in the compute dtype (the engine runs the whole module in bf16 / fp16 when asked)
        pixel_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.model.dtype, torch.float32)
        # the same objective as the other recipes (every loss.* option); the head's rows are partitioned
        # under ZeRO-3, so its full size comes from DeepSpeed's ds_shape
        head_w = model.get_output_embeddings().weight
        digits = fam.digit_token_ids(processor.tokenizer)
        loss_fn = loop.training_loss(cfg, processor.tokenizer, loc_ids, int(getattr(head_w, "ds_shape", head_w.shape)[0]),
                                     None if digits is None else torch.as_tensor(digits, device=device))

        optimizer = build_optimizer(model, cfg)
        scheduler = optim.build_scheduler(optimizer, warmup=cfg.train.warmup_steps, total=cfg.train.steps, kind=cfg.train.schedule)
        # The engine steps the scheduler once per optimizer step (at the accumulation boundary) and
        # keeps its state in the checkpoint.
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=conf)
        engine.train()

        # ---- resume: shards (weights + optimizer + scheduler), RNG and the data position -----------
        step, epoch, resumed_from = 0, 0, None
        micro = cfg.train.micro_batch_size
        position = loop.DataPosition(session, micro)
        if ckpt_dir is not None:
            zero_checkpoint.load(ckpt_dir, engine, rank=session.rank, load_dir=load_dir, tag=load_tag)
            if load_dir is not None:
                torch.distributed.barrier()  # every rank on this node has read the universal copy: the converter removes it
            step, epoch = state["step"], state["epoch"]
            # the examples the epoch trained on (any world size), or its batch count (loop.DataPosition)
            position = loop.DataPosition.restore(session, micro, state, ckpt_dir)
            resumed_from = step
            if session.rank == 0:
                log.info("resumed from step %d (epoch %d, batch %d)", step, epoch, state["batch_in_epoch"])

    def save_and_report(metrics: dict) -> None:
        tag = zero_checkpoint.tag_for(step)
        state = None
        snapshot = position.snapshot()  # every rank: the epoch's example keys are gathered to rank 0
        if session.rank == 0:
            state = loop.checkpoint_state(cfg, step=step, metrics=metrics, position=snapshot)
            state.update(zero_stage=stage, world_size=session.world_size, dtype=cfg.model.dtype, tag=tag)
        # Every rank writes its own shard files and reports its own directory; Ray Train merges them.
        with tempfile.TemporaryDirectory(prefix=f"raytrain-zero-r{session.rank}-") as d:
            zero_checkpoint.save(d, engine, rank=session.rank, tag=tag, state=state)
            if session.rank == 0:
                loop.save_position(d, snapshot)
            session.report(metrics, d)

    # ZeRO-2 keeps whole parameters on every rank: rank 0 generates alone. A ZeRO-3 forward gathers
    # each layer from every rank, so every rank decodes the (same) subset, in step (synced_gpus).
    validate = loop.Validation(session, cfg.train, fam, processor, on_all_ranks=stage == 3, loss_fn=loss_fn, device=device,
                               pixel_dtype=pixel_dtype, max_len=cfg.data.max_seq_len)

    def validate_zero(module, metrics: dict) -> bool:
        with _hf_zero3(conf) if stage == 3 else contextlib.nullcontext():  # ZeRO-3: generate() gathers shards
            return validate(module, metrics)

    window = loop.MetricsWindow(micro_batch_size=micro, world_size=session.world_size, trainable_params=n_train,
                                resumed_from=resumed_from, position=position)
    stop = False
    batches = position.batches() if step < cfg.train.steps else ()
    for epoch, _, batch in batches:
        inputs, targets = loop.batch_to_model(batch, fam, device, pixel_dtype)
        out = engine(**inputs, use_cache=False)
        loss, stats = loss_fn(out.logits, targets)
        del out  # free logits before backward: they dominate activation memory
        # The engine divides by grad_accum itself, reduces/partitions gradients, and only
        # steps optimizer + scheduler (with clipping) at the accumulation boundary.
        boundary = engine.is_gradient_accumulation_boundary()
        engine.backward(loss)
        engine.step()
        window.add(float(loss.detach()), stats["ce"], stats.get("num_loss", 0.0))
        if not boundary:
            continue
        step += 1

        if cfg.train.fail_at_step == step and session.rank == 0 and resumed_from is None:
            raise RuntimeError(f"injected failure at step {step} (train.fail_at_step)")

        due = loop.due(cfg.train, step, window.reported)
        if due.log or due.checkpoint:
            grad_norm = engine.get_global_grad_norm()
            metrics = window.metrics(step=step, epoch=epoch, lr=scheduler.get_last_lr()[0],
                                     grad_norm=float(grad_norm) if grad_norm is not None else float("nan"))
            stop = loop.finish_report(session, window, due, metrics, validate=lambda m: validate_zero(engine.module, m),
                                      save_and_report=save_and_report)
        if stop:
            validate.log_stop(step)
            break
        if step >= cfg.train.steps:
            break
    return {"step": step, "epoch": epoch, "early_stopped": stop, "engine": engine}


def gathered_state_dict(engine) -> dict[str, torch.Tensor]:
    """The engine's full module weights as fp32 CPU tensors (ZeRO-3: gathered from every rank;
    collective, every rank must call it)."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        # ZeRO-2/3 in bf16: the module holds bf16 copies; the fp32 masters live in the optimizer.
        return {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# Ray Train entry point


def train_fn_per_worker(config: dict) -> None:
    """TorchTrainer's train_loop_per_worker (launch/trainer.py): config = {"experiment": dict,
    "model_path": str, "data_uri": str (shards, for in-training validation)}."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = config_mod.from_dict(config["experiment"])
    session, device = from_ray_train(cfg, config)
    train(cfg, config["model_path"], session, device)


if __name__ == "__main__":
    raise SystemExit(f"run through `raytrain train` with train.strategy=zero2|zero3 (this module is the worker side); cwd={os.getcwd()}")
