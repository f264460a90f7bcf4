"""Learning experiments on the synthetic set, through the real recipe loop (Ray-free, one process):

  python bench/learning.py ablation   # plain CE vs distance-aware <loc> loss, same budget (issue 4)
  python bench/learning.py adapters   # pre-train a tiny base on pointing, then LoRA / QLoRA-4bit /
                                      # QLoRA-8bit learn detection from it (issue 4)
  python bench/learning.py digits     # coordinates written as digits: plain CE vs the number loss, same
                                      # budget, for Qwen2.5-VL absolute JSON and PaliGemma answering in
                                      # Molmo percent text; Qwen's <|loc|> tokens with soft targets beside

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
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from raytrain import config as config_mod  # noqa: E402
from raytrain import tempdirs  # noqa: E402
from raytrain.data import pipeline, synthetic  # noqa: E402
from raytrain.eval import batch as eval_batch  # noqa: E402
from raytrain.formats.numbers import NumberSpan  # noqa: E402
from raytrain.models import ensure_preset, family  # noqa: E402
from raytrain import predict  # noqa: E402
from raytrain.eval.metrics import pointing  # noqa: E402
from raytrain.recipes import ddp  # noqa: E402
from raytrain.training.session import Session  # noqa: E402
from raytrain.training import checkpointing  # noqa: E402

OUT = REPO / "bench" / "results"


def examples(task: str, start: int, n: int, seed: int = 21, spec: str = "paligemma", image_hw=(64, 64)):
    """(image as the model sees it, example) pairs: 64-px synthetic images stretched to the model input."""
    rows = []
    for i in range(start, start + n):
        ex = synthetic.make_example(i, seed=seed, image_size=64)
        (e,) = pipeline.examples_for(ex["objects"], [task], 64, 64, spec, image_hw)
        img = Image.open(io.BytesIO(ex["image"])).convert("RGB").resize((image_hw[1], image_hw[0]), Image.BILINEAR)
        rows.append((img, e))
    return rows


def encode(proc, rows, micro: int, spec: str = "paligemma", max_len: int = 48):
    fam = family(spec)
    out = []
    for i in range(0, len(rows) - micro + 1, micro):
        c = rows[i : i + micro]
        numbers = [[NumberSpan(*n) for n in json.loads(r[1]["numbers"])] for r in c]
        enc = fam.encode_train(proc, [r[0] for r in c], [r[1]["prefix"] for r in c], [r[1]["suffix"] for r in c], max_len, numbers)
        if int(enc.pop("length").max()) > max_len:
            raise ValueError(f"examples longer than max_len={max_len}")
        out.append({k: torch.from_numpy(v) for k, v in enc.items()})
    return out


def train(model_path: str, overrides: list[str], batches) -> tuple[Path, list[dict]]:
    cfg = config_mod.load(None, overrides)
    reports, saved = [], []

    def report(metrics, ckpt_dir):
        reports.append(metrics)
        if "ce" in metrics:  # the curve as it goes (a long arm on a shared machine is otherwise silent until it ends)
            print(f"  step {metrics.get('step')} ce {metrics['ce']:.4f} num_loss {metrics.get('num_loss', 0.0):.4f}", flush=True)
        if ckpt_dir:  # kept for the later arms (a base checkpoint), removed when the bench exits
            keep = tempdirs.until_exit("raytrain-bench-learning-")
            shutil.copytree(ckpt_dir, keep, dirs_exist_ok=True)
            saved.append(keep)

    def epoch_batches(epoch, micro):
        order = np.random.default_rng(epoch).permutation(len(batches))
        return [batches[i] for i in order]

    session = Session(rank=0, world_size=1, checkpoint_dir=lambda: None, report=report, epoch_batches=epoch_batches)
    ddp.train(cfg, model_path, session, torch.device("cpu"), wrap_ddp=lambda m: m)
    return saved[-1], reports


def evaluate(model, proc, rows, batch_size: int = 50, spec: str = "paligemma", max_new_tokens: int = 12) -> dict:
    """Greedy decoding through the predict path (unconstrained: the model's own answers), scored as `raytrain eval` does."""
    fam = family(spec)
    out = []
    opts = predict.DecodeOptions(max_new_tokens=max_new_tokens, constrained=False, confidence=False)
    for i in range(0, len(rows), batch_size):
        c = rows[i : i + batch_size]
        hw = (c[0][0].height, c[0][0].width)
        batch = {k: np.array([r[1][k] for r in c], dtype=object) for k in ("task", "query", "prefix", "targets")}
        batch.update(id=np.array([str(j) for j in range(len(c))], dtype=object), width=np.full(len(c), 64), height=np.full(len(c), 64),
                     image=np.stack([np.asarray(r[0]) for r in c]), content_box=np.tile([0, 0, hw[1], hw[0]], (len(c), 1)))
        rows_out = predict.predict_batch(model, proc, fam, batch, opts)
        out += [{k: rows_out[k][j] for k in rows_out} for j in range(len(c))]
    agg = eval_batch.aggregate(out)
    agg.pop("parse_errors", None)
    return agg


def ablation(steps: int, base: str) -> dict:
    proc = family("paligemma").load_processor(base)
    train_rows, test_rows = examples("point", 0, 4000), examples("point", 10_000, 200)
    batches = encode(proc, train_rows, 32)
    common = ["model.freeze_vision=false", f"train.steps={steps}", "train.micro_batch_size=32", "train.lr=2e-3",
              "train.warmup_steps=100", f"train.log_every={max(1, steps // 20)}", f"train.checkpoint_every={steps}"]
    result = {"steps": steps, "batch": 32, "train_examples": len(train_rows), "test_examples": len(test_rows)}
    for name, sigma in (("plain_ce", 0.0), ("distance_aware_sigma60", 60.0)):
        t = time.perf_counter()
        ckpt, reports = train(base, common + [f"loss.loc_sigma={sigma}"], batches)
        model, p = checkpointing.load_for_inference(ckpt, base, family("paligemma"))
        m = evaluate(model, p, test_rows)
        result[name] = {"metrics": m, "seconds": round(time.perf_counter() - t, 1), "ce_curve": [(r["step"], r["ce"]) for r in reports]}
        print(name, {k: m.get(k) for k in ("valid_rate", "mean_norm_distance", "success_rate")}, flush=True)
    result["centre_baseline"] = centre_baseline(test_rows)
    return result


def centre_baseline(rows) -> dict:
    centre = [predict.score_example("point", [pointing.centre_point(64, 64)], e["targets"], 64, 64) for _, e in rows]
    return pointing.aggregate_pointing(centre)


# Arms of the digits ablation: (family spec, preset, extra overrides). Same data, steps and lr.
DIGIT_ARMS = {
    "qwen_absolute_plain_ce": ("qwen2_5_vl", "tiny:qwen2_5_vl", ["loss.number_weight=0", "loss.loc_sigma=0"]),
    "qwen_absolute_number_loss": ("qwen2_5_vl", "tiny:qwen2_5_vl", ["loss.loc_sigma=0"]),
    "qwen_tokens_loc_sigma60": ("qwen2_5_vl+tokens", "tiny:qwen2_5_vl", ["loss.loc_sigma=60"]),
    "paligemma_molmo_plain_ce": ("paligemma+molmo", "tiny:paligemma", ["loss.number_weight=0"]),
    "paligemma_molmo_number_loss": ("paligemma+molmo", "tiny:paligemma", []),
}


def digits(steps: int, arms: list[str]) -> dict:
    """Pointing on 4,000 training images, each arm the same budget (batch 32, lr 2e-3, full
    fine-tuning from the tiny preset's random init); 200 held-out images through the predict path."""
    result = {"steps": steps, "batch": 32, "train_examples": 4000, "test_examples": 200}
    for name in arms:
        spec, preset, extra = DIGIT_ARMS[name]
        fam = family(spec)
        base = fam.resolve(preset)
        proc = fam.load_processor(base)
        hw = fam.image_size(proc)
        train_rows, test_rows = examples("point", 0, 4000, spec=spec, image_hw=hw), examples("point", 10_000, 200, spec=spec, image_hw=hw)
        max_len = 160 if spec.startswith("qwen") else 128
        batches = encode(proc, train_rows, 32, spec, max_len)
        t = time.perf_counter()
        overrides = [f"model.family={spec.split('+')[0]}", f"model.box_format={fam.answer_format}", "model.freeze_vision=false",
                     "model.train_projector=true", f"train.steps={steps}", "train.micro_batch_size=32", "train.lr=2e-3",
                     "train.warmup_steps=100", f"train.log_every={max(1, steps // 20)}", f"train.checkpoint_every={steps}", *extra]
        ckpt, reports = train(base, overrides, batches)
        model, p = checkpointing.load_for_inference(ckpt, base, fam)
        m = evaluate(model, p, test_rows, spec=spec, max_new_tokens=48 if spec.startswith("qwen") else 80)
        result[name] = {"spec": spec, "overrides": extra, "metrics": m, "seconds": round(time.perf_counter() - t, 1),
                        "curve": [(r["step"], r["ce"], r.get("num_loss")) for r in reports]}
        print(name, {k: m.get(k) for k in ("valid_rate", "mean_norm_distance", "success_rate")}, flush=True)
        result.setdefault("centre_baseline", centre_baseline(test_rows))
    return result


def adapters(pre_steps: int, steps: int, base_seed_model: str) -> dict:
    proc = family("paligemma").load_processor(base_seed_model)
    # 1) pre-train a base on POINTING only (full fine-tuning from random init)
    t = time.perf_counter()
    point_batches = encode(proc, examples("point", 0, 4000), 32)
    base_ckpt, _ = train(base_seed_model, ["model.freeze_vision=false", f"train.steps={pre_steps}", "train.micro_batch_size=32",
                                           "train.lr=2e-3", "train.warmup_steps=100", f"train.checkpoint_every={pre_steps}",
                                           f"train.log_every={pre_steps}"], point_batches)
    base = str(base_ckpt / "model")  # a from_pretrained directory: the shipped-base role
    result = {"pretrain_steps": pre_steps, "pretrain_seconds": round(time.perf_counter() - t, 1), "adapter_steps": steps}
    test_rows = examples("detect", 10_000, 200)
    base_model, base_proc = family("paligemma").load(base)
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
        model, p = checkpointing.load_for_inference(ckpt, base, family("paligemma"))
        m = evaluate(model, p, test_rows)
        result[name] = {"metrics": m, "seconds": round(time.perf_counter() - t, 1), "trainable_params": reports[-1]["trainable_params"]}
        print(name, {k: m["boxes"].get(k) for k in ("valid_rate", "f1", "mean_iou")}, flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["ablation", "adapters", "digits"])
    ap.add_argument("--arms", default=",".join(DIGIT_ARMS), help="digits: comma-separated arms")
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
    elif a.mode == "digits":
        res = digits(a.steps or 2000, a.arms.split(","))
        # arms run separately add up in one file per budget (a --steps 4000 run must not replace the 2,000-step arms)
        prev = OUT / (f"learning_digits_{res['steps']}steps.json" if res["steps"] != 2000 else "learning_digits.json")
        if prev.exists() and json.loads(prev.read_text()).get("steps") == res["steps"]:
            res = {**{k: v for k, v in json.loads(prev.read_text()).items() if k in DIGIT_ARMS}, **res}
        headline = "mean_norm_distance: " + ", ".join(f"{k} {res[k]['metrics'].get('mean_norm_distance')}" for k in DIGIT_ARMS if k in res) + \
            f" (centre baseline {res['centre_baseline']['mean_norm_distance']:.4f})"
    else:
        res = adapters(a.pre_steps, a.steps or 400, seed_model)
        f1 = {k: res[k]["metrics"]["boxes"]["f1"] for k in ("lora", "qlora_4bit", "qlora_8bit")}
        headline = f"detection F1 after adapters {f1} vs pointing-only base {res['base_on_detect']['boxes']['f1']}"
    res.update(seconds=round(time.perf_counter() - t, 1), loadavg=os.getloadavg(), machine=f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    path = prev if a.mode == "digits" else OUT / f"learning_{a.mode}.json"
    path.write_text(json.dumps(res, indent=2, default=str))
    print(headline)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
