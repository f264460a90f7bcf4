"""DeepSpeed ZeRO-2/3 recipe (recipes/zero.py) on real DeepSpeed over gloo, 2 CPU ranks.

- Ray: TorchTrainer + Ray Data, 2 workers. ZeRO-3 (fp32) and ZeRO-2 (bf16) train (loss goes down);
  every rank reports its own checkpoint directory and Ray Train merges them into one checkpoint
  whose shards sum to ONE copy of the trainable state (fp32 master + 2 Adam moments = 12 bytes
  per parameter), not one per rank; the merged checkpoint consolidates into a model that
  `from_pretrained` loads; a ZeRO-3 checkpoint written by 2 workers resumes on 1 worker
  (universal checkpoint conversion, optimizer state kept).
- Ray-free: exact resume needs a deterministic batch order, which Ray Data's streaming split does
  not give. So `zero.train` runs in 2 plain processes (this file as a script, torch.distributed
  gloo over 127.0.0.1) with a seeded per-epoch permutation split by rank: an fp32 ZeRO-3 run
  interrupted mid-epoch and resumed gives the same per-step losses as an uninterrupted one, and
  consolidation equals the engine's gathered weights bit for bit.

DeepSpeed's CPU accelerator JIT-compiles its shm comm op on first use; `deepspeed_op` builds it
once into torch's extension cache ($TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

TINY_PARAMS = 596544  # tiny PaliGemma preset, every parameter trainable (model.freeze_vision=false)
BYTES_PER_PARAM = 3 * 4  # fp32 master weights + Adam exp_avg + exp_avg_sq

RAY_COMMON = [
    "data.num_images=120",
    "train.micro_batch_size=8",
    "train.warmup_steps=4",
    "train.lr=3e-3",
    "train.log_every=2",
    "model.freeze_vision=false",
    "scale.num_workers=2",
    "scale.cpus_per_worker=0.5",
    "scale.max_failures=0",
]


@pytest.fixture(scope="module")
def deepspeed_op():
    """Build (first time on this machine) or load DeepSpeed's CPU comm op; returns seconds taken."""
    from deepspeed.accelerator import get_accelerator

    t = time.perf_counter()
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        builder.load(verbose=False)
    seconds = time.perf_counter() - t
    print(f"\ndeepspeed shm comm op ready in {seconds:.1f} s (TORCH_EXTENSIONS_DIR={os.environ.get('TORCH_EXTENSIONS_DIR', 'default')})")
    return seconds


# ----------------------------------------------------------------------------------------------
# DeepSpeed config from raytrain's config (no engine)


