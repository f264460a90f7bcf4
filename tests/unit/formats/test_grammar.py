"""PaliGemma output grammar (token-level state machine): every sentence it lets through parses
back cleanly, and it keeps box order, the object limit, no duplicates and the token budget."""

import numpy as np
import pytest

from raytrain.formats.grammar import NUM_LOC, DetectionGrammar, query_labels
from raytrain.formats.paligemma import loc_token, parse

# A toy vocabulary: ids 100.. are <loc0000>..<loc1023>; words as a sentencepiece tokenizer
# would split " red circle ; " (7 = "▁", 8 = ";").
EOS = 1
LOC0 = 100
WORDS = {5: " red", 6: " circle", 9: " blue", 10: " sq", 11: "uare", 7: " ", 8: ";"}
SEQS = {
    "red": ([5, 7, 8, 7], [5]),
    "red circle": ([5, 6, 7, 8, 7], [5, 6]),  # "red" is a prefix of "red circle"
    "blue square": ([9, 10, 11, 7, 8, 7], [9, 10, 11]),
}
LOC_IDS = list(range(LOC0, LOC0 + NUM_LOC))


def grammar(kind="box", max_objects=None, labels=SEQS, **kw) -> DetectionGrammar:
    return DetectionGrammar(LOC_IDS, labels, EOS, kind, max_objects, **kw)


def text_of(ids) -> str:
    out = []
    for t in ids:
        if t == EOS:
            out.append("<eos>")
        elif t >= LOC0:
            out.append(loc_token(t - LOC0))
        else:
            out.append(WORDS[t])
    return "".join(out)


def locs(*bins):
    return [LOC0 + b for b in bins]


def allowed_ids(a) -> set[int]:
    ids = set(a.tokens)
    if a.locs is not None:
        ids |= {LOC0 + b for b in np.flatnonzero(a.locs)}
    return ids


def random_walk(g: DetectionGrammar, rng, budget=None, prefer=None, limit=400) -> list[int]:
    """Follow the grammar choosing at random (or by `prefer`) until <eos>."""
    ids: list[int] = []
    while len(ids) < limit:
        a = g.allowed(ids, None if budget is None else budget - len(ids))
        choices = sorted(allowed_ids(a))
        assert choices, f"no allowed token after {ids}"
        t = prefer(choices, rng) if prefer else choices[rng.integers(len(choices))]
        ids.append(t)
        if t == EOS:
            return ids
    raise AssertionError("no <eos> reached")


# ---------------------------------------------------------------------------- acceptance


def test_accepts_rendered_targets_and_rejects_broken_ones():
    g = grammar("box")
    ok = locs(1, 2, 3, 4) + [5, 6] + [7, 8, 7] + locs(5, 6, 7, 8) + [9, 10, 11, EOS]
    assert g.accepts(ok)
    assert parse(text_of(ok), 100, 100, "box", SEQS).errors == []
    assert g.accepts(locs(0, 0, 0, 0) + [5, EOS])  # "red" alone: a prefix label is a label
    bad = {
        "three locs": locs(1, 2, 3) + [5, EOS],
        "five locs": locs(1, 2, 3, 4, 5) + [5, EOS],
        "no label": locs(1, 2, 3, 4) + [EOS],
        "partial label": locs(1, 2, 3, 4) + [9, 10, EOS],
        "no eos": locs(1, 2, 3, 4) + [5, 6],
        "y2 < y1": locs(10, 2, 9, 4) + [5, EOS],
        "x2 < x1": locs(1, 20, 3, 19) + [5, EOS],
        "duplicate": locs(1, 2, 3, 4) + [5, 7, 8, 7] + locs(1, 2, 3, 4) + [9, 10, 11, EOS],
        "separator then eos": locs(1, 2, 3, 4) + [5, 7, 8, 7, EOS],
        "text first": [5] + locs(1, 2, 3, 4) + [5, EOS],
    }
    for name, ids in bad.items():
        assert not g.accepts(ids), name
    # the same object twice but with another label is still a duplicate object
    assert not g.accepts(locs(1, 2, 3, 4) + [5, 7, 8, 7] + locs(1, 2, 3, 4) + [9, 10, 11, EOS])
    assert grammar("box", forbid_duplicates=False).accepts(bad["duplicate"])


