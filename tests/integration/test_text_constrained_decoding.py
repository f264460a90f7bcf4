"""Grammar-constrained decoding of TEXT answers on the tiny Qwen2.5-VL preset with RANDOM weights:
every box format (absolute / normalized / pairs / tokens) and both object kinds. Its free outputs do
not parse; its constrained outputs always do (greedy, beam search, sampling, left-padded batches, a
budget that binds), and per-object confidences cover exactly the value tokens of what it wrote. On
a real-size (151k-token) byte-level BPE vocabulary, built offline, the grammar accepts every
rendered answer and answers each step in well under a millisecond on average."""

import gc
import io
import math
import random
import re
import statistics
import time

import numpy as np
import pytest
from PIL import Image

from raytrain.data.synthetic import make_example
from raytrain.predict import GrammarLogitsProcessor, token_logprobs
from raytrain.formats import qwen as fmt
from raytrain.formats import qwen_grammar
from raytrain.formats import text_confidence
from raytrain.formats import text_grammar as tg
from raytrain.formats.annotations import Box, Point
from raytrain.models import family

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

SIDE = 112  # the tiny preset's model frame (112 x 112, a fixed point of its resize)
MAX_NEW = 64  # binds: three fenced boxes take ~90 tokens with the tiny tokenizer
MAX_OBJECTS = 3
KIND_OF_TASK = {"point": "point", "box": "detect"}


def spec(rep: str) -> str:
    return "qwen2_5_vl" if rep == "absolute" else f"qwen2_5_vl+{rep}"


@pytest.fixture(scope="module")
def model(tiny_qwen_path):
    m, _ = family("qwen2_5_vl").load(tiny_qwen_path)
    return m.eval()


@pytest.fixture(scope="module")
def processors(tiny_qwen_path):
    return {rep: family(spec(rep)).load_processor(tiny_qwen_path) for rep in fmt.REPRESENTATIONS}


@pytest.fixture(scope="module")
def batch():
    """6 synthetic images with 1-2 shapes; one label or all of an image's labels per query, so the
    prompts have different lengths and the batch is left-padded."""
    exs = [make_example(i, seed=5, image_size=SIDE, shapes_per_image=1 + i % 2) for i in range(6)]
    images = [Image.open(io.BytesIO(e["image"])).convert("RGB") for e in exs]
    labels = [sorted({o.label for o in e["objects"] if o.label}) for e in exs]
    return images, labels


def generate(model, processor, rep, kind, images, labels, grammars=None, max_new=MAX_NEW, **decoding):
    """[(generated ids up to the end token, their raw log-probs, decoded text)] per example."""
    import torch

    fam = family(spec(rep))
    tok = processor.tokenizer
    prompts = [fmt.render_prompt(KIND_OF_TASK[kind], " ; ".join(lb), rep) for lb in labels]
    enc = fam.encode_prompts(processor, images, prompts)
    plen = int(enc["input_ids"].shape[1])
    stop = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    procs = [GrammarLogitsProcessor(grammars, plen, max_new)] if grammars is not None else []
    decoding.setdefault("do_sample", False)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new, pad_token_id=tok.pad_token_id, eos_token_id=stop,
                             logits_processor=procs, output_logits=True, return_dict_in_generate=True, **decoding)
    lp = token_logprobs(model, out, plen)
    rows = []
    for ids, row_lp in zip(out.sequences[:, plen:].tolist(), lp):
        n = next((i + 1 for i, t in enumerate(ids) if t in stop), len(ids))
        rows.append((ids[:n], [float(v) for v in row_lp[:n]], tok.decode(ids[:n], skip_special_tokens=True, clean_up_tokenization_spaces=False)))
    return rows


def grammars_for(processor, rep, kind, labels, max_objects=MAX_OBJECTS):
    return [tg.compile_grammar(qwen_grammar.answer_grammar(kind, lb, rep, SIDE, SIDE, max_objects), processor.tokenizer) for lb in labels]


def parse(text, kind, rep, labels):
    return fmt.parse(text, kind, SIDE, SIDE, SIDE, SIDE, rep, labels)


@pytest.mark.parametrize("rep", fmt.REPRESENTATIONS)
def test_random_weights_free_decoding_is_invalid(model, processors, batch, rep):
    images, labels = batch
    for kind in ("point", "box"):
        rows = generate(model, processors[rep], rep, kind, images, labels)
        valid = [bool(r.objects) and not r.errors for r in (parse(t, kind, rep, lb) for (_, _, t), lb in zip(rows, labels))]
        assert sum(valid) / len(valid) < 0.5


