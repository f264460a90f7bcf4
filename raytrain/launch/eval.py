"""Driver side of `raytrain eval`: evaluate a checkpoint on a split with a pool of predictor actors
(Ray Data; GPUs when eval.gpus_per_actor > 0), streaming the predictions to the run's eval
directory, and print / write every metric.

    raytrain eval --config jobs/tiny/shapes.yaml [eval.checkpoint=<uri>] [eval.split=val] [eval.limit=100]

Without eval.checkpoint the run's checkpoint chosen by train.select_checkpoint is used (the latest by
default; `latest_checkpoint`). `evaluate` is also the last
step of `raytrain train` (trained / untrained / blind baseline on the held-out split). With
eval.grid set, `raytrain eval` scores every checkpoint x prompt x decoding instead and prints one
table (seed 003's 12 cells: jobs/paligemma/1-3b_qlora_risc_captions_eval.yaml).

Files in <run>/eval/ (eval/exports.py): metrics[_<split>].json, predictions_<split>.jsonl,
coco_gt_<split>.json + coco_results_<split>.json (detect examples; pycocotools loads them and
COCOeval over them gives the mAP printed here), the baselines' predictions_<split>_<column>.jsonl.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import time

from raytrain import config as config_mod
from raytrain import storage
from raytrain.config import Experiment, TextOptions
from raytrain.launch import job, tracking
from raytrain.launch.ray_runtime import init_ray

log = logging.getLogger("raytrain.launch.eval")

COLUMNS = ("trained", "untrained", "centre_baseline")
POINT_KEYS = ["n", "valid_rate", "mean_norm_distance", "median_norm_distance", "mean_distance", "median_distance",
              "std_distance", "mse_x", "mse_y", "mae_x", "mae_y", "success_rate", "success_rate_all"]
HEADLINE = (  # (row title, dotted metric) of the summary table; rows no column has are left out.
    # valid_rate_by_task counts answers that parsed to at least one object: a valid empty answer ("[]") is not one
    ("answers with objects: point", "valid_rate_by_task.point"), ("answers with objects: detect", "valid_rate_by_task.detect"),
    ("answers with objects: segment", "valid_rate_by_task.segment"), ("answers with objects: caption", "valid_rate_by_task.caption"),
    ("answers with objects: dense caption", "valid_rate_by_task.dense_caption"),
    ("COCO mAP @[.5:.95]", "coco.map"), ("COCO AP50", "coco.map_50"), ("COCO AP75", "coco.map_75"), ("COCO mAR@100", "coco.mar_100"),
    ("image-level accuracy", "image_level.accuracy"), ("image-level F1", "image_level.f1"),
    ("image-level specificity", "image_level.specificity"),
    ("point precision (1:1)", "point_prf.precision"), ("point recall (1:1)", "point_prf.recall"), ("point F1 (1:1)", "point_prf.f1"),
    ("ECE (confidences)", "calibration.ece"), ("objects with confidence", "calibration.n"),
    ("mask mIoU", "segmentation.miou"), ("BLEU-1", "captions.bleu_1"), ("BLEU-4", "captions.bleu_4"), ("METEOR", "captions.meteor"),
    ("CIDEr", "captions.cider"), ("CLIPScore", "captions.clip_score"), ("dense: recall@.5", "dense_captions.recall_50"),
    ("dense: METEOR@.5", "dense_captions.meteor_50"),
)


# ---------------------------------------------------------------------------------------------- checkpoints


def latest_checkpoint(cfg: Experiment, run_name: str | None = None) -> str:
    """URI of the run's checkpoint as train.select_checkpoint chooses it (this job's run, or
    `run_name`'s): the highest step (last), or the best by that metric as recorded in each
    checkpoint's state.json (train.select_mode min | max; ties: the later step). What `raytrain eval`
    evaluates without eval.checkpoint and what `raytrain train` evaluates at its end
    (`checkpoint_choice` says why)."""
    return checkpoint_choice(cfg, run_name)["checkpoint"]


def checkpoint_choice(cfg: Experiment, run_name: str | None = None) -> dict:
    """{"checkpoint": URI, "step", "select_checkpoint", "select_mode", "value"} of the chosen checkpoint
    (see `latest_checkpoint`). Checkpoints without state.json (an interrupted upload) are skipped;
    so are, when selecting by a metric, those that do not record it."""
    run = storage.run_dir(job.runs_root(cfg), run_name or cfg.name)
    fs = storage.fsspec_fs(run, job.storage_opts(cfg))
    root = storage.strip_scheme(run)
    by, mode = cfg.train.select_checkpoint, cfg.train.select_mode
    found = []  # (sort key, dir, step, value)
    for d in fs.glob(posixpath.join(root, "checkpoint_*")):
        state = posixpath.join(d, "state.json")
        if not fs.exists(state):
            continue  # an interrupted upload: not a usable checkpoint
        rec = json.loads(fs.cat(state))
        step = int(rec["step"])
        if by == "last":
            found.append(((step,), d, step, None))
            continue
        value = (rec.get("metrics") or {}).get(by)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:  # NaN never wins
            found.append(((value if mode == "max" else -value, step), d, step, float(value)))
    if not found:
        what = "" if by == "last" else f" recording {by!r} (train.select_checkpoint)"
        raise FileNotFoundError(f"no checkpoint{what} under {run}")
    _, best, step, value = max(found, key=lambda f: f[0])
    return {"checkpoint": ("s3://" + best) if storage.is_s3(run) else best, "step": step, "select_checkpoint": by,
            "select_mode": mode, "value": value}


def resolve_checkpoint(cfg: Experiment, spec: str) -> str | None:
    """A grid's checkpoint entry: "" = eval.checkpoint or this run's latest, "base" = the untrained
    base model (None), "run:<name>" = the latest checkpoint of run <name> under storage.root, else a URI."""
    if spec == "base":
        return None
    if spec.startswith("run:"):
        return latest_checkpoint(cfg, spec[4:])
    return spec or cfg.eval.checkpoint or latest_checkpoint(cfg)


# ---------------------------------------------------------------------------------------------- settings


def decode_options(cfg: Experiment, decoding=None):
    """The predict path's decoding options from the job's `eval` section (raytrain/predict.py);
    `decoding`: a grid cell's eval.grid.DecodingConfig instead of eval.max_new_tokens / eval.decoding."""
    from raytrain.predict import DecodeOptions

    ev = cfg.eval
    if decoding is None:
        mnt, gen, seed = ev.max_new_tokens, dict(ev.decoding), ev.seed
    else:
        gen = decoding.generate_kwargs()
        mnt, seed = gen.pop("max_new_tokens"), decoding.seed
    if "segment" in cfg.data.tasks and ev.constrained:
        from raytrain.formats.paligemma_masks import MIN_ANSWER_TOKENS

        if mnt < MIN_ANSWER_TOKENS:  # every answer would be the grammar's empty one: all-zero metrics, silently
            raise ValueError(f"max_new_tokens={mnt} cannot hold one mask answer (<loc> x4, <seg> x16, label, <eos>: "
                             f">= {MIN_ANSWER_TOKENS} tokens); set eval.max_new_tokens (the seed segment job uses 256; "
                             "`raytrain smoke` measures the answers' length)")
    return DecodeOptions(max_new_tokens=mnt, constrained=ev.constrained, confidence=ev.confidence, max_objects=ev.max_objects,
                         nms_iou=ev.nms_iou, generate=gen, seed=seed)


