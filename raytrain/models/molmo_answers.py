"""Molmo's point answers as either family writes them (answer format "molmo"): the decoding grammar
and the per-object confidences, both families calling these plain functions with their own end
token (no implementation inheritance)."""

from __future__ import annotations

from raytrain.formats import molmo, text_confidence, text_grammar
from raytrain.formats.grammar import AnyOf

_CACHE: dict[tuple, AnyOf] = {}


def grammar(processor, labels, max_objects, empty_answer: str, end_token: str, lead: str = ""):
    """One <point> or a <points> list for ONE label, or the "nothing found" answer; None for a
    query naming several labels (Molmo writes one element per label: decoded freely). `lead`: what
    the family's tokenization puts before an answer (PaliGemma's sentencepiece "▁": " ")."""
    if len(labels) != 1:
        return None
    key = (id(processor.tokenizer), labels[0], max_objects, empty_answer, end_token, lead)
    g = _CACHE.get(key)
    if g is None:
        parts = molmo.answer_grammars(labels[0], max_points=max_objects, nothing_found=empty_answer or molmo.NOTHING_FOUND, lead=lead)
        g = _CACHE[key] = AnyOf([text_grammar.compile_grammar(p, processor.tokenizer, end_tokens=[end_token]) for p in parts])
    return g


def confidences(logprobs, token_ids, processor, labels, image_hw, empty_answer: str, end_token: str, lead: str = "") -> list[float]:
    """One confidence per parsed point, read through the grammar that reads the answer."""
    g = grammar(processor, labels, None, empty_answer, end_token, lead)
    if g is None:
        return []
    h, w = image_hw
    return text_confidence.text_object_confidences(logprobs, token_ids, g.reading(list(token_ids)), molmo.piece_parser(labels[0], w, h))
