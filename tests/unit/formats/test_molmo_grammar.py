"""Molmo's point answers as a decoding grammar: every answer `render_points` writes is accepted token
by token through the real tiny tokenizers (one point, many points, none), others are not, and
confidences come back one per parsed point."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raytrain.formats import molmo
from raytrain.formats.annotations import Point
from raytrain.models import family, molmo_answers, paligemma_decoding


@pytest.fixture(scope="module", params=["paligemma+molmo", "qwen2_5_vl+molmo"])
def setup(request, tiny_model_path, tiny_qwen_path):
    fam = family(request.param)
    proc = fam.load_processor(tiny_qwen_path if request.param.startswith("qwen") else tiny_model_path)
    end = "<|im_end|>" if request.param.startswith("qwen") else "<eos>"
    return fam, proc, end


def _ids(proc, end, text):
    tok = proc.tokenizer
    ids = paligemma_decoding.suffix_token_ids(proc, [text])[0][:-1] if end == "<eos>" else tok(text, add_special_tokens=False)["input_ids"]
    return ids + [tok.convert_tokens_to_ids(end)]  # the ids training writes for the answer


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 64), st.floats(0, 48)), min_size=0, max_size=5,
                unique_by=lambda p: (round(p[0] * 100 / 64, 1), round(p[1] * 100 / 48, 1))))  # the grammar bans repeats
def test_every_rendered_answer_is_accepted(setup, pts):
    fam, proc, end = setup
    g = fam.grammar(proc, "point", ["red circle"], (64, 64), None)
    text = molmo.render_points([Point(x, y, "red circle") for x, y in pts], 64, 48, label="red circle")
    assert g.accepts(_ids(proc, end, text)), text


def test_other_answers_are_refused_and_limits_hold(setup):
    fam, proc, end = setup
    g = fam.grammar(proc, "point", ["cat"], (64, 64), 2)
    assert not g.accepts(_ids(proc, end, '<point x="10.0" y="20.0" alt="dog">dog</point>'))  # another label
    assert not g.accepts(_ids(proc, end, '<point x="100.1" y="20.0" alt="cat">cat</point>'))  # past 100 %
    assert not g.accepts(_ids(proc, end, '<points x1="1.0" y1="2.0" x2="3.0" y2="4.0" x3="5.0" y3="6.0" alt="cat">cat</points>'))
    assert g.accepts(_ids(proc, end, '<points x1="1.0" y1="2.0" x2="3.0" y2="4.0" alt="cat">cat</points>'))
    assert g.accepts(_ids(proc, end, "There are none."))
    assert fam.grammar(proc, "point", ["cat", "dog"], (64, 64), None) is None  # several labels: decoded freely


def test_confidences_one_per_point(setup):
    fam, proc, end = setup
    text = molmo.render_points([Point(10, 20, "cat"), Point(30, 40, "cat")], 64, 64, label="cat")
    ids = _ids(proc, end, text)
    conf = fam.object_confidences([math.log(0.5)] * len(ids), ids, proc, "point", ["cat"], (64, 64))
    assert len(conf) == len(fam.parse_output(text, "point", 64, 64).objects) == 2
    assert all(c == pytest.approx(0.5) for c in conf)
    assert molmo_answers.grammar(proc, ["cat"], None, "", end) is molmo_answers.grammar(proc, ["cat"], None, "", end)  # cached