def pool_gpus(cfg: Experiment) -> float:
    """GPUs per predictor actor: eval.gpus_per_actor, or 0 (printed) when the cluster has no GPU and
    eval.cpu_fallback allows CPU predictors."""
    import ray

    gpus = cfg.eval.gpus_per_actor
    if gpus > 0 and cfg.eval.cpu_fallback and not ray.cluster_resources().get("GPU"):
        print(f"eval: eval.gpus_per_actor={gpus:g} but this Ray cluster has no GPU: the predictors run on CPU "
              "(eval.cpu_fallback=false waits for GPU nodes instead)", flush=True)
        return 0.0
    return gpus


class Inputs:
    """What every column of one evaluation shares: the split, its preprocessing, the example
    selection (eval.limit) and the predictor pool's settings."""

    def __init__(self, cfg: Experiment, uri: str, base_path: str, ckpt_uri: str | None, counter):
        from raytrain.data import preprocess
        from raytrain.eval import batch as eval_batch
        from raytrain.eval import inputs

        self.cfg, self.uri, self.base_path, self.counter = cfg, uri, base_path, counter
        self.opts = job.storage_opts(cfg)
        # the checkpoint's recorded preprocessing and text (prompts, negatives' answer) win over the
        # config (a mismatch is logged); the family object, bound to that text, goes to the predictors
        self.prep, text, state = cfg.data.preprocess, cfg.data.text, {}
        if ckpt_uri:
            from raytrain.training import checkpointing

            state = checkpointing.recorded_state(ckpt_uri, self.opts)
            self.prep = preprocess.resolve_recorded(state.get("preprocess"), self.prep, ckpt_uri)
            if "text" in state and TextOptions.from_dict(state["text"]) != text:
                text = TextOptions.from_dict(state["text"])
                log.warning("the checkpoint was trained with data.text %s; evaluating with it (the config says %s)", text, cfg.data.text)
        self.fam = cfg.model_family(text)
        # the model-input frame: the processor's square, or "native" (each image its own size)
        self.image_hw = preprocess.frame_for(self.fam, self.fam.load_processor(base_path), self.prep)
        print(f"eval preprocessing: {self.prep.to_dict()}", flush=True)
        ev = cfg.eval
        self.ids = None
        if ev.limit:
            self.ids = inputs.select_ids(uri, ev.split, ev.limit, ev.seed if ev.limit_random else None, self.opts)
            print(f"eval.limit: {len(self.ids)} rows of split {ev.split} ({'random, seed ' + str(ev.seed) if ev.limit_random else 'the first'})",
                  flush=True)
        n_rows = len(self.ids) if self.ids is not None else inputs.count_rows(uri, ev.split, self.opts)
        self.gpus = pool_gpus(cfg)
        actors = ev.max_actors or ev.num_actors
        self.rows_per_block = eval_batch.block_rows(n_rows * len(cfg.data.tasks), ev.batch_size, ev.bucket_batches, actors)
        self.out_dir = storage.join(storage.run_dir(job.runs_root(cfg), cfg.name), "eval")
        if not storage.is_s3(self.out_dir):
            os.makedirs(self.out_dir, exist_ok=True)
        self._counted = False

    def examples(self):
        """A fresh lazy examples Dataset; the data counter counts the first pass only."""
        from raytrain.eval import inputs

        counter = None if self._counted else self.counter
        self._counted = True
        return inputs.examples(self.uri, self.cfg.eval.split, tasks=self.cfg.data.tasks, image_hw=self.image_hw,
                               family=self.fam, allow_convert=self.cfg.data.allow_convert, opts=self.opts,
                               counter=counter, preprocess=self.prep, ids=self.ids)

    def predictions(self, ckpt_uri: str | None, options, prompt: str | None = None):
        from raytrain.eval import batch as eval_batch

        ev = self.cfg.eval
        return eval_batch.predictions_dataset(
            self.examples(), family=self.fam, model_path=self.base_path, checkpoint_uri=ckpt_uri,
            storage={"endpoint_url": self.cfg.storage.endpoint_url, "region": self.cfg.storage.region}, dtype=ev.dtype,
            batch_size=ev.batch_size, pool=ev.pool_size, cpus_per_actor=ev.cpus_per_actor, gpus_per_actor=self.gpus,
            options=options, rows_per_block=self.rows_per_block, clip_path=ev.clip_path, prompt=prompt,
            accelerator_type=ev.accelerator_type)

    def score(self, predictions, column: str, main: bool) -> dict:
        from raytrain.eval import streaming

        return streaming.evaluate_column(predictions, self.out_dir, self.cfg.eval.split, column, self.opts, main=main,
                                         calibration_bins=self.cfg.eval.calibration_bins)


