#!/usr/bin/env python
"""Images/s from Parquet shards on S3 (moto on 127.0.0.1) to tokenized torch batches:
raytrain's Ray Data pipeline vs a plain single-process loop doing the same work.

    python bench/data_pipeline.py            # ~8-10 min on 2 shared cores; bench/results/data_pipeline.json

What is compared (the same shards, the same tiny PaliGemma processor, batch size 64):

  shipped    pipeline.train_dataset(..., family="paligemma").iter_torch_batches(batch_size=64) consumed fully in the
             driver, the way a Ray Train worker consumes its shard, with the launcher's Ray Data
             settings: the Parquet read and pipeline.prepare_block (decode_and_expand + tokenize,
             64 rows/examples at a time) fused into one task per block of ~5 shards.
  staged     the session-2 pipeline, measured in every round next to shipped: read blocks of
             max(files, 4 x CPUs), then map_batches(decode_and_expand, 64) -> map_batches(tokenize,
             64), which Ray cannot fuse with the read (an intermediate Arrow block of decoded images
             per batch, a drop-count round trip per batch and stage, short tasks).
  plain      one process: pyarrow reads each shard from S3 -> validate.check_row -> examples_for ->
             resize -> paligemma.encode_train on 64 examples at a time -> torch tensors.

Rounds are interleaved (plain, shipped, plain, staged), in a Ray session with ray.init(num_cpus=1)
and then in one with num_cpus=2. Every run also records CPU-seconds per image (driver + Ray
processes, moto excluded), which other jobs' load disturbs much less than wall time, and the time
to the first batch (Ray Data's per-execution start: planning, the first task, its resource
reservation) next to the rate after it. All sides must produce the same tokenized examples (count
and input_ids checksum), or the script fails.

Memory: peak RSS summed over the driver and all Ray processes (psutil, every 0.25 s) and peak
object-store bytes, while streaming 1k rows and 20k rows (20 server-side copies of the 1k shard),
nothing materialized. Streaming should keep the 20k peak close to the 1k peak.

Profile: per-stage time of the plain loop, the processor's image vs text halves, and Ray's default
(V2) Parquet reader in place of the launcher's V1 reader, next to a plain run; these optional
parts run only while they fit in --budget-s.

The last line printed is the headline: shipped / plain images/s at 2 CPUs.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # first: it sets Ray's loopback env vars before anything imports ray
import numpy as np

TASKS = ["point", "detect"]
IMAGE_HW = (64, 64)  # the tiny preset's input size; --image-px changes it (and MAX_LEN) in main()
MAX_LEN = 48  # image tokens (16 at 64 px) + prompt + target
TEXT_LEN = MAX_LEN - (IMAGE_HW[0] // 16) ** 2
BATCH = 64
COLS = ["id", "image", "width", "height", "objects"]
TARGET = 1.6


# ---------------------------------------------------------------------------------------------
# the plain single-process loop (the baseline)


def plain_loop(uri: str, opts, model_path: str, *, batch_size: int = BATCH, stage_times: Counter | None = None) -> dict:
    """S3 -> pyarrow -> check_row -> examples_for -> resize -> encode_train -> torch, one process.
    Same work as pipeline.decode_and_expand + pipeline.tokenize, minus Ray. stage_times (optional)
    accumulates seconds per stage."""
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    from raytrain.data import shards, validate
    from raytrain.data.pipeline import examples_for
    from raytrain.formats.annotations import objects_from_json
    from raytrain.models import paligemma

    st = stage_times if stage_times is not None else Counter()
    tic = time.perf_counter
    t = t_begin = tic()
    proc = paligemma.load_processor(model_path)  # the pipeline caches one per worker process too
    paths, fs = shards.shard_source(uri, "train", opts)
    st["setup (processor, listing)"] += tic() - t

    images = examples = checksum = 0
    first: list[float] = []
    buf: dict[str, list] = {"image": [], "prefix": [], "suffix": []}

    def encode(n: int) -> None:
        nonlocal examples, checksum
        t = tic()
        pil = [Image.fromarray(a) for a in buf["image"][:n]]
        enc = paligemma.encode_train(proc, pil, buf["prefix"][:n], buf["suffix"][:n], MAX_LEN)
        fits = enc.pop("length") <= MAX_LEN
        enc = {k: v[fits] for k, v in enc.items()}
        t2 = tic()
        st["encode_train (processor)"] += t2 - t
        batch = {k: torch.from_numpy(v) for k, v in enc.items()}  # what iter_torch_batches hands over
        examples += int(batch["input_ids"].shape[0])
        checksum += int(batch["input_ids"].sum())
        st["to torch + consume"] += tic() - t2
        if not first:
            first.append(tic() - t_begin)
        for v in buf.values():
            del v[:n]

    for path in paths:
        t = tic()
        table = pq.read_table(path, filesystem=fs, columns=COLS)
        cols = {k: table[k].to_pylist() for k in COLS}
        st["read (S3 + parquet)"] += tic() - t
        for i in range(table.num_rows):
            t = tic()
            row = {k: cols[k][i] for k in COLS}
            checked, reason, _ = validate.check_row(row)
            t2 = tic()
            st["check_row (decode + validate)"] += t2 - t
            if reason is not None:
                continue
            objs = objects_from_json(row["objects"])
            try:
                exs = examples_for(objs, TASKS, checked["width"], checked["height"], "paligemma", IMAGE_HW)
            except ValueError:
                continue
            t3 = tic()
            st["examples_for (render targets)"] += t3 - t2
            if not exs:
                continue
            arr = np.asarray(checked["pil"].resize((IMAGE_HW[1], IMAGE_HW[0]), Image.BILINEAR), dtype=np.uint8)
            st["resize"] += tic() - t3
            images += 1
            for ex in exs:
                buf["image"].append(arr)
                buf["prefix"].append(ex["prefix"])
                buf["suffix"].append(ex["suffix"])
            while len(buf["prefix"]) >= batch_size:
                encode(batch_size)
    if buf["prefix"]:
        encode(len(buf["prefix"]))
    return {"images": images, "examples": examples, "checksum": checksum, "first_batch_s": round(first[0] if first else 0.0, 3)}


# ---------------------------------------------------------------------------------------------
# the Ray Data pipeline (raytrain's), and variants for the profile


VARIANTS = {
    "shipped": {"desc": "pipeline.train_dataset as shipped (read + prepare_block fused, launcher's Ray Data settings)"},
    "staged": {"staged": True, "desc": "session 2's pipeline: read -> map_batches(decode_and_expand, 64) -> map_batches(tokenize, 64)"},
    "v2_reader": {"v2": True, "desc": "shipped, with Ray 2.60's default Parquet reader (DataContext.use_datasource_v2=True)"},
}
FIXED = "staged"  # the variant measured next to the shipped pipeline in every round


@contextlib.contextmanager
def ray_settings(variant: str):
    """Apply a variant's DataContext flag on the driver, restore it after."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    old_v2 = ctx.use_datasource_v2
    if VARIANTS[variant].get("v2"):
        ctx.use_datasource_v2 = True
    try:
        yield
    finally:
        ctx.use_datasource_v2 = old_v2


