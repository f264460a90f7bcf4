"""What packing buys: the useful-token share of padded vs packed batches on each seed job's length
distribution, and tiny-model training throughput packed vs padded on CPU.

    nice python bench/packing.py [--out bench/results/packing.json] [--skip-train]

1. Useful-token share = non-pad tokens / tokens computed. Each seed job's examples come from its
   fixture in the seed's own format (tests/assets/, tests/assets/README.md) through the REAL
   converter (data/convert/*), the job's tasks, family and answer format (pipeline.examples_for,
   as the pipeline renders them) and the family's encode_train. Text tokens are counted with the
   tiny presets' tokenizers (the released tokenizers cannot be downloaded here: their larger
   vocabularies split fewer words, so text lengths are upper bounds); image tokens are the
   released model's (PaliGemma-224: 256; Qwen2.5-VL: its smart_resize of each image under the
   released processor's pixel bounds / 28^2). An epoch of 4,096 examples is drawn from each
   fixture's lengths (seeded); padded batches hold the job's micro_batch_size examples and compute
   micro x their longest (the recipes trim the batch's common padding); packed batches hold the
   same number of rows of data.packing tokens filled first-fit decreasing within blocks of 256
   examples (data/packing.py's assign_rows, per Ray Data block) and compute rows x their longest fill.
2. Training throughput on CPU: the DDP recipe's loop (recipes/ddp.py train, plain Session) on the
   tiny PaliGemma over one epoch of synthetic examples of very different lengths (1-3 shapes; point,
   detect, caption and dense-caption answers): padded micro-batches of 8 examples vs packed rows
   (data.packing=128, shuffled) holding about as many examples; useful tokens per wall second and
   per CPU second (this machine's 2 cores are shared, so CPU seconds are the steadier figure),
   interleaved runs, medians.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ASSETS = ROOT / "tests" / "assets"
EPOCH = 4096
BLOCK = 256  # examples per Ray Data block the packer sees


# ----------------------------------------------------------------------------------------------
# 1. seed distributions


@contextlib.contextmanager
def _serve(folder: Path):
    """The PixMo fixture's image URLs served from 127.0.0.1 (the rows name an unresolvable host)."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(folder)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()


def _rows(records, to_objects, **kw) -> list[dict]:
    from raytrain.data.convert import common
    from raytrain.data.shards import PrepReport

    report = PrepReport()
    return list(common.iter_rows(records(report), to_objects, report, object_drops=Counter(), notes=Counter(), **kw))


def seed_rows(seed: str, tmp: Path) -> list[dict]:
    """Shard rows (id, image, width, height, objects) of a seed's fixture through its converter."""
    from raytrain.data.convert import captions, jsonl, pixmo_points, visual_genome
    from raytrain.data.convert.common import FetchOptions

    if seed == "000":
        folder = ASSETS / "seed000_pixmo_points"
        with _serve(folder) as url:
            text = (folder / "rows.jsonl").read_text().replace("http://images.fixture.test", f"{url}/images")
            (tmp / "rows.jsonl").write_text(text)
            fetch = FetchOptions(cache_dir=str(tmp / "cache"), timeout_s=5.0, retries=0)
            return _rows(lambda r: pixmo_points.records(pixmo_points.load_rows(str(tmp / "rows.jsonl")), r), pixmo_points.to_objects,
                         fetch=fetch)
    if seed.startswith("001"):
        name = seed.split("-")[1]
        return _rows(lambda r: jsonl.records(str(ASSETS / "seed001_datature_jsonl" / f"{name}.jsonl"), report=r), jsonl.to_objects)
    if seed == "002":
        return _rows(lambda r: visual_genome.records(str(ASSETS / "seed002_visual_genome"), report=r), visual_genome.to_objects)
    if seed == "003":
        return _rows(lambda r: captions.records(str(ASSETS / "risc_mini" / "captions.csv"), report=r), captions.to_objects)
    if seed == "004":
        return _rows(lambda r: jsonl.records(str(ASSETS / "seed004_fracture_jsonl" / "data.jsonl"), report=r), jsonl.to_objects)
    raise ValueError(seed)