# ---------------------------------------------------------------------------------------------- evaluation


def evaluate(cfg: Experiment, uri: str, base_path: str, ckpt_uri: str | None, counter) -> tuple[dict, str]:
    """Metrics of trained / untrained / centre_baseline on the eval split (each column's predictions
    and COCO files streamed to the run's eval directory); returns (metrics, eval directory URI)."""
    from raytrain.data import pipeline
    from raytrain.eval import batch as eval_batch

    inp = Inputs(cfg, uri, base_path, ckpt_uri, counter)
    options = decode_options(cfg)
    results: dict = {}
    t = time.perf_counter()
    results["trained"] = inp.score(inp.predictions(ckpt_uri, options), "trained", main=True)
    results["trained"]["eval_seconds"] = round(time.perf_counter() - t, 2)
    if cfg.eval.baselines:
        results["untrained"] = inp.score(inp.predictions(None, options), "untrained", main=False)
        mean_wh = eval_batch.mean_box_size(pipeline.train_box_sizes(uri, "train", inp.opts))
        base = eval_batch.baseline_dataset(inp.examples(), mean_box_wh=mean_wh, batch_size=cfg.eval.batch_size, family=inp.fam)
        results["centre_baseline"] = inp.score(base, "centre_baseline", main=False)
    return results, inp.out_dir


