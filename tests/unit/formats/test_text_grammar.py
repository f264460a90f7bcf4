"""Text answer grammars (formats/text_grammar.py, the Qwen builders in formats/qwen.py): number slots
against brute force, every answer the grammar lets through parses back cleanly (object limit, no
duplicates, box order, the token budget), every answer render_objects writes is accepted token by
token through the real tiny Qwen tokenizer, and per-object confidences cover exactly the tokens
that spell an object's values."""

import math
import random
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raytrain.formats import qwen as fmt
from raytrain.formats import qwen_grammar
from raytrain.formats import text_confidence
from raytrain.formats import text_grammar as tg
from raytrain.formats._text_parts import num_complete, num_viable
from raytrain.formats.annotations import Box, Point

LABELS = ["red circle", "red", "blue square", 'say "hi"\\', "it's", "中文标签"]
W, H = 112, 84

# ---------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("num, bound", [
    (tg.Num(0, 1234), None),
    (tg.Num(7, 640), 35),  # a range not starting at 0, and a lower bound from an earlier slot
    (tg.Num(0, 1000, 3), None),  # Python's repr of round(v, 3) for v in [0, 1]: "0.0", "0.5", "1.0"
    (tg.Num(0, 1000, 3), 120),
    (tg.Num(0, 10000, 2, trim=False), 4999),  # fixed two decimals: "49.99" .. "100.00"
])
def test_number_slot_matches_brute_force(num, bound):
    lo = num.lo if bound is None else max(num.lo, bound)
    whole = {num.render(v) for v in range(lo, num.hi + 1)}
    prefixes = {w[:i] for w in whole for i in range(len(w) + 1)}
    rng = random.Random(0)
    probes = set(prefixes)
    for w in list(whole)[:300]:  # near misses: one character changed, added or dropped
        i = rng.randrange(len(w))
        probes |= {w[:i] + c + w[i + 1 :] for c in "0123456789."} | {w + "0", w + ".", w[:i] + w[i + 1 :], "0" + w}
    probes |= {"".join(rng.choice("0123456789.") for _ in range(rng.randint(1, 7))) for _ in range(3000)}
    for s in probes:
        b = s.encode()
        assert num_viable(num, b, bound) == (s in prefixes), s
        v = num_complete(num, b, bound)
        assert (v is not None) == (s in whole), s
        if v is not None:
            assert num.render(v) == s


def test_renderings_are_those_of_the_formats():
    assert [tg.Num(0, 1000, 3).render(v) for v in (0, 5, 50, 500, 125, 1000)] == ["0.0", "0.005", "0.05", "0.5", "0.125", "1.0"]
    for v in range(1001):  # exactly json.dumps(round(x, 3)) as formats.qwen writes normalised values
        assert tg.Num(0, 1000, 3).render(v) == repr(round(v / 1000, 3))
    assert tg.Num(0, 10000, 2, trim=False).render(1250) == "12.50"


def test_bad_descriptions_are_rejected():
    with pytest.raises(ValueError, match="slot"):
        tg.AnswerGrammar((tg.Lit("x"),))
    with pytest.raises(ValueError, match="ge="):
        tg.AnswerGrammar((tg.Num(0, 10), tg.Num(0, 20, ge=0)))  # x2's range must equal x1's
    with pytest.raises(ValueError, match="ge="):
        tg.AnswerGrammar((tg.Num(0, 10, ge=0),))  # only an EARLIER slot
    with pytest.raises(ValueError, match="max_objects"):
        tg.AnswerGrammar((tg.Num(0, 10),), max_objects=0)


# ---------------------------------------------------------------------------- a toy vocabulary

# every printable ASCII byte, some merged pieces (numbers, JSON syntax, label words), the UTF-8
# bytes of the CJK label one by one (byte-level BPE splits characters), added loc tokens, and
# <end> / a special token that must never appear
PIECES = [bytes((b,)) for b in range(9, 127)] + [bytes((b,)) for b in "中文标签".encode()] + [
    s.encode() for s in ['{"', '": ', ", ", '"}', "},\n\t", "```", "json", "\n\t", "[\n\t", "\n]", "red", " circle",
                         "blue", " square", "12", "0.", "100", '"label', "bbox", "_2d", "point", "', [", "])", "('", "中"]
]
LOC0 = 3000
END, OTHER = 2000, 2001
TOY = tg.TokenVocab({i: p for i, p in enumerate(PIECES)},
                    {**{LOC0 + b: fmt.loc_token(b) for b in range(fmt.NUM_BINS)}, END: "<end>", OTHER: "<other>"},
                    special={END, OTHER})


