"""Training added vocabulary rows: the <|loc_DDDD|> tokens of Qwen2.5-VL's `tokens` box format.

Seed 002 added 1024 location tokens to Qwen2.5-VL and saw the model detect nothing: the new rows
started as the mean of the vocabulary, and under LoRA they were never trained. Its proposed fix,
implemented here: first warm up ONLY the new rows (input embedding, and the output rows of an
untied lm_head) for `train.new_token_warmup_steps` optimizer steps, then train what the strategy
trains.

Which parameters carry the new rows:

* LoRA / QLoRA: peft's trainable tokens (`LoraConfig(trainable_token_indices=...)`, see
  `lora_token_indices`): a (1024, hidden) parameter per matrix that replaces those rows in the
  forward pass and is saved inside the adapter. They train for the whole run, warm-up or not:
  LoRA never updates embeddings, so without them the added tokens would keep their init forever.
* full fine-tuning: the embedding matrices themselves (they are trainable anyway); during the
  warm-up their gradient is masked to the new rows.

How the warm-up freezes the rest: after backward and before clipping, the gradient of every other
trainable parameter is dropped (`grad = None`: AdamW skips the parameter, its moments and weight
decay untouched) and, for full fine-tuning, weight decay is off for that step (decoupled decay
would otherwise shrink the masked rows). Nothing changes `requires_grad`, so DDP's set of reduced
parameters stays the same and the optimizer holds every parameter from the start. The cost: the
warm-up still computes the other gradients.

Resume: the warm-up is a function of the optimizer step alone (`step < steps`), and the step is
restored from the checkpoint, so a run resumed before K continues the warm-up and one resumed
after K does not repeat it. The optimizer's saved state never carries the warm-up's zero decay
(it is restored right after `optimizer.step()`).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("raytrain.training.new_tokens")

DELTA = "trainable_tokens_delta"  # peft's parameter holding the trainable token rows


def _unwrap(model):
    return model.module if hasattr(model, "module") and not hasattr(model, "peft_config") else model


def _input_and_untied_output(model) -> tuple[str, str | None]:
    """Module names (leaf names, as peft matches them) of the input embedding and, when it does
    not share the input's weight, the output projection."""
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    untied = out is not None and out.weight is not emb.weight
    return names[id(emb)], (names[id(out)] if untied else None)


def token_rows(fam, processor) -> list[int]:
    """Vocabulary ids of the rows the family's answer format added (Qwen2.5-VL `tokens`: the 1024
    <|loc|> tokens), else none."""
    return [int(i) for i in fam.new_token_ids(processor)]


def lora_token_indices(fam, model, processor) -> dict[str, list[int]] | None:
    """`trainable_token_indices` for peft's LoraConfig: the added rows of the input embedding (and
    of an untied lm_head; a tied one follows the input), or None when nothing was added. Call on
    the model before `get_peft_model`."""
    rows = token_rows(fam, processor)
    if not rows:
        return None
    inp, out = _input_and_untied_output(model)
    return {inp: rows, **({out: rows} if out else {})}


class NewTokenWarmup:
    """The warm-up of one run; a no-op when `steps` is 0. In the loop, between backward and
    clipping: `before_step(step, optimizer)`, then after `optimizer.step()`: `after_step(optimizer)`."""

    def __init__(self, model, token_ids, steps: int):
        self.steps = int(steps)
        self.rows = [int(i) for i in token_ids]
        self._decay: list[float] | None = None
        self._masks: dict[int, torch.Tensor] = {}
        if self.steps <= 0:
            self.carriers, self.masked, self.others = [], [], []
            return
        if not self.rows:
            raise ValueError("train.new_token_warmup_steps > 0 needs added tokens to warm up (model.box_format=tokens)")
        m = _unwrap(model)
        params = [p for p in m.parameters() if p.requires_grad]
        deltas = [p for n, p in m.named_parameters() if DELTA in n and p.requires_grad]
        if deltas:  # LoRA: peft's token rows, nothing else to mask
            self.carriers, self.masked = deltas, []
        else:  # full fine-tuning: the embedding matrices, row-masked
            emb = m.get_input_embeddings().weight
            out = m.get_output_embeddings()
            mats = [emb] if out is None or out.weight is emb else [emb, out.weight]
            self.masked = [W for W in mats if W.requires_grad]
            if not self.masked:
                raise ValueError("new-token warm-up: the embedding matrix is frozen and no peft trainable tokens carry the new rows")
            self.carriers = list(self.masked)
        keep = {id(p) for p in self.carriers}
        self.others = [p for p in params if id(p) not in keep]

    def active(self, step: int) -> bool:
        """Whether optimizer step `step` (0-based: the number of steps already taken) is a warm-up step."""
        return step < self.steps

    def _mask(self, W: torch.Tensor) -> torch.Tensor:
        mask = self._masks.get(id(W))
        if mask is None or mask.device != W.device:
            mask = torch.zeros(W.shape[0], 1, dtype=W.dtype, device=W.device)
            mask[torch.as_tensor(self.rows, device=W.device)] = 1
            self._masks[id(W)] = mask
        return mask

    def before_step(self, step: int, optimizer) -> bool:
        """Restrict the coming optimizer step to the new rows when `step` is a warm-up step; returns
        whether it is. Call after backward (gradients reduced) and before clipping."""
        if not self.active(step):
            return False
        for p in self.others:
            p.grad = None
        for W in self.masked:
            if W.grad is not None:
                W.grad.mul_(self._mask(W))
        if self.masked:  # decoupled weight decay would move the masked rows
            self._decay = [g.get("weight_decay", 0.0) for g in optimizer.param_groups]
            for g in optimizer.param_groups:
                g["weight_decay"] = 0.0
        if step + 1 == self.steps:
            log.info("new-token warm-up: last warm-up step %d; the strategy's full trainable set from step %d", step + 1, step + 2)
        return True

    def after_step(self, optimizer) -> None:
        """Restore the weight decay `before_step` turned off (so checkpoints never save it off)."""
        if self._decay is not None:
            for g, wd in zip(optimizer.param_groups, self._decay):
                g["weight_decay"] = wd
            self._decay = None