def run_grid(cfg: Experiment, uri: str, base_path: str, counter) -> tuple[list[dict], str]:
    """Every checkpoint x prompt x decoding of eval.grid (raytrain.eval.grid), each a streamed
    evaluation of the split; returns one row per cell (names + every metric) and the eval dir."""
    from raytrain.eval import grid

    g = cfg.eval.grid
    checkpoints = {name: resolve_checkpoint(cfg, spec) for name, spec in (g.checkpoints or {"latest": ""}).items()}
    prompts = dict(g.prompts) or {"default": None}
    # no grid decodings: the one of eval.max_new_tokens / eval.decoding (decode_options(cfg))
    decodings = [grid.DecodingConfig(name, **{"max_new_tokens": cfg.eval.max_new_tokens, **d}) for name, d in g.decodings.items()]
    cells = grid.grid_cells({k: k for k in prompts}, decodings or [grid.DecodingConfig("default")], list(checkpoints))
    inputs: dict[str, Inputs] = {}  # per checkpoint: its recorded preprocessing; the data counted once

    def predict_fn(checkpoint: str, prompt_name: str, decoding) -> dict:
        if checkpoint not in inputs:
            inputs[checkpoint] = Inputs(cfg, uri, base_path, checkpoints[checkpoint], None if inputs else counter)
        inp = inputs[checkpoint]
        print(f"grid cell {checkpoint} x {prompt_name} x {decoding.name}", flush=True)
        ds = inp.predictions(checkpoints[checkpoint], decode_options(cfg, decoding if decodings else None), prompts[prompt_name])
        return inp.score(ds, _slug(f"{checkpoint}_{prompt_name}_{decoding.name}"), main=False)

    rows = grid.run_cells(predict_fn, cells, lambda m: m)
    return rows, next(iter(inputs.values())).out_dir


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", s).strip("-") or "cell"


# ---------------------------------------------------------------------------------------------- output


