"""The trainable model of a run, shared by the recipes: the DDP recipe builds full / LoRA / QLoRA
models with it, the ZeRO recipe its full one (which DeepSpeed then shards).

Recipe plumbing: like the recipes, it reads the Experiment.
"""

from __future__ import annotations

import dataclasses

from raytrain import config as config_mod
from raytrain.models import task_head
from raytrain.training import new_tokens


def build_model(cfg: config_mod.Experiment, model_path: str, *, strategy: str | None = None):
    """Model + processor for the configured strategy (or `strategy`: the ZeRO recipe builds "full");
    returns (model, processor, trainable count).

    full: the freeze policy decides which parts train. lora: the base is frozen (quantized by
    bitsandbytes when quant.bits is 4/8: QLoRA), LoRA adapters go on the language model's linear
    layers, and the freeze policy can additionally unfreeze the last vision layers / projector.
    Either way model.task_head_queries > 0 adds the (trainable) task attention head."""
    strategy = strategy or cfg.train.strategy
    fam = cfg.model_family()
    quant = dataclasses.asdict(cfg.quant) if cfg.quant.bits else None  # the config allows it with strategy lora only
    model, processor = fam.load(model_path, dtype=cfg.model.dtype, quant=quant)
    policy = dict(
        freeze_vision=cfg.model.freeze_vision,
        unfreeze_vision_layers=cfg.model.unfreeze_vision_layers,
        train_projector=cfg.model.train_projector,
    )
    if strategy == "full":
        fam.apply_freeze_policy(model, **policy)
        if cfg.model.train_modules:
            train_only(model, cfg.model.train_modules)
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif strategy == "lora":
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
        raise ValueError(f"build_model builds strategy full | lora (ZeRO shards a full one), not {strategy!r}")
    # seed 004's task attention head, after the freeze policy and peft: it always trains
    task_head.install(model, cfg.model.task_head_queries, processor=processor)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, processor, n_train


def train_only(model, patterns) -> int:
    """Freeze every parameter but those whose name matches one of the fnmatch `patterns`
    (model.train_modules); returns how many parameter tensors train. A pattern list that matches
    nothing is an error (a typo would otherwise train nothing)."""
    from fnmatch import fnmatchcase

    n = 0
    for name, p in model.named_parameters():
        keep = any(fnmatchcase(name, pat) for pat in patterns)
        p.requires_grad_(keep)
        n += keep
    if n == 0:
        names = [name for name, _ in model.named_parameters()]
        raise ValueError(f"model.train_modules {list(patterns)} matches no parameter; names look like {names[:3]} ... {names[-2:]}")
    return n

