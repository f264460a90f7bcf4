"""GPU memory estimate per training strategy: which strategy fits which GPU.

    python -m raytrain.models.memory paligemma2-28b-224 --gpu-gb 80

All sizes are GiB (2**30 bytes) per GPU, at the peak of a training step (start of backward).
Parameter counts come from the real architecture on the meta device (`raytrain.models.presets`).
This is arithmetic, not a measurement: expect it to be within ~10-15% of `torch.cuda.max_memory_allocated`,
and check a new setting with one real step before a long run.

Strategies and bytes per parameter (P = all parameters, N = GPUs the state is sharded over)

    full_bf16   raytrain's recipe: the model is loaded in bfloat16 and torch AdamW keeps its moments
                in the parameter dtype, so 2 (weights) + 2 (grads) + 4 (Adam m, v in bf16) = 8 B/param.
                `master_fp32=True` models classic mixed precision instead: 2 (bf16 weights) + 4 (fp32
                master) + 8 (fp32 Adam) + 2 (grads) = 16 B/param.
    lora_bf16   frozen bf16 base (2 B/param) + LoRA adapters, which peft keeps in fp32
                (autocast_adapter_dtype): 4 (weights) + 4 (grads) + 8 (Adam) = 16 B per adapter param.
    qlora_8bit  LLM.int8 decoder linears: 1 B/param + one fp32 scale per output row; everything else bf16.
    qlora_4bit  NF4 decoder linears with double quantization: 0.5 B/param + 0.127 bits/param of
                quantization constants (8-bit absmax per 64 weights + fp32 per 256 absmax blocks);
                everything else bf16.
                For both QLoRA variants only the LANGUAGE decoder's linear layers are quantized: token
                embeddings, norms, the vision tower and the projector stay bf16 (raytrain's QLoRA lists
                the vision tower and projector in `llm_int8_skip_modules`; quantizing them would save
                ~0.3 GiB and costs localisation accuracy). peft's `prepare_model_for_kbit_training`
                would upcast those bf16 parameters to fp32 (+2 B each); raytrain does not call it.
    zero2/zero3 DeepSpeed full fine-tuning, bf16 mixed precision as the ZeRO paper counts it:
                2 (bf16 weights) + 2 (bf16 grads) + 12 (fp32 master, Adam m, v).
                ZeRO-2 shards grads + optimizer over N GPUs; ZeRO-3 also shards the weights and keeps a
                gathered working set on each GPU (the larger of the token embedding and two decoder
                layers, in bf16). `offload=True` moves the optimizer state (and the fp32 gradient
                partition) to CPU memory; with ZeRO-3 it also moves the weights (offload_param).

`zero_stage` applies ZeRO sharding to the LoRA / QLoRA strategies too (stage >= 1 optimizer,
>= 2 grads, 3 weights), e.g. LoRA on Qwen2.5-VL-72B with ZeRO-3 over 8 GPUs. Without ZeRO and with num_gpus > 1,
DDP keeps a second copy of the trainable gradients in its all-reduce buckets.

Activations (bf16 = 2 B per element; T = micro_batch x (image tokens + seq_len) decoder tokens)

    Per decoder layer and token, saved for backward without checkpointing:
        2 x (n_norm x h + 3q + 3kv + 4i)  +  r x h x n_norm
    h width, q = heads x head_dim, kv = kv_heads x head_dim, i = MLP width, n_norm = RMSNorms per layer
    (2; Gemma 2 has 4). The terms: norm outputs; q, k, v and their rotary copies and the attention
    output; gate, up, act(gate), act(gate)*up of the gated MLP; what transformers' RMSNorm saves
    (r = 8 B for Gemma's fp32 x and x*rsqrt, 6 B for Qwen's fp32 x and bf16 normalised x). Attention through SDPA/flash keeps no (S x S) matrix. Gemma 2 cannot use SDPA (logit
    softcapping), so transformers runs it eagerly: + 2q for the GQA-expanded k, v and
    heads x S x 8 B for the softcapped scores, fp32 softmax and bf16 probabilities.
    With gradient checkpointing (transformers checkpoints every decoder and vision layer) only each
    layer's input stays (2h B per token per layer); the layer being back-propagated is recomputed,
    which adds 2 x one layer's activations (its activations and their gradients) to the peak.
    Without checkpointing the peak is all layers + one layer's gradients in flight.

    The vision tower counts the same way over its patches (SigLIP: LayerNorm, 2-matrix GELU MLP, no
    rotary; Qwen ViT: RMSNorm, SwiGLU, 2-D rotary) when it is trained (full / ZeRO). LoRA strategies
    adapt the language decoder only, so the frozen tower runs without a graph: one layer transient.

    Logits: T x vocab x 6 B for Gemma 2 (the bf16 logits are softcapped: tanh output saved + two
    gradient buffers), x 4 B otherwise; plus 12 B per vocab entry for each supervised position
    (fp32 copy, log-softmax, gradient), counted as all micro_batch x seq_len text positions.

Overhead: 1 GiB (CUDA context, cuBLAS workspace, NCCL) + 5% of everything else (allocator
fragmentation) + DDP buckets when they apply + for quantized weights one dequantized bf16 copy of the
largest linear layer.
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass, field

from raytrain.models import family as model_family
from raytrain.models import presets

GiB = float(2**30)

STRATEGIES = ("full_bf16", "zero2", "zero3", "lora_bf16", "qlora_8bit", "qlora_4bit")
"""In order of preference for `recommend`: full fine-tuning first, then LoRA, then 8-bit, then 4-bit
(each step trades model quality or speed for memory)."""

NF4_BYTES = 0.5 + 0.127 / 8  # 4-bit codes + double-quantized absmax constants
INT8_BYTES = 1.0
CUDA_CONTEXT_GB = 1.0
FRAGMENTATION = 0.05
LORA_TARGETS = {
    "all-linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
}


@dataclass
class Estimate:
    """Per-GPU peak memory of one training step, GiB."""

    weights_gb: float
    """Model weights resident on the GPU (bf16 / quantized; for ZeRO-3 the shard + gathered working set)."""
    trainable_gb: float
    """Extra trainable tensors beyond `weights` (LoRA adapters, fp32)."""
    grads_gb: float
    optimizer_gb: float
    """Adam moments (+ fp32 master weights where the strategy keeps them)."""
    activations_gb: float
    """Saved activations + logits/loss buffers at the start of backward."""
    overhead_gb: float
    total_gb: float
    breakdown: dict = field(default_factory=dict)
    """Parameter counts, bytes per trainable parameter, token counts, activation parts, CPU memory."""


# ---------------------------------------------------------------------------- architecture numbers


@dataclass(frozen=True)
class Tower:
    """The shapes of a transformer stack that decide its activation memory."""

    layers: int
    width: int
    q: int  # query width (heads x head_dim)
    kv: int  # key (= value) width
    heads: int
    mlp: int
    n_norm: int
    rms: bool  # RMSNorm (fp32 internals) vs LayerNorm
    # bytes per width element one RMSNorm saves: Gemma 8 (fp32 x, fp32 x*rsqrt), Qwen 6 (fp32 x, bf16 normed)
    rms_fp32_bytes: int
    gated: bool  # gated MLP (4 saved tensors of width mlp) vs plain (2)
    rotary: bool
    eager_softcap: bool  # attention runs eagerly with softcapping (Gemma 2)


def towers(cfg, family_name: str | None = None) -> tuple[Tower, Tower]:
    """(language decoder, vision encoder) shapes of a model config (PaliGemmaConfig, Qwen2_5_VLConfig,
    ...); `family_name`: the raytrain family (default: the config's model_type, which names it)."""
    t = cfg.text_config
    gemma2 = t.model_type == "gemma2"
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    text = Tower(
        layers=t.num_hidden_layers,
        width=t.hidden_size,
        q=t.num_attention_heads * head_dim,
        kv=t.num_key_value_heads * head_dim,
        heads=t.num_attention_heads,
        mlp=t.intermediate_size,
        n_norm=4 if gemma2 else 2,
        rms=True,
        rms_fp32_bytes=8 if t.model_type.startswith("gemma") else 6,
        gated=True,
        rotary=True,
        eager_softcap=gemma2,
    )
    # the vision tower's shape is the family's to describe (SigLIP, Qwen's ViT, ...)
    vision = Tower(**model_family(family_name or cfg.model_type).vision_tower_dims(cfg))
    return text, vision


@functools.cache
def _arch(name: str) -> dict:
    p = presets.get(name)
    cfg = presets.build_config(name)
    text, vision = towers(cfg, p.family)
    merge = getattr(cfg.vision_config, "spatial_merge_size", 1)
    shapes = presets.linear_shapes(name, "language")
    return {
        "text": text,
        "vision": vision,
        "patches": p.image_tokens * merge**2,  # vision-tower tokens per image
        "vocab": cfg.text_config.vocab_size,
        "largest_linear": max(i * o for _, i, o in shapes),
        "linear_rows": sum(o for _, i, o in shapes),
        "layer_params": sum(i * o for _, i, o in shapes) // text.layers,
    }


def layer_bytes_per_token(tw: Tower, seq: int) -> float:
    """Bytes one layer saves for backward per token (no checkpointing); see the module docstring."""
    elems = tw.n_norm * tw.width + (tw.q + 2 * tw.kv) + tw.q  # norm outputs, q/k/v, attention output
    if tw.rotary:
        elems += tw.q + tw.kv
    elems += (4 if tw.gated else 2) * tw.mlp
    if not tw.rms:
        elems += tw.n_norm * tw.width  # LayerNorm saves its bf16 input
    out = 2.0 * elems
    if tw.rms:
        out += float(tw.rms_fp32_bytes) * tw.width * tw.n_norm
    if tw.eager_softcap:
        if tw.kv < tw.q:
            out += 2.0 * 2 * tw.q  # repeat_kv copies of k and v
        out += tw.heads * seq * 8.0  # scores (tanh out bf16) + softmax fp32 + probs bf16, per query token
    return out


def _tower_activation_bytes(tw: Tower, tokens: int, seq: int, trained: bool, ckpt: bool) -> float:
    layer = layer_bytes_per_token(tw, seq) * tokens
    if not trained:
        return layer  # forward without graph: one layer transient
    if ckpt:
        return tw.layers * 2.0 * tw.width * tokens + 2.0 * layer
    return tw.layers * layer + layer


# ---------------------------------------------------------------------------- estimate


def lora_params(name: str, r: int = 8, targets="all-linear") -> int:
    """Adapter parameters of rank-`r` LoRA on the language decoder's linear layers named by
    `targets` ('all-linear', 'attention', or a list of module names such as ['q_proj', 'v_proj'])."""
    names = LORA_TARGETS[targets] if isinstance(targets, str) else tuple(targets)
    return sum(r * (i + o) for mod, i, o in presets.linear_shapes(name, "language") if mod.rsplit(".", 1)[-1] in names)


def estimate(
    name: str,
    strategy: str,
    *,
    micro_batch: int,
    seq_len: int,
    lora_r: int = 8,
    lora_targets="all-linear",
    grad_checkpointing: bool = True,
    num_gpus: int = 1,
    zero_stage: int | None = None,
    offload: bool = False,
    master_fp32: bool = False,
) -> Estimate:
    """Peak GPU memory per GPU for training preset `name` with `strategy` (see STRATEGIES).

    micro_batch: examples per GPU per forward/backward. seq_len: TEXT tokens per example (prompt +
    target); the preset's image tokens are added to it. Other arguments: see the module docstring.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; known: {STRATEGIES}")
    if strategy in ("zero2", "zero3"):
        implied = int(strategy[-1])
        if zero_stage not in (None, implied):
            raise ValueError(f"strategy {strategy} implies zero_stage={implied}, got {zero_stage}")
        zero_stage = implied
    if zero_stage not in (None, 0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0..3, got {zero_stage}")
    stage = zero_stage or 0
    n = max(1, int(num_gpus))
    if offload and stage == 0:
        raise ValueError("offload needs ZeRO (zero_stage >= 1 or strategy zero2/zero3)")
    if strategy == "full_bf16" and stage:
        raise ValueError("full_bf16 is the unsharded recipe; use strategy zero2 / zero3 for sharded full fine-tuning")

    preset = presets.get(name)
    arch = _arch(name)
    counts = presets.count_params(name)
    inv = presets.param_inventory(name)
    total = counts["total"]
    q_lin = inv.get("language.linear", 0)  # decoder linears: what QLoRA quantizes

    # -- weights (bytes, whole model, before sharding) and trainable parameter count
    full = strategy in ("full_bf16", "zero2", "zero3")
    if strategy == "qlora_4bit":
        w_bytes = q_lin * NF4_BYTES + (total - q_lin) * 2.0
    elif strategy == "qlora_8bit":
        w_bytes = q_lin * INT8_BYTES + arch["linear_rows"] * 4.0 + (total - q_lin) * 2.0
    else:
        w_bytes = total * 2.0
    n_lora = 0 if full else lora_params(name, lora_r, lora_targets)
    n_train = total if full else n_lora

    # -- per-trainable-parameter bytes: (extra weight copy, grads, optimizer)
    if strategy in ("zero2", "zero3") or (strategy == "full_bf16" and master_fp32):
        per = (0.0, 2.0, 12.0)  # fp32 master + Adam m, v in "optimizer", as the ZeRO paper counts
    elif strategy == "full_bf16":
        per = (0.0, 2.0, 4.0)  # torch AdamW moments in bf16, like the parameters
    else:
        per = (4.0, 4.0, 8.0)  # fp32 LoRA adapters, fp32 grads, fp32 Adam
    trainable_bytes = n_train * per[0]
    grad_bytes = n_train * per[1]
    opt_bytes = n_train * per[2]

    # -- sharding / offload
    text_width = arch["text"].width
    cpu_bytes = 0.0
    live_bytes = 0.0
    if stage >= 1:
        opt_bytes /= n
    if stage >= 2:
        grad_bytes /= n
    if offload:
        # ZeRO-Offload: optimizer state and the fp32 gradient partition live in CPU memory; the GPU
        # only streams bf16 gradients through its reduce buckets (counted in overhead).
        cpu_bytes += opt_bytes + n_train * 4.0 / n
        opt_bytes = 0.0
        grad_bytes = 0.0
    if stage == 3:
        # gathered working set: the current layer and the prefetched next one, or the embedding table
        live_bytes = 2.0 * max(arch["vocab"] * text_width, 2 * arch["layer_params"])
        w_bytes /= n
        trainable_bytes /= n
        if offload:
            cpu_bytes += w_bytes
            w_bytes = 0.0
        w_bytes += live_bytes
    ddp_bytes = 0.0
    if stage == 0 and n > 1:
        ddp_bytes = grad_bytes  # DDP all-reduce buckets hold a copy of the gradients

    # -- activations
    tokens_per_example = preset.image_tokens + seq_len
    t_tokens = micro_batch * tokens_per_example
    text, vision = arch["text"], arch["vision"]
    act_text = _tower_activation_bytes(text, t_tokens, tokens_per_example, True, grad_checkpointing)
    v_tokens = micro_batch * arch["patches"]
    act_vision = _tower_activation_bytes(vision, v_tokens, arch["patches"], full, grad_checkpointing)
    logit_bytes = t_tokens * arch["vocab"] * (6.0 if text.eager_softcap else 4.0)
    loss_bytes = micro_batch * seq_len * arch["vocab"] * 12.0
    extra_bytes = t_tokens * text.width * 12.0  # embeddings out, final norm, lm_head input
    mask_bytes = (
        micro_batch * tokens_per_example**2 * 2.0 if model_family(preset.family).PREFIX_LM_MASK else 0.0
    )  # 4-D prefix-LM mask
    act_bytes = act_text + act_vision + logit_bytes + loss_bytes + extra_bytes + mask_bytes

    # -- overhead
    dequant_bytes = arch["largest_linear"] * 2.0 if strategy.startswith("qlora") else 0.0
    bucket_bytes = 2 * text.width**2 * 2.0 if stage >= 1 else 0.0  # reduce/prefetch buckets, DeepSpeed "auto" = h^2
    subtotal = w_bytes + trainable_bytes + grad_bytes + opt_bytes + act_bytes
    overhead_bytes = CUDA_CONTEXT_GB * GiB + FRAGMENTATION * subtotal + ddp_bytes + dequant_bytes + bucket_bytes

    g = lambda b: b / GiB
    est = Estimate(
        weights_gb=g(w_bytes),
        trainable_gb=g(trainable_bytes),
        grads_gb=g(grad_bytes),
        optimizer_gb=g(opt_bytes),
        activations_gb=g(act_bytes),
        overhead_gb=g(overhead_bytes),
        total_gb=g(subtotal + overhead_bytes),
    )
    est.breakdown = {
        "preset": preset.name,
        "strategy": strategy,
        "params_total": total,
        "params_trainable": n_train,
        "params_quantized": q_lin if strategy.startswith("qlora") else 0,
        "lora_params": n_lora,
        "bytes_per_trainable_param": sum(per),
        "zero_stage": stage,
        "num_gpus": n,
        "offload": offload,
        "tokens_per_example": tokens_per_example,
        "image_tokens": preset.image_tokens,
        "decoder_tokens": t_tokens,
        "vision_patches": v_tokens,
        "activations_text_gb": g(act_text),
        "activations_vision_gb": g(act_vision),
        "logits_gb": g(logit_bytes + loss_bytes),
        "zero3_live_params_gb": g(live_bytes),
        "ddp_buckets_gb": g(ddp_bytes),
        "cpu_gb": g(cpu_bytes),
        "grad_checkpointing": grad_checkpointing,
    }
    return est


def _kwargs_for(strategy: str, kw: dict) -> dict:
    """The `estimate` arguments that apply to `strategy`: zero2/zero3 imply their stage, full_bf16
    is never sharded, and LoRA/QLoRA take `zero_stage` (and then `offload`) when given."""
    k = dict(kw)
    if strategy.startswith("zero") or strategy == "full_bf16":
        k.pop("zero_stage", None)
    if strategy == "full_bf16" or (not strategy.startswith("zero") and not k.get("zero_stage")):
        k.pop("offload", None)
    return k


def fits(name: str, gpu_gb: float, strategies=STRATEGIES, **kw) -> list[tuple[str, float, bool]]:
    """[(strategy, total GiB, fits in gpu_gb)] for each strategy; `kw` go to `estimate`.

    Arguments that do not apply to a strategy are dropped for it (see `_kwargs_for`).
    """
    rows = []
    for s in strategies:
        k = _kwargs_for(s, kw)
        total = estimate(name, s, **k).total_gb
        rows.append((s, total, total <= gpu_gb))
    return rows


def recommend(name: str, gpu_gb: float, **kw) -> str:
    """The most preferred strategy (full > ZeRO full > LoRA > 8-bit QLoRA > 4-bit QLoRA) whose
    estimate fits in `gpu_gb` GiB per GPU; 'none' if nothing fits. ZeRO is only considered with
    num_gpus > 1 or offload (on one GPU without offload it only adds fp32 state to full_bf16)."""
    multi = kw.get("num_gpus", 1) > 1 or kw.get("offload", False)
    for s, _, ok in fits(name, gpu_gb, **kw):
        if s.startswith("zero") and not multi:
            continue
        if ok:
            return s
    return "none"


# ---------------------------------------------------------------------------- CLI


def format_table(name: str, gpu_gb: float, **kw) -> str:
    cols = ("weights", "trainable", "grads", "optimizer", "activations", "overhead", "total")
    head = f"{'strategy':<11}" + "".join(f"{c:>12}" for c in cols) + "   fits"
    lines = [head, "-" * len(head)]
    for s in STRATEGIES:
        e = estimate(name, s, **_kwargs_for(s, kw))
        vals = (e.weights_gb, e.trainable_gb, e.grads_gb, e.optimizer_gb, e.activations_gb, e.overhead_gb, e.total_gb)
        lines.append(
            f"{s:<11}" + "".join(f"{v:>12.1f}" for v in vals) + f"   {'yes' if e.total_gb <= gpu_gb else 'no'}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m raytrain.models.memory", description="Per-GPU memory estimate (GiB) per training strategy."
    )
    ap.add_argument("preset", help=f"one of: {', '.join(presets.PRESETS)}")
    ap.add_argument("--gpu-gb", type=float, default=80.0, help="memory per GPU, GiB")
    ap.add_argument("--micro-batch", type=int, default=4, help="examples per GPU per step")
    ap.add_argument("--seq-len", type=int, default=64, help="text tokens per example (image tokens are added)")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-targets", default="all-linear", choices=sorted(LORA_TARGETS))
    ap.add_argument("--no-grad-checkpointing", action="store_true")
    ap.add_argument("--num-gpus", type=int, default=1)
    ap.add_argument("--offload", action="store_true", help="ZeRO optimizer (and ZeRO-3 weight) offload to CPU")
    args = ap.parse_args(argv)
    try:
        p = presets.get(args.preset)
    except KeyError as e:
        print(e.args[0], file=sys.stderr)
        return 2
    kw = {
        "micro_batch": args.micro_batch,
        "seq_len": args.seq_len,
        "lora_r": args.lora_r,
        "lora_targets": args.lora_targets,
        "grad_checkpointing": not args.no_grad_checkpointing,
        "num_gpus": args.num_gpus,
        "offload": args.offload,
    }
    c = presets.count_params(p.name)
    print(
        f"{p.name} ({p.hub_id}): {c['total'] / 1e9:.2f}B params, {p.image_tokens} image tokens + {args.seq_len} text tokens, "
        f"micro-batch {args.micro_batch}, {args.num_gpus} GPU(s) of {args.gpu_gb:g} GiB, "
        f"grad checkpointing {'off' if args.no_grad_checkpointing else 'on'}"
    )
    print(format_table(p.name, args.gpu_gb, **kw))
    print(f"recommended: {recommend(p.name, args.gpu_gb, **kw)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