def toy_ids(text: str) -> list[int]:
    """Greedy longest-match tokenization with the toy vocabulary (loc tokens split off first)."""
    ids = []
    for chunk in re.split(r"(<\|loc_\d{4}\|>)", text):
        if chunk.startswith("<|loc_"):
            ids.append(LOC0 + int(chunk[6:10]))
            continue
        b = chunk.encode()
        while b:
            n = max(len(k) for k in TOY.keys if b.startswith(k))
            ids.append(TOY.key_ids[TOY.key_index[b[:n]]][0])
            b = b[n:]
    return ids


def toy_grammar(kind="box", rep="absolute", max_objects=None, **kw) -> tg.TextGrammar:
    return tg.TextGrammar(qwen_grammar.answer_grammar(kind, LABELS, rep, W, H, max_objects, **kw), TOY, [END])


def walk(g, rng, budget=None, prefer_long=False, limit=3000) -> list[int]:
    """Follow the grammar at random (or as long as it lets us) until <end>."""
    ids: list[int] = []
    while len(ids) < limit:
        a = g.allowed(ids, None if budget is None else budget - len(ids))
        assert a.locs is None and a.tokens, f"nothing allowed after {TOY.decode(ids)!r}"
        choices = [t for t in a.tokens if t != END] if prefer_long and len(a.tokens) > 1 else list(a.tokens)
        t = rng.choice(choices)
        ids.append(t)
        if t == END:
            return ids
    raise AssertionError("no <end> reached")


def parse(text, kind, rep, labels=LABELS):
    return fmt.parse(text, kind, W, H, W, H, rep, labels)


@pytest.mark.parametrize("rep", fmt.REPRESENTATIONS)
@pytest.mark.parametrize("kind", ["point", "box"])
def test_toy_accepts_rendered_answers_and_rejects_broken_ones(rep, kind):
    g = toy_grammar(kind, rep)
    if kind == "point":
        objs = [Point(3.2, 80.1, "red"), Point(111.9, 0.2, "中文标签"), Point(50, 40, 'say "hi"\\')]
    else:
        objs = [Box(0, 0, 112, 84, "red circle"), Box(10.4, 20.6, 10.4, 20.6, "it's"), Box(5, 6, 70, 80, "red")]
    text = fmt.render_objects(objs, W, H, W, H, rep)
    assert g.accepts(toy_ids(text) + [END]), text
    assert not g.accepts(toy_ids(text))  # no <end>
    assert not g.accepts(toy_ids(text) + [OTHER, END])
    assert not g.accepts(toy_ids(text + " ") + [END])
    dup = fmt.render_objects(objs[:1], W, H, W, H, rep)
    assert g.accepts(toy_ids(dup) + [END])
    doubled = fmt.render_objects(objs[:1], W, H, W, H, rep, fenced=False)
    doubled = doubled[:-1] + ", " + doubled[1:]  # the same object twice (unfenced layout)
    assert not tg.TextGrammar(qwen_grammar.answer_grammar(kind, LABELS, rep, W, H, fenced=False), TOY, [END]).accepts(toy_ids(doubled) + [END])
    assert tg.TextGrammar(qwen_grammar.answer_grammar(kind, LABELS, rep, W, H, fenced=False, forbid_duplicates=False),
                          TOY, [END]).accepts(toy_ids(doubled) + [END])
    assert not toy_grammar(kind, rep, max_objects=2).accepts(toy_ids(text) + [END])
    assert not tg.TextGrammar(qwen_grammar.answer_grammar(kind, ["red"], rep, W, H), TOY, [END]).accepts(toy_ids(text) + [END])


@pytest.mark.parametrize("bad", [
    '[{"bbox_2d": [12, 30, 11, 40], "label": "red"}]',  # x2 < x1
    '[{"bbox_2d": [12, 30, 13, 29], "label": "red"}]',  # y2 < y1
    '[{"bbox_2d": [012, 30, 13, 40], "label": "red"}]',  # leading zero
    '[{"bbox_2d": [113, 30, 113, 40], "label": "red"}]',  # x beyond the frame width (112)
    '[{"bbox_2d": [1, 85, 2, 85], "label": "red"}]',  # y beyond the frame height (84)
    '[{"bbox_2d": [1, 2, 3, 4], "label": "green"}]',  # not an allowed label
    '[{"bbox_2d": [1, 2, 3], "label": "red"}]',
    '[{"bbox_2d": [1, 2, 3, 4], "label": "red"},]',
    "[]",  # the empty answer, unless allowed
])
def test_toy_rejects_invalid_absolute_boxes(bad):
    assert not tg.TextGrammar(qwen_grammar.answer_grammar("box", LABELS, "absolute", W, H, fenced=False), TOY, [END]).accepts(toy_ids(bad) + [END])


