"""The answer grammar of Qwen2.5-VL's formats (formats/qwen.py) for constrained decoding: exactly
the text `render_objects` writes, as a `text_grammar.AnswerGrammar` (compile it against a tokenizer
with `text_grammar.compile_grammar`). Kept beside the codec it mirrors; pure, no torch.

`answer_grammar`: points and boxes labelled from the query's labels. `region_grammar`: dense
captions, boxes each with a FREE phrase (`text_grammar.Text`), in every representation (Qwen3-VL's
0-1000 JSON is `absolute` in a 1000 x 1000 frame)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace

from raytrain.formats import text_grammar as tg
from raytrain.formats.qwen import (
    _KEY,
    KINDS,
    LOC_TOKENS,
    NORMALIZED_DECIMALS,
    REPRESENTATIONS,
    _check_label,
    _check_sizes,
)


def answer_grammar(
    kind: str,
    labels: Sequence[str],
    representation: str,
    frame_w: int,
    frame_h: int,
    max_objects: int | None = None,
    fenced: bool = True,
    allow_empty: bool = False,
    forbid_duplicates: bool = True,
) -> tg.AnswerGrammar:
    """The answers ``render_objects`` writes for ``kind`` objects labelled with one of ``labels``, in
    the model frame ``frame_w`` x ``frame_h`` (resized pixels), as a ``text_grammar.AnswerGrammar``:
    exactly its layout, separators and number formats, boxes with x2 >= x1 and y2 >= y1 (``parse``
    rejects the others), at most ``max_objects`` objects; ``allow_empty`` also accepts the empty
    answer (the fenced / bare ``[]``). Compile it with ``text_grammar.compile_grammar``."""
    if kind not in _KEY:
        raise ValueError(f"unknown kind {kind!r}, expected one of {KINDS}")
    if representation not in REPRESENTATIONS:
        raise ValueError(f"unknown representation {representation!r}, expected one of {REPRESENTATIONS}")
    _check_sizes(frame_w, frame_h)
    labels = list(dict.fromkeys(labels))
    if not labels:
        raise ValueError("at least one allowed label is needed")
    for lb in labels:
        _check_label(lb)
    pairs = representation == "pairs"
    if pairs:  # str() of a list of (label, [...]) tuples: repr'd labels, never fenced
        label = tg.Label(tuple(repr(lb) for lb in labels), quote=1)
    else:
        label = tg.Label(tuple(json.dumps(lb, ensure_ascii=False) for lb in labels), quote=1)
    return _answer(kind, label, representation, frame_w, frame_h, fenced, allow_empty, max_objects, forbid_duplicates)


def _answer(kind, label, representation, frame_w, frame_h, fenced, allow_empty, max_objects, forbid_duplicates) -> tg.AnswerGrammar:
    """The layout `render_objects` writes around each object's `label` slot (a Label or a Text)."""
    pairs = representation == "pairs"
    first = 1 if pairs else 0  # slot number of the first coordinate (pairs write the label first)
    if representation == "tokens":
        axes = [tg.Token(LOC_TOKENS), tg.Token(LOC_TOKENS)]
    elif representation == "normalized":
        axes = [tg.Num(0, 10**NORMALIZED_DECIMALS, NORMALIZED_DECIMALS)] * 2
    else:
        axes = [tg.Num(0, int(frame_w)), tg.Num(0, int(frame_h))]
    coords = list(axes) + ([replace(a, ge=first + i) for i, a in enumerate(axes)] if kind == "box" else [])
    if representation == "tokens":  # "<|loc_..|><|loc_..|>": one JSON string, no separators
        value = [tg.Lit('"'), *coords, tg.Lit('"')]
    else:
        value = [tg.Lit("[")] + [x for i, c in enumerate(coords) for x in ([tg.Lit(", ")] if i else []) + [c]] + [tg.Lit("]")]
    if pairs:
        item = [tg.Lit("("), label, tg.Lit(", "), *value, tg.Lit(")")]
        head, sep, tail, empty = "[", ", ", "]", "[]"
    else:
        item = [tg.Lit('{"' + _KEY[kind] + '": '), *value, tg.Lit(', "label": '), label, tg.Lit("}")]
        if fenced:
            head, sep, tail, empty = "```json\n[\n\t", ",\n\t", "\n]\n```", "```json\n[]\n```"
        else:
            head, sep, tail, empty = "[", ", ", "]", "[]"
    return tg.AnswerGrammar(tuple(item), head, sep, tail, empty if allow_empty else None, max_objects, forbid_duplicates)


