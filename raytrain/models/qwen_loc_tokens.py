"""Qwen2.5-VL's added location tokens: the 1024 <|loc_DDDD|> tokens of the `tokens` answer format.

Adding them is deterministic (appended after the base vocabulary in bin order), so data workers,
the trainer and eval each add them on their own and agree on every id; their embedding rows start
from the digits they are written with (init_new_token_embeddings); an adapter trained with them
carries its tokenizer, which `check_tokenizer` compares on load. Their warm-up is
raytrain/training/new_tokens.py.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from raytrain.formats import qwen as fmt


def loc_token_ids(tokenizer) -> np.ndarray:
    """Vocabulary ids of <|loc_0000|>..<|loc_1023|> in bin order when the tokenizer has them (the
    `tokens` representation; see add_loc_tokens), else an empty int64 array (absolute / normalized
    / pairs answers are plain text; the loss then treats every token alike)."""
    vocab = tokenizer.get_vocab()
    present = [t in vocab for t in fmt.LOC_TOKENS]
    if not any(present):
        return np.zeros((0,), dtype=np.int64)
    if not all(present):
        raise ValueError(f"tokenizer has only {sum(present)} of the {fmt.NUM_BINS} <|loc_DDDD|> tokens")
    return np.array([vocab[t] for t in fmt.LOC_TOKENS], dtype=np.int64)


def add_loc_tokens_to_tokenizer(tokenizer) -> list[str]:
    """Add the missing <|loc_DDDD|> tokens to `tokenizer` in bin order; returns what was added.
    Deterministic: the same base tokenizer always gets the same ids (appended after its vocabulary),
    which is what lets data workers, the trainer and eval each add them on their own."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in fmt.LOC_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing)  # ordinary tokens: decoding with skip_special_tokens keeps them
    return missing


def add_loc_tokens(model, tokenizer, method: str = "digits", seed: int = 0) -> np.ndarray:
    """Add the 1024 <|loc_DDDD|> tokens to a real Qwen tokenizer + model (no-op where present):
    grow the embedding matrix only if the vocabulary outgrows it (Qwen checkpoints carry spare rows),
    initialise the new rows (init_new_token_embeddings). Returns loc_token_ids."""
    missing = add_loc_tokens_to_tokenizer(tokenizer)
    if missing:
        rows = model.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > rows:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        init_new_token_embeddings(model, tokenizer, missing, method=method, seed=seed)
    return loc_token_ids(tokenizer)


_LOC_DIGITS = re.compile(r"<\|loc_([0-9]{4})\|>")


def _embedding_matrices(model) -> list:
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    return [emb] if out is None or out.weight is emb else [emb, out.weight]


def init_new_token_embeddings(model, tokenizer, new_tokens: Sequence[str], method: str = "digits", noise_std: float = 0.1, seed: int = 0) -> list[int]:
    """Initialise the embedding rows (input, and output when untied) of `new_tokens`.

    method "mean": the mean of the existing rows (the usual choice; seed 002 saw it give weak,
    interchangeable tokens). method "digits" (default): a location token <|loc_0512|> starts at a
    place-weighted mean (8:4:2:1) of the embeddings of the digit tokens "0","5","1","2" its bin is
    written with, so bins start distinct and numerically related; other tokens fall back to the mean.
    Both add Gaussian noise of `noise_std` x the existing rows' std to break ties. Returns the ids.

    Why digits: a pretrained Qwen already reads and writes coordinates with these digit tokens (the
    absolute format), so a bin starts next to the number it stands for instead of at one shared
    point. Bins sharing their leading digits start close (0512 and 0513 differ only in the weight-1
    digit, 0512 and 0912 in the weight-4 one), so neighbouring bins start near each other except
    across carries (0099 -> 0100); the distance-aware <loc> loss teaches the fine order. The output
    rows (an untied lm_head) come from the digits' output rows the same way, so the first logits of
    a bin follow those of its digits. With "mean" all 1024 rows start equal up to the noise: the
    model cannot tell bins apart and the softmax spreads evenly over them (seed 002's failure).
    """
    import torch

    if method not in ("mean", "digits"):
        raise ValueError(f"method must be 'mean' or 'digits', got {method!r}")
    ids = tokenizer.convert_tokens_to_ids(list(new_tokens))
    if any(i is None for i in ids):
        raise ValueError("some new tokens are not in the tokenizer: add them first")
    if any(W.numel() == 0 or hasattr(W, "ds_id") for W in _embedding_matrices(model)):
        raise ValueError("the embedding matrix is partitioned (DeepSpeed ZeRO-3): add the <|loc|> tokens to an unpartitioned "
                         "model (e.g. a strategy=full run, or save the resized model) and start ZeRO-3 from that")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for W in _embedding_matrices(model):
            old = torch.ones(W.shape[0], dtype=torch.bool)
            old[torch.as_tensor(ids)] = False
            old[len(tokenizer) :] = False  # spare rows past the vocabulary are not embeddings of anything
            ref = W[old.to(W.device)].float()
            mean, std = ref.mean(0), ref.std()
            for tok, i in zip(new_tokens, ids):
                m = _LOC_DIGITS.fullmatch(tok) if method == "digits" else None
                if m:
                    digit_ids = tokenizer(m.group(1), add_special_tokens=False)["input_ids"]
                    w = torch.tensor([2.0 ** (len(digit_ids) - 1 - k) for k in range(len(digit_ids))])
                    base = (w[:, None] * W[torch.as_tensor(digit_ids)].float().cpu()).sum(0) / w.sum()
                else:
                    base = mean.cpu()
                noise = torch.randn(W.shape[1], generator=gen) * (noise_std * float(std))
                W[i] = (base + noise).to(W.device, W.dtype)
    return list(ids)


def check_tokenizer(processor, saved_dir: str | Path) -> None:
    """Raise ValueError when `saved_dir` holds a tokenizer (an adapter trained with added <|loc|>
    tokens) whose vocabulary size or <|loc_DDDD|> ids differ from `processor`'s: the adapter's
    embedding rows would belong to other tokens. No-op without saved tokenizer files."""
    d = Path(saved_dir)
    if not (d / "tokenizer_config.json").is_file():
        return
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(str(d))
    have = processor.tokenizer
    if len(saved) != len(have) or not np.array_equal(loc_token_ids(saved), loc_token_ids(have)):
        raise ValueError(
            f"the tokenizer saved in {d} ({len(saved)} tokens, {len(loc_token_ids(saved))} <|loc|>) differs from the "
            f"loaded one ({len(have)} tokens, {len(loc_token_ids(have))} <|loc|>): load it with the family it was "
            "trained with (state.json 'family', e.g. qwen2_5_vl+tokens)"
        )
