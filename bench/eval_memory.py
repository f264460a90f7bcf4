#!/usr/bin/env python
"""Driver memory of a streamed evaluation vs the split size: peak RSS of the driver process while
`raytrain eval`'s streaming path scores 1,000 and 100,000 examples (target: the 100k peak <= 1.2x
the 1k peak).

    python bench/eval_memory.py                      # ~10-20 min on 2 shared cores; bench/results/eval_memory.json
    python bench/eval_memory.py --sizes 1000 20000   # smaller

What runs is the real streaming code (eval/streaming.evaluate_column), with the cheap predictor
the issue allows: the blind baseline (eval/batch.baseline_dataset: render the centre point /
centred mean box in the model's answer format, then the predict path's parse -> source pixels ->
score), so the bench measures the pipeline, not a model. Per example: the Ray Data job writes the
prediction rows as JSONL parts from its writer stage; the driver reads them back line by line into
every metric (pointing, boxes, point P/R/F1, calibration, COCO mAP in chunks of 2,000 images
through pycocotools), the one predictions JSONL and the COCO ground-truth / results files. Each size
runs in a fresh subprocess (its own driver and local Ray, 2 CPUs, 127.0.0.1) on a synthetic split of
size/2 images (point + detect each); a thread samples the driver's RSS every 0.1 s.

Reported per size: the driver's RSS before the evaluation (Ray, torch, transformers imported, the
dataset planned), its peak during it, and the wall time; the headline is peak(largest) /
peak(smallest). The driver's work that does grow with the split is O(examples) floats for the
per-sample statistics (medians need them all): a few MB at 100k.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # first: it sets Ray's loopback env vars before anything imports ray

TARGET = 1.2


def one(size: int, root: str, image_size: int) -> dict:
    """In this (fresh) process: a split of size/2 images, one streamed baseline evaluation."""
    import psutil

    from raytrain.data import shards
    from raytrain.eval import batch as eval_batch
    from raytrain.eval import inputs, streaming

    t0 = time.perf_counter()
    uri = str(Path(root) / "data")
    shards.prepare_synthetic(uri, n=size // 2, seed=5, image_size=image_size, splits={"test": 1.0})
    prep_s = time.perf_counter() - t0
    C.init_ray(2)
    me = psutil.Process()
    ex = inputs.examples(uri, "test", tasks=["point", "detect"], image_hw=(64, 64), family="paligemma")
    ds = eval_batch.baseline_dataset(ex, mean_box_wh=(0.3, 0.3), batch_size=64, family="paligemma")
    before = me.memory_info().rss
    peak = [before]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], me.memory_info().rss)
            stop.wait(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t1 = time.perf_counter()
    m = streaming.evaluate_column(ds, str(Path(root) / "eval"), "test", "centre_baseline", main=True)
    wall = time.perf_counter() - t1
    stop.set()
    th.join()
    peak[0] = max(peak[0], me.memory_info().rss)
    mib = 1024**2
    return {"examples": m["examples"], "images": size // 2, "image_px": image_size, "prepare_s": round(prep_s, 1),
            "eval_wall_s": round(wall, 1), "predict_s": m["seconds"]["predict"], "score_s": m["seconds"]["score"],
            "driver_rss_before_mib": round(before / mib, 1), "driver_rss_peak_mib": round(peak[0] / mib, 1),
            "driver_rss_growth_mib": round((peak[0] - before) / mib, 1),
            "coco_images": m["coco"]["n_images"], "valid_rate_by_task": m["valid_rate_by_task"],
            "predictions_bytes": Path(m["files"]["predictions"]).stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 100000], help="examples per run (2 per image)")
    ap.add_argument("--image-size", type=int, default=32, help="source image side (small: the bench measures the driver)")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--root", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="sizes 200 and 2,000 (checks the script, not the numbers)")
    args = ap.parse_args()
    if args.child is not None:
        print("RESULT " + json.dumps(one(args.child, args.root, args.image_size)), flush=True)
        return
    if args.smoke:
        args.sizes = [200, 2000]
    t_start = time.perf_counter()
    result: dict = {"params": vars(args), "loadavg_start": C.loadavg(), "target": {"peak_ratio_max": TARGET}, "runs": []}
    for size in args.sizes:
        with tempfile.TemporaryDirectory(prefix="raytrain-bench-evalmem-") as root:
            proc = subprocess.run([sys.executable, __file__, "--child", str(size), "--root", root, "--image-size", str(args.image_size)],
                                  capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.exit(f"size {size} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
            r = json.loads(line[len("RESULT "):])
            r["loadavg_after"] = C.loadavg()
            result["runs"].append(r)
            print(f"{size} examples: driver RSS {r['driver_rss_before_mib']} -> peak {r['driver_rss_peak_mib']} MiB, "
                  f"eval {r['eval_wall_s']} s (predict {r['predict_s']}, score {r['score_s']})", flush=True)
    small, large = result["runs"][0], result["runs"][-1]
    ratio = large["driver_rss_peak_mib"] / small["driver_rss_peak_mib"]
    result["headline"] = {"peak_ratio": round(ratio, 3), "sizes": [small["examples"], large["examples"]], "target": TARGET,
                          "met": ratio <= TARGET}
    result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    result["loadavg_end"] = C.loadavg()
    path = C.write_result("eval_memory", result)
    print(f"wrote {path}")
    print(f"eval_memory: driver peak RSS {large['examples']} / {small['examples']} examples = {ratio:.3f}x "
          f"({large['driver_rss_peak_mib']} vs {small['driver_rss_peak_mib']} MiB; target <= {TARGET}x "
          f"{'met' if ratio <= TARGET else 'NOT met'})")


if __name__ == "__main__":
    main()
