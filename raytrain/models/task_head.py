"""The optional task attention head between the vision tower and the projector (seed 004).

Seed 004 inserted "256 learnable queries that cross-attend over the SigLIP patch embeddings" between
PaliGemma's SigLIP encoder and its multimodal projector (F1 0.700 -> 0.717 on shoulder fractures,
with the last 5 SigLIP layers unfrozen). Config: `model.task_head_queries` (0 = off).

    patches (B, P, D) --LN--> keys/values
    queries (1, N, D) --LN--> multi-head cross-attention --+--> residual MLP (pre-LN) --> LN --> (B, N, D)
             \_____________________________________________/ residual

Choices beyond the seed's bare `nn.MultiheadAttention(D, num_heads=1)`, and why:

* pre-LN residual block (queries + attention, then + MLP): the queries keep a direct gradient path
  and the block trains stably from random init (Perceiver / Flamingo resampler layout, one layer);
* heads = the vision tower's own `num_attention_heads` (SigLIP-So400m: 16 x 72) instead of 1:
  same parameter count, several patch groups per query; fixed by the model, so checkpoints are
  self-describing from the weights' shapes;
* the output LayerNorm starts as a copy of the tower's `post_layernorm`: the projector (pretrained
  on post_layernorm outputs) sees inputs of the per-channel scale it was trained on;
* q/k/v/o as plain `nn.Linear` + `scaled_dot_product_attention` rather than `nn.MultiheadAttention`,
  whose forward reads `out_proj.weight` without calling `out_proj` (ZeRO-3 gathers a module's
  parameters only when the module itself is called).

Token count: PaliGemma's processor expands `<image>` to `image_seq_length` placeholder tokens
(= the tower's patches: 256 at 224 px, 1024 at 448 px), and the model scatters exactly that many
projected features into them. The head therefore outputs exactly as many tokens as the patches:
N must equal the model's image tokens (`install` checks it against the model config and the
processor), so prompts, data shards, eval and serving stay unchanged. Seed 004's 256 queries
match PaliGemma 2 224 px exactly (the seed's "196 patches" is a 16-px-patch figure; PaliGemma uses
14-px patches: 16 x 16 = 256). A compressing head (N < P, e.g. 256 queries on 448 px) would need
`image_seq_length = N` in every processor that tokenizes for the model (data pipeline, in-training
validation, eval, serving); raytrain does not do that, and `install` says so.

Qwen2.5-VL is not supported: its images have a variable number of merged patches per image
(`image_grid_thw`) and the vision path packs all images of a batch into one sequence, so a fixed
number of queries per image does not fit its prompt layout; `install` raises for it.

Installing: `install(model, N)` adds the head as `model.model.task_head` of a loaded PaliGemma
(before or after peft wrapping) and a forward pre-hook on `model.model.multi_modal_projector` that
replaces the projector's input (the tower's last hidden state) by the head's output. The head is
always trainable. Checkpoints: `task_head.safetensors` (the head's own state dict, keys without
prefix, plus metadata) next to the weights it belongs to (`model/` or `adapter/`); `save_model`
writes a full model directory without duplicating the head into `model.safetensors`, and
`raytrain.models.paligemma.load` re-installs the head of any directory that has the file.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ATTR = "task_head"  # attribute on PaliGemmaModel: parameters are named model.task_head.*
FILE = "task_head.safetensors"
FORMAT = "raytrain.task_head/1"


class TaskAttentionHead(nn.Module):
    """N learnable queries cross-attending over patch embeddings: (B, P, D) -> (B, N, D)."""

    def __init__(self, dim: int, num_queries: int, num_heads: int, mlp_ratio: int = 4, eps: float = 1e-6):
        super().__init__()
        if num_queries <= 0:
            raise ValueError(f"num_queries must be > 0, got {num_queries}")
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.queries = nn.Parameter(torch.randn(1, num_queries, dim))  # the seed's init (unit normal)
        self.norm_q = nn.LayerNorm(dim, eps=eps)
        self.norm_kv = nn.LayerNorm(dim, eps=eps)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"), nn.Linear(mlp_ratio * dim, dim))
        self.norm_out = nn.LayerNorm(dim, eps=eps)

    @property
    def num_queries(self) -> int:
        return int(self.queries.shape[1])

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, H, T, D/H)
        b, t, d = x.shape
        return x.view(b, t, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(self, patches: torch.Tensor, return_attention: bool = False):
        """patches (B, P, D) -> (B, N, D); with return_attention also the head-averaged attention
        weights (B, N, P) — which patches each query reads (seed 004's explainability view)."""
        b = patches.shape[0]
        x = self.queries.expand(b, -1, -1)
        kv = self.norm_kv(patches)
        q, k, v = self._heads(self.q_proj(self.norm_q(x))), self._heads(self.k_proj(kv)), self._heads(self.v_proj(kv))
        attn = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, D/H)
        x = x + self.o_proj(attn.transpose(1, 2).reshape(b, -1, x.shape[-1]))
        x = x + self.mlp(self.norm_mlp(x))
        out = self.norm_out(x)
        if not return_attention:
            return out
        weights = torch.softmax(q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5), dim=-1).mean(1)
        return out, weights

    def projector_pre_hook(self, module, args):
        """Forward pre-hook on the projector: its input (the tower's last hidden state) -> our output.
        Runs in the head's dtype (QLoRA keeps it fp32) and hands back the tower's dtype.
        (A bound method, so a deep copy of the model hooks the copied head.)"""
        (features, *rest) = args
        return (self(features.to(self.queries.dtype)).to(features.dtype), *rest)


