"""Where an answer writes coordinates as digits, and what each digit is worth.

Formats that write coordinates as numbers in text (Qwen2.5-VL's absolute pixels, normalized 0-1 and
(phrase, box) pairs; Molmo's percent points; Qwen3-VL's 0-1000) record, WHILE rendering, the
character span of every coordinate value and the range it lives in (`NumberSpan`). Nothing here
guesses numbers from the text: a label such as "cat 2" has digits that are not coordinates.

From the spans and a tokenizer's character offsets, `token_place_weights` gives each answer token
the value of its digit's place in units of the coordinate's range (the "112" of a 112-px frame:
100/112, 10/112, 1/112), which is what the distance-aware number loss (models/losses.py) weighs a
digit's error with. Pure functions: no torch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

DIGITS = "0123456789"


class NumberSpan(NamedTuple):
    """answer[start:end] writes one coordinate value; `range` is the span of values it can take
    (the frame side in pixels, 1.0 for normalized coordinates, 100 for percent)."""

    start: int
    end: int
    range: float


class SpanWriter:
    """Builds an answer from text pieces and records the span of every coordinate number written
    (`number`, or `numbers` for a '[12, 34]' list as JSON and Python both write it)."""

    def __init__(self):
        self.parts: list[str] = []
        self.n = 0
        self.spans: list[NumberSpan] = []

    def put(self, s: str) -> None:
        self.parts.append(s)
        self.n += len(s)

    def number(self, s: str, range_: float) -> None:
        self.spans.append(NumberSpan(self.n, self.n + len(s), float(range_)))
        self.put(s)

    def numbers(self, values, ranges) -> None:
        self.put("[")
        for i, (v, r) in enumerate(zip(values, ranges)):
            self.put(", " if i else "")
            self.number(json.dumps(v), r)
        self.put("]")

    def text(self) -> str:
        return "".join(self.parts)


def digit_places(number: str) -> list[tuple[int, float]]:
    """(offset in `number`, place value) of each digit: '112' -> [(0, 100), (1, 10), (2, 1)];
    '0.125' -> [(0, 1), (2, 0.1), (3, 0.01), (4, 0.001)]; a sign or exponent is not a digit."""
    mantissa = number.lstrip("+-").split("e")[0].split("E")[0]
    lead = len(number) - len(number.lstrip("+-"))
    int_part, _, frac = mantissa.partition(".")
    out = [(lead + i, 10.0 ** (len(int_part) - 1 - i)) for i, c in enumerate(int_part) if c in DIGITS]
    base = lead + len(int_part) + 1
    out += [(base + i, 10.0 ** -(i + 1)) for i, c in enumerate(frac) if c in DIGITS]
    return out


def token_place_weights(text: str, spans: Sequence[NumberSpan], offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    """(n_tokens,) float32 signed place weights of the tokens whose character `offsets` cover `text`:
    place / range for a token that is exactly one coordinate digit, NEGATIVE on the first digit of
    each number (so a loss can count numbers: the number of negative entries), 0 elsewhere. A
    number whose digits do not each get a token of their own (a tokenizer that merges digits) gets
    no weights at all: a digit distribution per position is what the loss needs."""
    out = np.zeros(len(offsets), dtype=np.float32)
    by_char = {}
    for s in spans:
        places = digit_places(text[s.start : s.end])
        for k, (off, place) in enumerate(places):
            by_char[s.start + off] = (s, k == 0, place / float(s.range))
    tok_of_char: dict[int, int] = {}
    for t, (a, b) in enumerate(offsets):
        for c in range(a, b):
            tok_of_char[c] = t
    for s in spans:
        chars = [s.start + off for off, _ in digit_places(text[s.start : s.end])]
        toks = [tok_of_char.get(c) for c in chars]
        single = all(t is not None and offsets[t][1] - offsets[t][0] == 1 for t in toks)
        if not single or len(set(toks)) != len(toks):
            continue
        for c, t in zip(chars, toks):
            _, first, w = by_char[c]
            out[t] = -w if first else w
    return out


def digit_token_ids(tokenizer) -> np.ndarray | None:
    """int64 ids of the vocabulary's single-digit tokens '0'..'9' in digit order (byte-level BPE and
    sentencepiece vocabularies both hold them under those strings), or None when some digit has no
    token of its own (its numbers cannot get a digit loss)."""
    vocab = tokenizer.get_vocab()
    if not all(d in vocab for d in DIGITS):
        return None
    ids = np.asarray([vocab[d] for d in DIGITS], dtype=np.int64)
    return ids if len(set(ids.tolist())) == 10 else None