def test_toy_normalized_numbers_are_written_as_rendered():
    g = tg.TextGrammar(qwen_grammar.answer_grammar("point", ["red"], "normalized", W, H, fenced=False), TOY, [END])
    assert g.accepts(toy_ids('[{"point_2d": [0.5, 1.0], "label": "red"}]') + [END])
    for bad in ("0.50", "1", "1.001", ".5", "0.1234", "00.5"):
        assert not g.accepts(toy_ids(f'[{{"point_2d": [{bad}, 0.0], "label": "red"}}]') + [END]), bad


def test_toy_empty_answer_only_when_allowed():
    for rep, fenced, empty in (("absolute", True, "```json\n[]\n```"), ("normalized", False, "[]"), ("pairs", True, "[]")):
        assert tg.TextGrammar(qwen_grammar.answer_grammar("box", LABELS, rep, W, H, fenced=fenced, allow_empty=True), TOY, [END]).accepts(toy_ids(empty) + [END])
        assert not tg.TextGrammar(qwen_grammar.answer_grammar("box", LABELS, rep, W, H, fenced=fenced), TOY, [END]).accepts(toy_ids(empty) + [END])


@pytest.mark.parametrize("rep", fmt.REPRESENTATIONS)
@pytest.mark.parametrize("kind", ["point", "box"])
def test_toy_random_walks_always_parse(rep, kind):
    rng = random.Random(1)
    g = toy_grammar(kind, rep, max_objects=4, allow_empty=True)
    seen_empty = False
    for n in range(40):
        ids = walk(g, rng, prefer_long=n % 2 == 1)
        assert ids[-1] == END and END not in ids[:-1]
        res = parse(TOY.decode(ids), kind, rep)
        if not res.objects and [e.reason for e in res.errors] == ["empty_output"]:
            seen_empty = True
            continue
        assert res.errors == [] and 1 <= len(res.objects) <= 4, TOY.decode(ids)
        assert len(set(res.objects)) == len(res.objects)
        assert all(o.label in LABELS for o in res.objects)
        if kind == "box":
            assert all(b.x2 >= b.x1 and b.y2 >= b.y1 for b in res.objects)
    assert seen_empty


@pytest.mark.parametrize("rep", fmt.REPRESENTATIONS)
def test_toy_budget_ends_the_answer_in_time(rep):
    """Walks that avoid <end> whenever they can still stop within the budget, and no object is cut."""
    rng = random.Random(2)
    g = toy_grammar("box", rep)
    least = g.tokens_to_finish(g.state([]))
    assert least < 60
    for budget in (int(least), int(least) + 1, 60, 90):
        for _ in range(6):
            ids = walk(g, rng, budget=budget, prefer_long=True)
            assert len(ids) <= budget
            res = parse(TOY.decode(ids), "box", rep)
            assert res.errors == [] and res.objects
    # a budget that cannot hold the shortest answer is ignored (the output will be cut there)
    assert g.allowed([], int(least) - 1).tokens == g.allowed([], None).tokens


def test_toy_duplicate_ban_never_leaves_a_dead_end():
    """Two labels and a 2x1 frame: 2 x 3 x 2 = 12 distinct points exist (x in 0..2, y in 0..1);
    without an object limit the grammar must stop offering a separator once all are used, never let
    a prefix start a 13th."""
    g = tg.TextGrammar(qwen_grammar.answer_grammar("point", ["red", "blue"], "pairs", 2, 1), TOY, [END])
    rng = random.Random(3)
    for _ in range(30):
        ids: list[int] = []
        while not ids or ids[-1] != END:  # never close the list while another object may start
            a = g.allowed(ids)
            assert a.tokens, TOY.decode(ids)
            keep = [t for t in a.tokens if t != END and b"]" not in TOY.text_bytes(t)]
            ids.append(rng.choice(keep or list(a.tokens)))
        res = fmt.parse(TOY.decode(ids), "point", 2, 1, 2, 1, "pairs", ["red", "blue"])
        assert res.errors == [] and len(res.objects) == len(set(res.objects)) == 12


