#!/usr/bin/env python
"""Samples/s of raytrain's batched evaluation (the Ray Data job of `raytrain eval`: actor pool of
predictors, batch 64, length-bucketed, predictions written as JSONL parts by its writer stage) vs
sequential per-sample generate, on the same tiny model and the same examples.

    python bench/eval_throughput.py          # ~5-8 min on 2 shared cores; bench/results/eval_throughput.json

Both sides start from the same materialized examples (pipeline.examples_dataset of a held-out
split, as launch.eval.evaluate builds it) and do the same work per example: generate
(max_new_tokens 16; by default grammar-constrained with per-object confidences, as
`eval.constrained: true` runs), parse_output, score_example.

  ray         eval.batch.predictions_dataset + write_predictions_job (batch_size=64, bucket_batches=4,
              num_actors=2, cpus_per_actor=0.5) over the whole split (--examples, default 10,000): the
              eval config's defaults (one torch thread per actor), each call starting its actors and
              loading the model, as evaluate() does, and ending when every prediction is written.
  sequential  one process, one example at a time (1 torch thread, as each Predictor actor), over
              the split's first --sequential-examples (default 200): a per-sample rate, which does
              not depend on how many examples follow. (2 threads was tried: on 2 cores shared with
              other jobs OpenMP's spinning made it 5-10x slower than 1 thread.)

Interleaved (sequential, ray) x --rounds; CPU-seconds of the whole process tree are kept too.
Profile (once): the same examples decoded in batches of 64 in this process (batching without
Ray), in arrival order and length-bucketed (4 batches ordered by task and prompt length), and the
pool on 2 examples (its fixed cost: actor start + model load + Ray Data planning), from which the
split size where the pool reaches the target follows. Last line: ray / sequential.

Decoding modes (`--decoding`): `constrained` (default) and `unconstrained`; a mode is one entry of
DECODING (how the sequential side decodes one example, and the pool's decoding options).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # first: it sets Ray's loopback env vars before anything imports ray

TARGET = 20.0
TASKS = ["point", "detect"]
MAX_NEW_TOKENS = 16


# ---------------------------------------------------------------------------------------------
# decoding modes: one entry each (the DecodeOptions both sides run)


def options(mode: str):
    """The predict path's decoding options of a mode (raytrain/predict.py): the same code the
    Predictor actors, Serve and validation run."""
    from raytrain.predict import DecodeOptions

    constrained = mode == "constrained"
    return DecodeOptions(max_new_tokens=MAX_NEW_TOKENS, constrained=constrained, confidence=constrained)


DECODING = ("unconstrained", "constrained")


# ---------------------------------------------------------------------------------------------
# the two sides


def sequential(rows: list[dict], model_path: str, mode: str, threads: int) -> dict:
    """One example at a time in this process through the predict path (decode, parse, source
    pixels, confidences, score), as the actor pool runs it."""
    import numpy as np
    import torch

    from raytrain import predict
    from raytrain.models import family

    torch.set_num_threads(threads)
    fam = family("paligemma")
    t0 = time.perf_counter()
    model, processor = fam.load(model_path, dtype="float32")
    model.eval()
    load_s = time.perf_counter() - t0
    opts = options(mode)
    texts, valid = [], 0
    t1 = time.perf_counter()
    for r in rows:
        one = {k: np.asarray([v]) if k == "image" else np.array([v], dtype=object) for k, v in r.items()}
        out = predict.predict_batch(model, processor, fam, one, opts)
        valid += out["objects"][0] not in ("[]", "")
        texts.append(str(out["text"][0]))
    decode_s = time.perf_counter() - t1
    total = time.perf_counter() - t0
    return {"threads": threads, "samples": len(rows), "load_s": round(load_s, 3), "decode_s": round(decode_s, 3),
            "wall_s": round(total, 3), "samples_per_s": round(len(rows) / total, 3),
            "samples_per_s_excluding_load": round(len(rows) / decode_s, 3), "valid": valid,
            "texts": {f"{r['id']}/{r['task']}": t for r, t in zip(rows, texts)}}


def batched(rows: list[dict], model_path: str, mode: str, batch_size: int, bucket_batches: int = 1) -> dict:
    """The same examples through the predict path in batches in this process, 1 thread: what
    batching alone gives, without Ray (left-padded prompts); bucket_batches > 1: each window of that
    many batches ordered by task and prompt length first (predict.bucket_order), as the actors do."""
    import numpy as np
    import torch

    from raytrain import predict
    from raytrain.models import family

    torch.set_num_threads(1)
    fam = family("paligemma")
    model, processor = fam.load(model_path, dtype="float32")
    model.eval()
    opts = options(mode)
    t0 = time.perf_counter()
    if bucket_batches > 1:
        window = batch_size * bucket_batches
        ordered = []
        for w in range(0, len(rows), window):
            part = rows[w:w + window]
            lengths = predict.prompt_lengths(processor, [r["prefix"] for r in part])
            ordered += [part[i] for i in predict.bucket_order([r["task"] for r in part], lengths)]
        rows = ordered
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        batch = {k: np.stack([r[k] for r in chunk]) if k == "image" else np.array([r[k] for r in chunk], dtype=object) for k in chunk[0]}
        predict.predict_batch(model, processor, fam, batch, opts)
    wall = time.perf_counter() - t0
    return {"samples": len(rows), "batch_size": batch_size, "bucket_batches": bucket_batches, "threads": 1, "wall_s": round(wall, 3),
            "samples_per_s": round(len(rows) / wall, 2), "note": "model load excluded; parse + score included"}


def pooled(examples, model_path: str, mode: str, *, batch_size: int, bucket_batches: int, num_actors: int,
           cpus_per_actor: float, n_examples: int) -> dict:
    """The Ray Data job of `raytrain eval` for one model: predictor pool + writer stage, until every
    prediction is written (JSONL parts in a temporary folder, read back afterwards for the checks)."""
    from raytrain.eval import batch as eval_batch
    from raytrain.eval.exports import read_predictions

    with tempfile.TemporaryDirectory(prefix="raytrain-bench-parts-") as parts_dir:
        t0 = time.perf_counter()
        ds = eval_batch.predictions_dataset(
            examples, family="paligemma", model_path=model_path, checkpoint_uri=None, storage=None, dtype="float32",
            batch_size=batch_size, pool=num_actors, cpus_per_actor=cpus_per_actor, gpus_per_actor=0.0, options=options(mode),
            rows_per_block=eval_batch.block_rows(n_examples, batch_size, bucket_batches, num_actors))
        parts = eval_batch.write_predictions_job(ds, parts_dir)
        wall = time.perf_counter() - t0
        out = [r for p, _ in parts for r in read_predictions(p)]
    return {"samples": len(out), "wall_s": round(wall, 3), "samples_per_s": round(len(out) / wall, 3),
            "actors_used": len({int(r["worker"]) for r in out}), "parts": len(parts),
            "valid": sum(1 for r in out if r["objects"]),
            "texts": {f"{r['id']}/{r['task']}": r["text"] for r in out}}


# ---------------------------------------------------------------------------------------------
# main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=10000, help="examples in the split (2 per image: point + detect)")
    ap.add_argument("--sequential-examples", type=int, default=200,
                    help="the sequential side decodes the split's first N examples (its rate does not depend on the "
                         "split size; decoding all of them one by one would take most of the time budget)")
    from raytrain.config import EvalConfig

    ev = EvalConfig()  # the shipped eval defaults: batch 64, 4-batch buckets, 2 actors, 0.5 CPU each (1 torch thread)
    ap.add_argument("--batch-size", type=int, default=ev.batch_size)
    ap.add_argument("--bucket-batches", type=int, default=ev.bucket_batches)
    ap.add_argument("--num-actors", type=int, default=ev.num_actors)
    ap.add_argument("--cpus-per-actor", type=float, default=ev.cpus_per_actor)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--decoding", choices=sorted(DECODING), default="constrained")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one round (checks the script, not the numbers)")
    args = ap.parse_args()
    if args.smoke:
        args.examples, args.rounds, args.sequential_examples = 40, 1, 20
    t_start = time.perf_counter()
    result: dict = {"params": vars(args), "loadavg_start": C.loadavg(), "target": {"ratio_ray_over_sequential": TARGET}}

    with tempfile.TemporaryDirectory(prefix="raytrain-bench-eval-") as root:
        from raytrain.data import pipeline, shards

        model_path = C.tiny_model_path()
        uri = str(Path(root) / "data")
        shards.prepare_synthetic(uri, n=args.examples // len(TASKS), seed=7, splits={"test": 1.0})
        ray = C.init_ray(2)
        examples = pipeline.examples_dataset(uri, "test", tasks=TASKS, image_hw=(64, 64), family="paligemma").materialize()
        rows = examples.take_all()
        result["data"] = {"examples": len(rows), "images": args.examples // len(TASKS), "image_px": 64,
                          "max_new_tokens": MAX_NEW_TOKENS}
        print(f"{len(rows)} examples", flush=True)

        runs: dict = {"sequential": [], "ray": []}
        for rnd in range(args.rounds):
            for side, threads in (("sequential", 1), ("ray", None)):
                load0 = C.loadavg()
                cpu0 = C.tree_cpu()
                if side == "sequential":
                    r = sequential(rows[:args.sequential_examples], model_path, args.decoding, threads)
                else:
                    r = pooled(examples, model_path, args.decoding, batch_size=args.batch_size, bucket_batches=args.bucket_batches,
                               num_actors=args.num_actors, cpus_per_actor=args.cpus_per_actor, n_examples=len(rows))
                r["cpu_s"] = round(C.cpu_delta(cpu0, C.tree_cpu()), 2)  # driver + every Ray process
                r["cpu_ms_per_sample"] = round(1000 * r["cpu_s"] / r["samples"], 2)
                r["round"], r["loadavg_before"], r["loadavg_after"] = rnd, load0, C.loadavg()
                runs[side].append(r)
                print(f"[round {rnd}] {side}{'' if threads is None else f' ({threads} thread)'}: "
                      f"{r['samples_per_s']:.1f} samples/s, load {C.loadavg()}", flush=True)

        # ---- profile: batching without Ray, and the pool's fixed cost ------------------------------
        result["profile"] = {"batched_in_process": batched(rows, model_path, args.decoding, args.batch_size),
                             "batched_in_process_bucketed": batched(rows, model_path, args.decoding, args.batch_size, args.bucket_batches)}
        tiny = ray.data.from_items(rows[:2]).materialize()
        fixed = pooled(tiny, model_path, args.decoding, batch_size=args.batch_size, bucket_batches=args.bucket_batches,
                       num_actors=args.num_actors, cpus_per_actor=args.cpus_per_actor, n_examples=2)
        fixed.pop("texts")
        result["profile"]["pool_2_examples"] = fixed
        print(f"[profile] batched in-process {result['profile']['batched_in_process']['samples_per_s']:.1f} samples/s, "
              f"bucketed {result['profile']['batched_in_process_bucketed']['samples_per_s']:.1f}; "
              f"the pool on 2 examples (its fixed cost) {fixed['wall_s']:.1f}s", flush=True)
        ray.shutdown()

    seq_best = [r["samples_per_s"] for r in runs["sequential"]]
    ray_mean = [r["samples_per_s"] for r in runs["ray"]]
    ratios = [q / s for s, q in zip(seq_best, ray_mean)]
    # same texts? (batched greedy with left padding vs one example: float differences can flip a token)
    ref = runs["sequential"][0]["texts"]
    agree = sum(runs["ray"][0]["texts"].get(k) == v for k, v in ref.items()) / max(1, len(ref))
    for side_runs in runs.values():
        for r in side_runs:
            r.pop("texts")
    ratio = C.summary(ratios)
    cpu_seq = C.summary([r["cpu_ms_per_sample"] for r in runs["sequential"]])
    cpu_ray = C.summary([r["cpu_ms_per_sample"] for r in runs["ray"]])
    # fixed cost F of a pool run (its 2-example run) and the rate R of the pool once
    # running, taken as num_actors x the in-process batched rate (the pool's own F-subtracted rate
    # is too noisy under load: both terms move by +-10 s). A split of n examples then takes F + n/R,
    # and the pool reaches TARGET x the sequential rate S once n >= F*T*S / (1 - T*S/R).
    prof = result["profile"]
    fixed_s = prof["pool_2_examples"]["wall_s"]
    s_med = C.summary(seq_best)["median"]
    rate = args.num_actors * prof["batched_in_process_bucketed"].get("samples_per_s", 0.0)
    need = TARGET * s_med
    prof["pool_rate_ideal_samples_per_s"] = round(rate, 1)
    prof["batching_gain_in_process"] = round(prof["batched_in_process"].get("samples_per_s", 0.0) / s_med, 2)
    prof["fixed_cost_share_of_pool_wall"] = round(fixed_s / C.summary([r["wall_s"] for r in runs["ray"]])["median"], 3)
    prof["examples_needed_for_target"] = round(fixed_s * need / (1 - need / rate)) if rate > need else None
    prof["note"] = ("examples_needed_for_target: split size at which the pool would reach the target over "
                    "sequential, from its fixed cost (2-example run) and num_actors x the in-process bucketed rate")
    result.update({
        "cpu_ms_per_sample": {"sequential": cpu_seq, "ray": cpu_ray,
                              "ratio_sequential_over_ray": round(cpu_seq["median"] / cpu_ray["median"], 3)},
        "runs": runs,
        "sequential_samples_per_s": C.summary(seq_best),
        "ray_samples_per_s": C.summary(ray_mean),
        "ratio_ray_over_sequential": ratio,
        "same_text_fraction": round(agree, 4),
        "headline": {"ratio_ray_over_sequential": ratio["median"], "ray_samples_per_s": C.summary(ray_mean)["median"],
                     "sequential_samples_per_s": C.summary(seq_best)["median"], "target": TARGET,
                     "met": ratio["median"] >= TARGET, "decoding": args.decoding, "pool_fixed_cost_s": fixed_s},
        "loadavg_end": C.loadavg(),
        "elapsed_s": round(time.perf_counter() - t_start, 1),
    })
    path = C.write_result("eval_throughput", result)
    h = result["headline"]
    print(f"wrote {path} ({result['elapsed_s']}s)")
    print(f"eval_throughput ({args.decoding}): ray/sequential samples/s = {h['ratio_ray_over_sequential']:.2f}x "
          f"(ray {h['ray_samples_per_s']:.1f} vs sequential {h['sequential_samples_per_s']:.1f} samples/s; "
          f"target >= {TARGET:.0f}x {'met' if h['met'] else 'NOT met'})")


if __name__ == "__main__":
    main()
