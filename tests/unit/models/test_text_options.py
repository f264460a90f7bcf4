"""A job's text options bound to the family object: prompt templates, the system prompt (chat
families), negatives' "nothing found" answer (rendered, parsed as a valid empty answer, allowed by
every grammar), and multi-label examples — through the pipeline's example expansion and the
encoders, for both families."""

import json

import numpy as np
import pytest
from PIL import Image

from raytrain import config as config_mod
from raytrain import predict
from raytrain.data import pipeline
from raytrain.formats.annotations import Absent, Box, Point, objects_from_json
from raytrain.models import family


def test_config_binds_the_text_options_to_the_family():
    cfg = config_mod.load(None, ["data.text.prompts={detect: 'Detect {query}'}", "data.text.empty_answer=Normal"])
    fam = cfg.model_family()
    assert fam.render_example("detect", "Fracture", [], 64, 64) == ("Detect Fracture", "Normal")
    assert fam.spec == "paligemma" and fam != family("paligemma") and hash(fam) != hash(family("paligemma"))
    for bad, msg in ((["data.text.prompts={detect: 'x {label}'}"], "only {query}"), (["data.text.prompts={dance: x}"], "unknown task"),
                     (["data.text.system_prompt=be brief"], "no chat template")):
        with pytest.raises(ValueError, match=msg):
            config_mod.load(None, bad)
    qwen = config_mod.load(None, ["model.family=qwen2_5_vl", "data.text.system_prompt=You locate fractures."])
    assert qwen.model_family().system_prompt == "You locate fractures."


@pytest.mark.parametrize("spec,own_empty", [("paligemma", ""), ("paligemma+molmo", "There are none."),
                                            ("qwen2_5_vl", "```json\n[]\n```"), ("qwen2_5_vl+pairs", "[]"),
                                            ("qwen2_5_vl+molmo", "There are none.")])
def test_negatives_render_and_parse_as_a_valid_empty_answer(spec, own_empty):
    for fam, empty in ((family(spec), own_empty), (family(spec).with_text(empty_answer="Normal"), "Normal")):
        task = "point"
        prompt, answer = fam.render_example(task, "cat", [], 64, 64, (112, 112))
        assert answer == empty and fam.answer_numbers(task, "cat", [], 64, 64, (112, 112)) == []
        res = fam.parse_output(answer, task, 64, 64, (112, 112))
        assert res.objects == [] and res.errors == []
        assert fam.parse_output("normal." if empty == "Normal" else answer.upper(), task, 64, 64, (112, 112)).errors == []
        garbage = fam.parse_output("zebra crossing", task, 64, 64, (112, 112))
        assert garbage.objects == [] and garbage.errors  # not every empty parse is a valid empty answer


def test_scoring_counts_an_empty_answer_as_valid_and_right_on_a_negative():
    fam = family("paligemma").with_text(empty_answer="Normal")
    batch = {"id": np.array(["n", "p"], dtype=object), "task": np.array(["detect", "detect"], dtype=object),
             "query": np.array(["Fracture", "Fracture"], dtype=object), "width": np.array([64, 64]), "height": np.array([64, 64]),
             "targets": np.array(["[]", json.dumps([{"type": "box", "x1": 1, "y1": 2, "x2": 30, "y2": 40, "label": "Fracture"}])], dtype=object),
             "image": np.zeros((2, 64, 64, 3), np.uint8)}
    rows = predict.texts_to_rows(fam, batch, ["Normal", "Normal"])
    neg, pos = (json.loads(s) for s in rows["score"])
    assert neg["valid"] == 1 and (neg["tp"], neg["fp"], neg["fn"]) == (0, 0, 0)  # a right "nothing"
    assert pos["valid"] == 1 and (pos["tp"], pos["fn"]) == (0, 1)  # a missed fracture, not an unparsable output


def test_pipeline_expands_negatives_and_multi_label_examples():
    objs = [Box(1, 2, 30, 40, "cat"), Box(40, 10, 60, 30, "dog"), Box(5, 5, 9, 9, "cat"), Absent("bird")]
    one = pipeline.examples_for(objs, ["detect"], 64, 64, family("paligemma"))
    assert [(e["query"], len(objects_from_json(e["targets"]))) for e in one] == [("bird", 0), ("cat", 2), ("dog", 1)]
    assert one[0]["suffix"] == "" and one[0]["prefix"] == "detect bird"
    grouped = pipeline.examples_for(objs, ["detect"], 64, 64, family("paligemma").with_text(multi_label=True))
    (e,) = grouped
    assert e["query"] == "bird ; cat ; dog" and e["prefix"] == "detect bird ; cat ; dog"
    assert [o.label for o in objects_from_json(e["targets"])] == ["cat", "cat", "dog"]  # query order, then each label's objects
    assert e["suffix"].count(";") == 2 and e["suffix"].endswith(" dog")
    # points of an image with only boxes are not negatives: only an Absent label is
    assert pipeline.examples_for([Box(1, 2, 30, 40, "cat")], ["point"], 64, 64, "paligemma") == []


def test_prompt_templates_reach_the_pipeline_and_the_chat_turn(tiny_qwen_path):
    fam = family("qwen2_5_vl").with_text(prompts={"point": "Where is the {query}?"}, system_prompt="You point at things.")
    (e,) = pipeline.examples_for([Point(10, 20, "cat")], ["point"], 64, 64, fam, (112, 112))
    assert e["prefix"] == "Where is the cat?"
    proc = fam.load_processor(tiny_qwen_path)
    enc = fam.encode_train(proc, [Image.new("RGB", (112, 112))], [e["prefix"]], [e["suffix"]], 200)
    text = proc.tokenizer.decode(enc["input_ids"][0][: int(enc["length"][0])])
    assert "You point at things." in text and "You are a helpful assistant." not in text and "Where is the cat?" in text
    prompt = fam.encode_prompts(proc, [Image.new("RGB", (112, 112))], [e["prefix"]])
    assert "You point at things." in proc.tokenizer.decode(prompt["input_ids"][0])


@pytest.mark.parametrize("spec", ["paligemma", "qwen2_5_vl", "qwen2_5_vl+normalized", "qwen2_5_vl+tokens"])
def test_grammars_accept_the_empty_answer(spec, tiny_model_path, tiny_qwen_path):
    fam = family(spec).with_text(empty_answer="Normal")
    proc = fam.load_processor(tiny_qwen_path if spec.startswith("qwen") else tiny_model_path)
    hw = fam.image_size(proc)
    g = fam.grammar(proc, "box", ["Fracture"], hw, None)
    tok = proc.tokenizer
    stop = fam.stop_token_ids(tok)[0]
    ids = tok("Normal", add_special_tokens=False)["input_ids"] + [stop]
    assert g.accepts(ids)
    _, answer = fam.render_example("detect", "Fracture", [Box(1, 2, 30, 40, "Fracture")], 64, 64, hw)
    pos_ids = tok(answer, add_special_tokens=False)["input_ids"] + [stop]
    assert g.accepts(pos_ids)
    assert not g.accepts(tok("Normalx", add_special_tokens=False)["input_ids"] + [stop])
