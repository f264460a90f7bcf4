"""Optimizer, learning-rate schedule and mixed-precision builders (flat arguments, no config)."""

from __future__ import annotations

import contextlib
import math

import torch


OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw", "sgd")


def param_groups(params, weight_decay: float, ndim=lambda p: p.ndim) -> list[dict]:
    """Trainable params in two groups: decayed (matrices), and biases / norms (1-D, never decayed).
    `ndim`: a parameter's dimensions (ZeRO-3 passes the full shape's: its local params are 1-D)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if ndim(p) >= 2]
    no_decay = [p for p in params if ndim(p) < 2]
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def build_optimizer(params, *, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), name: str = "adamw",
                    momentum: float = 0.0, ndim=lambda p: p.ndim) -> torch.optim.Optimizer:
    """The optimizer `name` over trainable params; no decay on biases and norms (1-D tensors).
    adamw / sgd (with `momentum`; Google's PaliGemma fine-tuning default) are torch's; the 8-bit /
    paged AdamW variants come from bitsandbytes (state in 8 bits; paged = spills to CPU under GPU
    memory pressure; tensors under 4096 elements keep 32-bit state)."""
    groups = param_groups(params, weight_decay, ndim)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "paged_adamw": bnb.optim.PagedAdamW}.get(name)
    if cls is None:
        raise ValueError(f"train.optimizer must be one of {OPTIMIZERS}, not {name!r}")
    return cls(groups, lr=lr, betas=tuple(betas))


def lr_lambda(step: int, *, warmup: int, total: int, kind: str = "cosine", min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then decay."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return min_ratio + (1 - min_ratio) * (1.0 - progress)
    raise ValueError(f"unknown schedule {kind!r}: cosine | linear | constant")


def build_scheduler(optimizer, *, warmup: int, total: int, kind: str = "cosine"):
    lr_lambda(0, warmup=warmup, total=total, kind=kind)  # validate `kind` now, not at step 1
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, warmup=warmup, total=total, kind=kind))


# ----------------------------------------------------------------------------------------------
# float16 mixed precision (model.dtype float16)


def is_fp16(dtype: str) -> bool:
    return dtype == "float16"


def master_weights_fp32(model) -> int:
    """float16 runs: the TRAINABLE parameters back to float32 (the frozen ones stay float16, which
    is where the memory goes). fp16 updates would round small steps away, and a GradScaler cannot
    unscale fp16 gradients. Returns how many tensors were cast."""
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype == torch.float16:
            p.data = p.data.float()
            n += 1
    return n


def autocast(dtype: str, device: torch.device):
    """The forward pass's context: fp16 autocast for float16 runs (fp32 and fp16 weights meet in
    fp16 matmuls), nothing otherwise."""
    return torch.autocast(device.type, dtype=torch.float16) if is_fp16(dtype) else contextlib.nullcontext()


def grad_scaler(dtype: str, device: torch.device) -> torch.amp.GradScaler:
    """Dynamic loss scaling for float16 runs (fp16 gradients underflow without it: the loss is
    multiplied before backward, the gradients divided before clipping, and a step whose gradients
    overflowed is skipped and the scale halved). Disabled (a pass-through) for other dtypes."""
    return torch.amp.GradScaler(device.type, enabled=is_fp16(dtype))