def test_point_grammar_and_object_limit():
    g = grammar("point", max_objects=2)
    two = locs(1, 2) + [5, 7, 8, 7] + locs(3, 4) + [5, 6, EOS]
    assert g.accepts(two)
    assert not g.accepts(locs(1, 2) + [5, 7, 8, 7] + locs(3, 4) + [5, 7, 8, 7] + locs(5, 6) + [5, EOS])
    # at the limit: after " red" only <eos> or " circle" (which still ends in <eos>), no separator
    a = g.allowed(locs(1, 2) + [5, 7, 8, 7] + locs(3, 4) + [5])
    assert set(a.tokens) == {EOS, 6} and a.locs is None
    # below the limit the separator is open, and after it only locs
    assert set(g.allowed(locs(1, 2) + [5]).tokens) == {EOS, 6, 7}
    a = g.allowed(locs(1, 2) + [5, 7, 8, 7])
    assert a.tokens == () and a.locs is not None
    assert g.allowed([]).tokens == () and g.allowed([]).locs.all()


def test_dead_and_finished_prefixes_allow_only_eos():
    g = grammar("box")
    for prefix in ([5], locs(1, 2, 3, 4) + [EOS], locs(1, 2, 3, 4) + [5, EOS, 0, 0]):
        a = g.allowed(prefix)
        assert a.tokens == (EOS,) and a.locs is None


# ---------------------------------------------------------------------------- loc constraints


def test_box_order_masks_bins_below_the_start():
    g = grammar("box")
    m = g.allowed(locs(300, 700)).locs  # choosing y2: y2 >= y1 = 300
    assert not m[:300].any() and m[300:].all()
    m = g.allowed(locs(300, 700, 301)).locs  # choosing x2: x2 >= x1 = 700
    assert not m[:700].any() and m[700:].all()


def test_duplicate_completion_is_masked_with_lookahead():
    g = grammar("box", max_objects=5)
    sep = [5, 7, 8, 7]
    first = locs(1, 2, 3, 4) + sep
    m = g.allowed(first + locs(1, 2, 3)).locs
    assert not m[4] and m[5] and not m[:2].any()  # x2 = 4 would repeat object 1
    # (y1, x1 = 1023, y2) leaves one x2: once used, that y2 itself must be masked
    edge = locs(7, 1023, 9, 1023) + sep
    m = g.allowed(edge + locs(7, 1023)).locs
    assert not m[9] and m[8] and m[10] and not m[:7].any()  # and y2 >= y1 = 7 as always
    # (1023, 1023, 1023, 1023) is the only box starting at y1 = x1 = 1023
    corner = locs(1023, 1023, 1023, 1023) + sep
    assert not g.allowed(corner + locs(1023)).locs[1023]
    pts = grammar("point", max_objects=5)
    m = pts.allowed(locs(5, 6) + sep + locs(5)).locs
    assert not m[6] and m.sum() == NUM_LOC - 1


def test_vectorised_mask_equals_scalar_rule():
    rng = np.random.default_rng(0)
    for kind in ("box", "point"):
        g = grammar(kind)
        n = g.n_locs
        for _ in range(40):
            # objects crowded near the corner so that duplicates and look-ahead matter
            objs = []
            for _ in range(rng.integers(1, 6)):
                o = sorted(rng.integers(1018, 1024, size=n).tolist())
                objs.append(tuple(o))
            k = int(rng.integers(0, n))
            cur = tuple(objs[0][:k])
            mask = g._loc_mask(cur, tuple(objs))
            scalar = np.array([g._loc_ok(cur, tuple(objs), b) for b in range(NUM_LOC)])
            assert (mask == scalar).all(), (kind, cur, objs)


# ---------------------------------------------------------------------------- everything it generates parses


@pytest.mark.parametrize("kind", ["box", "point"])
def test_random_walks_parse_clean(kind):
    """Whatever a model picks among the allowed tokens, the text parses with no error, within
    the object limit, without duplicates, and ends with <eos> inside the token budget."""
    rng = np.random.default_rng(1)
    n = 4 if kind == "box" else 2
    # a "model" that loves one corner: the worst case for duplicates and box order
    corner = lambda choices, r: choices[-1] if r.random() < 0.7 else choices[r.integers(len(choices))]
    for trial in range(60):
        max_objects = int(rng.integers(1, 5))
        g = grammar(kind, max_objects=max_objects)
        budget = int(rng.integers(n + 3, 40)) if trial % 2 else None
        ids = random_walk(g, rng, budget, prefer=corner if trial % 3 == 0 else None)
        assert g.accepts(ids)
        if budget is not None:
            assert len(ids) <= budget
        res = parse(text_of(ids), 640, 480, kind, allowed_labels=SEQS)
        assert res.errors == [], text_of(ids)
        assert 1 <= len(res.objects) <= max_objects
        assert len(set(res.objects)) == len(res.objects)
        if kind == "box":
            assert all(o.x2 >= o.x1 and o.y2 >= o.y1 for o in res.objects)