SEEDS = {  # seed fixture -> the seed's job
    "000": "jobs/paligemma/2-3b_qlora_pixmo_points.yaml",
    "001-detect": "jobs/paligemma/1-3b_full_jsonl_detect.yaml",
    "001-caption": "jobs/paligemma/1-3b_full_jsonl_caption.yaml",
    "002": "jobs/qwen2_5_vl/3b_qlora_dense_captioning_visual_genome.yaml",
    "003": "jobs/paligemma/1-3b_qlora_risc_captions_conf1.yaml",
    "004": "jobs/paligemma/2-3b_full_shoulder_fracture.yaml",
}


def real_image_tokens(cfg, width: int, height: int, frame) -> int:
    """Image tokens of the job's released model for one image (module doc)."""
    from raytrain.models import family, presets

    fam = family(cfg.model.spec)
    if isinstance(frame, dict):  # native: the released processor's smart_resize of this image
        h, w = fam.input_size(frame, width, height)
        return (h // 28) * (w // 28)
    preset = next(p for p in presets.PRESETS.values() if p.hub_id == cfg.model.name_or_path)
    v = preset.config_fn().vision_config
    return (int(v.image_size) // int(v.patch_size)) ** 2


def seed_lengths(seed: str, job: str, tmp: Path) -> tuple[list[int], dict]:
    """Token lengths of a seed fixture's training examples as its job would train them."""
    from PIL import Image

    from raytrain import config as config_mod
    from raytrain.data import pipeline, preprocess, validate
    from raytrain.formats.annotations import objects_from_json
    from raytrain.models import ensure_preset, family, qwen_batch
    from raytrain.models.qwen_resize import DEFAULT_RESIZE

    cfg = config_mod.load(str(ROOT / job))
    spec = cfg.model.spec
    fam = family(spec)
    tiny = str(ensure_preset(f"tiny:{fam.name}"))
    proc = fam.load_processor(tiny)
    prep = cfg.data.preprocess
    # the released model's frame: a fixed 224 square (PaliGemma-224) or native sizes under the
    # released Qwen2.5-VL processor's bounds (and the job's own, where it sets them)
    frame = (qwen_batch.native_frame(DEFAULT_RESIZE, prep.min_pixels, prep.max_pixels) if prep.mode == "native" else (224, 224))
    tiny_hw = fam.image_size(proc)
    lengths, kept = [], 0
    for row in seed_rows(seed, tmp):
        checked, reason, _ = validate.check_row({k: row[k] for k in ("id", "image", "width", "height", "objects")})
        if reason is not None:
            continue
        w, h = checked["width"], checked["height"]
        geom = preprocess.geometry_for(fam, prep, frame, w, h)
        try:
            exs = pipeline.examples_for(objects_from_json(row["objects"]), cfg.data.tasks, w, h, spec, (geom.out_h, geom.out_w), geom)
        except ValueError:
            continue
        kept += 1
        img = Image.new("RGB", (tiny_hw[1], tiny_hw[0]))  # text tokens do not depend on the pixels
        enc = fam.encode_train(proc, [img] * len(exs), [e["prefix"] for e in exs], [e["suffix"] for e in exs], max_len=8192)
        tiny_img = int(fam.image_tokens(proc) or 16)
        for n in enc["length"]:
            lengths.append(int(n) - tiny_img + real_image_tokens(cfg, w, h, frame))
    info = {"job": job, "family": spec, "tasks": cfg.data.tasks, "rows_kept": kept, "examples": len(lengths),
            "max_seq_len": cfg.data.max_seq_len, "micro_batch_size": cfg.train.micro_batch_size,
            "lengths": {"min": min(lengths), "median": float(np.median(lengths)), "max": max(lengths)}}
    return lengths, info


def shares(lengths: list[int], micro: int, packing: int, seed: int = 0) -> dict:
    """Useful-token share of one drawn epoch, padded vs packed (module doc)."""
    from raytrain.data.packing import assign_rows

    rng = np.random.default_rng(seed)
    epoch = rng.choice(np.asarray(lengths), size=EPOCH, replace=True)
    useful = int(epoch.sum())
    padded = sum(len(b) * int(b.max()) for b in np.array_split(epoch, range(micro, EPOCH, micro)))
    fills = []
    for s in range(0, EPOCH, BLOCK):
        block = epoch[s:s + BLOCK]
        fills += [int(block[r].sum()) for r in assign_rows(block, packing)]
    fills = np.asarray(fills)
    rng.shuffle(fills)
    packed = sum(len(b) * int(b.max()) for b in np.array_split(fills, range(micro, len(fills), micro)))
    return {"packing": packing, "padded_share": round(useful / padded, 4), "packed_share": round(useful / packed, 4),
            "examples_per_row": round(EPOCH / len(fills), 2), "rows": len(fills)}


# ----------------------------------------------------------------------------------------------
# 2. CPU training throughput


def _train_batches(model_path: str, packing: int, micro_examples: int, n_images: int = 96):
    from raytrain.data import packing as packing_mod
    from raytrain.data import pipeline, synthetic
    from raytrain.formats.annotations import objects_to_json
    from raytrain.models import family
    from raytrain.training.session import collate

    rows = {k: [] for k in ("id", "image", "width", "height", "objects")}
    for i in range(n_images):
        ex = synthetic.make_example(i, seed=21, image_size=64, shapes_per_image=1 + i % 3)
        for k in rows:
            rows[k].append(objects_to_json(ex[k]) if k == "objects" else ex[k])
    rows = {k: np.array(v, dtype=object) if k in ("id", "image", "objects") else np.array(v) for k, v in rows.items()}
    tasks = ["point", "detect", "caption", "dense_caption"]
    ex = pipeline.decode_and_expand(rows, split="train", tasks=tasks, image_hw=(64, 64), family="paligemma")
    enc = pipeline.tokenize(ex, split="train", model_path=model_path, max_len=packing, family="paligemma")
    order = np.random.default_rng(0).permutation(len(enc["input_ids"]))
    enc = {k: v[order] for k, v in enc.items()}
    lengths = enc["attention_mask"].sum(1)
    if not micro_examples:  # packed rows
        pad_id = family("paligemma").load_processor(model_path).tokenizer.pad_token_id
        rows_ = packing_mod.pack_batch(enc, family="paligemma", length=packing, pad_id=pad_id)
        # first-fit decreasing leaves the longest examples in the first rows: shuffle the rows, as
        # the training split's local shuffle does
        perm = np.random.default_rng(1).permutation(len(rows_["input_ids"]))
        rows_ = {k: v[perm] for k, v in rows_.items()}
        per_row = len(enc["input_ids"]) / len(rows_["input_ids"])
        micro = max(1, round(8 / per_row))
        batches = [collate({k: v[i:i + micro] for k, v in rows_.items()}) for i in range(0, len(rows_["input_ids"]) - micro + 1, micro)]
    else:
        micro = micro_examples
        batches = [collate({k: v[i:i + micro] for k, v in enc.items()}) for i in range(0, len(enc["input_ids"]) - micro + 1, micro)]
    return batches, micro, float(lengths.mean())


def train_throughput(model_path: str, packing: int, packed: bool) -> dict:
    """One epoch (every example once) of the recipe's loop; CPU and wall seconds per example over
    the steps after warm-up (the last step, which also writes the final checkpoint, excluded)."""
    import torch

    from raytrain import config as config_mod
    from raytrain.recipes import ddp
    from raytrain.training.session import Session

    torch.manual_seed(0)
    torch.set_num_threads(1)
    batches, micro, mean_len = _train_batches(model_path, packing, 0 if packed else 8)
    steps = len(batches)
    examples = [sum(len(np.ravel(k)) for k in b["example_keys"]) for b in batches]
    tokens = [int(b["attention_mask"].sum(1).max()) * len(b["attention_mask"]) for b in batches]  # computed after the trim
    cfg = config_mod.load(None, ["train.strategy=full", "model.freeze_vision=false", f"train.steps={steps}", f"train.micro_batch_size={micro}",
                                 "train.warmup_steps=1", "train.log_every=1", "train.checkpoint_every=100000", "loss.loc_sigma=60"])
    marks = {}

    def report(m, d):
        marks[m["step"]] = (time.process_time(), time.perf_counter())

    session = Session(rank=0, world_size=1, checkpoint_dir=lambda: None, report=report, epoch_batches=lambda e, m: [dict(b) for b in batches])
    with tempfile.TemporaryDirectory() as d, contextlib.chdir(d):
        ddp.train(cfg, model_path, session, torch.device("cpu"), wrap_ddp=lambda m: m)
    first, last = 2, steps - 1  # steps 3 .. steps-1 are timed
    n_ex = sum(examples[first:last])
    cpu = marks[last][0] - marks[first][0]
    wall = marks[last][1] - marks[first][1]
    useful = n_ex * mean_len
    return {"packed": packed, "micro_batch_rows": micro, "steps_timed": last - first, "examples_timed": n_ex,
            "cpu_ms_per_example": round(1000 * cpu / n_ex, 3), "examples_per_cpu_s": round(n_ex / cpu, 2),
            "examples_per_s": round(n_ex / wall, 2), "useful_tokens_per_s": round(useful / wall, 1),
            "useful_tokens_per_cpu_s": round(useful / cpu, 1), "useful_token_share": round(useful / sum(tokens[first:last]), 4),
            "mean_example_tokens": round(mean_len, 1), "batches_per_epoch": steps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "packing.json"))
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved padded/packed training runs")
    a = ap.parse_args(argv)
    out: dict = {"seeds": {}, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "gpu": None}}
    with tempfile.TemporaryDirectory() as d:
        for seed, job in SEEDS.items():
            tmp = Path(d) / seed
            tmp.mkdir()
            lengths, info = seed_lengths(seed, job, tmp)
            ms = info["max_seq_len"]
            info["epochs"] = [shares(lengths, info["micro_batch_size"], p) for p in (ms, 2 * ms, 4 * ms)]
            info["best_packed_share"] = max(e["packed_share"] for e in info["epochs"])
            out["seeds"][seed] = info
            print(seed, json.dumps({k: v for k, v in info.items() if k != "epochs"}), json.dumps(info["epochs"]), flush=True)
    if not a.skip_train:
        from raytrain.models import ensure_preset

        path = str(ensure_preset("tiny:paligemma"))
        runs = []
        for _ in range(a.rounds):  # interleaved: the load on this shared machine moves between runs
            for packed in (False, True):
                runs.append(train_throughput(path, 128, packed))
                print(json.dumps(runs[-1]), flush=True)

        def med(packed: bool, key: str) -> float:
            return float(np.median([r[key] for r in runs if r["packed"] == packed]))

        out["cpu_training"] = {
            "model": "tiny:paligemma (full fine-tuning, fp32, 1 torch thread), data.packing=128, padded micro-batch 8 examples",
            "runs": runs,
            "useful_tokens_per_s_ratio": round(med(True, "useful_tokens_per_s") / med(False, "useful_tokens_per_s"), 3),
            "useful_tokens_per_cpu_s_ratio": round(med(True, "useful_tokens_per_cpu_s") / med(False, "useful_tokens_per_cpu_s"), 3),
            "useful_token_share": {"padded": med(False, "useful_token_share"), "packed": med(True, "useful_token_share")},
            "loadavg": os.getloadavg(),
        }
        print(json.dumps({k: v for k, v in out["cpu_training"].items() if k != "runs"}), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
