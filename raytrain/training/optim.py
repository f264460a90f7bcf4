"""Optimizer and learning-rate schedule builders (flat arguments, no config)."""

from __future__ import annotations

import math

import torch


OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw")


def build_optimizer(params, *, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), name: str = "adamw") -> torch.optim.Optimizer:
    """AdamW over trainable params; no decay on biases and norms (1-D tensors).
    8-bit / paged variants come from bitsandbytes (state in 8 bits; paged = spills to CPU under
    GPU memory pressure). bitsandbytes keeps tensors under 4096 elements in 32-bit state."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "paged_adamw": bnb.optim.PagedAdamW}.get(name)
    if cls is None:
        raise ValueError(f"train.optimizer must be one of {OPTIMIZERS}, not {name!r}")
    return cls(groups, lr=lr, betas=betas)


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
