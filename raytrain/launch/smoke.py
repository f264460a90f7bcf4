"""Smoke mode: shrink any experiment so that it runs on CPU in seconds.

    python -m raytrain.launch.smoke --config jobs/paligemma/2-3b_qlora_pixmo_points.yaml          # Ray-free
    python -m raytrain.launch.smoke --config jobs/paligemma/2-3b_qlora_pixmo_points.yaml --ray    # whole job

`smoke(cfg)` keeps what makes the job the job — model family, strategy, quantization (QLoRA runs on
CPU through bitsandbytes), LoRA settings, freeze policy, task head (one query per tiny image token), losses, optimizer, lr schedule kind,
decoding settings — and replaces what only makes it big or slow: the real checkpoint becomes the
offline tiny preset of the SAME family (`tiny:paligemma`, `tiny:qwen2_5_vl`), the dataset becomes
a few dozen synthetic shapes images, steps/rows/workers shrink, dtypes become float32 (bfloat16
matmuls are slow on most CPUs) and the learning rate becomes one that moves a random-init tiny
model in a few steps (the seeds' 1e-6 .. 1e-4 would not). A task head (model.task_head_queries)
is kept with one query per image token of the tiny preset.

A job whose task the synthetic set cannot render (checked against the pipeline at run time: today
`segment`, the shapes carry no masks; caption and dense_caption they do carry) trains on the closest
task it can (`FALLBACK_TASK`); `smoke_plan` says which, and `smoke` logs it.

On the job's own data instead (`smoke(cfg, root=..., data=PATH)`, `--data PATH`): PATH is a small
local copy of the job's source in its own format (tests/assets/ holds one per seed: e.g.
`--data tests/assets/seed004_fracture_jsonl`; seed 001's folder holds three sources, so name the
file, `.../seed001_datature_jsonl/segment.jsonl`). The data section is then KEPT — converter,
tasks (no substitution), prompts / system prompt / "nothing found" answer / multi-label grouping,
preprocessing, answer format, source options — and only pointed at PATH, with every row in one
split that is both trained on and decoded (see launch/smoke_fixture.py for what else changes).
`smoke` converts PATH at once with `raytrain prepare`'s own code, Ray-free, into the run's data
folder, and measures data.max_seq_len / eval.max_new_tokens on those examples. PixMo rows fetch
their image URLs: the fixture's name a host that never resolves, so serve them (the test does).

Two ways to run the result:

* `run_local`: the recipe loop (`recipes.ddp.train`, or `recipes.zero.train` for zero2/zero3)
  with a plain `Session` over batches encoded by the family's `encode_train` (synthetic: a few;
  local data: every example, tokenized by the pipeline's `tokenize`), no Ray; then a generation
  with the job's decoding settings from the written checkpoint, through the predict path (on
  local data also parsed with the family's parser for the task and scored per example).
  tests/integration/test_jobs_smoke.py runs it for jobs/tiny/ (synthetic), and
  tests/integration/test_seed_fixture_smoke.py for every seed job on its seed's fixture.
* `--ray`: `raytrain train` itself (`launch.train.main`) on the shrunk config: Ray Data pipeline,
  TorchTrainer with one CPU worker, evaluation, report (synthetic data only).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from raytrain import config as config_mod
from raytrain.config import Experiment
from raytrain.launch import smoke_fixture

log = logging.getLogger("raytrain.launch.smoke")

STEPS = 8
NUM_IMAGES = 64
"""Synthetic images generated for a smoke run (all splits)."""
MICRO_BATCH = 4
MAX_ACCUM = 2
"""Gradient accumulation is kept (capped at 2) so the no-sync path of the recipe still runs."""
SEQ_MARGIN = 8
"""Tokens added to the longest smoke example (data.max_seq_len) and to its longest answer
(eval.max_new_tokens): both are measured on the smoke data with the family's own encoding
(`token_budget`), so no family's prompt or answer length is written down here."""
LR = {"full": 2e-3, "lora": 5e-3, "zero2": 2e-3, "zero3": 2e-3}
FALLBACK_TASK = {"caption": "detect", "dense_caption": "detect", "segment": "detect"}
"""Closest task the synthetic shapes can render: a label-bearing box answer for the text tasks
(a dense caption is a box + phrase; a PaliGemma mask answer starts with the object's box)."""