def test_toy_state_is_off_grammar_after_a_wrong_token_and_done_after_end():
    g = toy_grammar()
    wrong = toy_ids("```json\n[\n\tX")
    assert g.allowed(wrong).tokens == (END,)
    ok = toy_ids(fmt.render_objects([Box(1, 2, 3, 4, "red")], W, H, W, H)) + [END]
    assert g.allowed(ok).tokens == (END,) and g.allowed(ok + [OTHER, 5]).tokens == (END,)
    assert g.loc_ids.size == 0


# ---------------------------------------------------------------------------- the real tiny Qwen tokenizer


@pytest.fixture(scope="module")
def qwen_tok(tiny_qwen_path):
    """The tiny preset's tokenizer through the `tokens` view (its <|loc|> tokens present either way)."""
    from raytrain.models import family

    return family("qwen2_5_vl+tokens").load_processor(tiny_qwen_path).tokenizer


def test_vocab_bytes_are_the_tokenizers(qwen_tok):
    v = tg.token_vocab(qwen_tok)
    assert tg.token_vocab(qwen_tok) is v  # cached
    rng = random.Random(0)
    for text in ['{"bbox_2d": [12, 34], "label": "中文标签"}', "naïve café 🙂 ```json\n[\n\t", "<|loc_0012|>x<|loc_1023|>"]:
        ids = qwen_tok(text, add_special_tokens=False)["input_ids"]
        assert v.decode(ids) == text
    for _ in range(200):  # any ids, partial UTF-8 characters and special tokens included
        ids = [rng.randrange(len(qwen_tok)) for _ in range(rng.randint(1, 12))]
        assert v.decode(ids) == qwen_tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    im_end = qwen_tok.convert_tokens_to_ids("<|im_end|>")
    assert v.input_of(im_end) is None and v.added_id["<|loc_0000|>"] == qwen_tok.convert_tokens_to_ids("<|loc_0000|>")


def test_sentencepiece_vocab_spells_its_pieces():
    from raytrain.models.tiny_paligemma import build_tokenizer

    tok = build_tokenizer()
    v = tg.TokenVocab.from_tokenizer(tok)
    text = "<loc0001><loc0002> red circle ; <loc0003><loc0004> blue square"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert v.decode(ids).strip() == tok.decode(ids, skip_special_tokens=True).strip() == text


def _objects(draw_kind, draw, labels):
    n = draw(st.integers(1, 5))
    # no -0.0 (nor a negative denormal, which the frame scaling rounds to -0.0): render_objects writes
    # it as "-0.0" in the normalized format (its clip keeps the sign of zero), which no grammar
    # should teach a model to write
    coord = st.floats(-10, 130, allow_nan=False).map(lambda v: v if abs(v) > 1e-300 else 0.0)
    out = []
    for _ in range(n):
        lb = draw(st.sampled_from(labels))
        if draw_kind == "point":
            out.append(Point(draw(coord), draw(coord), lb))
        else:
            x1, x2 = sorted((draw(coord), draw(coord)))
            y1, y2 = sorted((draw(coord), draw(coord)))
            out.append(Box(x1, y1, x2, y2, lb))
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), rep=st.sampled_from(fmt.REPRESENTATIONS), kind=st.sampled_from(["point", "box"]),
       fenced=st.booleans(), frame=st.sampled_from([(112, 112), (644, 476), (28, 1988)]))
