"""Dense-caption region grammars (formats/qwen_grammar.region_grammar, the free-text slot of
formats/text_grammar.py + formats/_free_text.py) through the real tiny Qwen2.5-VL and Qwen3-VL
tokenizers and the families' own `grammar` / `render_example` / `parse_output`: every rendered
training target is accepted token by token; every answer a random walk through the allowed tokens
ends in parses with zero errors; the budget ends answers in time; the vectorised phrase step allows
exactly the tokens a byte-by-byte reading allows; per-object confidences cover the phrase and
coordinate tokens."""

import math
import random
import re
from types import SimpleNamespace

import numpy as np
import pytest

from raytrain.formats import qwen_grammar
from raytrain.formats import text_grammar as tg
from raytrain.formats.annotations import Region
from raytrain.models import family, tiny_qwen3

SPECS = ["qwen2_5_vl+pairs", "qwen2_5_vl", "qwen2_5_vl+normalized", "qwen2_5_vl+tokens", "qwen3_vl"]
SRC_W, SRC_H = 640, 480  # source pixels; the model input below is another size
IMAGE_HW = (84, 112)  # (h, w) of the model input: Qwen2.5-VL's frame is smart_resize of it
PHRASES = ["man's hat", 'a "big" dog', "中文 tree", "x\\y", "it's \"both\"", "é", "white cloud in blue sky", "sign: 'STOP'",
           "a" * 150, "naïve café 🙂", "{json} [brackets] (parens), commas"]


@pytest.fixture(scope="module")
def procs(tiny_qwen_path):
    qwen25 = family("qwen2_5_vl+tokens").load_processor(tiny_qwen_path)  # <|loc|> tokens present for every format
    return {"qwen2_5_vl": qwen25, "qwen3_vl": SimpleNamespace(tokenizer=tiny_qwen3.build_tokenizer())}


def _proc(procs, spec):
    return procs[spec.split("+")[0]]


def _regions(rng, n) -> list[Region]:
    out = []
    for _ in range(n):
        x1, x2 = sorted(rng.uniform(-5, SRC_W + 5) for _ in range(2))
        y1, y2 = sorted(rng.uniform(-5, SRC_H + 5) for _ in range(2))
        out.append(Region(x1, y1, x2, y2, rng.choice(PHRASES)))
    return out