# ----------------------------------------------------------------------------------------------
# shrinking the config


@dataclass
class SmokePlan:
    """What `smoke` did to the job's tasks: the ones it trains, and why each substitution."""

    tasks: list[str]
    notes: list[str] = field(default_factory=list)


def synthetic_supports(task: str, family: str) -> bool:
    """True when the pipeline renders `task` from a synthetic shapes image for `family`."""
    from raytrain.data import pipeline, synthetic

    ex = synthetic.make_example(0, seed=0)
    try:
        return bool(pipeline.examples_for(ex["objects"], [task], ex["width"], ex["height"], family))
    except (KeyError, ValueError, NotImplementedError):
        return False


def smoke_plan(tasks: list[str], family: str) -> SmokePlan:
    """The tasks a smoke run trains: the job's own where the synthetic set can render them, else
    `FALLBACK_TASK`'s substitute (or point/detect), each substitution explained in `notes`."""
    kept: list[str] = []
    notes: list[str] = []
    for task in tasks:
        if synthetic_supports(task, family):
            new = task
        else:
            new = FALLBACK_TASK.get(task, "detect")
            notes.append(f"task {task!r}: the synthetic shapes set cannot render it for {family}; smoke trains {new!r} instead")
        if new not in kept:
            kept.append(new)
    if not kept:
        kept = ["point", "detect"]
        notes.append("the job names no task: smoke trains point + detect")
    return SmokePlan(kept, notes)