def test_every_rendered_answer_is_accepted_token_by_token(qwen_tok, data, rep, kind, fenced, frame):
    fw, fh = frame
    labels = data.draw(st.lists(st.sampled_from(LABELS + ["cat", "traffic light"]), min_size=1, max_size=4, unique=True))
    objs = _objects(kind, data.draw, labels)
    text = fmt.render_objects(objs, 120, 120, fw, fh, rep, fenced=fenced)
    distinct = len(set(parse_qwen := fmt.parse(text, kind, 120, 120, fw, fh, rep, labels).objects)) == len(parse_qwen)
    g = tg.compile_grammar(qwen_grammar.answer_grammar(kind, labels, rep, fw, fh, max_objects=5, fenced=fenced, forbid_duplicates=distinct), qwen_tok)
    ids = qwen_tok(text + "<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[-1] == g.eos_id
    for i, t in enumerate(ids):
        assert t in g.allowed(ids[:i]).tokens, (text, qwen_tok.decode(ids[:i]))
        assert t in g.allowed(ids[:i], 4096 - i).tokens
    assert g.accepts(ids)


# ---------------------------------------------------------------------------- confidence


def _value_spans(text: str, rep: str) -> list[list[tuple[int, int]]]:
    """Character spans of each object's values, found with regexes instead of the grammar."""
    out = []
    if rep == "pairs":
        for m in re.finditer(r"\((['\"])(.*?)\1, \[([^\]]*)\]\)", text):
            spans = [(m.start(2), m.end(2))]
            spans += [(m.start(3) + n.start(), m.start(3) + n.end()) for n in re.finditer(r"[0-9.]+", m.group(3))]
            out.append(spans)
        return out
    for m in re.finditer(r'\{"(?:bbox|point)_2d": (\[[^\]]*\]|"[^"]*"), "label": "((?:[^"\\]|\\.)*)"\}', text):
        spans = [(m.start(2), m.end(2))]
        pat = r"<\|loc_\d{4}\|>" if rep == "tokens" else r"[0-9.]+"
        spans += [(m.start(1) + n.start(), m.start(1) + n.end()) for n in re.finditer(pat, m.group(1))]
        out.append(spans)
    return out


@pytest.mark.parametrize("rep", fmt.REPRESENTATIONS)
def test_confidence_is_geometric_mean_of_the_value_tokens(qwen_tok, rep):
    objs = [Box(10, 20, 30, 40, "red circle"), Box(1, 2, 100, 80, 'say "hi"\\'), Box(50, 5, 60, 6, "中文标签")]
    text = fmt.render_objects(objs, W, H, W, H, rep)
    enc = qwen_tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    im_end = qwen_tok.convert_tokens_to_ids("<|im_end|>")
    rng = np.random.default_rng(0)
    lp = np.log(rng.uniform(0.05, 1.0, len(ids) + 3))
    g = tg.compile_grammar(qwen_grammar.answer_grammar("box", LABELS, rep, W, H), qwen_tok)
    parse_objects = lambda t: parse(t, "box", rep).objects
    conf = text_confidence.text_object_confidences(lp, ids + [im_end, qwen_tok.pad_token_id, qwen_tok.pad_token_id], g, parse_objects)
    spans = _value_spans(text, rep)
    assert len(spans) == len(conf) == len(parse_objects(text)) == 3
    for c, sp in zip(conf, spans):
        toks = [i for i, (a, b) in enumerate(offsets) if any(a < e and s < b for s, e in sp)]
        assert math.isclose(c, math.exp(np.mean(lp[toks])), rel_tol=1e-9)
    assert len(set(conf)) == 3


def test_confidence_nan_where_the_grammar_cannot_place_an_object(qwen_tok):
    g = tg.compile_grammar(qwen_grammar.answer_grammar("point", ["red", "blue"], "absolute", W, H, fenced=False), qwen_tok)
    text = '[{"point_2d": [1, 2], "label": "red"}, {"point_2d": [3, 4], "label": "green"}, {"point_2d": [5, 6], "label": "blue"}]'
    ids = qwen_tok(text, add_special_tokens=False)["input_ids"]
    lp = np.full(len(ids), math.log(0.5))
    # parsed without a label filter: "green" is an object to the parser but not to the grammar
    conf = text_confidence.text_object_confidences(lp, ids, g, lambda t: parse(t, "point", "absolute", None).objects)
    assert len(conf) == 3 and math.isclose(conf[0], 0.5) and math.isnan(conf[1]) and math.isnan(conf[2])
    # a duplicate and a fourth object beyond the limit are still placed (reading ignores both rules)
    g3 = tg.compile_grammar(qwen_grammar.answer_grammar("point", ["red"], "absolute", W, H, max_objects=1, fenced=False), qwen_tok)
    text = '[{"point_2d": [1, 2], "label": "red"}, {"point_2d": [1, 2], "label": "red"}]'
    ids = qwen_tok(text, add_special_tokens=False)["input_ids"]
    conf = text_confidence.text_object_confidences(np.full(len(ids), math.log(0.25)), ids, g3, lambda t: parse(t, "point", "absolute").objects)
    assert conf == pytest.approx([0.25, 0.25])
    assert text_confidence.text_object_confidences([], [], g3, lambda t: parse(t, "point", "absolute").objects) == []
    with pytest.raises(ValueError, match="log-probs"):
        text_confidence.text_object_confidences([0.0], ids, g3, lambda t: [])
