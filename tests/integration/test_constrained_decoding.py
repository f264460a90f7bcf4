"""Grammar-constrained decoding on the tiny PaliGemma preset with RANDOM weights: its free
outputs do not parse, its constrained outputs always do (greedy, beam search, sampling,
left-padded batches), and per-object confidences follow the tokens through beam search."""

import io
import math

import numpy as np
import pytest
from PIL import Image

from raytrain.data.synthetic import make_example
from raytrain import predict, tasks
from raytrain.formats import paligemma as fmt
from raytrain.models import family
from raytrain.models import paligemma_decoding as dec
from raytrain.formats.grammar import query_labels

pytestmark = pytest.mark.integration

MAX_NEW = 40


@pytest.fixture(scope="module")
def tiny(tiny_paligemma):
    return tiny_paligemma


@pytest.fixture(scope="module")
def batch():
    """8 synthetic images; queries of different lengths so the prompts are left-padded."""
    exs = [make_example(i, seed=3, shapes_per_image=2) for i in range(8)]
    images = [Image.open(io.BytesIO(e["image"])).convert("RGB") for e in exs]
    queries = []
    for i, e in enumerate(exs):
        labels = sorted({o.label for o in e["objects"] if o.label})  # captions have no label
        queries.append(" ; ".join(labels) if i % 2 else labels[0])
    return images, queries


def prefixes(task, queries):
    return [fmt.render_prefix(task, q) for q in queries]


def valid_rate(texts, kind, queries):
    ok = [bool(fmt.parse(t, 64, 64, kind, query_labels(q)).objects) and not fmt.parse(t, 64, 64, kind, query_labels(q)).errors
          for t, q in zip(texts, queries)]
    return sum(ok) / len(ok)


def test_label_ids_are_those_of_training_targets(tiny):
    _, processor = tiny
    from raytrain.models.paligemma import encode_train

    seqs = dec.label_sequences(processor, ["red circle", "blue square"])
    target = "<loc0001><loc0002> red circle ; <loc0003><loc0004> blue square"
    img = Image.new("RGB", (64, 64))
    enc = encode_train(processor, [img], ["detect red circle ; blue square"], [target], max_len=128)
    ids = [int(t) for t in enc["labels"][0] if t >= 0]
    locs = set(processor.tokenizer.convert_tokens_to_ids([fmt.loc_token(i) for i in range(1, 5)]))
    words = [t for t in ids if t not in locs]
    assert words == seqs["red circle"][0] + seqs["blue square"][1] + [processor.tokenizer.eos_token_id]
    # the separator really is how the tokenizer writes " ; " between a label and a loc
    sep = seqs["red circle"][0][len(seqs["red circle"][1]) :]
    assert processor.tokenizer.decode(sep) .strip() == ";"


def test_batch_is_left_padded(tiny, batch):
    from raytrain.models.paligemma import encode_prompts

    _, processor = tiny
    images, queries = batch
    mask = encode_prompts(processor, images, prefixes("detect", queries))["attention_mask"]
    assert mask[:, 0].min() == 0 and mask[:, -1].min() == 1


@pytest.mark.parametrize("task", ["point", "detect"])
def test_random_weights_free_decoding_is_mostly_invalid(tiny, batch, task):
    model, processor = tiny
    images, queries = batch
    gens = predict.decode(model, processor, family("paligemma"), images, prefixes(task, queries), max_new_tokens=MAX_NEW, logprobs=True)
    assert valid_rate([g.text for g in gens], tasks.kind(task), queries) < 0.5