def test_budget_too_small_still_follows_the_grammar():
    g = grammar("box")
    # 4 locs + " red" + <eos> = 6 tokens at least; with 3 left it cannot end, but stays valid
    a = g.allowed([], remaining=3)
    assert a.locs is not None and a.locs.all()
    # with exactly enough left, the label must be the shortest one that ends at once
    a = g.allowed(locs(1, 2, 3, 4), remaining=2)
    assert set(a.tokens) == {5}
    assert set(g.allowed(locs(1, 2, 3, 4) + [5], remaining=1).tokens) == {EOS}
    # room for " ; " + 4 locs + " red" + <eos> (9 tokens): the separator stays open, one less: not
    assert 7 in g.allowed(locs(1, 2, 3, 4) + [5], remaining=9).tokens
    assert 7 not in g.allowed(locs(1, 2, 3, 4) + [5], remaining=8).tokens
    a = g.allowed(locs(1, 2, 3, 4) + [5, 7, 8, 7], remaining=6)
    assert a.locs is not None and a.locs.any()
    # one token short: nothing fits, so the grammar alone decides (the output will be cut)
    assert g.allowed(locs(1, 2, 3, 4) + [5, 7, 8, 7], remaining=5).locs.all()


# ---------------------------------------------------------------------------- construction


def test_query_labels():
    assert query_labels("red circle") == ["red circle"]
    assert query_labels(" cat ; dog ;; cat ; ") == ["cat", "dog"]
    assert query_labels("") == []


def test_bad_construction_raises():
    with pytest.raises(ValueError, match="kind"):
        grammar("mask")
    with pytest.raises(ValueError, match="loc ids"):
        DetectionGrammar(LOC_IDS[:10], SEQS, EOS, "box")
    with pytest.raises(ValueError, match="label"):
        grammar(labels={})
    with pytest.raises(ValueError, match="loc / eos"):
        grammar(labels={"x": ([LOC0], [5])})
    with pytest.raises(ValueError, match="empty"):
        grammar(labels={"x": ([], [5])})
    with pytest.raises(ValueError, match="max_objects"):
        grammar(max_objects=0)


# ---------------------------------------------------------------------------- caches


def test_cached_answers_equal_a_fresh_grammars_in_any_order():
    """The prefix-state and answer caches (one step walks one token during decoding) give the
    answer a grammar that never saw the prefix gives, whatever order prefixes come in, with
    budgets, dead prefixes and the cache dropped in between; cached masks are read-only."""
    import raytrain.formats.grammar as grammar_mod

    rng = np.random.default_rng(3)
    cached = grammar("box", max_objects=3)
    walks = [random_walk(cached, rng, budget=int(rng.integers(8, 30))) for _ in range(30)]
    prefixes = [w[:k] for w in walks for k in range(len(w) + 1)]
    prefixes += [w[:3] + [EOS, 5] for w in walks[:5]] + [[5, 6] + w for w in walks[:5]]  # done / dead prefixes
    order = rng.permutation(len(prefixes))
    limit = grammar_mod._CACHE_ENTRIES
    try:
        grammar_mod._CACHE_ENTRIES = 200  # forces the caches to be dropped mid-way
        for i in order:
            p, budget = prefixes[i], int(rng.integers(1, 30))
            for remaining in (None, budget):
                got, want = cached.allowed(p, remaining), grammar("box", max_objects=3).allowed(p, remaining)
                assert got.tokens == want.tokens and allowed_ids(got) == allowed_ids(want), (p, remaining)
                assert cached.state(p) == grammar("box", max_objects=3).state(p)
                if got.locs is not None:
                    with pytest.raises(ValueError):
                        got.locs[0] = not got.locs[0]
    finally:
        grammar_mod._CACHE_ENTRIES = limit
