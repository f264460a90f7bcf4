#!/usr/bin/env python
"""GPU training throughput of raytrain's recipe vs a Hugging Face `Trainer` baseline, per strategy:
LoRA bf16, QLoRA 4-bit (nf4, double quant, bf16 compute), full fine-tuning bf16, on a random-weight
model of the real architecture (`raytrain.models.presets.random_model`, default paligemma2-3b-224).

    torchrun --standalone --nproc_per_node=1 bench/gpu_throughput.py                 # H100/H200, ~5-10 min
    torchrun --standalone --nproc_per_node=1 bench/gpu_throughput.py --smoke         # CPU, tiny preset, ~1-2 min

Per strategy and side: tokens/s (every attended token, image tokens included), samples/s, MFU and
peak GPU memory (torch.cuda.max_memory_allocated, per rank). Steady state: --warmup optimizer
steps are excluded, --steps are timed (CUDA-synchronised).

  raytrain  the recipe's model setup (training.model.build_model: freeze policy, peft LoRA on the
            language model's q/k/v/o/gate/up/down, QLoRA through bitsandbytes at load) and its
            loop body (padding trim, forward, models.losses.suffix_loss with the <loc> soft target,
            backward / grad-accum, clip, AdamW from training.optim), DDP when WORLD_SIZE > 1.
  hf        transformers.Trainer following seed report 000: per-device batch 4, grad accum 4,
            paged_adamw_8bit, lr 1e-4, bf16, LoRA r=8 alpha=8 on the same seven projections,
            the model's own cross-entropy (`labels=`); full fine-tuning uses the same Trainer
            settings without peft.

Both sides get the same synthetic batches: image tokens + a short prompt + a suffix of 4 <loc>
tokens, a label word and <eos> (labels only on the suffix), random pixels. Weights are random, so
losses mean nothing; only speed and memory are measured.

MFU = achieved model FLOP/s / peak bf16 FLOP/s of the GPU (--peak-tflops, default by device name:
H100/H200 989). Model FLOPs per token: 6N for full fine-tuning (forward 2N, backward 4N); 4N for
LoRA/QLoRA (forward 2N + backward activation gradients 2N; frozen weights get no weight
gradients); N = parameters in the decoder and vision tower (embeddings excluded), attention's
sequence-length term ignored (seq ~280 here). Reported per rank.

The last line printed is the headline: raytrain / hf tokens/s per strategy.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # first: it sets Ray's loopback env vars before anything imports ray

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


# ---------------------------------------------------------------------------------------------
# distributed setup (plain torchrun; also runs as a single plain process)


def dist_setup():
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, device


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# the model checkpoint both sides load (random weights, real architecture)


def save_random_checkpoint(preset: str, out: Path, smoke: bool, rank: int, world: int) -> tuple[str, dict]:
    """Rank 0 writes the random model with save_pretrained (bf16), so both sides and QLoRA load it
    through from_pretrained like a hub checkpoint; returns (path, facts)."""
    import torch.distributed as dist

    from raytrain.models import presets

    path = out / "model"
    if smoke:
        # the offline tiny preset already is a saved checkpoint (with its processor)
        path = Path(C.tiny_model_path())
    elif rank == 0 and not (path / "config.json").exists():
        model = presets.random_model(preset, dtype="bfloat16", device="cpu")
        model.save_pretrained(path, safe_serialization=True)
        del model
        gc.collect()
        save_stand_in_processor(path, presets.get(preset).image_size)
    if world > 1:
        dist.barrier()
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    text = cfg.text_config
    vision = cfg.vision_config
    image_tokens = (vision.image_size // vision.patch_size) ** 2
    return str(path), {"image_token_id": cfg.image_token_id, "vocab": text.vocab_size, "image_size": vision.image_size,
                       "image_tokens": image_tokens}


def save_stand_in_processor(path: Path, image_size: int) -> None:
    """training.model.build_model loads a processor next to the weights. Offline there is no real
    PaliGemma tokenizer, so the tiny preset's tokenizer stands in (only the batches' token ids
    matter here, and they are synthetic) with a SigLIP image processor of the preset's size."""
    from transformers import AutoTokenizer, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import (
        SiglipImageProcessorPil,
    )

    tok = AutoTokenizer.from_pretrained(C.tiny_model_path())
    ip = SiglipImageProcessorPil(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    ip.image_seq_length = (image_size // 14) ** 2
    PaliGemmaProcessor(image_processor=ip, tokenizer=tok).save_pretrained(path)


def count_matmul_params(model) -> int:
    """Parameters that do matmul work per token: everything but the embedding tables."""
    n = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name or "position_embedding" in name:
            continue
        n += p.numel() * (2 if getattr(p, "quant_type", None) else 1)  # bnb 4-bit packs 2 values per byte
    return n


# ---------------------------------------------------------------------------------------------
# synthetic batches, the same for both sides


def make_batches(facts: dict, micro: int, n: int, loc_ids, seed: int = 0) -> list[dict]:
    """n micro-batches: [image]*T + <bos> + 6 prompt tokens + '\\n' | 4 <loc> + 2 label tokens + <eos>."""
    import torch

    g = torch.Generator().manual_seed(seed)
    t_img, prompt, suffix = facts["image_tokens"], 8, 7
    seq = t_img + prompt + suffix
    text_hi = min(facts["vocab"], 256000) - 1
    out = []
    for _ in range(n):
        ids = torch.randint(10, text_hi, (micro, seq), generator=g)
        ids[:, :t_img] = facts["image_token_id"]
        ids[:, t_img] = 2  # <bos>
        locs = loc_ids[torch.randint(0, len(loc_ids), (micro, 4), generator=g)]
        ids[:, t_img + prompt:t_img + prompt + 4] = locs
        ids[:, -1] = 1  # <eos>
        labels = torch.full_like(ids, -100)
        labels[:, t_img + prompt:] = ids[:, t_img + prompt:]
        tt = torch.zeros_like(ids)
        tt[:, t_img + prompt:] = 1
        out.append({
            "input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": tt, "labels": labels,
            "pixel_values": torch.randn(micro, 3, facts["image_size"], facts["image_size"], generator=g),
        })
    return out


# ---------------------------------------------------------------------------------------------
# raytrain side: the recipe's build_model and loop body


def experiment(model_path: str, strategy: str, micro: int, accum: int, smoke: bool):
    from raytrain import config as config_mod

    over = [f"model.name_or_path={model_path}", f"train.micro_batch_size={micro}", f"train.grad_accum={accum}",
            "train.lr=1e-4", "train.warmup_steps=0", "lora.r=8", "lora.alpha=8",
            "model.freeze_vision=true", "model.train_projector=false",
            f"model.dtype={'float32' if smoke else 'bfloat16'}"]
    over.append("train.strategy=full" if strategy == "full" else "train.strategy=lora")
    if strategy == "qlora":
        over += ["quant.bits=4", "quant.quant_type=nf4", "quant.double_quant=true",
                 f"quant.compute_dtype={'float32' if smoke else 'bfloat16'}"]
    return config_mod.load(None, over)


def run_raytrain(cfg, model_path: str, batches: list[dict], loc_ids, device, world: int, warmup: int, steps: int) -> dict:
    import torch

    from raytrain.models.losses import suffix_loss
    from raytrain.training import optim
    from raytrain.training.model import build_model

    torch.manual_seed(0)
    model, _processor, n_train = build_model(cfg, model_path)
    loc_ids = loc_ids.to(device)  # the real vocabulary's <loc> ids (the stand-in tokenizer's are not)
    if not cfg.quant.bits:
        model.to(device)
    model.train()
    n_matmul = count_matmul_params(model)
    pixel_dtype = next(p.dtype for n, p in model.named_parameters() if "patch_embed" in n)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = optim.build_optimizer(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    accum = cfg.train.grad_accum
    tokens = 0
    it = iter(batches * ((warmup + steps) * accum // len(batches) + 1))
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            t0 = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        for micro_i in range(accum):
            b = next(it)
            inputs = {k: v.to(device, non_blocking=True) for k, v in b.items() if k != "labels"}
            labels = b["labels"].to(device)
            inputs["pixel_values"] = inputs["pixel_values"].to(pixel_dtype)
            no_sync = getattr(model, "no_sync", None)
            ctx = no_sync() if (no_sync is not None and micro_i < accum - 1) else contextlib.nullcontext()
            with ctx:
                out = model(**inputs, use_cache=False)
                loss, _ = suffix_loss(out.logits, labels, loc_ids, cfg.loss.loc_sigma, cfg.loss.loc_weight)
                del out
                (loss / accum).backward()
            if step >= warmup:
                tokens += int(b["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del model, opt
    return {"wall_s": wall, "tokens": tokens, "samples": steps * accum * batches[0]["input_ids"].shape[0],
            "peak_mem_bytes": peak, "trainable_params": n_train, "matmul_params": n_matmul}


# ---------------------------------------------------------------------------------------------
# HF Trainer side (seed 000's recipe)


def build_hf_model(model_path: str, strategy: str, smoke: bool):
    import torch
    from transformers import BitsAndBytesConfig, PaliGemmaForConditionalGeneration

    kwargs = {"dtype": torch.float32 if smoke else torch.bfloat16}
    if strategy == "qlora":  # seed 000: nf4, double quantization, bf16 compute; towers kept in full precision
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32 if smoke else torch.bfloat16,
            llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector", "lm_head"])
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))} if torch.cuda.is_available() else {"": "cpu"}
    model = PaliGemmaForConditionalGeneration.from_pretrained(model_path, **kwargs)
    for n, p in model.named_parameters():  # seed 000 trains the language model only
        if n.startswith(("model.vision_tower.", "model.multi_modal_projector.")):
            p.requires_grad_(False)
    if strategy == "full":
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if strategy == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, bias="none",
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))


def run_hf(model_path: str, strategy: str, batches: list[dict], micro: int, accum: int, warmup: int, steps: int,
           smoke: bool, device, out_dir: str) -> dict:
    import torch
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(v_len(b))]

    class Rows(Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i % len(rows)]

    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            sync(device)
            marks.append(time.perf_counter())
            if len(marks) == warmup and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)

    torch.manual_seed(0)
    model = build_hf_model(model_path, strategy, smoke)
    n_matmul = count_matmul_params(model)
    cuda = device.type == "cuda"
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
        learning_rate=1e-4, max_steps=warmup + steps, bf16=cuda and not smoke,
        optim="paged_adamw_8bit" if cuda else "adamw_torch", lr_scheduler_type="constant",
        logging_steps=10_000, save_strategy="no", report_to=[], dataloader_num_workers=0,
        remove_unused_columns=False, ddp_find_unused_parameters=False, use_cpu=not cuda, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[Clock()])
    trainer.train()
    wall = marks[-1] - marks[warmup - 1]
    seq_tokens = int(batches[0]["attention_mask"][0].sum())
    samples = steps * accum * micro
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    del trainer, model
    return {"wall_s": wall, "tokens": samples * seq_tokens, "samples": samples, "peak_mem_bytes": peak, "matmul_params": n_matmul}


