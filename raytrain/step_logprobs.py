"""Log-probabilities of the tokens `generate` picks, recorded one decoding step at a time.

`generate(output_logits=True)` keeps every step's raw logits until it returns, and
`compute_transition_scores` then stacks and normalises them: (rows x steps x vocab) float32, three
times over at the peak. With PaliGemma's 257,216-token vocabulary a batch of 16 segmentation answers
(256 steps) holds ~4 GB per copy, and a Qwen dense-captioning batch of 8 at 768 steps ~3.7 GB, on the
GPU that also holds the model. Confidences need only ONE number per (row, step): the log-probability
of the chosen token under the raw model distribution.

`StepLogprobs` reads it with forward hooks on the module `generate` calls: after each forward, the
log-softmax of the last position's logits (the same raw logits `output_logits` would keep, before
any logits processor); before the next forward, the chosen token of each row (that forward's new
input id) picks its value, and the (rows, vocab) step is dropped. Memory: one step, not all of them.

Rows must keep their identity from step to step, which holds for greedy decoding and sampling (rows
that finished are padded, not dropped) but not for beam search, whose beams are reordered: predict.py
asks `output_logits` there (`compute_transition_scores` follows `beam_indices`).
"""

from __future__ import annotations


def generating_module(model):
    """The module whose forward `generate` calls: a peft wrapper delegates generate to its base
    model, so hooks on the wrapper itself would never run."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class StepLogprobs:
    """Context manager: while open, every forward of `model` records its last position's
    log-softmax; `values(sequences, prompt_len)` returns the chosen tokens' log-probabilities as a
    (rows, generated) float32 numpy array (what `predict.token_logprobs` returns for greedy and
    sampled decoding)."""

    def __init__(self, model):
        self.module = generating_module(model)
        self._handles: list = []
        self._last = None  # (rows, vocab) float32 log-softmax of the latest forward's last position
        self._steps: list = []  # per step: (rows,) log-probability of the token chosen there

    def __enter__(self) -> StepLogprobs:
        self._handles = [self.module.register_forward_pre_hook(self._before, with_kwargs=True),
                         self.module.register_forward_hook(self._after)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _before(self, module, args, kwargs):
        if self._last is None:
            return None
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else (args[0] if args else None)
        if ids is None:
            raise RuntimeError("a decoding step without input_ids: its chosen tokens are unknown, so are their log-probabilities")
        self._pick(ids[:, -1])
        return None

    def _after(self, module, args, output):
        import torch

        logits = output.logits if hasattr(output, "logits") else output[0]
        # float32 as generate's output_logits stores them, normalised over the vocabulary as
        # compute_transition_scores(normalize_logits=True) does
        self._last = torch.log_softmax(logits[:, -1, :].to(dtype=torch.float32), dim=-1)
        return None

    def _pick(self, chosen) -> None:
        self._steps.append(self._last.gather(1, chosen.reshape(-1, 1).to(self._last.device)).squeeze(1))
        self._last = None

    def values(self, sequences, prompt_len: int):
        """(rows, generated) log-probabilities of `sequences[:, prompt_len:]` (generate's output);
        the last step's token never went through a forward, so it is picked here."""
        import numpy as np
        import torch

        n_new = int(sequences.shape[1]) - int(prompt_len)
        if self._last is not None and len(self._steps) < n_new:
            self._pick(sequences[:, -1])
        if len(self._steps) != n_new:
            raise RuntimeError(f"recorded {len(self._steps)} decoding steps for {n_new} generated tokens")
        if not n_new:
            return np.zeros((int(sequences.shape[0]), 0), dtype=np.float32)
        return torch.stack(self._steps, dim=1).float().cpu().numpy()
