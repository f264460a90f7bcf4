"""bitsandbytes quantization shared by the model families (plain functions, no config)."""

from __future__ import annotations


def quantization_config(quant: dict | None):
    """transformers BitsAndBytesConfig from raytrain's quant settings (None = full precision)."""
    if not quant or not quant.get("bits"):
        return None
    import torch
    from transformers import BitsAndBytesConfig

    skip = list(quant.get("skip_modules") or [])
    if quant["bits"] == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.get("quant_type", "nf4"),
            bnb_4bit_use_double_quant=bool(quant.get("double_quant", True)),
            bnb_4bit_compute_dtype=getattr(torch, quant.get("compute_dtype", "bfloat16")),
            llm_int8_skip_modules=skip,
        )
    if quant["bits"] == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    raise ValueError(f"quant.bits must be 0, 4 or 8, not {quant['bits']}")


def _cpu_4bit_fix(model) -> None:
    # bitsandbytes 0.50 on CPUs with AVX512-BF16 takes a fused inference path in Linear4bit that,
    # once any no-grad forward ran (evaluation, generation), breaks later backward passes.
    # The plain dequantize+matmul path is correct for training; force it on CPU.
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return
    for mod in model.modules():
        if isinstance(mod, Linear4bit):
            mod.support_avx512bf16_for_cpu = False


def from_pretrained_kwargs(quant: dict | None, device: str | None) -> dict:
    """Extra `from_pretrained` kwargs for quantized loading (empty for full precision)."""
    import torch

    qcfg = quantization_config(quant)
    if qcfg is None:
        return {}
    return {"quantization_config": qcfg, "device_map": {"": device or ("cuda" if torch.cuda.is_available() else "cpu")}}


def after_load(model, quant: dict | None, device: str | None) -> None:
    """CPU fix for quantized models; plain models are moved to `device` when given."""
    if quant and quant.get("bits"):
        _cpu_4bit_fix(model)
    elif device:
        model.to(device)
