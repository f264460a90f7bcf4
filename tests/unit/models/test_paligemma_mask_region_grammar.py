"""PaliGemma's segment (`<loc>`x4 `<seg>`x16 label) and dense-caption (`<loc>`x4 free phrase) grammars
on the REAL tiny PaliGemma tokenizer: rendered training targets are accepted, malformed answers are
not, every answer a random walk through `allowed` reaches parses back with zero errors through the
family's parser, the token budget ends answers with <eos>, and an untrained tiny PaliGemma decoded
through `raytrain.predict` with constrained decoding answers validly, with one confidence per object."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raytrain import predict
from raytrain.formats import paligemma as fmt
from raytrain.formats import paligemma_masks as pm
from raytrain.formats.annotations import CodedMask, Mask, Region
from raytrain.formats.region_grammar import OTHER, SEP, SEP_WORD, SPACE, WORD, RegionGrammar, token_classes
from raytrain.models import family
from raytrain.models import paligemma_decoding as dec

ASSETS = Path(__file__).resolve().parents[2] / "assets"
SEG_LABELS = ["quokka", "eye", "patch"]
W = H = 64


@pytest.fixture(scope="module")
def proc(tiny_model_path):
    return family("paligemma").load_processor(tiny_model_path)


@pytest.fixture(scope="module")
def fam():
    return family("paligemma")


def ids_of(proc, suffix: str) -> list[int]:
    """The suffix's ids as training sees them, <eos> included."""
    return dec.suffix_token_ids(proc, [suffix])[0]


def text_of(proc, ids) -> str:
    """What `predict.decode` hands the parser."""
    return proc.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def choices(g, a) -> list[int]:
    ids = set(a.tokens)
    if a.locs is not None:
        ids |= set(g.loc_ids[a.locs].tolist())
    if a.vocab is not None:
        ids |= set(np.flatnonzero(a.vocab).tolist())
    return sorted(ids)


def walk(g, rng, budget=None, limit=600) -> list[int]:
    ids: list[int] = []
    while len(ids) < limit:
        c = choices(g, g.allowed(ids, None if budget is None else budget - len(ids)))
        assert c, f"nothing allowed after {ids}"
        ids.append(c[rng.integers(len(c))])
        if ids[-1] == g.eos_id:
            return ids
    raise AssertionError("no <eos> within the limit")


def seg_grammar(fam, proc, labels=SEG_LABELS, max_objects=None):
    return fam.grammar(proc, "mask", labels, (H, W), max_objects)


def region_grammar(fam, proc, max_objects=None):
    return fam.grammar(proc, "region", [], (H, W), max_objects)


# ---------------------------------------------------------------------------- segment


def test_segment_grammar_accepts_rendered_targets(fam, proc):
    g = seg_grammar(fam, proc)
    rows = [json.loads(line) for line in (ASSETS / "seed001_datature_jsonl/segment.jsonl").read_text().splitlines()]
    targets = [r["suffix"] for r in rows]
    # and targets the family renders from masks (a random codec: the codes do not matter here)
    codec = pm.MaskCodec.random(0)
    a = np.zeros((H, W), bool)
    a[5:30, 10:40] = True
    b = np.zeros((H, W), bool)
    b[40:60, 2:20] = True
    targets.append(pm.render_segments([Mask.from_array(a, "eye"), Mask.from_array(b, "patch")], W, H, codec))
    targets.append(pm.render_coded([CodedMask(1, 2, 30, 40, "quokka", tuple(range(16)))], W, H))
    targets.append("")  # a negative: no object
    for t in targets:
        ids = ids_of(proc, t)
        assert g.accepts(ids), t
        res = fam.parse_output(text_of(proc, ids), "segment", W, H)
        assert not res.errors and len(res.objects) == t.count("<seg") // 16, (t, res)


def test_segment_grammar_rejects_malformed_answers(fam, proc):
    g = seg_grammar(fam, proc)
    locs = "<loc0010><loc0020><loc0300><loc0400>"
    segs = "".join(fmt.seg_token(i) for i in range(16))
    bad = [
        locs + segs[: 15 * 8] + " eye",  # 15 codes
        locs + segs + "<seg001> eye",  # 17 codes
        locs + " eye",  # a box, no mask
        locs + segs + " dog",  # not a label of the query
        locs + segs,  # no label
        "<loc0300><loc0020><loc0010><loc0400>" + segs + " eye",  # y2 < y1
        locs[:-9] + "<seg001>" + segs + " eye",  # a seg where the 4th loc goes
        locs + segs + " eye ; ",  # a separator and nothing after it
        locs + segs + " eye ; " + locs + segs + " eye",  # the same object twice
    ]
    for t in bad:
        assert not g.accepts(ids_of(proc, t)), t
    assert g.accepts(ids_of(proc, locs + segs + " eye ; " + locs + segs[:-8] + "<seg001> eye"))


