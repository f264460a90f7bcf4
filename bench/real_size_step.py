"""One LoRA training step of the PaliGemma2-3B-224 architecture on CPU, with random weights, through
the DDP recipe's own loop (`raytrain.recipes.ddp.train` with a plain Session: no Ray), and its peak
resident memory next to `raytrain.models.memory`'s estimate for the same setting.

    nice python bench/real_size_step.py [--preset paligemma2-3b-224] [--out bench/results/real_size_step.json]

Three processes, so each number is its own:
  build   `raytrain.models.presets.random_model` (bfloat16, the estimate's lora_bf16 setting), saved
          with save_pretrained next to a processor (SigLIP at 224 px, 256 image tokens, the tiny
          preset's tokenizer: no real tokenizer can be downloaded here; the model's image token id
          is set to that tokenizer's <image>, every id lies inside the real 257216-row vocabulary)
  step    the recipe loads it through the same from_pretrained path a hub checkpoint takes, wraps
          LoRA (r 8, all decoder linears), and runs ONE optimizer step on one example; peak RSS
          (getrusage ru_maxrss) and wall time of this process
  here    `memory.estimate(preset, "lora_bf16", ...)` for the same micro-batch, text tokens, LoRA
          rank / targets and gradient checkpointing

The estimate is per GPU (weights, LoRA state, activations, logits, allocator overhead); the RSS is a
CPU process's (also the Python / torch runtime and the safetensors pages it read), so expect RSS a
little above the estimate's weights + activations and not the estimate's CUDA overhead term.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PREFIX = "detect red circle"
SUFFIX = "<loc0100><loc0200><loc0600><loc0700> red circle"


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux: KiB


def build(preset: str, out: Path) -> dict:
    """Random-weight model of `preset` + a processor for it, saved into `out`."""
    from transformers import PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from raytrain.models import presets
    from raytrain.models.tiny_paligemma import build_tokenizer

    t = time.perf_counter()
    tok = build_tokenizer()
    model = presets.random_model(preset, dtype="bfloat16")
    side = int(model.config.vision_config.image_size)
    n_img = (side // int(model.config.vision_config.patch_size)) ** 2
    model.config.image_token_id = tok.convert_tokens_to_ids("<image>")
    model.config.text_config.pad_token_id = tok.pad_token_id
    assert len(tok) <= model.config.text_config.vocab_size
    ip = SiglipImageProcessorPil(size={"height": side, "width": side}, image_mean=[0.5] * 3, image_std=[0.5] * 3, do_convert_rgb=True)
    ip.image_seq_length = n_img  # what the saved processor reads back (as models/tiny_paligemma.py does)
    proc = PaliGemmaProcessor(image_processor=ip, tokenizer=tok)
    model.save_pretrained(out, safe_serialization=True)
    proc.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    return {"params": n, "image_size": side, "image_tokens": n_img, "build_s": round(time.perf_counter() - t, 1), "build_peak_rss_gb": round(_rss_gb(), 2)}


def step(model_dir: str, grad_ckpt: bool) -> dict:
    """One LoRA optimizer step through recipes/ddp.py train()."""
    import contextlib

    import numpy as np
    import torch
    from PIL import Image

    from raytrain import config as config_mod
    from raytrain.models import family
    from raytrain.recipes import ddp
    from raytrain.training.session import Session

    torch.set_num_threads(os.cpu_count() or 1)
    fam = family("paligemma")
    proc = fam.load_processor(model_dir)
    h, w = fam.image_size(proc)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))
    enc = fam.encode_train(proc, [img], [PREFIX], [SUFFIX], max_len=512)
    n_tokens = int(enc.pop("length")[0])
    text_tokens = n_tokens - int(proc.image_seq_length)
    batch = {k: torch.from_numpy(v) for k, v in enc.items()}
    cfg = config_mod.load(None, ["train.strategy=lora", "model.dtype=bfloat16", f"model.gradient_checkpointing={str(grad_ckpt).lower()}",
                                 "lora.r=8", "lora.alpha=8", "train.steps=1", "train.micro_batch_size=1", "train.warmup_steps=0",
                                 "train.log_every=1", "train.checkpoint_every=1000", "loss.loc_sigma=60"])
    reports = []
    session = Session(rank=0, world_size=1, checkpoint_dir=lambda: None, report=lambda m, d: reports.append(m),
                      epoch_batches=lambda e, m: [batch])
    # the final step writes a checkpoint (adapter + optimizer): into a temp dir that goes away
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as d, contextlib.chdir(d):
        ddp.train(cfg, model_dir, session, torch.device("cpu"), wrap_ddp=lambda m: m)
    return {"step_s": round(time.perf_counter() - t, 1), "peak_rss_gb": round(_rss_gb(), 2), "loss": reports[-1]["loss"],
            "trainable_params": reports[-1]["trainable_params"], "tokens": n_tokens, "text_tokens": text_tokens,
            "lora_r": cfg.lora.r, "lora_targets": list(cfg.lora.target_modules), "gradient_checkpointing": grad_ckpt}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="paligemma2-3b-224")
    ap.add_argument("--no-grad-ckpt", action="store_true", help="without gradient checkpointing")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "real_size_step.json"))
    ap.add_argument("--model-dir", default="", help="keep the built random model here (reused when it is there)")
    ap.add_argument("--_build", help=argparse.SUPPRESS)
    ap.add_argument("--_step", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._build:
        print(json.dumps(build(a.preset, Path(a._build))))
        return 0
    if a._step:
        print(json.dumps(step(a._step, not a.no_grad_ckpt)))
        return 0

    from raytrain.models import memory

    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def run(*args) -> dict:
        p = subprocess.run([sys.executable, __file__, "--preset", a.preset, *args], env=env, capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"{args[0]} failed ({p.returncode}):\n{p.stderr[-4000:]}")
        return json.loads(p.stdout.strip().splitlines()[-1])

    with contextlib.ExitStack() as stack:
        d = a.model_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="real-size-"))
        record = Path(d) / "bench_build.json"
        if record.is_file():  # --model-dir of an earlier run: the random model is already there
            built = json.loads(record.read_text())
        else:
            built = run("--_build", d)
            record.write_text(json.dumps(built))
        done = run("--_step", d, *(["--no-grad-ckpt"] if a.no_grad_ckpt else []))
    est = memory.estimate(a.preset, "lora_bf16", micro_batch=1, seq_len=done["text_tokens"], lora_r=done["lora_r"],
                          lora_targets=done["lora_targets"], grad_checkpointing=done["gradient_checkpointing"])
    out = {
        "preset": a.preset,
        "setting": "lora_bf16, micro-batch 1, one optimizer step, recipes/ddp.py train() on CPU",
        "peak_rss_gb": done["peak_rss_gb"],
        "estimate_gb": round(est.total_gb, 2),
        "estimate": {k: round(getattr(est, k), 3) for k in ("weights_gb", "trainable_gb", "grads_gb", "optimizer_gb", "activations_gb",
                                                              "overhead_gb", "total_gb")},
        "build": built,
        "step": done,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
