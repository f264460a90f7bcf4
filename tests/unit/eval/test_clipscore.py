"""CLIPScore from a local CLIP folder (a tiny random CLIP built offline here: CLIPModel from a small
config, a character-level CLIP tokenizer): 2.5 * max(cos, 0) of CLIP's projected embeddings, and the
eval predictor adds it to every caption example's score when eval.clip_path is set."""

import json

import numpy as np
import pytest
import torch


def build_tiny_clip(out) -> str:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789.,":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")  # no merges: one token per character
    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=64)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(out)
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=1),
                     vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2),
                     projection_dim=16)
    CLIPModel(cfg).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


def _images(n):
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)) for _ in range(n)]


def test_clipscore_is_two_and_a_half_times_clips_cosine(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    from raytrain.eval.metrics.clipscore import ClipScore

    caps = ["a red circle", "blue square on the left", "zz"]
    ims = _images(3)
    got = ClipScore(tiny_clip).scores(ims, caps)
    model, proc = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        out = model(**proc(text=caps, images=ims, return_tensors="pt", padding=True))
        cos = torch.diagonal(out.logits_per_image) / model.logit_scale.exp()  # CLIP's logits are scaled cosines
    assert got == pytest.approx([2.5 * max(float(c), 0.0) for c in cos], abs=1e-5)
    assert all(0.0 <= s <= 2.5 for s in got)
    with pytest.raises(FileNotFoundError):
        ClipScore("/no/such/clip")


def test_predictor_adds_clipscore_to_caption_examples(tiny_clip, tiny_model_path):
    from raytrain.eval.batch import Predictor
    from raytrain.formats.annotations import Caption, objects_to_json
    from raytrain.predict import DecodeOptions

    n = 3
    ims = np.stack([np.asarray(im.resize((64, 64))) for im in _images(n)])
    batch = {"id": np.array([f"c{i}" for i in range(n)], dtype=object), "task": np.array(["caption"] * n, dtype=object),
             "query": np.array([""] * n, dtype=object), "prefix": np.array(["caption en"] * n, dtype=object),
             "targets": np.array([objects_to_json([Caption("a red circle")])] * n, dtype=object),
             "width": np.full(n, 64), "height": np.full(n, 64), "image": ims, "content_box": np.tile([0, 0, 64, 64], (n, 1))}
    pred = Predictor(family="paligemma", model_path=tiny_model_path, options=DecodeOptions(max_new_tokens=6), batch_size=2,
                     clip_path=tiny_clip)
    out = pred(batch)
    scores = [json.loads(s) for s in out["score"]]
    assert all("clip_score" in s and 0.0 <= s["clip_score"] <= 2.5 for s in scores)
    assert list(out["device"]) == ["cpu"] * n