@pytest.mark.parametrize("rep", fmt.REPRESENTATIONS)
@pytest.mark.parametrize("kind", ["point", "box"])
@pytest.mark.parametrize("decoding", [
    {},  # greedy
    {"num_beams": 2},
    {"do_sample": True, "top_k": 50, "temperature": 1.5},
], ids=["greedy", "beam2", "sample"])
def test_constrained_outputs_always_parse(model, processors, batch, rep, kind, decoding):
    import torch

    images, labels = batch
    processor = processors[rep]
    grammars = grammars_for(processor, rep, kind, labels)
    torch.manual_seed(0)
    rows = generate(model, processor, rep, kind, images, labels, grammars, **decoding)
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for (ids, lp, text), lb, g in zip(rows, labels, grammars):
        res = parse(text, kind, rep, lb)
        assert res.errors == [] and 1 <= len(res.objects) <= MAX_OBJECTS, text
        assert {o.label for o in res.objects} <= set(lb)
        assert len(set(res.objects)) == len(res.objects), text
        assert ids[-1] == im_end and len(ids) <= MAX_NEW and g.accepts(ids)
        if kind == "box":
            assert all(b.x2 >= b.x1 and b.y2 >= b.y1 for b in res.objects)
        conf = text_confidence.text_object_confidences(lp, ids, g, lambda t, lb=lb: parse(t, kind, rep, lb).objects)
        assert len(conf) == len(res.objects) and all(0 < c <= 1 for c in conf), conf


@pytest.mark.parametrize("rep", fmt.REPRESENTATIONS)
def test_a_tight_budget_still_ends_the_answer(model, processors, batch, rep):
    """The fewest tokens a one-box answer needs: every row still closes its answer in time."""
    images, labels = batch
    processor = processors[rep]
    grammars = grammars_for(processor, rep, "box", labels, max_objects=None)
    least = max(int(g.tokens_to_finish(g.state([]))) for g in grammars)
    rows = generate(model, processor, rep, "box", images, labels, grammars, max_new=least, min_new_tokens=least)
    for (ids, _, text), lb in zip(rows, labels):
        res = parse(text, "box", rep, lb)
        assert res.errors == [] and len(res.objects) == 1 and len(ids) <= least, text


def _value_token_ids(tok, ids: list[int], rep: str) -> list[list[int]]:
    """Per object, the positions of the tokens that overlap its numbers / loc tokens / label text,
    found from character offsets and regexes (not the grammar)."""
    ids = ids[:-1]  # the end token
    starts = [len(tok.decode(ids[:i], clean_up_tokenization_spaces=False)) for i in range(len(ids) + 1)]
    text = tok.decode(ids, clean_up_tokenization_spaces=False)
    if rep == "pairs":
        objs = [(m.start(2), m.end(2), m.start(3), m.group(3)) for m in re.finditer(r"\((['\"])(.*?)\1, \[([^\]]*)\]\)", text)]
    else:
        objs = [(m.start(2), m.end(2), m.start(1), m.group(1))
                for m in re.finditer(r'\{"(?:bbox|point)_2d": (\[[^\]]*\]|"[^"]*"), "label": "((?:[^"\\]|\\.)*)"\}', text)]
    out = []
    for l0, l1, c0, coords in objs:
        spans = [(l0, l1)] + [(c0 + n.start(), c0 + n.end()) for n in re.finditer(r"<\|loc_\d{4}\|>|[0-9.]+", coords)]
        out.append([i for i in range(len(ids)) if any(starts[i] < e and s < starts[i + 1] for s, e in spans)])
    return out


@pytest.mark.parametrize("rep", fmt.REPRESENTATIONS)
def test_confidences_are_the_geometric_mean_of_value_tokens(model, processors, batch, rep):
    images, labels = batch
    processor = processors[rep]
    tok = processor.tokenizer
    grammars = grammars_for(processor, rep, "box", labels)
    rows = generate(model, processor, rep, "box", images, labels, grammars, num_beams=3, min_new_tokens=MAX_NEW)
    checked = 0
    for (ids, lp, text), lb, g in zip(rows, labels, grammars):
        conf = text_confidence.text_object_confidences(lp, ids, g, lambda t, lb=lb: parse(t, "box", rep, lb).objects)
        expect = [math.exp(np.mean([lp[i] for i in toks])) for toks in _value_token_ids(tok, ids, rep)]
        assert conf == pytest.approx(expect, rel=1e-9), text
        checked += len(conf)
    assert checked >= len(rows)


# ---------------------------------------------------------------------------- a real-size vocabulary


