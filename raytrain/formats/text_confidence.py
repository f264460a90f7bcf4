"""Per-object confidences of answers written as text (formats/text_grammar.py grammars).

Confidence of an object = geometric mean of the raw probabilities of the tokens that spell its
VALUE characters (numbers, location tokens, label text, a region's free phrase), read through the
answer's grammar; the same definition as PaliGemma's <loc> confidences (models/paligemma_decoding.py)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from raytrain.formats._token_vocab import SYM
from raytrain.formats.annotations import match_in_order
from raytrain.formats.text_grammar import TextGrammar


def text_object_confidences(
    logprobs: Sequence[float],
    token_ids: Sequence[int],
    grammar: TextGrammar,
    parse_objects: Callable[[str], Sequence],
) -> list[float]:
    """One confidence per object of ``parse_objects(text)`` (same order, same length), where
    ``text = grammar.vocab.decode(token_ids up to the first end token)`` (what
    ``tokenizer.decode(ids, skip_special_tokens=True)`` gives).

    ``logprobs[i]``: the raw log-probability of ``token_ids[i]``. Confidence = geometric mean of the
    probabilities of the tokens that spell the object's VALUE characters (its numbers or location
    tokens and its label's text; quotes, brackets, keys, separators and whitespace are syntax). The
    ids are read through the grammar (without its object limit and duplicate ban); each object it
    reads is parsed on its own and matched, in order, to the parse of the whole text. An object the
    grammar cannot place (text outside the grammar) gets NaN."""
    ids = [int(t) for t in token_ids]
    if len(logprobs) < len(ids):
        raise ValueError(f"{len(logprobs)} log-probs for {len(ids)} tokens")
    ends = [i for i, t in enumerate(ids) if t in grammar.end_ids]
    ids = ids[: ends[0]] if ends else ids
    g = grammar.lenient()
    vocab = g.vocab
    inputs, owner, pieces = [], [], []
    for i, t in enumerate(ids):
        x = vocab.input_of(t)
        if x is None:  # a special token: decoding skips it
            continue
        for b in ((x,) if isinstance(x, int) else x):
            inputs.append(b)
            owner.append(i)
            pieces.append(vocab.text_bytes(b - SYM) if b >= SYM else bytes((b,)))
    full = parse_objects(vocab.decode(ids))
    if not full:
        return []
    tags, objects = g.trace(inputs)
    placed: list = []
    for k in range(len(objects)):
        at = [n for n, tag in enumerate(tags) if tag is not None and tag[0] == k]
        toks = sorted({owner[n] for n in at if g.is_value(tags[n], objects)})
        conf = float(math.exp(sum(logprobs[i] for i in toks) / len(toks))) if toks else float("nan")
        text = b"".join(pieces[at[0] : at[-1] + 1]).decode("utf-8", errors="replace")
        placed.extend((o, conf) for o in parse_objects(text))
    return match_in_order(full, placed)
