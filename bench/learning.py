"""Learning experiments on the synthetic set, through the real recipe loop (Ray-free, one process):

  python bench/learning.py ablation   # plain CE vs distance-aware <loc> loss, same budget (issue 4)
  python bench/learning.py adapters   # pre-train a tiny base on pointing, then LoRA / QLoRA-4bit /
                                      # QLoRA-8bit learn detection from it (issue 4)

Each writes bench/results/learning_<mode>.json with every number and prints its headline last.
Held-out metrics come from the same parse -> score code as `raytrain eval`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from raytrain import config as config_mod  # noqa: E402
from raytrain.data import pipeline, synthetic  # noqa: E402
from raytrain.eval import batch as eval_batch  # noqa: E402
from raytrain.models import paligemma  # noqa: E402
from raytrain.models.tiny import ensure_preset  # noqa: E402
from raytrain.recipes import ddp  # noqa: E402
from raytrain.training.session import Session  # noqa: E402
from raytrain.training import checkpointing  # noqa: E402

OUT = REPO / "bench" / "results"


def examples(task: str, start: int, n: int, seed: int = 21):
    rows = []
    for i in range(start, start + n):
        ex = synthetic.make_example(i, seed=seed, image_size=64)
        (e,) = pipeline.examples_for(ex["objects"], [task], 64, 64)
        img = Image.open(io.BytesIO(ex["image"])).convert("RGB")
        rows.append((img, e))
    return rows


def encode(proc, rows, micro: int):
    out = []
    for i in range(0, len(rows) - micro + 1, micro):
        c = rows[i : i + micro]
        enc = paligemma.encode_train(proc, [r[0] for r in c], [r[1]["prefix"] for r in c], [r[1]["suffix"] for r in c], 48)
        enc.pop("length")
        out.append({k: torch.from_numpy(v) for k, v in enc.items()})
    return out


def train(model_path: str, overrides: list[str], batches) -> tuple[Path, list[dict]]:
    cfg = config_mod.load(None, overrides)
    reports, saved = [], []

    def report(metrics, ckpt_dir):
        reports.append(metrics)
        if ckpt_dir:
            keep = Path(tempfile.mkdtemp(prefix="learning-"))
            shutil.copytree(ckpt_dir, keep, dirs_exist_ok=True)
            saved.append(keep)

    def epoch_batches(epoch, micro):
        order = np.random.default_rng(epoch).permutation(len(batches))
        return [batches[i] for i in order]

    session = Session(rank=0, world_size=1, checkpoint_dir=lambda: None, report=report, epoch_batches=epoch_batches)
    ddp.train(cfg, model_path, session, torch.device("cpu"), wrap_ddp=lambda m: m)
    return saved[-1], reports


def evaluate(model, proc, rows, batch_size: int = 50) -> dict:
    out = []
    for i in range(0, len(rows), batch_size):
        c = rows[i : i + batch_size]
        texts = paligemma.generate(model, proc, [r[0] for r in c], [r[1]["prefix"] for r in c], max_new_tokens=12)
        for (img, e), text in zip(c, texts):
            res = paligemma.parse_output(text, e["task"], 64, 64)
            score = eval_batch.score_example(e["task"], res.objects or None, e["targets"], 64, 64)
            out.append({"task": e["task"], "score": json.dumps(score), "errors": json.dumps([[x.reason, x.text] for x in res.errors])})
    agg = eval_batch.aggregate(out)
    agg.pop("parse_errors", None)
    return agg


def ablation(steps: int, base: str) -> dict:
    proc = paligemma.load_processor(base)
    train_rows, test_rows = examples("point", 0, 4000), examples("point", 10_000, 200)
    batches = encode(proc, train_rows, 32)
    common = ["model.freeze_vision=false", f"train.steps={steps}", "train.micro_batch_size=32", "train.lr=2e-3",
              "train.warmup_steps=100", f"train.log_every={max(1, steps // 20)}", f"train.checkpoint_every={steps}"]
    result = {"steps": steps, "batch": 32, "train_examples": len(train_rows), "test_examples": len(test_rows)}
    for name, sigma in (("plain_ce", 0.0), ("distance_aware_sigma60", 60.0)):
        t = time.perf_counter()
        ckpt, reports = train(base, common + [f"loss.loc_sigma={sigma}"], batches)
        model, p = checkpointing.load_for_inference(ckpt, base, paligemma)
        m = evaluate(model, p, test_rows)
        result[name] = {"metrics": m, "seconds": round(time.perf_counter() - t, 1), "ce_curve": [(r["step"], r["ce"]) for r in reports]}
        print(name, {k: m.get(k) for k in ("valid_rate", "mean_norm_distance", "success_rate")}, flush=True)
    centre = [json.loads(r) for r in [json.dumps(eval_batch.score_example("point", [eval_batch.point_metrics.centre_point(64, 64)], e["targets"], 64, 64)) for _, e in test_rows]]
    result["centre_baseline"] = eval_batch.point_metrics.aggregate_pointing(centre)
    return result


def adapters(pre_steps: int, steps: int, base_seed_model: str) -> dict:
    proc = paligemma.load_processor(base_seed_model)
    # 1) pre-train a base on POINTING only (full fine-tuning from random init)
    t = time.perf_counter()
    point_batches = encode(proc, examples("point", 0, 4000), 32)
    base_ckpt, _ = train(base_seed_model, ["model.freeze_vision=false", f"train.steps={pre_steps}", "train.micro_batch_size=32",
                                           "train.lr=2e-3", "train.warmup_steps=100", f"train.checkpoint_every={pre_steps}",
                                           f"train.log_every={pre_steps}"], point_batches)
    base = str(base_ckpt / "model")  # a from_pretrained directory: the shipped-base role
    result = {"pretrain_steps": pre_steps, "pretrain_seconds": round(time.perf_counter() - t, 1), "adapter_steps": steps}
    test_rows = examples("detect", 10_000, 200)
    base_model, base_proc = paligemma.load(base)
    base_model.eval()
    result["base_on_detect"] = evaluate(base_model, base_proc, test_rows)
    result["base_on_point"] = evaluate(base_model, base_proc, examples("point", 10_000, 200))
    print("base (pointing-only) on detect:", {k: result["base_on_detect"]["boxes"].get(k) for k in ("valid_rate", "f1", "mean_iou")}, flush=True)
    # 2) each adapter strategy learns DETECTION from that base, same budget
    det_batches = encode(proc, examples("detect", 0, 2000), 16)
    for name, extra in (("lora", []), ("qlora_4bit", ["quant.bits=4"]), ("qlora_8bit", ["quant.bits=8"])):
        t = time.perf_counter()
        ckpt, reports = train(base, ["train.strategy=lora", "lora.r=16", "lora.alpha=32", f"train.steps={steps}", "train.micro_batch_size=16",
                                     "train.lr=3e-3", "train.warmup_steps=30", f"train.checkpoint_every={steps}", f"train.log_every={max(1, steps // 10)}",
                                     "model.train_projector=false", *extra], det_batches)
        model, p = checkpointing.load_for_inference(ckpt, base, paligemma)
        m = evaluate(model, p, test_rows)
        result[name] = {"metrics": m, "seconds": round(time.perf_counter() - t, 1), "trainable_params": reports[-1]["trainable_params"]}
        print(name, {k: m["boxes"].get(k) for k in ("valid_rate", "f1", "mean_iou")}, flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["ablation", "adapters"])
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--pre-steps", type=int, default=1500)
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    seed_model = str(ensure_preset("tiny:paligemma"))
    t = time.perf_counter()
    if a.mode == "ablation":
        res = ablation(a.steps or 1200, seed_model)
        ce, da = res["plain_ce"]["metrics"], res["distance_aware_sigma60"]["metrics"]
        headline = (f"mean_norm_distance: plain CE {ce.get('mean_norm_distance')} vs distance-aware {da.get('mean_norm_distance')} "
                    f"(centre baseline {res['centre_baseline']['mean_norm_distance']:.4f}); success {ce.get('success_rate_all')} vs {da.get('success_rate_all')}")
    else:
        res = adapters(a.pre_steps, a.steps or 400, seed_model)
        f1 = {k: res[k]["metrics"]["boxes"]["f1"] for k in ("lora", "qlora_4bit", "qlora_8bit")}
        headline = f"detection F1 after adapters {f1} vs pointing-only base {res['base_on_detect']['boxes']['f1']}"
    res.update(seconds=round(time.perf_counter() - t, 1), loadavg=os.getloadavg(), machine=f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    (OUT / f"learning_{a.mode}.json").write_text(json.dumps(res, indent=2, default=str))
    print(headline)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
