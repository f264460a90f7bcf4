"""Evaluation grids: checkpoints x prompts x decoding strategies, one table row per cell.

Seed 003 evaluated 2 checkpoints x 3 prompts x 2 decodings (greedy; beam search with
sampling) = 12 runs and showed that the prompt alone can move BLEU-1 from 0.38 to 0.003 and
that decoding moves it by a few points; ``seed003_grid`` is that grid. ``run_grid`` runs any
grid through two user functions, so the same loop serves captioning and grounding:

    predict_fn(checkpoint, prompt, decoding) -> predictions     (whatever score_fn reads)
    score_fn(predictions) -> {metric: value}

Cells run checkpoint by checkpoint (predict_fn can keep one model loaded at a time), and
every cell is seeded with its decoding's ``seed`` first, so a sampled cell gives the same
output whether it runs alone or inside a grid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import product
from typing import Any

from raytrain.predict import seed_everything

ROW_KEYS = ("checkpoint", "prompt", "decoding")


@dataclass(frozen=True)
class DecodingConfig:
    """One decoding strategy; ``generate_kwargs()`` gives the ``model.generate`` keywords.

    Sampling knobs (temperature, top_p, top_k) need ``do_sample``; beam knobs
    (length_penalty, early_stopping) need ``num_beams > 1``: setting them otherwise is an
    error here rather than a warning that ``generate`` ignores them. None = the model's default.
    """

    name: str
    max_new_tokens: int = 16
    num_beams: int = 1
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    no_repeat_ngram_size: int | None = None
    length_penalty: float | None = None
    early_stopping: bool | None = None
    seed: int = 0  # seeds python / numpy / torch before the cell runs

    def __post_init__(self):
        if not self.name:
            raise ValueError("a decoding needs a name (it is the table's row key)")
        if self.max_new_tokens < 1 or self.num_beams < 1:
            raise ValueError(f"{self.name}: max_new_tokens and num_beams must be >= 1")
        sampling = {k: v for k, v in (("temperature", self.temperature), ("top_p", self.top_p), ("top_k", self.top_k)) if v is not None}
        if sampling and not self.do_sample:
            raise ValueError(f"{self.name}: {sorted(sampling)} only apply with do_sample=True")
        beam = {k: v for k, v in (("length_penalty", self.length_penalty), ("early_stopping", self.early_stopping)) if v is not None}
        if beam and self.num_beams == 1:
            raise ValueError(f"{self.name}: {sorted(beam)} only apply with num_beams > 1")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"{self.name}: temperature must be > 0")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"{self.name}: top_p must be in (0, 1]")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"{self.name}: top_k must be >= 0")
        if self.no_repeat_ngram_size is not None and self.no_repeat_ngram_size < 1:
            raise ValueError(f"{self.name}: no_repeat_ngram_size must be >= 1")

    def generate_kwargs(self) -> dict[str, Any]:
        """Keywords for ``model.generate`` / ``models.<family>.generate`` (only those set)."""
        kw = {k: v for k, v in asdict(self).items() if k not in ("name", "seed") and v is not None}
        return kw


def greedy(max_new_tokens: int = 16, name: str = "greedy") -> DecodingConfig:
    return DecodingConfig(name, max_new_tokens)


def beam(num_beams: int = 4, length_penalty: float = 1.0, early_stopping: bool = True, max_new_tokens: int = 16,
         name: str | None = None, **extra) -> DecodingConfig:
    """Beam search; ``length_penalty`` > 1 favours longer outputs (scores are divided by length**lp)."""
    return DecodingConfig(name or f"beam{num_beams}", max_new_tokens, num_beams=num_beams, length_penalty=length_penalty,
                          early_stopping=early_stopping, **extra)


def sampling(temperature: float = 1.0, top_p: float | None = None, top_k: int | None = None, seed: int = 0,
             max_new_tokens: int = 16, name: str | None = None, **extra) -> DecodingConfig:
    """Ancestral sampling with optional nucleus (top_p) / top-k truncation."""
    parts = [f"t{temperature:g}"] + ([f"p{top_p:g}"] if top_p is not None else []) + ([f"k{top_k}"] if top_k is not None else [])
    return DecodingConfig(name or "sample_" + "_".join(parts), max_new_tokens, do_sample=True, temperature=temperature,
                          top_p=top_p, top_k=top_k, seed=seed, **extra)


@dataclass(frozen=True)
class GridCell:
    """One run of a grid: ``prompt_name`` labels the row, ``prompt`` is what the model sees."""

    checkpoint: str
    prompt_name: str
    prompt: str
    decoding: DecodingConfig


def grid_cells(prompts: Sequence[str] | Mapping[str, str], decodings: Sequence[DecodingConfig],
               checkpoints: Sequence[str]) -> list[GridCell]:
    """Every (checkpoint, prompt, decoding), checkpoint outermost. ``prompts``: texts, or
    ``{name: text}`` to give rows short names (seed 003's A / B / C)."""
    named = dict(prompts) if isinstance(prompts, Mapping) else {p: p for p in prompts}
    if not isinstance(prompts, Mapping) and len(named) != len(prompts):
        raise ValueError("duplicate prompts")
    names = [d.name for d in decodings]
    if len(set(names)) != len(names):
        raise ValueError(f"decoding names must be unique, got {names}")
    if len(set(checkpoints)) != len(checkpoints):
        raise ValueError(f"duplicate checkpoints {list(checkpoints)}")
    return [GridCell(c, pn, pt, d) for c, (pn, pt), d in product(checkpoints, named.items(), decodings)]


def run_cells(predict_fn: Callable[[str, str, DecodingConfig], Any], cells: Sequence[GridCell],
              score_fn: Callable[[Any], Mapping[str, Any]]) -> list[dict]:
    """One row per cell: ``checkpoint``, ``prompt`` (its name), ``decoding`` (its name), then
    the metrics of ``score_fn``. Each cell is seeded with its decoding's seed before it runs."""
    rows = []
    for cell in cells:
        seed_everything(cell.decoding.seed)
        metrics = dict(score_fn(predict_fn(cell.checkpoint, cell.prompt, cell.decoding)))
        clash = set(metrics) & set(ROW_KEYS)
        if clash:
            raise ValueError(f"score_fn returned reserved keys {sorted(clash)}")
        rows.append({"checkpoint": cell.checkpoint, "prompt": cell.prompt_name, "decoding": cell.decoding.name, **metrics})
    return rows


def run_grid(predict_fn: Callable[[str, str, DecodingConfig], Any], prompts: Sequence[str] | Mapping[str, str],
             decodings: Sequence[DecodingConfig], checkpoints: Sequence[str], *,
             score_fn: Callable[[Any], Mapping[str, Any]]) -> list[dict]:
    """``run_cells`` over every (checkpoint, prompt, decoding): len(checkpoints) x
    len(prompts) x len(decodings) rows."""
    return run_cells(predict_fn, grid_cells(prompts, decodings, checkpoints), score_fn)


# ---------------------------------------------------------------------------- seed 003

SEED003_PROMPTS = {
    "A": "Describe this image in detail:",  # the fine-tuning prompt
    "B": "Describe this image:",
    "C": "What do you see in this image:",
}
# Table III of seed 003. "B+S" is beam search WITH sampling (transformers' beam sampling).
SEED003_DECODINGS = (
    DecodingConfig("G", max_new_tokens=16),
    DecodingConfig(
        "B+S",
        max_new_tokens=16,
        num_beams=4,
        do_sample=True,
        top_p=0.9,
        top_k=50,
        temperature=0.8,
        early_stopping=True,
        length_penalty=1.0,
        no_repeat_ngram_size=2,
    ),
)


def seed003_grid(checkpoints: Sequence[str] = ("conf1", "conf2")) -> list[GridCell]:
    """Seed 003's 12 runs: 2 QLoRA checkpoints x prompts A/B/C x decodings G and B+S."""
    return grid_cells(SEED003_PROMPTS, SEED003_DECODINGS, checkpoints)