def test_segment_random_walks_parse_clean_within_budget_and_object_limit(fam, proc):
    rng = np.random.default_rng(0)
    for max_objects, budget in [(None, None), (2, None), (None, 70), (3, 200), (1, 23)]:
        g = seg_grammar(fam, proc, max_objects=max_objects)
        for _ in range(12):
            ids = walk(g, rng, budget)
            assert g.accepts(ids) and ids[-1] == g.eos_id
            if budget is not None:
                assert len(ids) <= budget
            res = fam.parse_output(text_of(proc, ids), "segment", W, H)
            n = sum(t in set(g.loc_ids.tolist()) for t in ids) // 4
            assert not res.errors and len(res.objects) == n, (text_of(proc, ids), res.errors)
            assert max_objects is None or n <= max_objects


def test_segment_budget_leaves_room_for_eos_and_allows_no_partial_object(fam, proc):
    g = seg_grammar(fam, proc, labels=["eye"])
    label = len(dec.label_sequences(proc, ["eye"], "mask")["eye"][1])
    one = 4 + 16 + label + 1  # the shortest answer with an object, <eos> included
    prefix = ids_of(proc, "<loc0001><loc0002><loc0003><loc0004>" + "<seg005>" * 16 + " eye")[:-1]
    # after a whole object, a second one fits only if its locs, codes, label and <eos> do
    a = g.allowed(prefix, one)  # `one` tokens left: exactly enough for " ; " is not, for <eos> it is
    assert a.locs is None and g.eos_id in a.tokens
    sep = choices(g, g.allowed(prefix, 100))
    assert set(sep) - {g.eos_id}, "with room, the separator is allowed"
    assert set(choices(g, g.allowed(prefix, 3))) == {g.eos_id}
    # at the start, with too little room for an object, only the empty answer
    assert choices(g, g.allowed([], one - 1)) == [g.eos_id]
    assert g.allowed([], one).locs is not None


# ---------------------------------------------------------------------------- dense caption


def vg_targets(fam) -> list[str]:
    images = json.loads((ASSETS / "seed002_visual_genome/image_data.json").read_text())
    sizes = {im["image_id"]: (im["width"], im["height"]) for im in images}
    out = []
    for im in json.loads((ASSETS / "seed002_visual_genome/region_descriptions.json").read_text()):
        regions = im["regions"]
        w, h = sizes[regions[0]["image_id"]]
        objs = [Region(r["x"], r["y"], r["x"] + r["width"], r["y"] + r["height"], r["phrase"].strip()) for r in regions]
        out.append(fam.render_example("dense_caption", "", objs, w, h)[1])
    return out


def test_region_grammar_accepts_rendered_targets(fam, proc):
    g = region_grammar(fam, proc)
    targets = vg_targets(fam) + [
        fam.render_example("dense_caption", "", [Region(1, 2, 30, 40, "a red circle, left.")], W, H)[1],
        "<loc0001><loc0002><loc0003><loc0004> x ; <loc0001><loc0002><loc0003><loc0004> x",  # same region twice
    ]
    assert len(targets) >= 4
    for t in targets:
        ids = ids_of(proc, t)
        assert g.accepts(ids), t
        res = fam.parse_output(text_of(proc, ids), "dense_caption", W, H)
        assert not res.errors and len(res.objects) == t.count(";") + 1, (t, res)
        assert all(isinstance(o, Region) and o.phrase for o in res.objects)


def test_region_grammar_rejects_malformed_answers(fam, proc):
    g = region_grammar(fam, proc, max_objects=2)
    box = "<loc0010><loc0020><loc0300><loc0400>"
    bad = [
        "",  # a dense caption names at least one region
        box,  # no phrase
        box + " ",  # a phrase of spaces
        box + " a <b",  # "<" could spell a token out
        box + " a ; ",  # a separator, then the end
        box + " a ; b",  # a separator, then no box
        "<loc0300><loc0020><loc0010><loc0400> a",  # y2 < y1
        box[:-9] + " a",  # 3 locs
        box + "<seg001> a",
        box + " a ; " + box + " b ; " + box + " c",  # 3 regions, at most 2
        box + " dog" * (dec.MAX_PHRASE_TOKENS + 1),  # too long a phrase
    ]
    for t in bad:
        assert not g.accepts(ids_of(proc, t)), t
    assert g.accepts(ids_of(proc, box + " dog" * dec.MAX_PHRASE_TOKENS))
    assert g.accepts(ids_of(proc, box + " a;" + box + "b"))  # the parser needs no spaces either