def build(variant: str, uri: str, opts, model_path: str, num_cpus: int):
    """The dataset a worker would iterate: raytrain's train_dataset, or session 2's staged version."""
    import ray

    from raytrain.data import pipeline, shards

    if not VARIANTS[variant].get("staged"):
        return pipeline.train_dataset(uri, "train", tasks=TASKS, model_path=model_path, image_hw=IMAGE_HW, max_len=MAX_LEN,
                                      opts=opts, batch_size=BATCH, family="paligemma")
    paths, fs = shards.shard_source(uri, "train", opts)
    blocks = max(len(paths), 4 * num_cpus)  # session 2's rule
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=COLS, override_num_blocks=blocks)
    ds = ds.map_batches(pipeline.decode_and_expand, batch_size=BATCH, batch_format="numpy",
                        fn_kwargs={"split": "train", "tasks": TASKS, "image_hw": IMAGE_HW})
    return ds.map_batches(pipeline.tokenize, batch_size=BATCH, batch_format="numpy",
                          fn_kwargs={"split": "train", "model_path": model_path, "max_len": MAX_LEN})


def consume(ds) -> dict:
    """Iterate every batch as torch tensors, as the recipes' workers do (training/session.py) (batch 64 here)."""
    examples = checksum = 0
    t0 = time.perf_counter()
    first = None
    for b in ds.iter_torch_batches(batch_size=BATCH):
        if first is None:
            first = time.perf_counter() - t0
        examples += int(b["input_ids"].shape[0])
        checksum += int(b["input_ids"].sum())
    return {"examples": examples, "checksum": checksum, "first_batch_s": round(first or 0.0, 3)}