def _ids(tok, text: str) -> list[int]:
    return tok(text + "<|im_end|>", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("spec", SPECS)
def test_rendered_dense_captions_are_accepted_token_by_token(procs, spec):
    fam, proc = family(spec), _proc(procs, spec)
    g = fam.grammar(proc, "region", [], IMAGE_HW)
    assert g is not None and g is fam.grammar(proc, "region", [], IMAGE_HW)  # compiled once per frame
    assert fam.grammar(proc, "caption", [], IMAGE_HW) is None
    rng = random.Random(0)
    for _ in range(25):
        regions = _regions(rng, rng.randint(1, 6))
        _, answer = fam.render_example("dense_caption", "", regions, SRC_W, SRC_H, IMAGE_HW)
        ids = _ids(proc.tokenizer, answer)
        for i, t in enumerate(ids):
            assert t in set(np.asarray(g.allowed(ids[:i], 4096 - i).tokens).tolist()), (answer, proc.tokenizer.decode(ids[:i]))
        assert g.accepts(ids), answer


def _walk(g, rng, budget, prefer_long=False) -> list[int]:
    ids: list[int] = []
    while True:
        toks = np.asarray(g.allowed(ids, budget - len(ids)).tokens).tolist()
        assert toks, ids
        if prefer_long and len(toks) > 1:
            toks = [t for t in toks if t not in g.end_ids] or toks
        ids.append(rng.choice(toks))
        if ids[-1] in g.end_ids:
            return ids
        assert len(ids) <= max(budget, 400)


@pytest.mark.parametrize("spec", SPECS)
def test_every_walk_through_the_grammar_parses_with_no_error(procs, spec):
    fam, proc = family(spec), _proc(procs, spec)
    tok = proc.tokenizer
    g = fam.grammar(proc, "region", [], IMAGE_HW)
    rng = random.Random(1)
    shortest = g.tokens_to_finish(g.state([]))  # the fewest tokens of one region, <|im_end|> included
    for n in range(40):
        budget = int(shortest) + rng.choice([0, 8, 30, 90])
        ids = _walk(g, rng, budget, prefer_long=n % 2 == 1)
        assert len(ids) <= budget and ids[-1] in g.end_ids
        text = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        res = fam.parse_output(text, "dense_caption", SRC_W, SRC_H, IMAGE_HW)
        assert res.errors == [] and res.objects, text
        for r in res.objects:
            assert isinstance(r, Region) and r.phrase.strip() and "<" not in r.phrase and "`" not in r.phrase
            assert 0 <= r.x1 <= r.x2 <= SRC_W and 0 <= r.y1 <= r.y2 <= SRC_H


@pytest.mark.parametrize("spec", ["qwen2_5_vl+pairs", "qwen2_5_vl", "qwen3_vl"])
def test_phrase_rules(procs, spec):
    fam, proc = family(spec), _proc(procs, spec)
    g = fam.grammar(proc, "region", [], IMAGE_HW)
    box = [1, 2, 30, 40]
    mx = qwen_grammar.PHRASE_MAX_BYTES

    def answer(quoted: str) -> str:
        if spec.endswith("pairs"):
            return f"[({quoted}, {box})]"
        return '```json\n[\n\t{"bbox_2d": ' + str(box) + ', "label": ' + quoted + "}\n]\n```"

    q = "'" if spec.endswith("pairs") else '"'
    good = ["a", " a ", "man" + ("\\'" if q == "'" else '\\"') + "s", "back\\\\slash", "é", "b" * mx]
    bad = ["", "   ", "\u3000", "a<b", "a`b", "a\nb", "a\\nb", "b" * (mx + 1), "a" + q + "b"]
    for p in good:
        assert g.accepts(_ids(proc.tokenizer, answer(q + p + q))), p
    for p in bad:
        assert not g.accepts(_ids(proc.tokenizer, answer(q + p + q))), p
    if spec.endswith("pairs"):  # repr's other quote: for phrases with an apostrophe
        assert g.accepts(_ids(proc.tokenizer, answer('"man\'s hat"')))
    assert not g.accepts(_ids(proc.tokenizer, answer(q + "a" + q).replace("30", "0")))  # x2 < x1
    empty = "[]" if spec.endswith("pairs") else "```json\n[]\n```"
    assert not g.accepts(_ids(proc.tokenizer, empty))  # an empty list of regions reads as an error


@pytest.mark.parametrize("spec", ["qwen2_5_vl+pairs", "qwen2_5_vl+tokens", "qwen3_vl"])
def test_phrase_steps_allow_what_a_byte_reading_allows(procs, spec):
    """The vectorised phrase step (two slices of sorted tables + the tokens that close the phrase),
    and tokens read into a phrase at once, against a fresh grammar that reads each token byte by byte."""
    fam, proc = family(spec), _proc(procs, spec)
    g = fam.grammar(proc, "region", [], IMAGE_HW)
    vocab = g.vocab
    ids_all = sorted(set(vocab.pieces) | set(vocab.added) - set(vocab.special) | set(g.end_ids))
    rng = random.Random(2)
    checked = 0
    for _ in range(6):
        ids = _walk(g, rng, 80)
        for i in range(len(ids)):
            s = g.state(ids[:i])
            in_phrase = len(s) == 1 and isinstance(next(iter(s))[2], tuple) and next(iter(s))[2][0] >= 0
            if rng.random() > (0.3 if in_phrase else 0.15):  # (states before a phrase read tokens into it at once too)
                continue
            got = set(np.asarray(g.allowed(ids[:i]).tokens).tolist())
            fresh = tg.TextGrammar(g.answer, vocab, g.end_ids)
            want = {t for t in ids_all if fresh.alive(ids[:i] + [t]) or fresh.accepts(ids[:i] + [t])}
            assert got == want, (vocab.decode(ids[:i]), sorted(got ^ want)[:10])
            checked += in_phrase
    assert checked >= 5


@pytest.mark.parametrize("spec", ["qwen2_5_vl+pairs", "qwen2_5_vl"])
def test_a_budget_ends_every_answer_in_time(procs, spec):
    fam, proc = family(spec), _proc(procs, spec)
    g = fam.grammar(proc, "region", [], IMAGE_HW)
    rng = random.Random(3)
    shortest = int(g.tokens_to_finish(g.state([])))
    assert 8 < shortest < 40
    for budget in range(shortest, shortest + 40, 3):
        for _ in range(3):
            ids = _walk(g, rng, budget, prefer_long=True)  # always the longest way: the budget must end it
            assert len(ids) <= budget and ids[-1] in g.end_ids, (budget, proc.tokenizer.decode(ids))
    ids = _walk(g, rng, shortest - 3)  # a budget that cannot hold one region is ignored, not a dead end
    assert ids[-1] in g.end_ids


def _value_spans(text: str, pairs: bool) -> list[list[tuple[int, int]]]:
    """Character spans of each region's phrase (between its quotes) and numbers, by regex."""
    out = []
    pat = r"\((['\"])((?:[^\\]|\\.)*?)\1, \[([^\]]*)\]\)" if pairs else r'\{"bbox_2d": (\[)([^\]]*)\], "label": "((?:[^"\\]|\\.)*)"\}'
    for m in re.finditer(pat, text):
        phrase, nums = (2, 3) if pairs else (3, 2)
        spans = [(m.start(phrase), m.end(phrase))]
        spans += [(m.start(nums) + n.start(), m.start(nums) + n.end()) for n in re.finditer(r"[0-9.]+", m.group(nums))]
        out.append(spans)
    return out


@pytest.mark.parametrize("spec", ["qwen2_5_vl+pairs", "qwen2_5_vl", "qwen3_vl"])
def test_region_confidences_are_the_geometric_mean_of_phrase_and_number_tokens(procs, spec):
    fam, proc = family(spec), _proc(procs, spec)
    tok = proc.tokenizer
    regions = [Region(10, 20, 300, 400, "man's hat"), Region(1, 2, 100, 80, 'say "hi"'), Region(50, 5, 60, 6, "中文 tree")]
    _, text = fam.render_example("dense_caption", "", regions, SRC_W, SRC_H, IMAGE_HW)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    lp = np.log(np.random.default_rng(0).uniform(0.05, 1.0, len(ids) + 1))
    conf = fam.object_confidences(list(lp), ids + tok.convert_tokens_to_ids(["<|im_end|>"]), proc, "region", [], IMAGE_HW)
    spans = _value_spans(text, spec.endswith("pairs"))
    assert len(spans) == len(conf) == len(fam.parse_output(text, "dense_caption", SRC_W, SRC_H, IMAGE_HW).objects) == 3
    for c, sp in zip(conf, spans):
        toks = [i for i, (a, b) in enumerate(offsets) if any(a < e and s < b for s, e in sp)]
        assert math.isclose(c, math.exp(np.mean(lp[toks])), rel_tol=1e-9)
