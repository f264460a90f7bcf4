"""Confidences' token log-probabilities recorded step by step (raytrain/step_logprobs.py) equal what
generate(output_logits=True) + compute_transition_scores give, on the real tiny models, for greedy,
grammar-constrained and sampled decoding, and for a peft-wrapped model; beam search keeps the
reference path; the hooks go away with the call."""

import numpy as np
import pytest
import torch
from PIL import Image

from raytrain import predict
from raytrain.models import family
from raytrain.step_logprobs import StepLogprobs, generating_module

MAX_NEW = 10


def reference(model, processor, fam, images, prefixes, grammars=None, **kw):
    """The path predict.decode took before: every step's logits kept, then compute_transition_scores."""
    from transformers import LogitsProcessorList

    enc = fam.encode_prompts(processor, images, prefixes)
    plen = int(enc["input_ids"].shape[1])
    procs = LogitsProcessorList([predict.GrammarLogitsProcessor(grammars, plen, MAX_NEW)] if grammars else [])
    tok = processor.tokenizer
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=MAX_NEW, pad_token_id=tok.pad_token_id, eos_token_id=fam.stop_token_ids(tok),
                             logits_processor=procs, output_logits=True, return_dict_in_generate=True, do_sample=kw.pop("do_sample", False), **kw)
    return out.sequences[:, plen:].tolist(), predict.token_logprobs(model, out, plen)


def check(model, processor, fam, images, prefixes, grammars=None, seed=None, **kw):
    if seed is not None:
        torch.manual_seed(seed)
    seqs, lp = reference(model, processor, fam, images, prefixes, grammars, **dict(kw))
    if seed is not None:
        torch.manual_seed(seed)
    gens = predict.decode(model, processor, fam, images, prefixes, grammars=grammars, max_new_tokens=MAX_NEW, logprobs=True, **kw)
    assert len(gens) == len(seqs)
    for g, ids, row in zip(gens, seqs, lp):
        n = len(g.token_ids)
        assert g.token_ids == ids[:n]  # the same tokens were chosen
        np.testing.assert_allclose(g.logprobs, row[:n], rtol=0, atol=2e-5)
        assert all(v <= 0 for v in g.logprobs)
    return gens


@pytest.fixture(scope="module")
def paligemma(tiny_model_path, one_torch_thread):
    fam = family("paligemma")
    model, processor = fam.load(tiny_model_path, dtype="float32")
    return fam, model.eval(), processor


def images(n, size=64, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


QUERIES = ["red circle", "blue square", "green triangle ; red circle", "yellow star"]


def test_paligemma_greedy_and_constrained_equal_the_kept_logits(paligemma):
    fam, model, processor = paligemma
    imgs = images(4)
    check(model, processor, fam, imgs, [f"detect {q}" for q in QUERIES])
    grammars = predict.grammars_for(fam, processor, ["detect"] * 4, QUERIES, (64, 64))
    gens = check(model, processor, fam, imgs, [f"detect {q}" for q in QUERIES], grammars=grammars)
    assert all(fam.parse_output(g.text, "detect", 64, 64, (64, 64)).errors == [] for g in gens)


def test_paligemma_sampling_equals_the_kept_logits(paligemma):
    fam, model, processor = paligemma
    check(model, processor, fam, images(4, seed=1), [f"point to {q}" for q in QUERIES], seed=3, do_sample=True, temperature=1.5)


def test_beam_search_keeps_the_reference_path(paligemma):
    """Beams are reordered between steps: decode asks output_logits there (no hooks registered)."""
    fam, model, processor = paligemma
    imgs, prefixes = images(2), ["detect red circle", "detect blue square"]
    module = generating_module(model)
    registered = []
    orig = module.register_forward_hook
    try:
        module.register_forward_hook = lambda *a, **k: registered.append(1) or orig(*a, **k)
        gens = predict.decode(model, processor, fam, imgs, prefixes, max_new_tokens=MAX_NEW, logprobs=True, num_beams=2)
    finally:
        del module.register_forward_hook
    assert not registered and all(len(g.logprobs) == len(g.token_ids) for g in gens)


def test_hooks_are_removed_and_a_peft_model_is_hooked_at_its_base(paligemma):
    from peft import LoraConfig, get_peft_model

    fam, model, processor = paligemma
    before = (len(model._forward_hooks), len(model._forward_pre_hooks))
    check(model, processor, fam, images(2, seed=4), ["detect red circle", "point to blue square"])
    assert (len(model._forward_hooks), len(model._forward_pre_hooks)) == before
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    try:
        assert generating_module(peft_model) is model
        check(peft_model, processor, fam, images(2, seed=5), ["detect red circle", "point to blue square"])
    finally:
        peft_model.unload()


def test_qwen_greedy_equals_the_kept_logits(tiny_qwen_path, one_torch_thread):
    from raytrain.formats import qwen as fmt

    fam = family("qwen2_5_vl")
    model, processor = fam.load(tiny_qwen_path, dtype="float32")
    model.eval()
    prefixes = [fmt.render_prompt("detect", "red circle"), fmt.render_prompt("point", "a large blue square")]
    check(model, processor, fam, images(2, size=112, seed=6), prefixes)


def test_a_step_without_input_ids_is_refused(paligemma):
    _, model, _ = paligemma
    rec = StepLogprobs(model)
    rec._last = torch.zeros(1, 4)
    with pytest.raises(RuntimeError, match="input_ids"):
        rec._before(model, (), {"inputs_embeds": torch.zeros(1, 1, 8)})