def block_stats(ds) -> dict:
    """Tasks and blocks per operator of the executed dataset, parsed from ds.stats()."""
    import re

    ops = {}
    for m in re.finditer(r"Operator \d+ ([^:]+): (\d+) tasks executed, (\d+) blocks produced in ([\d.]+)s", ds.stats()):
        ops[m.group(1).strip()] = {"tasks": int(m.group(2)), "blocks": int(m.group(3)), "wall_s": float(m.group(4))}
    return ops


# ---------------------------------------------------------------------------------------------
# measurement


def timed(fn, exclude: set[int], images: int) -> dict:
    """Run fn() and record wall time, images/s and CPU-seconds of the whole process tree."""
    cpu0 = C.tree_cpu(exclude)
    load0 = C.loadavg()
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    cpu = C.cpu_delta(cpu0, C.tree_cpu(exclude))
    after = images - BATCH / len(TASKS)  # images after the first batch of 64 examples
    out["images_per_s_after_first_batch"] = round(after / max(1e-9, wall - out["first_batch_s"]), 2)
    return {**out, "wall_s": round(wall, 3), "images_per_s": round(images / wall, 2), "cpu_s": round(cpu, 2),
            "cpu_ms_per_image": round(1000 * cpu / images, 3), "loadavg_before": load0, "loadavg_after": C.loadavg()}


def run_plain(uri, opts, model_path, exclude, images, stage_times=None) -> dict:
    return timed(lambda: plain_loop(uri, opts, model_path, stage_times=stage_times), exclude, images)


def run_ray(variant, uri, opts, model_path, exclude, images, num_cpus, memory: bool = True) -> dict:
    holder = {}

    def go():
        with ray_settings(variant):
            holder["ds"] = build(variant, uri, opts, model_path, num_cpus)
            return consume(holder["ds"])

    with C.MemorySampler(exclude=exclude) if memory else contextlib.nullcontext() as mem:
        r = timed(go, exclude, images)
    if mem is not None:
        r["memory"] = mem.result()
    r["variant"] = variant
    r["operators"] = block_stats(holder["ds"])
    return r


def copy_shards(endpoint: str, src_uri: str, dst_uri: str, copies: int) -> int:
    """`copies` server-side copies (CopyObject: no re-generation, no upload) of every train shard
    of src under dst. Returns the rows of one copy."""
    import boto3
    import pyarrow.parquet as pq

    from raytrain.data import shards
    from raytrain.storage import StorageOptions

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    paths, fs = shards.shard_source(src_uri, "train", StorageOptions(endpoint_url=endpoint, region="us-east-1"))
    rows = sum(pq.ParquetFile(fs.open_input_file(p)).metadata.num_rows for p in paths)
    bucket = src_uri[len("s3://"):].split("/", 1)[0]
    dst_prefix = dst_uri[len("s3://"):].split("/", 1)[1]
    k = 0
    for _ in range(copies):
        for p in paths:
            s3.copy_object(Bucket=bucket, Key=f"{dst_prefix}/train/shard-{k:05d}.parquet",
                           CopySource={"Bucket": bucket, "Key": p.split("/", 1)[1]})
            k += 1
    return rows


def idle_cpu(exclude: set[int], seconds: float = 5.0) -> float:
    """CPU-seconds per second that the driver + an idle Ray cluster use (background polling)."""
    c0 = C.tree_cpu(exclude)
    time.sleep(seconds)
    return round(C.cpu_delta(c0, C.tree_cpu(exclude)) / seconds, 3)