def _corpus(seed=0, n_words=300_000, n_lines=60_000):
    """Pseudo-words (Zipf-ish), CJK runs, numbers and JSON punctuation: enough distinct pairs for
    ~150k BPE merges, so the vocabulary has Qwen's size and its mix of partial-UTF-8 pieces."""
    rng = random.Random(seed)
    syl = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiou"] + list("aeiou") + ["th", "ch", "sh", "qu", "ng", "st"]
    words = ["".join(rng.choice(syl) for _ in range(rng.randint(1, 5))) for _ in range(n_words)]
    cjk = [chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(3000)]
    punct = ['", "', '": ', '{"', '"}', "},", "[", "]", "(", ")", "'", ", ", "\n", "\n\t", "```", "```json", '"']
    for _ in range(n_lines):
        parts = []
        for _ in range(rng.randint(5, 40)):
            r = rng.random()
            if r < 0.7:
                w = words[min(int(rng.paretovariate(0.7)) - 1, n_words - 1)] if rng.random() < 0.5 else rng.choice(words)
                parts.append((" " if rng.random() < 0.8 else "") + w)
            elif r < 0.8:
                parts.append("".join(rng.choice(cjk) for _ in range(rng.randint(1, 4))))
            elif r < 0.9:
                parts.append(str(rng.randint(0, 99999)))
            else:
                parts.append(rng.choice(punct))
        yield "".join(parts)


@pytest.fixture(scope="module")
def big_tokenizer():
    """A 151k-token byte-level BPE with Qwen2's pre-tokenizer, special tokens and <|loc|> tokens,
    trained offline in ~15 s."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from raytrain.models.tiny_qwen import QWEN_SPLIT, SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainer=trainers.BpeTrainer(vocab_size=150_000, show_progress=False,
                                                                   initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    fast.add_tokens(list(fmt.LOC_TOKENS))
    return fast


def test_large_vocabulary_accepts_answers_and_steps_fast(big_tokenizer):
    tok = big_tokenizer
    assert len(tok) > 150_000
    labels = ["red circle", "blue square", "person", "中文标签", "traffic light"]
    fw, fh = 644, 476  # a real model frame (multiples of 28)
    rng = random.Random(0)
    cold, report = [], []
    gc.disable()  # time the grammar, not a collection of the whole process's heap that it happens to trigger
    try:
        for rep in fmt.REPRESENTATIONS:
            for kind in ("point", "box"):
                answer = qwen_grammar.answer_grammar(kind, labels, rep, fw, fh, max_objects=8)
                times = []
                for _ in range(6):  # rendered answers, token by token
                    g = tg.TextGrammar(answer, tg.token_vocab(tok), [tok.eos_token_id])  # cold: no cached state
                    objs = []
                    for _ in range(rng.randint(1, 6)):
                        x1, x2 = sorted(rng.uniform(0, fw) for _ in range(2))
                        y1, y2 = sorted(rng.uniform(0, fh) for _ in range(2))
                        objs.append(Point(x1, y1, rng.choice(labels)) if kind == "point" else Box(x1, y1, x2, y2, rng.choice(labels)))
                    text = fmt.render_objects(list(dict.fromkeys(objs)), fw, fh, fw, fh, rep)
                    ids = tok(text + "<|im_end|>", add_special_tokens=False)["input_ids"]
                    for i, t in enumerate(ids):
                        t0 = time.perf_counter()
                        a = g.allowed(ids[:i], 512 - i)
                        times.append(time.perf_counter() - t0)
                        assert t in a.tokens, (text, tok.decode(ids[:i]))
                for _ in range(6):  # free walks under a budget that binds
                    g = tg.TextGrammar(answer, tg.token_vocab(tok), [tok.eos_token_id])
                    ids = []
                    while not ids or ids[-1] != g.eos_id:
                        t0 = time.perf_counter()
                        a = g.allowed(ids, 120 - len(ids))
                        times.append(time.perf_counter() - t0)
                        ids.append(rng.choice(a.tokens))
                    res = fmt.parse(tok.decode(ids, skip_special_tokens=True), kind, fw, fh, fw, fh, rep, labels)
                    assert res.errors == [] and res.objects and len(ids) <= 120
                cold.extend(times)
                report.append(f"{rep}/{kind}: mean {statistics.mean(times) * 1e3:.3f} ms, p99 {np.percentile(times, 99) * 1e3:.2f} ms")
    finally:
        gc.enable()
    print(f"\n{len(tok)}-token vocabulary, per allowed() call, a fresh grammar (no cached state) per answer\n" + "\n".join(report))
    # measured ~0.1 ms mean, a few ms at worst; generous bounds for a shared 2-core machine
    assert statistics.mean(cold) < 5e-3 and np.percentile(cold, 99) < 50e-3
