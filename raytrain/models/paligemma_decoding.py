"""PaliGemma's constrained decoding and per-object confidences (its `<loc>` answer format).

* ``PaliGemmaGrammars`` reads the token ids of each allowed label (and of the ``" ; "``
  separator after it) from a rendered training target, through the same processor call that
  builds training labels, and builds ``formats.grammar.DetectionGrammar``s from them (points,
  boxes, masks: ``<loc>``x4 ``<seg>``x16 label); for dense captions, whose phrases are free text,
  ``formats.region_grammar.RegionGrammar`` from the class of every token's text. These are what
  the family's ``grammar`` member returns, driven by ``raytrain.predict.GrammarLogitsProcessor``.
* ``object_confidences``: one confidence per parsed object, the GEOMETRIC MEAN of the
  probabilities of its tokens (its loc tokens, then its label tokens up to, not including, the
  ``;`` separator or <eos>; whitespace-only tokens are formatting and left out), i.e.
  ``exp(mean log p)``. The probabilities are the model's own (``raytrain.predict`` reads them
  before any logits processor), so constrained decoding does not inflate them. A product would
  penalise boxes (4 locs) against points (2 locs) and long labels against short ones; the
  geometric mean does not.
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Collection, Sequence

import numpy as np

from raytrain.formats import paligemma as fmt
from raytrain.formats.annotations import Obj, Point, match_in_order
from raytrain.formats.grammar import N_LOCS, N_SEGS, DetectionGrammar, query_labels
from raytrain.formats.region_grammar import RegionGrammar, token_classes

IGNORE_INDEX = -100  # the processor's label value outside the suffix
# Tokens of one dense-caption phrase: Visual Genome's phrases are a few words (a handful of tokens);
# the bound stops a barely trained model from spending the whole budget on one phrase.
MAX_PHRASE_TOKENS = 32
_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece's byte-fallback pieces

# ---------------------------------------------------------------------------- token ids


def suffix_token_ids(processor, suffixes: Sequence[str]) -> list[list[int]]:
    """Ids of each target ``suffix`` exactly as training sees them (the ``labels`` of
    ``models.paligemma.encode_train``: the same processor call), <eos> included. With a bare tokenizer instead of a
    processor: ``tokenizer(suffix + eos, add_special_tokens=False)``."""
    if hasattr(processor, "image_processor"):
        from PIL import Image

        # the processor call encode_train makes (one <image> prompt + suffix -> labels); the image is
        # a blank of the model size (the labels do not depend on it)
        size = processor.image_processor.size
        blank = Image.new("RGB", (int(size["width"]), int(size["height"])))
        enc = processor(text=["<image>"] * len(suffixes), images=[blank] * len(suffixes), suffix=list(suffixes),
                        padding="longest", return_tensors="np")
        return [[int(t) for t, m in zip(row, mask) if m and t != IGNORE_INDEX] for row, mask in zip(enc["labels"], enc["attention_mask"])]
    tok = processor
    return [list(tok(s + tok.eos_token, add_special_tokens=False)["input_ids"]) for s in suffixes]


def label_sequences(processor, labels: Sequence[str], kind: str = "point") -> dict[str, tuple[list[int], list[int]]]:
    """``{label: (ids of " label ; ", ids of " label")}`` as they appear inside a target.

    Each label is rendered twice, ``<loc><loc> label ; <loc><loc> label``, and read back: the
    ids between the two loc runs are the label followed by a separator, the ids after the
    second run (before <eos>) the label that ends the output. Reading them from a rendered
    target, instead of tokenizing ``" label"`` alone, keeps whatever the tokenizer does at the
    boundaries (a leading "▁", a label end merged with the separator). kind "mask" renders the
    runs as a segment target does (4 locs, 16 segs) and reads the label after them. Raises
    ValueError for a label that cannot be rendered (``;``, ``<``, surrounding spaces)."""
    tok = getattr(processor, "tokenizer", processor)
    run_tokens = [fmt.loc_token(i) for i in range(fmt.NUM_LOC)]
    n = 2
    if kind == "mask":
        run_tokens += [fmt.seg_token(i) for i in range(fmt.NUM_SEG)]
        n = N_LOCS[kind] + N_SEGS[kind]
    run_set = set(tok.convert_tokens_to_ids(run_tokens))
    run = "".join(run_tokens[0] for _ in range(n - N_SEGS.get(kind, 0))) + fmt.seg_token(0) * N_SEGS.get(kind, 0)
    for lb in labels:
        fmt.render_objects([Point(0, 0, lb)], 1, 1)  # the detection renderer's label checks
    suffixes = [f"{run} {lb} ; {run} {lb}" for lb in labels]
    out = {}
    for lb, ids in zip(labels, suffix_token_ids(processor, suffixes)):
        if ids and ids[-1] == tok.eos_token_id:
            ids = ids[:-1]
        is_run = [t in run_set for t in ids]
        # expected layout: run <label ; > run <label>, each run n tokens
        runs = [i for i in range(len(ids)) if is_run[i] and (i == 0 or not is_run[i - 1])]
        if len(runs) != 2 or runs[0] != 0 or sum(is_run) != 2 * n:
            raise ValueError(f"label {lb!r}: unexpected target ids {ids} (loc runs at {runs})")
        out[lb] = (ids[n : runs[1]], ids[runs[1] + n :])
        if not out[lb][0] or not out[lb][1]:
            raise ValueError(f"label {lb!r}: empty label ids in target {ids}")
    return out


def _alive(ref, what: str):
    obj = ref()
    if obj is None:
        raise RuntimeError(f"the {what} these grammars were built for was garbage-collected")
    return obj


class PaliGemmaGrammars:
    """Builds per-example ``DetectionGrammar``s for one processor, caching label ids.

    ``for_labels(kind, labels, max_objects)``: grammar for "point" / "box" output restricted
    to ``labels``. ``for_queries(kind, queries, max_objects)``: one per example, its labels
    read from the prompt query (``"cat ; dog"`` -> cat, dog), as ``detect`` prompts list them.
    """

    def __init__(self, processor, forbid_duplicates: bool = True, max_phrase: int = MAX_PHRASE_TOKENS):
        # weak references: models/paligemma.py keeps this builder in a module-level cache until the
        # processor is collected; a strong reference from here would keep it (and its tokenizer) forever
        self._processor = weakref.ref(processor)
        self._tokenizer = weakref.ref(getattr(processor, "tokenizer", processor))
        self.loc_ids = [int(i) for i in self.tokenizer.convert_tokens_to_ids([fmt.loc_token(i) for i in range(fmt.NUM_LOC)])]
        self.seg_ids = [int(i) for i in self.tokenizer.convert_tokens_to_ids([fmt.seg_token(i) for i in range(fmt.NUM_SEG)])]
        self.eos_id = int(self.tokenizer.eos_token_id)
        self.forbid_duplicates = forbid_duplicates
        self.max_phrase = max_phrase
        self._seqs: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
        self._grammars: dict[tuple, DetectionGrammar | RegionGrammar] = {}
        self._classes: np.ndarray | None = None

    @property
    def processor(self):
        return _alive(self._processor, "processor")

    @property
    def tokenizer(self):
        return _alive(self._tokenizer, "tokenizer")

    def _sequences(self, kind: str, labels: Sequence[str]) -> dict[str, tuple[list[int], list[int]]]:
        # a label reads the same after a loc run of any length; after seg tokens it is read apart
        group = "mask" if kind == "mask" else "point"
        missing = [lb for lb in dict.fromkeys(labels) if (group, lb) not in self._seqs]
        if missing:
            self._seqs.update({(group, lb): v for lb, v in label_sequences(self.processor, missing, group).items()})
        return {lb: self._seqs[(group, lb)] for lb in labels}

    def for_labels(self, kind: str, labels: Sequence[str], max_objects: int | None = None, empty_answer: str | None = None) -> DetectionGrammar:
        """`kind`: "point" | "box" | "mask". `empty_answer`: the "nothing found" text the grammar
        also accepts ("" = <eos> right away; None = none)."""
        key = (kind, tuple(labels), max_objects, empty_answer)
        if key not in self._grammars:  # grammars hold no per-call state: one per key is enough
            empty_ids = None if empty_answer is None else suffix_token_ids(self.processor, [empty_answer])[0][:-1]
            self._grammars[key] = DetectionGrammar(self.loc_ids, self._sequences(kind, list(labels)), self.eos_id, kind,
                                                   max_objects, self.forbid_duplicates, empty_ids,
                                                   self.seg_ids if kind == "mask" else None)
        return self._grammars[key]

    def for_regions(self, max_objects: int | None = None) -> RegionGrammar:
        """Dense-caption grammar (``<loc>``x4 free phrase ; ...): at least one region."""
        key = ("region", max_objects)
        if key not in self._grammars:
            if self._classes is None:
                self._classes = phrase_token_classes(self.tokenizer)
            self._grammars[key] = RegionGrammar(self.loc_ids, self.eos_id, self._classes, max_objects, self.max_phrase)
        return self._grammars[key]

    def for_queries(self, kind: str, queries: Sequence[str], max_objects: int | None = None) -> list[DetectionGrammar]:
        return [self.for_labels(kind, query_labels(q), max_objects) for q in queries]


def phrase_token_classes(tokenizer) -> np.ndarray:
    """``formats.region_grammar.token_classes`` of a sentencepiece tokenizer's vocabulary: each
    piece's text with "▁" read as a space and a byte-fallback piece (``<0x3B>``) as its byte;
    special and added tokens (<eos>, <image>, <loc>, <seg>, ...) never go in a phrase."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    n = len(tok)
    texts = {}
    for t, piece in enumerate(tok.convert_ids_to_tokens(list(range(n)))):
        if piece is None:
            continue
        m = _BYTE.fullmatch(piece)
        if m:
            b = int(m.group(1), 16)
            # a byte of a multi-byte character is text; an ASCII byte is that character
            piece = chr(b) if b < 0x80 else "\ufffd"
        texts[t] = piece.replace("\u2581", " ")
    excluded = set(tok.all_special_ids) | {int(t) for t in tok.added_tokens_decoder}
    return token_classes(texts, n, sorted(excluded))