# ----------------------------------------------------------------------------------------------
# installing into a loaded model


def _hf_model(model):
    """The transformers model under DDP / DeepSpeed (.module) and peft (.base_model.model) wrappers."""
    m = model
    while True:
        if hasattr(m, "get_base_model"):  # peft.PeftModel (peft also sets peft_config on the HF model)
            m = m.get_base_model()
        elif hasattr(m, "module") and isinstance(m.module, nn.Module):
            m = m.module
        else:
            return m


def find(model) -> TaskAttentionHead | None:
    """The installed head of a (possibly wrapped) model, or None."""
    return next((m for m in model.modules() if isinstance(m, TaskAttentionHead)), None)


def owns(name: str) -> bool:
    """True for parameter / state-dict names of the head (under any wrapper prefix)."""
    return name.startswith(f"{ATTR}.") or f".{ATTR}." in name


def image_tokens(model) -> int:
    """Image tokens per image the language model receives (= placeholders the processor writes)."""
    return int(_hf_model(model).config.text_config.num_image_tokens)


def install(model, num_queries: int, *, processor=None, num_heads: int | None = None) -> TaskAttentionHead | None:
    """Insert a fresh head with `num_queries` queries into a loaded PaliGemma (raw, peft- or
    DDP-wrapped); 0 = off (returns None and leaves the model untouched). The head is created on the
    projector's device, in its dtype, and is trainable whatever the freeze policy says."""
    if num_queries == 0:
        return None
    if num_queries < 0:
        raise ValueError(f"task head queries must be >= 0, got {num_queries}")
    hf = _hf_model(model)
    if type(hf).__name__ != "PaliGemmaForConditionalGeneration":
        raise ValueError(f"model.task_head_queries is implemented for PaliGemma only, not {type(hf).__name__}: "
                         "Qwen2.5-VL's images have a variable number of tokens each, which a fixed set of queries cannot fill")
    if find(hf) is not None:
        raise RuntimeError("the model already has a task head")
    n_img = image_tokens(hf)
    proc_n = getattr(processor, "image_seq_length", n_img) if processor is not None else n_img
    if num_queries != n_img or proc_n != n_img:
        raise ValueError(
            f"model.task_head_queries={num_queries}, but this model's prompts carry {proc_n} image tokens per image "
            f"(processor image_seq_length; model config: {n_img}). The head must output exactly one token per image "
            f"token: set model.task_head_queries={n_img} (a compressing head would need every processor that "
            "tokenizes for the model re-configured, which raytrain does not do)")
    inner = hf.model
    vision_cfg = hf.config.vision_config
    proj = inner.multi_modal_projector
    ref = proj.linear.weight
    head = TaskAttentionHead(vision_cfg.hidden_size, num_queries, num_heads or vision_cfg.num_attention_heads,
                             eps=getattr(vision_cfg, "layer_norm_eps", 1e-6))
    head.to(device=ref.device, dtype=ref.dtype if ref.dtype.is_floating_point else torch.float32)
    _copy_post_layernorm(inner.vision_tower.post_layernorm, head.norm_out)
    head.requires_grad_(True)
    inner.add_module(ATTR, head)
    proj.register_forward_pre_hook(head.projector_pre_hook)
    return head