@pytest.mark.parametrize("task", ["point", "detect"])
@pytest.mark.parametrize("decoding", [
    {},  # greedy
    {"num_beams": 2},
    {"do_sample": True, "top_k": 50, "temperature": 1.5},
    # a model that would never stop: every row runs into the object limit and the duplicate ban
    {"min_new_tokens": MAX_NEW},
    {"min_new_tokens": MAX_NEW, "num_beams": 2},
], ids=["greedy", "beam2", "sample", "greedy-nostop", "beam2-nostop"])
def test_constrained_outputs_always_parse(tiny, batch, task, decoding):
    import torch

    model, processor = tiny
    images, queries = batch
    kind = tasks.kind(task)
    max_objects = 3
    grammars = dec.PaliGemmaGrammars(processor).for_queries(kind, queries, max_objects)
    torch.manual_seed(0)
    gens = predict.decode(model, processor, family("paligemma"), images, prefixes(task, queries), grammars=grammars,
                            max_new_tokens=MAX_NEW, logprobs=True, **decoding)
    eos = processor.tokenizer.eos_token_id
    n_objects = []
    for g, q in zip(gens, queries):
        res = fmt.parse(g.text, 64, 64, kind, query_labels(q))
        assert res.errors == [] and res.objects, g.text
        assert len(res.objects) <= max_objects
        assert len(set(res.objects)) == len(res.objects), g.text
        assert g.token_ids[-1] == eos and len(g.token_ids) <= MAX_NEW
        if kind == "box":
            assert all(b.x2 >= b.x1 and b.y2 >= b.y1 for b in res.objects)
        n_objects.append(len(res.objects))
        conf = dec.object_confidences(g.logprobs, g.token_ids, processor.tokenizer, kind, query_labels(q))
        assert len(conf) == len(res.objects) and all(0 < c <= 1 for c in conf)
    if "min_new_tokens" in decoding:
        assert n_objects == [max_objects] * len(gens)  # the limit, not <eos>, ended them


def test_confidence_matches_a_teacher_forced_pass(tiny, batch):
    """Beam search: log-probs gathered through beam_indices equal a fresh forward pass over the
    returned sequence, and an object's confidence is the geometric mean of its tokens'."""
    import torch

    from raytrain.models.paligemma import encode_prompts

    model, processor = tiny
    images, queries = batch
    grammars = dec.PaliGemmaGrammars(processor).for_queries("box", queries[:1], 2)
    prefix = prefixes("detect", queries[:1])
    (g,) = predict.decode(model, processor, family("paligemma"), images[:1], prefix, grammars=grammars, max_new_tokens=MAX_NEW,
                              logprobs=True, num_beams=3, min_new_tokens=MAX_NEW)
    enc = encode_prompts(processor, images[:1], prefix)
    ids = torch.cat([enc["input_ids"], torch.tensor([g.token_ids])], dim=1)
    n_prompt = enc["input_ids"].shape[1]
    tt = torch.cat([enc["token_type_ids"], torch.ones(1, len(g.token_ids), dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=tt,
                       pixel_values=enc["pixel_values"]).logits
    lp = torch.log_softmax(logits[0, n_prompt - 1 : -1].float(), dim=-1)
    forced = lp[torch.arange(len(g.token_ids)), torch.tensor(g.token_ids)].numpy()
    np.testing.assert_allclose(g.logprobs, forced, atol=2e-4)

    loc_ids = set(dec.PaliGemmaGrammars(processor).loc_ids)
    texts = [processor.tokenizer.decode([t]) for t in g.token_ids]
    # first object: its 4 locs and the label words before the separator
    first = [i for i in range(len(g.token_ids)) if i < 4 or (g.token_ids[i] not in loc_ids and texts[i].strip()
             and ";" not in "".join(texts[4 : i + 1]))]
    conf = dec.object_confidences(g.logprobs, g.token_ids, processor.tokenizer, "box")
    assert len(conf) == 2
    assert math.isclose(conf[0], math.exp(np.mean([forced[i] for i in first])), rel_tol=1e-4)


def test_without_the_duplicate_ban_this_model_repeats_itself(tiny, batch):
    """What the ban in the tests above prevents: the random model, made to go on, repeats objects."""
    model, processor = tiny
    images, queries = batch
    grammars = dec.PaliGemmaGrammars(processor, forbid_duplicates=False).for_queries("point", queries, 3)
    gens = predict.decode(model, processor, family("paligemma"), images, prefixes("point", queries), grammars=grammars,
                            max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW)
    objs = [fmt.parse(g.text, 64, 64, "point").objects for g in gens]
    assert any(len(set(o)) < len(o) for o in objs)