def test_ds_config_follows_the_experiment():
    from raytrain import config as config_mod
    from raytrain.recipes import zero

    cfg = config_mod.load(None, ["train.strategy=zero3", "model.dtype=bfloat16", "train.micro_batch_size=4", "train.grad_accum=3",
                                 "train.max_grad_norm=0.5", "zero.offload_optimizer=true", "zero.offload_param=true"])
    conf = zero.ds_config(cfg, load_universal=True)
    assert conf["zero_optimization"]["stage"] == 3 and conf["bf16"] == {"enabled": True}
    assert (conf["train_micro_batch_size_per_gpu"], conf["gradient_accumulation_steps"], conf["gradient_clipping"]) == (4, 3, 0.5)
    assert conf["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and conf["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert conf["checkpoint"] == {"load_universal": True}
    cfg2 = config_mod.load(None, ["train.strategy=zero2"])
    conf2 = zero.ds_config(cfg2)
    assert conf2["zero_optimization"] == {"stage": 2} and conf2["bf16"] == {"enabled": False} and "checkpoint" not in conf2
    assert zero.ds_config(config_mod.load(None, ["train.strategy=zero2", "zero.offload_optimizer=true"]))["zero_optimization"]["offload_optimizer"]
    # the offload switches are checked where they are written: the config
    with pytest.raises(ValueError, match="offload_param needs train.strategy=zero3"):
        config_mod.load(None, ["train.strategy=zero2", "zero.offload_param=true"])
    with pytest.raises(ValueError, match="are DeepSpeed options"):
        config_mod.load(None, ["train.strategy=full", "zero.offload_optimizer=true"])
    with pytest.raises(ValueError, match="unknown config key"):
        config_mod.load(None, ["train.strategy=zero3", "zero.offload=true"])


# ----------------------------------------------------------------------------------------------
# Ray helpers (launch/trainer.py's TorchTrainer, as launch/train.fit builds it)


def _cfg(root: Path, name: str, model: str, *extra: str):
    from raytrain import config as config_mod

    return config_mod.load("jobs/tiny/shapes.yaml", [f"storage.root={root}", f"name={name}", f"model.name_or_path={model}", *RAY_COMMON, *extra])


@pytest.fixture(scope="module")
def shapes_ds(tmp_path_factory, ray_cluster, tiny_model_path):
    """The tokenized synthetic train split, materialized once for every Ray run of this module."""
    from raytrain.data import pipeline, shards
    from raytrain.models import family

    uri = str(tmp_path_factory.mktemp("zero-data"))
    cfg = _cfg(Path(uri), "data", tiny_model_path)
    shards.prepare_synthetic(uri, n=cfg.data.num_images, seed=cfg.data.seed, image_size=cfg.data.image_size, splits=cfg.data.splits)
    fam = family(cfg.model.family)
    return pipeline.train_dataset(
        uri, "train", tasks=cfg.data.tasks, model_path=tiny_model_path, image_hw=fam.image_size(fam.load_processor(tiny_model_path)),
        family=cfg.model.family, max_len=cfg.data.max_seq_len,
    ).materialize()


def _fit(cfg, base_path: str, train_ds, *, data_uri: str = ""):
    """launch/train.fit's trainer (launch/trainer.py picks the ZeRO recipe from train.strategy)
    on the module's dataset; returns (Result, history rows)."""
    from raytrain.launch import job, trainer
    from raytrain.training.metrics import HistoryCallback, read_history

    result = trainer.build_trainer(cfg, model_path=base_path, data_uri=data_uri, datasets={"train": train_ds}, name=cfg.name,
                                   runs_root=job.runs_root(cfg), callbacks=[HistoryCallback(job.history_uri(cfg))]).fit()
    assert result.error is None, result.error
    return result, read_history(job.history_uri(cfg))


def _shard_bytes(ckpt: Path) -> dict[str, int]:
    from raytrain.training import zero_checkpoint

    return zero_checkpoint.shard_files(ckpt)


def _assert_learns(rows: list[dict]) -> None:
    losses = [r["loss"] for r in rows]
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(math.isfinite(v) for v in losses), losses


# ----------------------------------------------------------------------------------------------
# Ray tests


def test_zero3_on_ray_trains_consolidates_and_resumes_on_one_worker(tmp_path, shapes_ds, tiny_model_path, deepspeed_op):
    from transformers import PaliGemmaForConditionalGeneration

    from raytrain.launch import consolidate
    from raytrain.training import optim, zero_checkpoint

    t0 = time.perf_counter()
    cfg = _cfg(tmp_path, "zero3", tiny_model_path, "train.strategy=zero3", "train.steps=20", "train.checkpoint_every=10")
    result, rows = _fit(cfg, tiny_model_path, shapes_ds)
    t_train = time.perf_counter() - t0
    _assert_learns(rows)
    assert rows[-1]["step"] == 20 and rows[-1]["trainable_params"] == TINY_PARAMS

    # one merged checkpoint: both ranks' shards side by side, rank 0's state.json
    ckpt = Path(result.checkpoint.path)
    state = zero_checkpoint.read_state(ckpt)
    assert (state["step"], state["zero_stage"], state["world_size"], state["strategy"]) == (20, 3, 2, "zero3")
    files = _shard_bytes(ckpt)
    optim_files = sorted(f for f in files if f.endswith("optim_states.pt"))
    assert [Path(f).name for f in optim_files] == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    assert (ckpt / "rng" / "rank_00000.pt").exists() and (ckpt / "rng" / "rank_00001.pt").exists()
    total = sum(files.values())
    one_copy = BYTES_PER_PARAM * TINY_PARAMS
    print(f"\nZeRO-3 fp32, 2 ranks: shards {total} B = {total / one_copy:.3f} x (12 B x {TINY_PARAMS} params); per rank {[files[f] for f in optim_files]}")
    assert 0.75 * one_copy <= total <= 1.25 * one_copy, files  # one copy in all, not one per rank
    for f in optim_files:
        assert abs(files[f] - one_copy / 2) <= 0.1 * one_copy  # each rank holds half

    # consolidation -> a plain HF directory, loadable, equal to the gathered shards, trained
    out = consolidate.consolidate(str(ckpt), str(tmp_path / "hf"), tiny_model_path)
    model = PaliGemmaForConditionalGeneration.from_pretrained(out)
    fp32 = zero_checkpoint.fp32_state_dict(ckpt)
    sd = model.state_dict()
    assert set(fp32) == set(sd)
    for k, v in fp32.items():
        assert torch.equal(sd[k], v), k
    base = PaliGemmaForConditionalGeneration.from_pretrained(tiny_model_path).state_dict()
    assert not torch.equal(base["model.language_model.layers.0.mlp.up_proj.weight"], sd["model.language_model.layers.0.mlp.up_proj.weight"])
    assert list((Path(out)).glob("*.safetensors")) and (Path(out) / "tokenizer.json").exists()

    # rerun of the same run on 1 worker: Ray Train restores the 2-rank checkpoint, the recipe
    # converts it to DeepSpeed's universal format and continues (not restarts)
    t1 = time.perf_counter()
    cfg1 = _cfg(tmp_path, "zero3", tiny_model_path, "train.strategy=zero3", "train.steps=24", "train.checkpoint_every=12",
                "scale.num_workers=1")
    result1, history = _fit(cfg1, tiny_model_path, shapes_ds)
    rows1 = history[len(rows):]
    t_resume = time.perf_counter() - t1
    assert rows1[0]["resumed_from"] == 20 and rows1[0]["step"] > 20 and rows1[-1]["step"] == 24
    # the lr schedule continues at the restored step (scheduler state came through the conversion);
    # as in recipes/ddp.py, a report's lr is the scheduler's after that step: lr_lambda(step)
    for r in rows1:
        assert r["lr"] == pytest.approx(cfg1.train.lr * optim.lr_lambda(r["step"], warmup=cfg1.train.warmup_steps, total=24), rel=1e-6)
    assert rows1[0]["loss"] < 0.8 * rows[0]["loss"]  # trained weights came back
    state1 = zero_checkpoint.read_state(Path(result1.checkpoint.path))
    assert (state1["step"], state1["world_size"]) == (24, 1)
    assert not zero_checkpoint.universal_root(ckpt, "global_step20").exists()  # the converted copy was removed
    print(f"losses 2 workers: {[round(r['loss'], 3) for r in rows]}\nresumed on 1: {[round(r['loss'], 3) for r in rows1]}\n"
          f"times: train {t_train:.0f} s, resume {t_resume:.0f} s")


def test_zero2_bf16_on_ray_trains_with_one_copy_of_state(tmp_path, shapes_ds, tiny_model_path, deepspeed_op):
    from raytrain.training import zero_checkpoint

    cfg = _cfg(tmp_path, "zero2", tiny_model_path, "train.strategy=zero2", "model.dtype=bfloat16", "train.steps=20", "train.checkpoint_every=20")
    result, rows = _fit(cfg, tiny_model_path, shapes_ds)
    _assert_learns(rows)
    ckpt = Path(result.checkpoint.path)
    files = _shard_bytes(ckpt)
    optim_bytes = sum(v for f, v in files.items() if f.endswith("optim_states.pt"))
    module_bytes = files[f"zero/{zero_checkpoint.read_state(ckpt)['tag']}/mp_rank_00_model_states.pt"]
    one_copy = BYTES_PER_PARAM * TINY_PARAMS
    print(f"\nZeRO-2 bf16, 2 ranks: optimizer shards {optim_bytes} B = {optim_bytes / one_copy:.3f} x 12 B/param; "
          f"bf16 module (rank 0 only) {module_bytes} B = {module_bytes / TINY_PARAMS:.2f} B/param; total {sum(files.values()) / one_copy:.3f} x")
    assert 0.9 * one_copy <= optim_bytes <= 1.1 * one_copy  # fp32 master + moments, split across ranks
    assert 0.9 * 2 * TINY_PARAMS <= module_bytes <= 1.1 * 2 * TINY_PARAMS  # ZeRO-2 keeps one bf16 module copy
    assert 0.75 * one_copy <= sum(files.values()) <= 1.25 * one_copy


# ----------------------------------------------------------------------------------------------
# Ray-free: exact resume (deterministic data), engine weights == consolidated weights


def _batches(model_path: str, n: int = 48) -> dict[str, torch.Tensor]:
    from PIL import Image

    from raytrain.data import pipeline, synthetic
    from raytrain.models import paligemma

    proc = paligemma.load_processor(model_path)
    items = []
    for i in range(n):
        ex = synthetic.make_example(i, seed=5, image_size=64)
        (e,) = pipeline.examples_for(ex["objects"], ["detect"], 64, 64, "paligemma")
        items.append((Image.open(io.BytesIO(ex["image"])).convert("RGB"), e["prefix"], e["suffix"]))
    enc = paligemma.encode_train(proc, [x[0] for x in items], [x[1] for x in items], [x[2] for x in items], 48)
    enc.pop("length")
    return {k: torch.from_numpy(v) for k, v in enc.items()}


def _worker_main(rank: int, world: int, port: int, args: dict) -> None:
    """One rank of a plain torch.distributed job (what torchrun would start)."""
    import datetime

    import torch.distributed as dist

    from raytrain import config as config_mod
    from raytrain.recipes import zero
    from raytrain.training.session import Session, broadcast_flag

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=180))
    cfg = config_mod.load(None, args["overrides"])
    data = torch.load(args["data"], weights_only=True)
    n = data["input_ids"].shape[0]

    def epoch_batches(epoch: int, micro: int):
        # seeded permutation per epoch, split by rank: the same order in every run
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(1000 + epoch))[rank::world]
        for i in range(0, len(perm) - micro + 1, micro):
            yield {k: v[perm[i : i + micro]] for k, v in data.items()}

    rows = []

    class Stop(Exception):
        pass

    def report(metrics: dict, ckpt_dir: str | None) -> None:
        rows.append(metrics)
        if ckpt_dir:  # what Ray Train does with each rank's directory: copy into one folder
            shutil.copytree(ckpt_dir, Path(args["store"]) / f"step_{metrics['step']:05d}", dirs_exist_ok=True)
        dist.barrier()
        if args.get("stop_after") and metrics["step"] >= args["stop_after"]:
            raise Stop()  # the "crash", on every rank: nothing after this step runs

    resume, val = args.get("resume"), args.get("val")

    def val_examples():  # what training/session.py's Ray glue loads: the fixed subset, on each rank that asks
        from raytrain.training import validation

        return validation.load_examples(val["uri"], "val", val["n"], tasks=["point"], image_hw=(64, 64), family="paligemma")

    session = Session(rank=rank, world_size=world, report=report, epoch_batches=epoch_batches,
                      checkpoint_dir=lambda: contextlib.nullcontext(resume) if resume else None,
                      val_examples=val_examples if val else None, broadcast_flag=broadcast_flag)
    with contextlib.suppress(Stop):
        out = zero.train(cfg, args["model_path"], session, torch.device("cpu"))
        if args.get("result"):
            Path(args["result"] + f".{rank}").write_text(json.dumps({k: v for k, v in out.items() if k != "engine"}))
        if args.get("gathered"):
            sd = zero.gathered_state_dict(out["engine"])  # collective
            if rank == 0:
                torch.save(sd, args["gathered"])
    if rank == 0:
        Path(args["rows"]).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def _run_ranks(world: int, args: dict, timeout: int = 600, rows: list | None = None) -> dict[int, float]:
    """Start `world` processes of this file; returns {step: loss} of rank 0 (`rows`: its whole reports)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen([sys.executable, __file__, str(r), str(world), str(port), json.dumps(args)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-4000:]
    reports = json.loads(Path(args["rows"]).read_text())
    if rows is not None:
        rows.extend(reports)
    return {r["step"]: r["loss"] for r in reports}


def test_exact_resume_and_consolidation_equal_engine_weights(tmp_path, tiny_model_path, deepspeed_op):
    from raytrain.launch import consolidate
    from raytrain.training import zero_checkpoint

    torch.save(_batches(tiny_model_path), tmp_path / "data.pt")  # 48 examples: 6 micro-batches of 4 per rank per epoch
    overrides = ["train.strategy=zero3", "train.steps=8", "train.micro_batch_size=4", "train.grad_accum=2", "train.warmup_steps=3",
                 "train.log_every=1", "train.checkpoint_every=4", "train.lr=3e-3", "model.freeze_vision=false"]
    common = {"overrides": overrides, "model_path": tiny_model_path, "data": str(tmp_path / "data.pt")}

    full = _run_ranks(2, {**common, "store": str(tmp_path / "full"), "rows": str(tmp_path / "full.json"), "gathered": str(tmp_path / "gathered.pt")})
    assert sorted(full) == list(range(1, 9))
    # stopped at step 5: the latest checkpoint is step 4, batch 2 of 6 in epoch 1 (3 steps per epoch)
    first = _run_ranks(2, {**common, "store": str(tmp_path / "first"), "rows": str(tmp_path / "first.json"), "stop_after": 5})
    assert max(first) == 5
    ckpt = tmp_path / "first" / "step_00004"
    state = zero_checkpoint.read_state(ckpt)
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 2)  # mid-epoch
    resumed = _run_ranks(2, {**common, "store": str(tmp_path / "resumed"), "rows": str(tmp_path / "resumed.json"), "resume": str(ckpt)})
    assert sorted(resumed) == list(range(5, 9))
    print(f"\nuninterrupted: {[round(full[s], 6) for s in sorted(full)]}\nresumed:       {[round(resumed[s], 6) for s in sorted(resumed)]}")
    for step in range(5, 9):
        assert abs(resumed[step] - full[step]) <= 1e-6, (step, resumed[step], full[step])
    for step in range(1, 6):
        assert abs(first[step] - full[step]) <= 1e-6

    # consolidation of the final checkpoint == the engine's gathered weights, tensor by tensor
    # (through the CLI entry point, as `raytrain consolidate` runs it)
    assert consolidate.main([str(tmp_path / "full" / "step_00008"), str(tmp_path / "hf"), "--base-model", tiny_model_path]) == 0
    from transformers import PaliGemmaForConditionalGeneration

    loaded = PaliGemmaForConditionalGeneration.from_pretrained(tmp_path / "hf").state_dict()
    gathered = torch.load(tmp_path / "gathered.pt", weights_only=True)
    assert set(loaded) == set(gathered)
    for k, v in gathered.items():
        assert torch.equal(loaded[k], v), k



@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_zero_validates_in_training_and_stops_early(strategy, tmp_path, tiny_model_path, deepspeed_op):
    """train.val_every / train.early_stop_metric under ZeRO, 2 ranks: rank 0 scores the fixed val
    subset (ZeRO-3: every rank decodes it in step, each forward being a collective), decides, and
    both ranks stop together. lr 0 cannot improve the metric: with patience 1 the run stops at the
    second validation (step 8 of 16), which writes a checkpoint; patience 10 runs to the end."""
    from raytrain.data import shards
    from raytrain.training import zero_checkpoint

    uri = str(tmp_path / "data")
    shards.prepare_synthetic(uri, n=60, seed=4, splits={"train": 0.5, "val": 0.5})
    torch.save(_batches(tiny_model_path, n=32), tmp_path / "data.pt")  # 4 micro-batches of 4 per rank per epoch
    base = [f"train.strategy={strategy}", "train.steps=16", "train.micro_batch_size=4", "train.warmup_steps=0", "train.log_every=4",
            "train.checkpoint_every=100", "train.lr=0.0", "model.freeze_vision=false", "train.val_every=4", "train.val_examples=6",
            "train.early_stop_metric=val_norm_distance_all"]
    common = {"model_path": tiny_model_path, "data": str(tmp_path / "data.pt"), "val": {"uri": uri, "n": 6}}

    rows: list[dict] = []
    _run_ranks(2, {**common, "overrides": [*base, "train.early_stop_patience=1"], "store": str(tmp_path / "stop"),
                   "rows": str(tmp_path / "stop.json"), "result": str(tmp_path / "stop_result")}, rows=rows)
    vals = [r for r in rows if "val_norm_distance_all" in r]
    assert [r["step"] for r in vals] == [4, 8]
    assert all(r["val_n"] == 6 and 0.0 <= r["val_norm_distance_all"] <= 1.0 for r in vals)
    assert [r["early_stopped"] for r in vals] == [0, 1] and vals[-1]["early_stop_best"] == vals[0]["val_norm_distance_all"]
    assert rows[-1]["step"] == 8
    for rank in (0, 1):  # rank 0's decision reached rank 1
        out = json.loads((tmp_path / f"stop_result.{rank}").read_text())
        assert (out["step"], out["early_stopped"]) == (8, True), (rank, out)
    # validations that can stop the run write a checkpoint (checkpoint_every is 100)
    assert sorted(p.name for p in (tmp_path / "stop").iterdir()) == ["step_00004", "step_00008"]
    assert zero_checkpoint.read_state(tmp_path / "stop" / "step_00008")["metrics"]["early_stopped"] == 1

    rows = []
    _run_ranks(2, {**common, "overrides": [*base, "train.early_stop_patience=10"], "store": str(tmp_path / "full"),
                   "rows": str(tmp_path / "full.json")}, rows=rows)
    vals = [r for r in rows if "val_norm_distance_all" in r]
    assert [r["step"] for r in vals] == [4, 8, 12, 16] and not any(r["early_stopped"] for r in vals)


def test_zero_recipe_trains_the_configured_objective(tmp_path, tiny_model_path, deepspeed_op):
    """Every loss.* option reaches the ZeRO recipe: its first-step loss (same weights, same first
    micro-batch, before any update) equals the DDP recipe's with the same options, and those options
    change the loss (they are not silently dropped, as they were before the recipes shared one loss)."""
    from raytrain import config as config_mod
    from raytrain.recipes import ddp
    from raytrain.training.session import Session

    torch.set_num_threads(1)
    torch.save(_batches(tiny_model_path), tmp_path / "data.pt")
    data = torch.load(tmp_path / "data.pt", weights_only=True)
    base = ["train.steps=1", "train.micro_batch_size=4", "train.warmup_steps=0", "train.log_every=1",
            "train.checkpoint_every=100", "model.freeze_vision=false"]
    objective = ["loss.focal_gamma=2.0", "loss.box_iou_weight=0.5", "loss.class_weights={red circle: 3.0, blue square: 0.5}"]

    def ddp_first_loss(overrides):
        cfg = config_mod.load(None, ["train.strategy=full", *base, *overrides])
        rows = []
        perm = torch.randperm(data["input_ids"].shape[0], generator=torch.Generator().manual_seed(1000))  # _worker_main's epoch-0 order

        def epoch_batches(epoch, micro):
            for i in range(0, len(perm) - micro + 1, micro):
                yield {k: v[perm[i : i + micro]] for k, v in data.items()}

        session = Session(rank=0, world_size=1, checkpoint_dir=lambda: None, report=lambda m, d: rows.append(m),
                          epoch_batches=epoch_batches)
        ddp.train(cfg, tiny_model_path, session, torch.device("cpu"), wrap_ddp=lambda m: m)
        return rows[0]["loss"]

    plain, weighted = ddp_first_loss([]), ddp_first_loss(objective)
    assert abs(weighted - plain) > 1e-3, (plain, weighted)  # the options matter on this batch
    zero = _run_ranks(1, {"overrides": ["train.strategy=zero3", *base, *objective], "model_path": tiny_model_path,
                          "data": str(tmp_path / "data.pt"), "store": str(tmp_path / "store"), "rows": str(tmp_path / "rows.json")})
    assert abs(zero[1] - weighted) <= 1e-4, (zero[1], weighted, plain)


if __name__ == "__main__":
    _worker_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]))