def pair_summary(plain: list[dict], ray_runs: list[dict], ncpu: int) -> dict:
    """Both sides of an interleaved comparison, the per-pair ratios, and the CPU-bound ceiling:
    ncpu x (plain CPU per image / ray CPU per image), the best ray/plain ratio that ncpu fully
    free cores could give at the measured CPU cost per image."""
    p = C.summary([x["images_per_s"] for x in plain])
    q = C.summary([x["images_per_s"] for x in ray_runs])
    cp = C.summary([x["cpu_ms_per_image"] for x in plain])
    cq = C.summary([x["cpu_ms_per_image"] for x in ray_runs])
    return {
        "plain_images_per_s": p,
        "ray_images_per_s": q,
        "ratio_ray_over_plain": C.summary([b["images_per_s"] / a["images_per_s"] for a, b in zip(plain, ray_runs)]),
        "first_batch_s": {"plain": C.summary([x["first_batch_s"] for x in plain]), "ray": C.summary([x["first_batch_s"] for x in ray_runs])},
        "ratio_after_first_batch": C.summary([b["images_per_s_after_first_batch"] / a["images_per_s_after_first_batch"]
                                              for a, b in zip(plain, ray_runs)]),
        "plain_cpu_ms_per_image": cp,
        "ray_cpu_ms_per_image": cq,
        "ratio_cpu_ray_over_plain": round(cq["median"] / cp["median"], 3),
        "cpu_bound_ceiling_ratio": round(ncpu * cp["median"] / cq["median"], 3),
    }