def test_region_random_walks_parse_clean_within_budget_and_object_limit(fam, proc):
    rng = np.random.default_rng(1)
    loc_set = set(region_grammar(fam, proc).loc_ids.tolist())
    for max_objects, budget in [(None, None), (2, None), (None, 40), (3, 12), (None, 6), (None, 3)]:
        g = region_grammar(fam, proc, max_objects)
        for _ in range(15):
            ids = walk(g, rng, budget)
            assert g.accepts(ids) or budget == 3  # 3 tokens cannot hold a region: the grammar goes on, the output is cut
            if budget == 3:
                assert len(ids) > 3 and g.accepts(ids)
                continue
            if budget is not None:
                assert len(ids) <= budget
            res = fam.parse_output(text_of(proc, ids), "dense_caption", W, H)
            n = sum(t in loc_set for t in ids) // 4
            assert not res.errors and len(res.objects) == n >= 1, (text_of(proc, ids), res.errors)
            assert max_objects is None or n <= max_objects


def test_phrase_token_classes_of_the_tiny_vocabulary(proc):
    tok = proc.tokenizer
    classes = dec.phrase_token_classes(tok)
    of = {p: int(classes[tok.convert_tokens_to_ids(p)]) for p in ["▁", "\n", ";", "<", "▁red", "▁circle", "."]}
    assert of == {"▁": SPACE, "\n": SPACE, ";": SEP, "<": OTHER, "▁red": WORD, "▁circle": WORD, ".": WORD}
    special = [tok.eos_token_id, tok.pad_token_id, tok.bos_token_id, tok.unk_token_id, tok.convert_tokens_to_ids("<image>")]
    special += tok.convert_tokens_to_ids([fmt.loc_token(0), fmt.loc_token(1023), fmt.seg_token(0), fmt.seg_token(127)])
    assert all(classes[t] == OTHER for t in special)


def test_token_classes_of_merged_pieces():
    texts = {0: " ;", 1: ");", 2: "a;b", 3: ";\n", 4: " a ", 5: "  ", 6: ";;", 7: "x<", 8: ""}
    got = token_classes(texts, 10, excluded=[9])
    assert got.tolist() == [SEP, SEP_WORD, OTHER, SEP, WORD, SPACE, OTHER, OTHER, OTHER, OTHER]


def test_region_grammar_refuses_bad_construction(proc):
    classes = dec.phrase_token_classes(proc.tokenizer)
    locs = dec.PaliGemmaGrammars(proc).loc_ids
    with pytest.raises(ValueError, match="loc ids"):
        RegionGrammar(locs[:5], 1, classes)
    with pytest.raises(ValueError, match="max_objects"):
        RegionGrammar(locs, 1, classes, max_objects=0)
    with pytest.raises(ValueError, match="WORD"):
        RegionGrammar(locs, 1, np.zeros_like(classes))
    bad = classes.copy()
    bad[locs[0]] = WORD
    with pytest.raises(ValueError, match="OTHER"):
        RegionGrammar(locs, 1, bad)


# ---------------------------------------------------------------------------- confidences


@pytest.mark.parametrize("task", ["segment", "dense_caption"])
def test_confidences_are_the_geometric_mean_of_each_objects_tokens(fam, proc, task):
    kind = "mask" if task == "segment" else "region"
    if task == "segment":
        t = ("<loc0001><loc0002><loc0003><loc0004>" + "<seg005>" * 16 + " eye ; "
             + "<loc0011><loc0012><loc0013><loc0014>" + "<seg006>" * 16 + " patch")
    else:
        t = "<loc0001><loc0002><loc0003><loc0004> red circle ; <loc0011><loc0012><loc0013><loc0014> dog"
    ids = ids_of(proc, t)
    lp = list(np.linspace(-0.1, -2.0, len(ids)))
    conf = fam.object_confidences(lp, ids, proc, kind, SEG_LABELS if kind == "mask" else [], (H, W))
    res = fam.parse_output(text_of(proc, ids), task, W, H)
    assert len(conf) == len(res.objects) == 2
    # the first object's tokens: its locs (and codes), then its words up to the separator
    texts = [proc.tokenizer.decode([i]) for i in ids]
    first = [i for i in range(len(ids)) if i < texts.index(";") and (texts[i].strip())]
    assert conf[0] == pytest.approx(float(np.exp(np.mean([lp[i] for i in first]))))
    assert 0 < conf[1] < conf[0] < 1  # later tokens have lower log-probs here


# ---------------------------------------------------------------------------- end to end


def images(n: int) -> list:
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("task,queries", [("segment", ["eye", "quokka ; eye ; patch", "patch", "eye ; patch"]),
                                          ("dense_caption", ["", "", "", ""])])