# ---------------------------------------------------------------------------- confidence


class _TokenInfo:
    """Per-tokenizer facts object_confidences reads for every answer: the <loc> / <seg> id sets
    and each token's text. Built once per tokenizer (looking up 1,152 special tokens per answer
    was a third of a CPU evaluation batch's time); token texts are filled as tokens are met."""

    def __init__(self, tok):
        self.tok = weakref.ref(tok)  # not a strong reference: the cache must not keep the tokenizer alive
        self.loc_set = frozenset(tok.convert_tokens_to_ids([fmt.loc_token(i) for i in range(fmt.NUM_LOC)]))
        self.seg_set = frozenset(tok.convert_tokens_to_ids([fmt.seg_token(i) for i in range(fmt.NUM_SEG)]))
        self._texts: dict[int, str] = {}

    def texts(self, tok, ids: Sequence[int]) -> list[str]:
        out = []
        for t in ids:
            s = self._texts.get(t)
            if s is None:  # one token decoded alone, as before the cache
                s = self._texts[t] = tok.decode([t], skip_special_tokens=True, clean_up_tokenization_spaces=False)
            out.append(s)
        return out


_TOKEN_INFO: dict[int, _TokenInfo] = {}


def _token_info(tok) -> _TokenInfo:
    """One _TokenInfo per tokenizer object, dropped with it (the _grammars pattern of models/paligemma.py)."""
    key = id(tok)
    info = _TOKEN_INFO.get(key)
    if info is None or info.tok() is not tok:
        info = _TOKEN_INFO[key] = _TokenInfo(tok)
        weakref.finalize(tok, _TOKEN_INFO.pop, key, None)
    return info