def _copy_post_layernorm(src: nn.LayerNorm, dst: nn.LayerNorm) -> None:
    import contextlib

    # ZeRO-3 partitions the tower while loading: gather its two vectors to read them
    ctx = _gathered([src.weight, src.bias]) if hasattr(src.weight, "ds_id") else contextlib.nullcontext()
    with ctx, torch.no_grad():
        dst.weight.copy_(src.weight.to(dst.weight.dtype))
        dst.bias.copy_(src.bias.to(dst.bias.dtype))


def _gathered(params):
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


# ----------------------------------------------------------------------------------------------
# checkpoints: task_head.safetensors next to the weights it belongs to


def save(model, out_dir: str | Path) -> bool:
    """Write the head (if any) to out_dir/task_head.safetensors; returns whether one was written."""
    from safetensors.torch import save_file

    head = find(model)
    if head is None:
        return False
    meta = {"format": FORMAT, "num_queries": str(head.num_queries), "num_heads": str(head.num_heads)}
    sd = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    save_file(sd, str(Path(out_dir) / FILE), metadata=meta)
    return True


def save_model(model, out_dir: str | Path) -> None:
    """`save_pretrained` (safetensors) of the HF model without the head's weights, plus the head file."""
    hf = _hf_model(model)
    if find(hf) is None:
        hf.save_pretrained(str(out_dir), safe_serialization=True)
        return
    state = {k: v for k, v in hf.state_dict().items() if not owns(k)}
    hf.save_pretrained(str(out_dir), safe_serialization=True, state_dict=state)
    save(hf, out_dir)


def load(model, weights_dir: str | Path, *, install_missing: bool, processor=None) -> TaskAttentionHead | None:
    """Restore the head saved in weights_dir (`model/` or `adapter/` of a checkpoint).

    install_missing=True (inference): a model without a head gets one of the saved size first.
    False (resume): the model must already have its head (built from the same config, so the
    optimizer holds its parameters). A checkpoint without a head file into a model with a head, or
    the reverse on resume, is an error rather than a silently untrained / dropped head."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    f = Path(weights_dir) / FILE
    head = find(model)
    if not f.exists():
        if head is not None:
            raise RuntimeError(f"the model has a task head but {weights_dir} holds no {FILE} "
                               "(checkpoint trained without model.task_head_queries?)")
        return None
    with safe_open(str(f), framework="pt") as fh:
        meta = fh.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{f}: not a raytrain task head file (format {meta.get('format')!r})")
    n, heads = int(meta["num_queries"]), int(meta["num_heads"])
    if head is None:
        if not install_missing:
            raise RuntimeError(f"checkpoint {weights_dir} has a task head ({n} queries) but the model has none: "
                               f"resume with model.task_head_queries={n}")
        head = install(model, n, processor=processor, num_heads=heads)
    if (head.num_queries, head.num_heads) != (n, heads):
        raise RuntimeError(f"checkpoint task head has {n} queries / {heads} heads, the model's {head.num_queries} / {head.num_heads}")
    sd = load_file(str(f), device=str(head.queries.device))
    head.load_state_dict({k: v.to(head.queries.dtype) for k, v in sd.items()}, strict=True)
    return head


def install_from_state_dict(model, state_dict: dict, processor=None) -> TaskAttentionHead | None:
    """Install an (untrained) head sized like the one in a full state dict (e.g. ZeRO's gathered
    fp32 weights, keys `model.task_head.*`), so that `load_state_dict` then fills it."""
    key = next((k for k in state_dict if owns(k) and k.endswith(f"{ATTR}.queries")), None)
    if key is None:
        return None
    return install(model, int(state_dict[key].shape[1]), processor=processor)
