#!/usr/bin/env python
"""Peak memory of decoding with confidences: log-probabilities recorded step by step
(raytrain/step_logprobs.py, what predict.decode does for greedy and sampled decoding) vs every
step's logits kept by generate(output_logits=True) and normalised by compute_transition_scores
(the path before; beam search still takes it).

    python bench/decode_memory.py        # ~1 min; bench/results/decode_memory.json

The tiny PaliGemma with its vocabulary grown to PaliGemma's real 257,216 tokens (the logits are what
the two paths hold; the rest of the model does not matter), a batch of 8 forced to decode 128 tokens
(min_new_tokens: a long segmentation or dense-caption answer). Each arm runs in a fresh process and
reports its peak RSS during decode above its RSS before (Linux: the peak is reset through
/proc/self/clear_refs). Both arms must choose the same tokens (checked); their log-probabilities differ by
up to ~1e-3 at this vocabulary size, and it is the reference that is off: compute_transition_scores
normalises a strided (rows, vocab, steps) view, whose float32 sum over 257k terms is ~20x less accurate
than the contiguous per-step log-softmax (measured against float64: 6.4e-4 vs 3.5e-5 on random logits).
Last line: reference / step-by-step peak growth.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

VOCAB = 257_216  # PaliGemma's vocabulary (256,000 text + 1,024 <loc> + 128 <seg> + 64 unused)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def arm(path: str, reference: bool, batch: int, steps: int) -> dict:
    import gc

    import numpy as np
    import torch
    from PIL import Image

    from raytrain import predict
    from raytrain.models import family

    torch.set_num_threads(1)
    fam = family("paligemma")
    model, processor = fam.load(path, dtype="float32")
    model.eval()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(batch)]
    prefixes = ["segment red circle"] * batch
    if reference:
        predict.StepLogprobs = lambda model: None  # decode then keeps every step's logits, as it did before
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # Linux: reset the peak (VmHWM) to the current RSS
        f.write("5")
    base = _status_kb("VmHWM")
    t = time.perf_counter()
    gens = predict.decode(model, processor, fam, images, prefixes, max_new_tokens=steps, logprobs=True, min_new_tokens=steps)
    wall = time.perf_counter() - t
    peak = _status_kb("VmHWM")
    return {"peak_growth_mb": round((peak - base) / 1024, 1), "rss_before_decode_mb": round(base / 1024, 1), "decode_s": round(wall, 2),
            "tokens": [g.token_ids for g in gens], "logprobs": [g.logprobs for g in gens]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--smoke", action="store_true", help="batch 2, 16 steps (checks the script, not the numbers)")
    ap.add_argument("--arm", choices=["reference", "steps"], help=argparse.SUPPRESS)  # a child process
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        args.batch, args.steps = 2, 16
    if args.arm:
        print(json.dumps(arm(args.model, args.arm == "reference", args.batch, args.steps)))
        return
    import tempfile

    from raytrain.models import family

    load_start = C.loadavg()
    with tempfile.TemporaryDirectory(prefix="raytrain-bench-decode-") as tmp:
        fam = family("paligemma")
        model, processor = fam.load(C.tiny_model_path(), dtype="float32")
        model.resize_token_embeddings(VOCAB)  # new rows: the real vocabulary's size; the tokenizer is unchanged
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        runs = {}
        for name in ("reference", "steps"):
            out = subprocess.run([sys.executable, __file__, "--arm", name, "--model", tmp, "--batch", str(args.batch),
                                  "--steps", str(args.steps)], capture_output=True, text=True, check=True)
            runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
    same_tokens = runs["reference"].pop("tokens") == runs["steps"].pop("tokens")
    a, b = runs["reference"].pop("logprobs"), runs["steps"].pop("logprobs")
    max_diff = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    ratio = runs["reference"]["peak_growth_mb"] / max(runs["steps"]["peak_growth_mb"], 1.0)
    result = {"params": {"batch": args.batch, "steps": args.steps, "vocab": VOCAB}, "runs": runs, "same_tokens": same_tokens,
              "max_logprob_diff": max_diff, "ratio_reference_over_steps": round(ratio, 1),
              "logits_bytes_per_step": args.batch * VOCAB * 4, "machine": C.machine(),
              "loadavg_start": load_start, "loadavg_end": C.loadavg()}
    path = C.write_result("decode_memory", result)
    print(f"wrote {path}")
    print(f"decode_memory: peak growth reference {runs['reference']['peak_growth_mb']:.0f} MB vs step-by-step "
          f"{runs['steps']['peak_growth_mb']:.0f} MB = {ratio:.1f}x (batch {args.batch}, {args.steps} steps, vocab {VOCAB:,}; "
          f"same tokens {same_tokens}, max log-prob difference {max_diff:.1e})")


if __name__ == "__main__":
    main()