def dotted(d: dict, key: str):
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def summary_table(cols: dict[str, dict]) -> dict[str, dict]:
    """{column: {row title: value}} of the HEADLINE rows any column has."""
    out: dict[str, dict] = {c: {} for c in cols}
    for title, key in HEADLINE:
        vals = {c: dotted(m, key) for c, m in cols.items()}
        if any(v is not None for v in vals.values()):
            for c, v in vals.items():
                out[c][title] = v
    return out


def print_tables(cfg: Experiment, metrics: dict) -> None:
    """The pointing and boxes tables (seed 000's numbers), then every other headline metric, then
    any warning (e.g. METEOR without Java)."""
    from raytrain.eval.metrics.table import format_table

    cols = {k: metrics[k] for k in COLUMNS if k in metrics}
    split = cfg.eval.split
    if any("valid_rate" in c for c in cols.values()):
        print(f"\npointing ({split} split, distances in source pixels):")
        print(format_table(cols, POINT_KEYS))
    box_cols = {k: v["boxes"] for k, v in cols.items() if "boxes" in v}
    if box_cols:
        print(f"\nboxes ({split} split, IoU 0.5):")
        print(format_table(box_cols))
    summary = summary_table(cols)
    if any(summary.values()):
        print(f"\nall metrics ({split} split; COCO ranked by per-object confidence; constrained decoding "
              f"{'on' if cfg.eval.constrained else 'off'}):")
        print(format_table(summary))
    for w in sorted({w for c in cols.values() for w in c.get("warnings", [])}):
        print(f"WARNING: {w}", flush=True)


def print_grid(cfg: Experiment, rows: list[dict]) -> None:
    from raytrain.eval.metrics.table import format_rows

    keys = list(cfg.eval.grid.metrics) or [k for _, k in HEADLINE if any(dotted(r, k) is not None for r in rows)]
    print(f"\ngrid ({cfg.eval.split} split): {len(rows)} cells")
    print(format_rows([{**{k: r[k] for k in ("checkpoint", "prompt", "decoding")}, **{k: dotted(r, k) for k in keys}} for r in rows]))
    for w in sorted({w for r in rows for w in r.get("warnings", [])}):
        print(f"WARNING: {w}", flush=True)


def main(cfg: Experiment) -> str:
    from raytrain.data import pipeline

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    init_ray(cfg.ray)
    uri = job.data_uri(cfg)
    base_path = job.model_path(cfg)
    counter = pipeline.drop_counter()
    opts = job.storage_opts(cfg)
    run_info = {"data": uri, "split": cfg.eval.split, "limit": cfg.eval.limit}
    if cfg.eval.grid.active:
        rows, out_dir = run_grid(cfg, uri, base_path, counter)
        metrics = {"grid": rows, "run": {**run_info, "data_counts": pipeline.drop_counts(counter)}}
        out = storage.write_json(storage.join(out_dir, f"grid_{cfg.eval.split}.json"), metrics, opts)
        print_grid(cfg, rows)
        print(out, flush=True)
        return out
    ckpt = cfg.eval.checkpoint or latest_checkpoint(cfg)
    print(f"evaluating {ckpt} on split {cfg.eval.split} of {uri}", flush=True)
    metrics, out_dir = evaluate(cfg, uri, base_path, ckpt, counter)
    metrics["run"] = {"checkpoint": ckpt, **run_info, "data_counts": pipeline.drop_counts(counter)}
    out = storage.write_json(storage.join(out_dir, f"metrics_{cfg.eval.split}.json"), metrics, opts)
    tracking.log_evaluation(cfg, metrics, ckpt)  # track: on -> metrics and eval files into the run's tracking run
    print_tables(cfg, metrics)
    print(out, flush=True)
    return out


if __name__ == "__main__":
    import sys

    main(config_mod.load(sys.argv[1] if len(sys.argv) > 1 else None, sys.argv[2:]))