def test_untrained_tiny_paligemma_answers_validly_when_constrained(tiny_paligemma, fam, task, queries, tmp_path, monkeypatch):
    """Random weights: free decoding does not give valid answers, constrained decoding always does,
    each object with a confidence."""
    codec = tmp_path / "vae-oid.npz"
    np.savez(codec, **{k: v.detach().numpy() for k, v in pm.MaskCodec.random(0).state_dict().items()})
    monkeypatch.setenv(pm.ENV_VAR, str(codec))  # segment answers decode to pixel masks
    model, processor = tiny_paligemma
    prefixes = [fam.render_example(task, q, [], W, H)[0] for q in queries]
    geoms = [predict.identity_geometry(W, H)] * len(queries)
    tasks_ = [task] * len(queries)

    free = predict.predict(model, processor, fam, images(4), tasks_, queries, prefixes, geoms,
                           predict.DecodeOptions(max_new_tokens=48, constrained=False))
    assert any(p.errors or not p.objects for p in free), [p.text for p in free]

    for opts in [predict.DecodeOptions(max_new_tokens=48), predict.DecodeOptions(max_new_tokens=30, max_objects=1),
                 predict.DecodeOptions(max_new_tokens=48, generate={"num_beams": 2})]:
        preds = predict.predict(model, processor, fam, images(4), tasks_, queries, prefixes, geoms, opts)
        for p in preds:
            assert not p.errors, (p.text, p.errors)
            assert all(s is not None and 0 < s <= 1 for s in p.scores), (p.text, p.scores)
            if opts.max_objects:
                assert len(p.objects) <= 1
        if task == "dense_caption":
            assert all(p.objects and all(isinstance(o, Region) for o in p.objects) for p in preds)
        else:
            assert all(isinstance(o, Mask) for p in preds for o in p.objects)


def test_phrase_answers_are_shared_objects(fam, proc):
    """A vocabulary mask is as long as the vocabulary (257k ids in PaliGemma's): phrase answers are
    made once per kind of answer, not per state or budget, and the logits processor converts each once."""
    g = region_grammar(fam, proc)
    rng = np.random.default_rng(2)
    masks = set()
    for budget in (None, 8, 20, 60, 200):
        ids = walk(g, rng, budget)
        for i in range(len(ids)):
            a = g.allowed(ids[:i], None if budget is None else budget - i)
            if a.vocab is not None:
                masks.add(id(a.vocab))
                assert not a.vocab.flags.writeable
    assert 1 <= len(masks) <= 64


def test_logits_processor_masks_phrase_rows_to_the_grammar(fam, proc):
    import torch

    g = region_grammar(fam, proc)
    box = ids_of(proc, "<loc0001><loc0002><loc0003><loc0004> red")[:-1]
    prompt = [7, 7]
    vocab = len(proc.tokenizer) + 6  # a model's vocabulary may be larger than its tokenizer's
    lp = predict.GrammarLogitsProcessor([g, g], prompt_len=len(prompt), max_new_tokens=40)
    rows = torch.tensor([prompt + box, prompt + box[:3] + [box[0]] * (len(box) - 3)])
    scores = torch.randn(2, vocab)
    out = lp(rows, scores.clone())
    for r in range(2):
        want = set(choices(g, g.allowed(rows[r, len(prompt):].tolist(), 40 - len(box))))
        got = set(torch.nonzero(torch.isfinite(out[r])).flatten().tolist())
        assert got == want and got, r
        assert torch.equal(out[r, sorted(got)], scores[r, sorted(got)])
    # an earlier processor banned every allowed token: the row still follows the grammar
    out = lp(rows[:1].repeat(2, 1), torch.full((2, vocab), float("-inf")))
    assert set(torch.nonzero(out[0] == -1e4).flatten().tolist()) == set(choices(g, g.allowed(box, 40 - len(box))))


@pytest.mark.parametrize("spec", ["paligemma", "paligemma+molmo"])
def test_every_grounding_task_gets_a_grammar_in_both_answer_formats(proc, spec):
    """Molmo's answer format changes pointing only: masks and regions keep <loc> (and their grammars);
    dense captions have no query labels and get theirs all the same."""
    fam = family(spec)
    got = predict.grammars_for(fam, proc, ["segment", "dense_caption", "caption", "detect"], ["eye ; patch", "", "", "eye"], (H, W))
    assert [type(g).__name__ if g is not None else None for g in got] == ["DetectionGrammar", "RegionGrammar", None, "DetectionGrammar"]
    assert got[0].kind == "mask" and got[0].labels == ("eye", "patch")
    assert fam.grammar(proc, "mask", [], (H, W)) is None  # no labels in the query: nothing to name