# A phrase: at most this many bytes between its quotes (the pairs parser reads up to 500 characters),
# without "<" (no "<|im_end|>" / "</think>" spelled in it) or "`" (no closing fence).
PHRASE_MAX_BYTES = 200
PHRASE_EXCLUDED = "<`"


def region_grammar(representation: str, frame_w: int, frame_h: int, max_objects: int | None = None, fenced: bool = True,
                   max_phrase_bytes: int = PHRASE_MAX_BYTES) -> tg.AnswerGrammar:
    """Dense-caption answers as ``render_objects`` writes them for boxes labelled with their phrase:
    the phrase is free text (``text_grammar.Text``: quoted as the format quotes it, ``pairs``
    either way ``repr`` does, escapes only ``\\`` and the quote; at least one visible character;
    at most ``max_phrase_bytes``), boxes with x2 >= x1, y2 >= y1 inside the frame. At least one
    region (the parsers read an empty list of regions as an error), no limit on repeats (two regions
    may share a box)."""
    if representation not in REPRESENTATIONS:
        raise ValueError(f"unknown representation {representation!r}, expected one of {REPRESENTATIONS}")
    _check_sizes(frame_w, frame_h)
    phrase = tg.Text(("'", '"') if representation == "pairs" else ('"',), max_phrase_bytes, PHRASE_EXCLUDED)
    return _answer("box", phrase, representation, frame_w, frame_h, fenced, False, max_objects, False)


_COMPILED: dict[tuple, object] = {}
_COMPILED_MAX = 256  # compiled grammars kept per process (label sets x kinds x frames)


def compiled_grammar(tokenizer, kind: str, labels: tuple, representation: str, fw: int, fh: int, max_objects,
                     empty_answer: str = "", end_tokens: tuple = ()):
    """The compiled answer grammar (text_grammar.compile_grammar) of one label set, cached: every row
    and beam of a batch and every batch with the same labels share it (it keeps no per-call state).
    The "nothing found" answer (the empty list, or `empty_answer`) is always allowed."""
    key = (id(tokenizer), kind, labels, representation, fw, fh, max_objects, empty_answer, end_tokens)
    g = _COMPILED.get(key)
    if g is None:
        if len(_COMPILED) >= _COMPILED_MAX:
            _COMPILED.pop(next(iter(_COMPILED)))
        answer = answer_grammar(kind, labels, representation, fw, fh, max_objects=max_objects, allow_empty=True)
        if empty_answer:
            answer = replace(answer, empty=empty_answer)
        g = _COMPILED[key] = tg.compile_grammar(answer, tokenizer, end_tokens=list(end_tokens))
    return g



def compiled_region_grammar(tokenizer, representation: str, fw: int, fh: int, max_objects, end_tokens: tuple = ()):
    """The compiled `region_grammar` of one frame, cached as `compiled_grammar`'s."""
    key = (id(tokenizer), "region", representation, fw, fh, max_objects, end_tokens)
    g = _COMPILED.get(key)
    if g is None:
        if len(_COMPILED) >= _COMPILED_MAX:
            _COMPILED.pop(next(iter(_COMPILED)))
        g = _COMPILED[key] = tg.compile_grammar(region_grammar(representation, fw, fh, max_objects), tokenizer, end_tokens=list(end_tokens))
    return g
