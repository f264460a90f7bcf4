"""`raytrain prepare` with issue 14 item 7's data options, end to end on Ray Data, on the seeds'
own fixtures: seed 003's caption selection by CLIPScore with a tiny CLIP built offline (saved with
save_pretrained, loaded back by the path a real CLIP ViT-B/32 folder takes) and its caption
statistics in the prep report (tests/assets/risc_mini); a random subset of Visual Genome images
(seed 002, tests/assets/seed002_visual_genome)."""

import csv
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from raytrain import config
from raytrain.data import caption_stats, shards
from raytrain.data.convert import common
from raytrain.formats.annotations import Caption, Region, objects_from_json
from raytrain.launch import prepare

pytestmark = pytest.mark.integration

ASSETS = Path(__file__).parents[1] / "assets"


def _byte_chars() -> list[str]:
    """The 256 characters byte-level BPE writes bytes as (printable Latin-1 as itself, the rest
    shifted past 255): a CLIP vocabulary must hold them all."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


def tiny_clip(folder: Path, seed: int) -> Path:
    """A random-init CLIP (2 layers, width 32, 32 px images) with a byte-level tokenizer and an
    image processor, saved the way a downloaded openai/clip-vit-base-patch32 folder is laid out."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **small),
        vision_config=dict(image_size=32, patch_size=8, **small),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                         tokenizer=tok)
    folder.mkdir(parents=True, exist_ok=True)
    proc.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def _risc_kept() -> dict[str, list[str]]:
    """image -> its captions, for the risc_mini rows whose photo is in the folder."""
    with open(ASSETS / "risc_mini" / "captions.csv") as f:
        rows = list(csv.DictReader(f))
    return {r["image"]: [" ".join(r[k].split()) for k in r if k.startswith("caption_") and r[k].strip()]
            for r in rows if r["image"] and (ASSETS / "risc_mini" / r["image"]).exists()}


def _highest(folder: Path, image: str, caps: list[str]) -> tuple[int, list[float]]:
    """The caption the tiny CLIP rates highest for the image, computed here from the model's own
    logits (independent of raytrain.data.clean), and the cosine of every caption."""
    from transformers import CLIPModel, CLIPProcessor

    proc, model = CLIPProcessor.from_pretrained(folder), CLIPModel.from_pretrained(folder).eval()
    enc = proc(text=caps, images=Image.open(ASSETS / "risc_mini" / image).convert("RGB"), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**enc)
    cos = (out.logits_per_image[0] / model.logit_scale.exp()).tolist()
    return max(range(len(caps)), key=lambda i: cos[i]), cos


def _clip_that_disagrees_with_consensus(tmp_path) -> tuple[Path, dict[str, str]]:
    """A seeded tiny CLIP whose choice is unambiguous for every kept image (a unique, positive best
    cosine) and differs from the first caption and from the n-gram consensus for at least one image,
    so that a pipeline ignoring the model could not pass; plus the caption it picks per image."""
    from raytrain.data import clean

    kept = _risc_kept()
    for seed in range(40):
        folder = tiny_clip(tmp_path / f"clip{seed}", seed)
        picks, telling = {}, False
        for image, caps in kept.items():
            best, cos = _highest(folder, image, caps)
            if cos[best] <= 0 or sum(abs(c - cos[best]) < 1e-6 for c in cos) > 1 or caps.count(caps[best]) > 1:
                break
            picks[image] = caps[best]
            telling |= best != 0 and best != clean.select_caption(caps, clean.NgramConsensus())
        else:
            if telling:
                return folder, picks
    raise AssertionError("no seed in 0..39 gives a tiny CLIP with an unambiguous, telling choice")


def test_clip_caption_selection_and_caption_statistics(tmp_path, ray_cluster):
    clip, picks = _clip_that_disagrees_with_consensus(tmp_path)
    shutil.copytree(ASSETS / "risc_mini", tmp_path / "risc")
    out = tmp_path / "out"
    cfg = config.load(None, [f"data.source=captions:{tmp_path / 'risc'}", f"data.uri={out}", "data.prepare.caption_select=clip",
                             f"data.prepare.clip_path={clip}", "data.tasks=[caption]"])
    report = prepare.main(cfg)

    # the shards: each kept image with the one caption the CLIP model scores highest
    kept = {}
    for split in ("train", "val", "test"):
        for r in shards.read_split(str(out), split).to_pylist():
            kept[r["id"]] = objects_from_json(r["objects"])
    assert kept == {f"captions-{image}": [Caption(text)] for image, text in picks.items()}
    assert report["objects_dropped"]["caption_not_selected"] == sum(len(c) - 1 for c in _risc_kept().values())

    # seed 003's statistics of the captions before selection, for the images kept
    stats = caption_stats.CaptionStats()
    for caps in _risc_kept().values():
        stats.add(caps)
    got = report["statistics"]["captions"]
    assert got == stats.summary()
    assert (got["images"], got["captions"]) == (3, 15)
    assert got["duplicates"] == {"within_image": 2, "images_with_duplicates": 2, "dataset": 2}  # moon and gravel repeat one
    assert 0 < got["caption_vs_caption"]["bleu_corpus"]["bleu_4"] < 1
    stored = shards.PrepReport.read(str(out))
    assert stored.statistics == report["statistics"]
    printed = prepare.format_report(report)
    assert "caption statistics" in printed and "BLEU-4" in printed


def test_a_random_subset_of_visual_genome_images(tmp_path, ray_cluster):
    out = tmp_path / "out"
    cfg = config.load(None, [f"data.source=visual_genome:{ASSETS / 'seed002_visual_genome'}", f"data.uri={out}",
                             "data.prepare.subset=2", "data.seed=1", "data.tasks=[dense_caption]"])
    report = prepare.main(cfg)
    written = {r["id"]: objects_from_json(r["objects"]) for s in report["rows_written"] for r in shards.read_split(str(out), s).to_pylist()}
    assert len(written) == 2 and all(objs and all(isinstance(o, Region) for o in objs) for objs in written.values())
    assert report["dropped"] == {"not_in_subset": 3}  # 5 images, 2 drawn
    assert report["subset"] == {"unit": "image", "requested": 2, "available": 5, "chosen": 2, "rows_kept": 2, "rows_left_out": 3}
    assert report["stages"][:4] == [["rows in", 5], ["after reading annotations", 5], ["after random subset", 2], ["after fetching images", 2]]
    # the draw is the one source_records makes: the same images, whatever runs it
    pc = prepare.prepare_config(cfg)
    recs, _ = prepare.source_records(pc, shards.PrepReport(), __import__("collections").Counter())
    assert {r["id"] for r in recs} == set(written)
    assert set(written) == {f"visual_genome-{k}" for k in _vg_keys(common)}


def _vg_keys(common_mod) -> set[str]:
    import json

    keys = [str(e["id"]) for e in json.loads((ASSETS / "seed002_visual_genome" / "region_descriptions.json").read_text())]
    return {keys[i] for i in common_mod.subset_indices(keys, 2, seed=1)}