# ---------------------------------------------------------------------------------------------
# main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=20000, help="rows of the throughput split")
    ap.add_argument("--rows-per-shard", type=int, default=1000, help="as `raytrain prepare` writes them (data.rows_per_shard default)")
    ap.add_argument("--reps", type=int, default=2, help="interleaved (plain, shipped, plain, staged) rounds at 2 CPUs")
    ap.add_argument("--reps-1cpu", type=int, default=1, help="the same rounds at 1 CPU")
    ap.add_argument("--mem-small", type=int, default=1000, help="rows of the small memory run")
    ap.add_argument("--mem-copies", type=int, default=20, help="the large memory run streams this many copies of the small split")
    ap.add_argument("--budget-s", type=float, default=560, help="optional parts (profile variants, the fixed variant's memory runs) run only while they fit in this many seconds")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one round (checks the script, not the numbers)")
    ap.add_argument("--image-px", type=int, default=64,
                    help="source images and model input of this size (a multiple of 16): 64 = the tiny preset; 224 builds "
                         "the same tiny model at PaliGemma-224's input size (196 image tokens); results go to "
                         "data_pipeline_<px>px.json")
    args = ap.parse_args()
    global IMAGE_HW, MAX_LEN
    if args.image_px % 16:
        ap.error("--image-px must be a multiple of 16 (the tiny model's patch size)")
    IMAGE_HW = (args.image_px, args.image_px)
    MAX_LEN = (args.image_px // 16) ** 2 + TEXT_LEN
    if args.smoke:
        args.rows, args.rows_per_shard, args.reps, args.mem_small, args.mem_copies = 300, 100, 1, 100, 3
    t_start = time.perf_counter()
    elapsed = lambda: time.perf_counter() - t_start
    result: dict = {"params": vars(args), "loadavg_start": C.loadavg(), "variants": {k: v["desc"] for k, v in VARIANTS.items()},
                    "target": {"ratio_ray_over_plain_2cpu": TARGET, "limit": 2.0}, "skipped": []}

    with C.moto_s3() as (endpoint, opts, bucket, moto_pid):
        from raytrain.data import shards

        exclude = {moto_pid}
        uri = f"{bucket}/tp"
        with C.Timer() as t:
            report = shards.prepare_synthetic(uri, n=args.rows, splits={"train": 1.0}, rows_per_shard=args.rows_per_shard, opts=opts,
                                              image_size=args.image_px)
        images = report.rows_written["train"]
        print(f"prepared {images} rows in {report.shards['train']} shards on {endpoint} ({t.s:.1f}s)", flush=True)
        mem_small = f"{bucket}/mem-small"
        shards.prepare_synthetic(mem_small, n=args.mem_small, seed=1, splits={"train": 1.0}, rows_per_shard=args.rows_per_shard, opts=opts,
                                 image_size=args.image_px)
        mem_large = f"{bucket}/mem-large"
        rows_small = copy_shards(endpoint, mem_small, mem_large, args.mem_copies)
        model_path = C.tiny_model_path(image_size=args.image_px)
        result["data"] = {"throughput_rows": images, "throughput_shards": report.shards["train"], "rows_per_shard": args.rows_per_shard,
                          "row_group_rows": 128, "image_px": args.image_px, "examples_per_image": len(TASKS), "batch_size": BATCH,
                          "max_len": MAX_LEN, "mem_small_rows": rows_small, "mem_large_rows": rows_small * args.mem_copies,
                          "source_bytes_per_row_approx": None}
        plain_loop(mem_small, opts, model_path)  # warm the driver (imports, processor load): not counted

        # 1 CPU first, then 2 CPUs; the optional parts (profile, the fixed variant's memory runs)
        # come last and only run while their estimated time still fits the budget.
        sessions: dict = {}
        for ncpu in (1, 2):
            ray = C.init_ray(ncpu)
            warm = run_ray(FIXED, mem_small, opts, model_path, exclude, rows_small, ncpu, memory=False)  # start workers
            idle = idle_cpu(exclude)
            runs: dict = {"plain": [], "shipped": [], "plain_b": [], FIXED: []}
            for rep in range(args.reps if ncpu == 2 else args.reps_1cpu):
                t_round = time.perf_counter()
                runs["plain"].append(run_plain(uri, opts, model_path, exclude, images))
                # no memory sampler here: the plain side runs without one, and its psutil walk + raylet
                # RPC every 0.25 s cost the Ray side 3-5 % of its images/s (memory has its own runs)
                runs["shipped"].append(run_ray("shipped", uri, opts, model_path, exclude, images, ncpu, memory=False))
                runs["plain_b"].append(run_plain(uri, opts, model_path, exclude, images))
                runs[FIXED].append(run_ray(FIXED, uri, opts, model_path, exclude, images, ncpu, memory=False))
                print(f"[{ncpu} CPU] round {rep}: plain {runs['plain'][-1]['images_per_s']:.1f}, shipped {runs['shipped'][-1]['images_per_s']:.1f}, "
                      f"plain {runs['plain_b'][-1]['images_per_s']:.1f}, {FIXED} {runs[FIXED][-1]['images_per_s']:.1f} img/s; "
                      f"load {C.loadavg()} ({time.perf_counter() - t_round:.0f}s)", flush=True)
            for x in runs["shipped"] + runs[FIXED]:
                # CPU that an idle Ray cluster (gcs, raylet, agents) burns anyway during the run
                x["cpu_ms_per_image_net_of_idle"] = round(1000 * (x["cpu_s"] - idle * x["wall_s"]) / images, 3)
            everything = [x for v in runs.values() for x in v]
            assert len({(x["examples"], x["checksum"]) for x in everything}) == 1, "sides disagree on the tokenized output"
            sessions[ncpu] = {
                "warmup_run": {k: warm[k] for k in ("wall_s", "images_per_s", "cpu_s")},
                "idle_cpu_s_per_s": idle,
                "shipped": pair_summary(runs["plain"], runs["shipped"], ncpu),
                FIXED: pair_summary(runs["plain_b"], runs[FIXED], ncpu),
                "runs": runs,
                "examples": everything[0]["examples"],
            }
            if ncpu == 1:
                ray.shutdown()

        # ---- memory (2 CPUs): stream 1k rows, then 20x as many; nothing materialized -------------
        mem: dict = {}
        for variant in ("shipped", FIXED):
            if variant != "shipped":
                est = 1.2 * sum(mem["shipped"][k]["wall_s"] for k in ("small", "large"))
                if elapsed() + est > args.budget_s:
                    result["skipped"].append(f"memory runs of {variant} (time budget: ~{est:.0f}s more)")
                    continue
            mem[variant] = {}
            for name, src, n in (("small", mem_small, rows_small), ("large", mem_large, rows_small * args.mem_copies)):
                r = run_ray(variant, src, opts, model_path, exclude, n, 2)
                r["rows"] = n
                mem[variant][name] = r
                print(f"[memory] {variant} {n} rows: {r['memory']} ({r['images_per_s']:.1f} img/s)", flush=True)
            ms, ml = mem[variant]["small"]["memory"], mem[variant]["large"]["memory"]
            mem[variant]["ratio_peak_rss_large_over_small"] = round(ml["peak_rss_sum_mib"] / ms["peak_rss_sum_mib"], 3)
            mem[variant]["ratio_peak_object_store_large_over_small"] = (
                round(ml["peak_object_store_mib"] / ms["peak_object_store_mib"], 3) if ms["peak_object_store_mib"] else None)
            if variant == "shipped" and not args.no_profile:
                # profile before the fixed variant's memory runs: it is the more useful of the two
                run_s = max(x["wall_s"] for x in sessions[2]["runs"]["shipped"]) + max(x["wall_s"] for x in sessions[2]["runs"]["plain"])
                result["profile"] = profile(uri, opts, model_path, images, exclude, 2, run_s=run_s,
                                            deadline=t_start + args.budget_s - 60, skipped=result["skipped"])
        mem["tokenized_bytes_per_example"] = tokenized_bytes()
        mem["source_bytes_per_row"] = source_bytes_per_row(mem_small, opts)
        result["memory"] = mem
        ray.shutdown()

    s2, s1 = sessions[2], sessions[1]
    result["sessions"] = {str(k): v for k, v in sessions.items()}
    scaling = {}
    for variant in ("shipped", FIXED):
        r2, r1 = s2[variant], s1[variant]
        scaling[variant] = {
            "ray_2cpu_images_per_s": r2["ray_images_per_s"]["median"],
            "ray_1cpu_images_per_s": r1["ray_images_per_s"]["median"],
            "ratio_raw_2cpu_over_1cpu": round(r2["ray_images_per_s"]["median"] / r1["ray_images_per_s"]["median"], 3),
            "ratio_normalised_2cpu_over_1cpu": round(r2["ratio_ray_over_plain"]["median"] / r1["ratio_ray_over_plain"]["median"], 3),
        }
    scaling["note"] = "normalised = (ray/plain at 2 CPUs) / (ray/plain at 1 CPU): divides out load drift between the two sessions"
    result["scaling"] = scaling
    head = s2["shipped"]["ratio_ray_over_plain"]["median"]
    result["headline"] = {
        "ratio_ray_over_plain_2cpu": head,
        "ray_images_per_s_2cpu": s2["shipped"]["ray_images_per_s"]["median"],
        "plain_images_per_s_2cpu": s2["shipped"]["plain_images_per_s"]["median"],
        "ratio_fixed_over_plain_2cpu": s2[FIXED]["ratio_ray_over_plain"]["median"],
        "target": TARGET,
        "met": head >= TARGET,
        "fixed_met": s2[FIXED]["ratio_ray_over_plain"]["median"] >= TARGET,
    }
    result["loadavg_end"] = C.loadavg()
    result["elapsed_s"] = round(elapsed(), 1)
    path = C.write_result("data_pipeline" if args.image_px == 64 else f"data_pipeline_{args.image_px}px", result)
    h = result["headline"]
    print(f"wrote {path} ({result['elapsed_s']}s)")
    print(f"data_pipeline: ray/plain images/s at 2 CPUs = {head:.2f}x (ray {h['ray_images_per_s_2cpu']:.1f} vs plain "
          f"{h['plain_images_per_s_2cpu']:.1f} img/s; target >= {TARGET}x {'met' if h['met'] else 'NOT met'}; "
          f"with {FIXED}: {h['ratio_fixed_over_plain_2cpu']:.2f}x)")


def tokenized_bytes() -> int:
    """Bytes of one tokenized example as the pipeline emits it (what materialize() stores):
    pixel_values uint8 (3, H, W) + pixel_scale/pixel_offset float32 (3) + input_ids/labels int32 +
    attention_mask/token_type_ids int8."""
    return 3 * IMAGE_HW[0] * IMAGE_HW[1] + 2 * 3 * 4 + MAX_LEN * (4 + 4 + 1 + 1)


def source_bytes_per_row(uri: str, opts) -> float:
    import pyarrow.parquet as pq

    from raytrain.data import shards

    paths, fs = shards.shard_source(uri, "train", opts)
    total = rows = 0
    for p in paths:
        total += fs.get_file_info(p).size
        rows += pq.ParquetFile(fs.open_input_file(p)).metadata.num_rows
    return round(total / rows, 1)


def profile(uri, opts, model_path, images, exclude, ncpu, *, run_s: float, deadline: float, skipped: list) -> dict:
    """Where the time goes: per-stage time of the plain loop, the processor's parts, and the Ray
    variants (each next to a plain run)."""
    out: dict = {}
    st: Counter = Counter()
    r = run_plain(uri, opts, model_path, exclude, images, stage_times=st)
    total = sum(st.values())
    out["plain_stage_ms_per_image"] = {k: round(1000 * v / images, 3) for k, v in st.most_common()}
    out["plain_stage_share"] = {k: round(v / total, 3) for k, v in st.most_common()}
    out["plain_reference"] = {k: r[k] for k in ("images_per_s", "cpu_ms_per_image", "wall_s")}
    out["processor_breakdown"] = processor_breakdown(model_path)
    out["variants"] = {}
    for variant in ("v2_reader",):
        if time.perf_counter() + run_s > deadline:
            skipped.append(f"profile variant {variant} (time budget: ~{run_s:.0f}s each)")
            continue
        plain = run_plain(uri, opts, model_path, exclude, images)
        v = run_ray(variant, uri, opts, model_path, exclude, images, ncpu, memory=False)
        out["variants"][variant] = {
            "ray_images_per_s": v["images_per_s"], "plain_images_per_s": plain["images_per_s"],
            "ratio_ray_over_plain": round(v["images_per_s"] / plain["images_per_s"], 3),
            "ray_cpu_ms_per_image": v["cpu_ms_per_image"], "plain_cpu_ms_per_image": plain["cpu_ms_per_image"],
            "operators": v["operators"], "examples": v["examples"],
        }
        print(f"[profile] {variant}: {out['variants'][variant]['ratio_ray_over_plain']:.2f}x "
              f"({v['images_per_s']:.1f} vs plain {plain['images_per_s']:.1f} img/s)", flush=True)
    return out


def processor_breakdown(model_path: str, n: int = 64, reps: int = 5) -> dict:
    """ms per example inside encode_train: the image half vs the text half of the processor, and
    what skipping the processor's second resize (images arrive already at the model size) would save."""
    from PIL import Image

    from raytrain.models import paligemma

    proc = paligemma.load_processor(model_path)
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (*IMAGE_HW, 3), dtype=np.uint8)) for _ in range(n)]
    prefixes = ["detect red circle"] * n
    suffixes = ["<loc0100><loc0200><loc0300><loc0400> red circle"] * n

    def best(fn) -> float:
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return 1000 * min(ts) / n

    full = best(lambda: paligemma.encode_train(proc, imgs, prefixes, suffixes, MAX_LEN))
    image_only = best(lambda: proc.image_processor(imgs, return_tensors="np"))
    no_resize = best(lambda: proc.image_processor(imgs, return_tensors="np", do_resize=False))
    return {"encode_train_ms_per_example": round(full, 3), "image_processor_ms_per_example": round(image_only, 3),
            "image_processor_no_resize_ms_per_example": round(no_resize, 3),
            "text_and_rest_ms_per_example": round(full - image_only, 3),
            "note": f"best of 5 over 64 examples; decode_and_expand already resized to {IMAGE_HW[0]}x{IMAGE_HW[1]} and the processor resizes again"}


if __name__ == "__main__":
    main()