def object_confidences(
    logprobs: Sequence[float],
    token_ids: Sequence[int],
    tokenizer,
    kind: str,
    allowed_labels: Collection[str] | None = None,
) -> list[float]:
    """One confidence per object of ``fmt.parse(text, w, h, kind, allowed_labels).objects``
    (same order, same length), where ``text`` is ``token_ids`` up to the first <eos> (what
    follows is padding), decoded without special tokens, as ``Generation.text`` is. kind "mask":
    the objects of ``paligemma_masks.parse_segments`` (a mask's 16 seg tokens count as its own);
    "region": those of a dense caption (boxes whose label is the phrase).

    ``logprobs[i]``: log-probability of ``token_ids[i]`` (``Generation.logprobs``). Confidence =
    geometric mean of the object's token probabilities (module docstring). The ids are split
    into objects at each run of loc tokens, each piece is parsed on its own, and its object is
    matched to the parse of the whole text; an object that cannot be matched (text that spells
    a loc token out of ordinary tokens) gets NaN.
    """
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    ids = [int(t) for t in token_ids]
    if len(logprobs) < len(ids):
        raise ValueError(f"{len(logprobs)} log-probs for {len(ids)} tokens")
    if tok.eos_token_id in ids:
        ids = ids[: ids.index(tok.eos_token_id)]
    info = _token_info(tok)
    texts = info.texts(tok, ids)
    loc_set, seg_set = info.loc_set, info.seg_set

    # start of each object: a loc token not preceded (whitespace aside) by a loc token, as
    # the parser's loc runs ("<loc>(\s*<loc>)*(\s*<seg>)*") are delimited
    starts, prev = [], None
    for i, t in enumerate(ids):
        if t in loc_set:
            if prev != "loc":
                starts.append(i)
            prev = "loc"
        elif t in seg_set:
            prev = "seg" if prev in ("loc", "seg") else "text"
        elif texts[i].strip():
            prev = "text"
    pieces: list[tuple[Obj, float]] = []
    for j, s in enumerate(starts):
        e = starts[j + 1] if j + 1 < len(starts) else len(ids)
        lps, in_label = [], False
        for i in range(s, e):
            t = ids[i]
            if t in loc_set or t in seg_set:
                if in_label:
                    break
                lps.append(logprobs[i])
                continue
            in_label = True
            if ";" in texts[i]:
                break
            if texts[i].strip():
                lps.append(logprobs[i])
        conf = float(math.exp(sum(lps) / len(lps))) if lps else float("nan")
        text = tok.decode(ids[s:e], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        for o in _parse(text, kind, allowed_labels):
            pieces.append((o, conf))
    full = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return match_in_order(_parse(full, kind, allowed_labels), pieces)


def _parse(text: str, kind: str, allowed_labels: Collection[str] | None) -> list:
    """Objects of an answer of `kind` on a 1x1 image (only their order and equality matter here)."""
    if kind == "mask":  # the codes, not pixels: no mask codec needed
        from raytrain.formats import paligemma_masks  # torch: only segment answers need it

        return paligemma_masks.parse_segments(text, 1, 1, codec=False, allowed_labels=allowed_labels).objects
    return fmt.parse(text, 1, 1, "box" if kind == "region" else kind, allowed_labels).objects