def v_len(b: dict) -> int:
    return int(b["input_ids"].shape[0])


# ---------------------------------------------------------------------------------------------
# main


def rates(r: dict, strategy: str, peak_flops: float | None) -> dict:
    tok_s = r["tokens"] / r["wall_s"]
    per_token = (6 if strategy == "full" else 4) * r["matmul_params"]
    return {**r, "tokens_per_s": round(tok_s, 1), "samples_per_s": round(r["samples"] / r["wall_s"], 3),
            "mfu": round(per_token * tok_s / peak_flops, 4) if peak_flops else None,
            "peak_mem_gib": round(r["peak_mem_bytes"] / 1024**3, 2) if r.get("peak_mem_bytes") else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="paligemma2-3b-224")
    ap.add_argument("--strategies", default="lora,qlora,full")
    ap.add_argument("--micro", type=int, default=4, help="per-device micro-batch (seed 000: 4)")
    ap.add_argument("--accum", type=int, default=4, help="gradient accumulation (seed 000: 4)")
    ap.add_argument("--warmup", type=int, default=3, help="optimizer steps excluded from timing")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s per GPU (default: by device name)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny preset, fp32, 2+2 steps of micro 2 x accum 2")
    args = ap.parse_args()
    if args.smoke:
        args.micro, args.accum, args.warmup, args.steps = 2, 2, 2, 2
    import torch

    rank, world, device = dist_setup()
    peak = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak_t = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        peak = peak_t * 1e12 if peak_t else None
    result: dict = {"params": vars(args), "world_size": world, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "loadavg_start": C.loadavg(), "peak_flops_per_gpu": peak, "strategies": {}}
    with tempfile.TemporaryDirectory(prefix="raytrain-bench-gpu-") as tmp:
        model_path, facts = save_random_checkpoint(args.preset, Path(tmp), args.smoke, rank, world)
        result["model"] = {"preset": "tiny:paligemma" if args.smoke else args.preset, **facts}
        from raytrain.models import paligemma

        loc_ids = torch.as_tensor(paligemma.loc_token_ids(paligemma.load_processor(model_path).tokenizer)) if args.smoke \
            else torch.arange(256000, 257024)  # <loc0000>.. in the PaliGemma vocabulary
        batches = make_batches(facts, args.micro, 8, loc_ids, seed=rank)
        result["model"]["seq_len"] = int(batches[0]["input_ids"].shape[1])
        for strategy in args.strategies.split(","):
            entry: dict = {}
            for side in ("raytrain", "hf"):
                try:
                    if side == "raytrain":
                        cfg = experiment(model_path, strategy, args.micro, args.accum, args.smoke)
                        r = run_raytrain(cfg, model_path, batches, loc_ids, device, world, args.warmup, args.steps)
                    else:
                        r = run_hf(model_path, strategy, batches, args.micro, args.accum, args.warmup, args.steps,
                                   args.smoke, device, str(Path(tmp) / f"hf-{strategy}"))
                    entry[side] = rates(r, strategy, peak)
                except Exception as e:  # noqa: BLE001 - e.g. bitsandbytes without its CUDA/CPU backend
                    entry[side] = {"error": f"{type(e).__name__}: {e}"[:500]}
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if rank == 0:
                    print(f"[{strategy}] {side}: {json.dumps({k: v for k, v in entry[side].items() if k in ('tokens_per_s', 'samples_per_s', 'mfu', 'peak_mem_gib', 'error')})}",
                          flush=True)
            if "tokens_per_s" in entry.get("raytrain", {}) and "tokens_per_s" in entry.get("hf", {}):
                entry["ratio_tokens_per_s_raytrain_over_hf"] = round(entry["raytrain"]["tokens_per_s"] / entry["hf"]["tokens_per_s"], 3)
            result["strategies"][strategy] = entry
    result["loadavg_end"] = C.loadavg()
    if rank == 0:
        path = C.write_result("gpu_throughput" + ("_smoke" if args.smoke else ""), result)
        print(f"wrote {path}")
        parts = [f"{s} {e.get('ratio_tokens_per_s_raytrain_over_hf', 'n/a')}x" for s, e in result["strategies"].items()]
        print(f"gpu_throughput ({result['device']}, {result['model']['preset']}): raytrain/hf tokens/s: " + ", ".join(parts))
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    main()