def smoke(cfg: Experiment, *, steps: int = STEPS, root: str | None = None, num_images: int = NUM_IMAGES,
          data: str | Path | None = None, micro_batch: int = MICRO_BATCH) -> Experiment:
    """A copy of `cfg` shrunk to run on CPU in seconds (see the module docstring for what is kept).

    root: storage root of the smoke run (default: the job's, with the run named `<name>-smoke`).
    data: a local copy of the job's source (file or folder, in the job's own format): the job's
    data section is kept and pointed at it (`smoke_fixture.fixture_data`), and the copy is
    converted at once, Ray-free, into the run's data folder (`root` is then required) so that the
    token budgets are measured on its examples. None: the synthetic shapes."""

    c = copy.deepcopy(cfg)
    fam = c.model_family()
    tiny_name = f"tiny:{fam.name}"  # every family ships an offline tiny preset under this name
    c.name = f"{cfg.name}-smoke"
    if root is not None:
        c.storage = config_mod.StorageConfig(root=str(root))

    if data is not None:
        # ---- data: the job's own, on its local copy (every row in one split, trained and decoded)
        if root is None:
            raise ValueError("smoke(data=...) converts the data into the run's root: give root (a local folder)")
        c.data, notes = smoke_fixture.fixture_data(c.data, data, str(root))
        c.data = dataclasses.replace(c.data, max_seq_len=4096)  # measured below (token_budget)
        c.train = dataclasses.replace(c.train, splits=[smoke_fixture.FIXTURE_SPLIT])
        c.eval = dataclasses.replace(c.eval, split=smoke_fixture.FIXTURE_SPLIT)
    else:
        # ---- data: the synthetic shapes, a few dozen images
        plan = smoke_plan(list(c.data.tasks), c.model.spec)
        notes = plan.notes
        c.data = dataclasses.replace(
            c.data,
            source="synthetic",
            uri="",
            num_images=num_images,
            image_size=64,
            shapes_per_image=1,
            splits={"train": 0.8, "val": 0.1, "test": 0.1},
            tasks=plan.tasks,
            max_seq_len=4096,  # measured below (token_budget)
            rows_per_shard=num_images,
            prepare=config_mod.PrepareOptions(),
        )
    for note in notes:
        log.warning("smoke: %s", note)

    # ---- model: the tiny preset of the same family, float32 on CPU; freeze policy unchanged
    # (unfreeze_vision_layers larger than the tiny tower's 2 layers unfreezes all of them)
    c.model = dataclasses.replace(c.model, name_or_path=tiny_name, dtype="float32")
    processor = fam.load_processor(tiny_name)
    if c.model.task_head_queries:  # the head outputs one token per image token: the tiny preset's count
        c.model.task_head_queries = fam.image_tokens(processor)
    if data is not None:
        smoke_fixture.prepare_fixture(c)
    seq_len, answer_len = token_budget(c, processor)
    c.data.max_seq_len = seq_len + SEQ_MARGIN
    if c.quant.bits:
        c.quant = dataclasses.replace(c.quant, compute_dtype="float32")

    # ---- training: few steps, a learning rate that moves a tiny model, one log line per step
    t = c.train
    every_val = t.val_every > 0
    c.train = dataclasses.replace(
        t,
        steps=steps,
        epochs=0.0,  # a job that trains by epochs: smoke's fixed step count instead
        micro_batch_size=micro_batch,
        grad_accum=max(1, min(t.grad_accum, MAX_ACCUM)),
        lr=LR.get(t.strategy, 2e-3),
        warmup_steps=min(t.warmup_steps, 1),
        # a job's new-token warm-up (e.g. 156 steps) would take the whole short run: keep the phase, shortened
        new_token_warmup_steps=min(t.new_token_warmup_steps, steps // 4),
        checkpoint_every=steps,
        keep_checkpoints=1,
        log_every=1,
        val_every=steps if every_val else 0,  # one validation at the end exercises early stopping's path
        val_examples=min(t.val_examples, 8),
        early_stop_patience=min(t.early_stop_patience, 1),
        fail_at_step=-1,
    )

    # ---- scale: one CPU worker on the local machine
    c.scale = dataclasses.replace(
        c.scale, num_workers=1, cpus_per_worker=1.0, use_gpu=False, resources_per_worker={},
        placement_strategy="PACK", accelerator_type=None, max_failures=0,
    )

    # ---- eval: the job's decoding settings on a handful of examples, no baselines, one CPU predictor
    # (no GPU to wait for, no cluster-side CLIP folder)
    c.eval = dataclasses.replace(
        c.eval, split=smoke_fixture.FIXTURE_SPLIT if data is not None else "test", batch_size=8, num_actors=1, min_actors=0, max_actors=0, cpus_per_actor=1.0, gpus_per_actor=0.0,
        accelerator_type=None, clip_path="", baselines=False, checkpoint="", max_new_tokens=answer_len + SEQ_MARGIN,
    )
    c.ray = config_mod.RayConfig(address=None, num_cpus=None, object_store_mb=256)

    # ---- sweep: two short trials, one at a time
    if c.tune.space:
        sched = dataclasses.replace(c.tune.scheduler, max_t=min(c.tune.scheduler.max_t, steps),
                                    grace_period=min(c.tune.scheduler.grace_period, steps))
        c.tune = dataclasses.replace(c.tune, num_samples=min(c.tune.num_samples, 2), max_concurrent=1, scheduler=sched,
                                     search=dataclasses.replace(c.tune.search, n_startup_trials=1))
    return c


def token_budget(cfg: Experiment, processor, n_images: int = 8, seed: int = 11) -> tuple[int, int]:
    """(longest example, longest answer) in tokens over a few smoke examples of `cfg` (its tasks,
    preprocessing and family; on local data every example of its prepared rows), encoded exactly
    as training encodes them."""
    import numpy as np

    fam = cfg.model_family()
    if is_fixture(cfg):
        images, prefixes, suffixes, _ = _fixture_rows(smoke_fixture.fixture_examples(cfg, processor))
    else:
        images, prefixes, suffixes, _ = _synthetic_rows(cfg, fam, processor, n_images, seed)
    enc = fam.encode_train(processor, images, prefixes, suffixes, max_len=4096)
    answer = (np.asarray(enc["labels"]) != -100).sum(axis=1)
    return int(np.max(enc["length"])), int(np.max(answer))


def is_fixture(cfg: Experiment) -> bool:
    """True for a smoke run on local data (a converter source), False for the synthetic shapes."""
    return cfg.data.source != "synthetic"


def _fixture_rows(examples: dict) -> tuple[list, list, list, list]:
    """(images, prefixes, suffixes, number spans) of a columnar examples batch (pipeline layout)."""
    import json

    from raytrain import predict
    from raytrain.formats.numbers import NumberSpan

    numbers = [[NumberSpan(*n) for n in json.loads(str(js))] for js in examples["numbers"]]
    return predict.batch_images(examples), [str(p) for p in examples["prefix"]], [str(x) for x in examples["suffix"]], numbers


def _synthetic_rows(cfg: Experiment, fam, processor, n_rows: int, seed: int) -> tuple[list, list, list, list]:
    """(images as the model sees them, prefixes, suffixes, answer number spans) of at least `n_rows`
    synthetic examples, as the pipeline renders them."""
    import json

    from PIL import Image

    from raytrain.data import pipeline, preprocess, synthetic
    from raytrain.formats.numbers import NumberSpan

    prep = cfg.data.preprocess
    frame = preprocess.frame_for(fam, processor, prep)
    images, prefixes, suffixes, numbers = [], [], [], []
    i = 0
    while len(images) < n_rows:
        ex = synthetic.make_example(i, seed=seed, image_size=cfg.data.image_size)
        i += 1
        geom = preprocess.geometry_for(fam, prep, frame, ex["width"], ex["height"])
        image = Image.fromarray(preprocess.apply(prep, Image.open(io.BytesIO(ex["image"])), geom))
        for e in pipeline.examples_for(ex["objects"], cfg.data.tasks, ex["width"], ex["height"], fam,
                                       (geom.out_h, geom.out_w), geom):
            images.append(image)
            prefixes.append(e["prefix"])
            suffixes.append(e["suffix"])
            numbers.append([NumberSpan(*n) for n in json.loads(e["numbers"])])
    return images, prefixes, suffixes, numbers


# ----------------------------------------------------------------------------------------------
# Ray-free run: the recipe loop on synthetic batches


class SmokeUnavailable(RuntimeError):
    """The job cannot run in smoke mode in this checkout yet (the reason says what is missing)."""


def missing_support(cfg: Experiment) -> str | None:
    """Why the recipe cannot run `cfg` here (a strategy whose dependencies do not import), or None."""
    if cfg.train.strategy in config_mod.ZERO_STAGES:
        try:
            from raytrain.recipes import zero  # noqa: F401
        except ImportError as e:
            return f"strategy {cfg.train.strategy} needs raytrain.recipes.zero, which does not import here: {e}"
    return None


def synthetic_batches(cfg: Experiment, model_path: str, n_batches: int, seed: int = 11) -> list[dict]:
    """`n_batches` tokenized micro-batches of synthetic examples for `cfg.data.tasks`, encoded
    exactly as the Ray Data pipeline does (images preprocessed to the model input as data.preprocess
    says, targets in that frame, family encode_train)."""
    import numpy as np
    import torch


    fam = cfg.model_family()
    proc = fam.load_processor(model_path)
    micro = cfg.train.micro_batch_size
    images, prefixes, suffixes, numbers = _synthetic_rows(cfg, fam, proc, n_batches * micro, seed)
    out = []
    for s in range(0, n_batches * micro, micro):
        enc = fam.encode_train(proc, images[s : s + micro], prefixes[s : s + micro], suffixes[s : s + micro], cfg.data.max_seq_len,
                               numbers[s : s + micro])
        length = enc.pop("length")
        if (np.asarray(length) > cfg.data.max_seq_len).any():
            raise ValueError(f"smoke examples need {int(np.max(length))} tokens > data.max_seq_len={cfg.data.max_seq_len}")
        out.append({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in enc.items()})
    return out


def fixture_batches(cfg: Experiment, model_path: str) -> list[dict]:
    """Every example of the prepared local data, tokenized by the pipeline's own `tokenize` (the
    family's encode_train at data.max_seq_len; too-long examples are an error here, not a skip),
    in micro-batches of train.micro_batch_size (the last one may be short)."""
    from collections import Counter

    from raytrain.data import pipeline
    from raytrain.training.session import collate

    fam = cfg.model_family()
    examples = smoke_fixture.fixture_examples(cfg, fam.load_processor(model_path))
    counts: Counter = Counter()
    enc = pipeline.tokenize(examples, split=smoke_fixture.FIXTURE_SPLIT, model_path=model_path, max_len=cfg.data.max_seq_len,
                            family=fam, counts=counts)
    if counts.get("dropped:too_long"):
        raise ValueError(f"{counts['dropped:too_long']} smoke examples exceed data.max_seq_len={cfg.data.max_seq_len}")
    micro = cfg.train.micro_batch_size
    n = len(enc["input_ids"])
    return [collate({k: v[s:s + micro] for k, v in enc.items()}) for s in range(0, n, micro)]


@dataclass
class LocalResult:
    losses: list[float]
    """Training loss per logged step (smoke logs every step)."""
    checkpoints: list[Path]
    """Copies of every checkpoint the recipe reported, oldest first."""
    generated: list[str]
    """Text generated from the last checkpoint with the job's eval.decoding settings."""
    model_path: str
    examples: dict | None = None
    """Local data: the decoded examples (columnar, pipeline layout: task, query, prefix, suffix, ...)."""
    predictions: list = field(default_factory=list)
    """Local data: the predict path's reading of each generated answer (`predict.Prediction`)."""
    scores: dict | None = None
    """Local data: `predict.score_rows` of the decoded examples (the evaluation's per-example rows)."""


def run_local(cfg: Experiment, out_dir: str | Path, *, model_path: str | None = None, n_batches: int = 8,
              preset_cache: str | None = None, eval_examples: int = 2) -> LocalResult:
    """Run an (already shrunk) experiment through its recipe without Ray, on CPU: the loop over
    `n_batches` synthetic micro-batches per epoch (local data: every example of its prepared rows),
    checkpoints copied to `out_dir`, then one generation of `eval_examples` examples from the last
    checkpoint with the job's decoding settings, read back by the predict path.
    Raises SmokeUnavailable when this checkout cannot run the job's recipe yet."""
    import torch

    from raytrain.training import checkpointing
    from raytrain.training.session import Session

    reason = missing_support(cfg)
    if reason:
        raise SmokeUnavailable(reason)
    fam = cfg.model_family()
    model_path = model_path or fam.resolve(cfg.model.name_or_path, preset_cache)
    batches = fixture_batches(cfg, model_path) if is_fixture(cfg) else synthetic_batches(cfg, model_path, n_batches)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    losses: list[float] = []
    saved: list[Path] = []

    def report(metrics: dict, ckpt_dir: str | None) -> None:
        losses.append(float(metrics["loss"]))
        if ckpt_dir:  # the recipe deletes its temporary directory after report returns
            keep = out / f"checkpoint_{int(metrics['step']):06d}"
            shutil.copytree(ckpt_dir, keep, dirs_exist_ok=True)
            saved.append(keep)

    session = Session(rank=0, world_size=1, checkpoint_dir=lambda: None, report=report, epoch_batches=lambda epoch, micro: batches)
    device = torch.device("cpu")
    if cfg.train.strategy in config_mod.ZERO_STAGES:
        from raytrain.recipes import zero

        zero.train(cfg, model_path, session, device)
    else:
        from raytrain.recipes import ddp

        ddp.train(cfg, model_path, session, device, wrap_ddp=lambda m: m)

    res = LocalResult(losses, saved, [], model_path)
    if saved and (saved[-1] / "state.json").exists() and ((saved[-1] / "adapter").exists() or (saved[-1] / "model").exists()):
        if is_fixture(cfg):
            _evaluate_fixture(cfg, saved[-1], model_path, fam, checkpointing, eval_examples, res)
        else:
            res.generated = _generate(cfg, saved[-1], model_path, fam, checkpointing)
    return res


def _evaluate_fixture(cfg: Experiment, ckpt: Path, model_path: str, fam, checkpointing, n: int, res: LocalResult) -> None:
    """The first `n` examples of the evaluated split through the predict path (decode with the
    job's settings, parse with the family's parser for the task, map to source pixels) and scored
    as the evaluation scores them; fills res.examples / generated / predictions / scores."""
    from raytrain import predict
    from raytrain.data import preprocess
    from raytrain.launch import eval as eval_launch  # the decoding options `raytrain eval` builds

    model, proc = checkpointing.load_for_inference(ckpt, model_path, fam)
    # as `raytrain eval` does: the checkpoint's recorded preprocessing
    prep = preprocess.resolve_recorded(checkpointing.recorded_preprocess(ckpt), cfg.data.preprocess, str(ckpt))
    examples = smoke_fixture.fixture_examples(cfg, proc, cfg.eval.split, prep=prep)
    res.examples = examples
    batch = {k: v[:n] for k, v in examples.items()}
    res.predictions = predict.predict(model, proc, fam, predict.batch_images(batch), [str(t) for t in batch["task"]],
                                      [str(q) for q in batch["query"]], [str(p) for p in batch["prefix"]],
                                      predict.batch_geometries(batch), eval_launch.decode_options(cfg))
    res.generated = [p.text for p in res.predictions]
    res.scores = predict.score_rows(batch, res.predictions)


def _generate(cfg: Experiment, ckpt: Path, model_path: str, fam, checkpointing) -> list[str]:
    """Two test-split examples through the predict path with the job's eval decoding settings:
    checks that the checkpoint reloads for inference, that the settings are valid generate()
    kwargs, and that constrained decoding / confidences run for the job's family and format."""
    from PIL import Image

    from raytrain import predict
    from raytrain.data import pipeline, preprocess, synthetic
    from raytrain.launch import eval as eval_launch  # the decoding options `raytrain eval` builds

    model, proc = checkpointing.load_for_inference(ckpt, model_path, fam)
    # as `raytrain eval` does: the checkpoint's recorded preprocessing
    prep = preprocess.resolve_recorded(checkpointing.recorded_preprocess(ckpt), cfg.data.preprocess, str(ckpt))
    frame = preprocess.frame_for(fam, proc, prep)
    images, tasks, queries, prefixes, geoms = [], [], [], [], []
    for i in range(2):
        ex = synthetic.make_example(10_000 + i, seed=11, image_size=cfg.data.image_size)
        geom = preprocess.geometry_for(fam, prep, frame, ex["width"], ex["height"])
        e = pipeline.examples_for(ex["objects"], cfg.data.tasks, ex["width"], ex["height"], fam, (geom.out_h, geom.out_w),
                                  geom)[0]
        images.append(Image.fromarray(preprocess.apply(prep, Image.open(io.BytesIO(ex["image"])), geom)))
        tasks.append(e["task"])
        queries.append(e["query"])
        prefixes.append(e["prefix"])
        geoms.append(geom)
    return [p.text for p in predict.predict(model, proc, fam, images, tasks, queries, prefixes, geoms, eval_launch.decode_options(cfg))]


# ----------------------------------------------------------------------------------------------
# CLI


def load_job(path: str | Path, overrides: list[str] | None = None) -> Experiment:
    """A job YAML as an Experiment (its `tune` section kept: smoke shrinks it)."""
    return config_mod.load(path, overrides)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raytrain.launch.smoke", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", "-c", required=True, help="job YAML (jobs/...)")
    ap.add_argument("--ray", action="store_true", help="run the shrunk job through `raytrain train` (Ray) instead of the Ray-free loop")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--root", default=None, help="storage root for the smoke run (default: a temporary directory)")
    ap.add_argument("--data", default=None, metavar="PATH",
                    help="a local copy of the job's source in its own format (file or folder, e.g. tests/assets/seed004_fracture_jsonl): "
                         "the job's converter, prompts and answer format run on it instead of synthetic shapes (Ray-free run only)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides applied to the job before shrinking")
    args = ap.parse_args(argv)
    if args.data and args.ray:
        ap.error("--data runs Ray-free only: its one split is trained on and decoded, which `raytrain train` does not allow")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with contextlib.ExitStack() as stack:
        root = args.root or stack.enter_context(tempfile.TemporaryDirectory(prefix="raytrain-smoke-"))
        cfg = smoke(load_job(args.config, args.overrides), steps=args.steps, root=root, data=args.data)
        if args.ray:
            from raytrain.launch import train as launch_train

            launch_train.main(cfg)
            return 0
        try:
            res = run_local(cfg, Path(root) / "local")
        except SmokeUnavailable as e:
            print(f"smoke: not runnable here yet: {e}", file=sys.stderr)
            return 3
        print(f"losses: {[round(x, 4) for x in res.losses]}")
        print(f"checkpoints: {[str(p) for p in res.checkpoints]}")
        print(f"generated: {res.generated}")
        for p in res.predictions:
            print(f"parsed: {len(p.objects)} objects, {len(p.errors)} parse errors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
