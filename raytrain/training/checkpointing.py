"""The one checkpoint layout, written by rank 0 into a directory that Ray Train then persists to
local disk or S3 (`ray.train.report(..., checkpoint=Checkpoint.from_directory(d))`).

    <ckpt>/
      model/             full fine-tuning: `save_pretrained` output (safetensors) + processor files
      adapter/           LoRA/QLoRA: peft `save_pretrained` output (adapter weights + config)
      */task_head.safetensors   with model.task_head_queries: the task attention head, in model/ or
                         adapter/ (models/task_head.py; not duplicated into model.safetensors)
      trainer_state.pt   optimizer + scheduler + torch RNG  (tensors only: loads with weights_only=True)
      state.json         step, epoch, batch position in the epoch, strategy, base model, metrics,
                         "preprocess": the image preprocessing trained with (raytrain/data/preprocess.py;
                         `recorded_preprocess` reads it, eval and Serve apply it)

Weights are safetensors; the torch file loads with `weights_only=True`. No credentials are ever
written here (storage options hold endpoints only; keys come from the environment).
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from raytrain.models import task_head

STATE_JSON = "state.json"
TRAINER_STATE = "trainer_state.pt"
EXTRA = "extra_trainable.safetensors"


def _extra_trainable(peft_model) -> dict:
    # not lora_* nor peft's trainable token rows (added <|loc|> tokens): the adapter file holds those;
    # the task head has its own file (task_head.FILE): it must be installed before it is loaded
    return {n: p for n, p in peft_model.named_parameters()
            if p.requires_grad and "lora_" not in n and "trainable_tokens_" not in n and not task_head.owns(n)}


def _load_extra(peft_model, adapter_dir: Path) -> None:
    from safetensors.torch import load_file

    f = adapter_dir / EXTRA
    if not f.exists():
        return
    params = dict(peft_model.named_parameters())
    for k, v in load_file(str(f)).items():
        if k not in params:
            raise RuntimeError(f"checkpoint has trainable base weight {k} the model lacks")
        with torch.no_grad():
            params[k].copy_(v)


def _unwrap(model):
    return model.module if hasattr(model, "module") and not hasattr(model, "peft_config") else model


def is_peft(model) -> bool:
    return hasattr(_unwrap(model), "peft_config")


def save(ckpt_dir: str | Path, *, model, optimizer, scheduler, state: dict, save_processor=None, save_adapter_files=None) -> Path:
    """Write a complete training checkpoint into ckpt_dir (call on rank 0 only).
    save_processor(dir) writes the processor and inference settings next to full weights (the
    family's `save_inference_files`); save_adapter_files(dir) writes only the settings an adapter
    needs to be used as trained (e.g. Qwen's resize record) — not a tokenizer copy per checkpoint."""
    d = Path(ckpt_dir)
    d.mkdir(parents=True, exist_ok=True)
    m = _unwrap(model)
    if is_peft(m):
        m.save_pretrained(str(d / "adapter"))
        extra = _extra_trainable(m)
        if extra:  # base weights the freeze policy unfroze next to LoRA (vision layers, projector)
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()}, str(d / "adapter" / EXTRA))
        task_head.save(m, d / "adapter")
        if save_adapter_files is not None:
            save_adapter_files(d / "adapter")
    else:
        task_head.save_model(m, d / "model")  # save_pretrained (+ the head's own file)
        if save_processor is not None:
            save_processor(d / "model")
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "torch_rng": torch.get_rng_state(),
        },
        d / TRAINER_STATE,
    )
    full_state = dict(state)
    full_state["python_rng"] = _py_rng_to_json(random.getstate())
    full_state["numpy_rng"] = _np_rng_to_json(np.random.get_state())
    (d / STATE_JSON).write_text(json.dumps(full_state, indent=2, sort_keys=True))
    return d


def read_state(ckpt_dir: str | Path) -> dict:
    return json.loads((Path(ckpt_dir) / STATE_JSON).read_text())


def recorded_state(checkpoint_uri: str, opts=None) -> dict:
    """A checkpoint's state.json (local dir or s3://), {} when it has none."""
    from raytrain import storage

    uri = storage.join(str(checkpoint_uri), STATE_JSON)
    return storage.read_json(uri, opts) if storage.exists(uri, opts) else {}


def recorded_preprocess(checkpoint_uri: str, opts=None) -> dict | None:
    """The image preprocessing record of a checkpoint (local dir or s3://): state.json's
    "preprocess", or None when the checkpoint has no state.json or predates the record."""
    return recorded_state(checkpoint_uri, opts).get("preprocess")


def load_weights(ckpt_dir: str | Path, model) -> None:
    """Load the checkpoint's trainable weights into an already-built (unwrapped or DDP) model."""
    from safetensors.torch import load_file

    d = Path(ckpt_dir)
    m = _unwrap(model)
    if (d / "adapter").exists():
        from peft import set_peft_model_state_dict

        sd = load_file(str(d / "adapter" / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(m, sd)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"adapter checkpoint has keys the model lacks: {unexpected[:5]}")
        _load_extra(m, d / "adapter")
        task_head.load(m, d / "adapter", install_missing=False)
        return
    if not (d / "model").exists():
        raise FileNotFoundError(f"no model/ or adapter/ under {d}")
    # Load through from_pretrained, not raw safetensors: save_pretrained may store legacy key
    # names (transformers 5 converts them on load), so the file keys need not match state_dict().
    # In the widest dtype the model holds (float16 training keeps its trainable weights in float32),
    # so load_state_dict copies each tensor into its own parameter's dtype without a round trip.
    dtypes = {p.dtype for p in m.parameters()}
    ref = type(m).from_pretrained(str(d / "model"), dtype=torch.float32 if torch.float32 in dtypes else next(iter(dtypes)))
    missing, unexpected = m.load_state_dict(ref.state_dict(), strict=False)
    missing = [k for k in missing if not task_head.owns(k)]  # in its own file, loaded next
    if missing or unexpected:
        raise RuntimeError(f"checkpoint/model mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    task_head.load(m, d / "model", install_missing=False)


def load_training_state(ckpt_dir: str | Path, *, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG; return state.json (step, epoch, position)."""
    d = Path(ckpt_dir)
    load_weights(d, model)
    blob = torch.load(d / TRAINER_STATE, weights_only=True, map_location="cpu")
    optimizer.load_state_dict(blob["optimizer"])
    if scheduler is not None and blob["scheduler"] is not None:
        scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    state = read_state(d)
    random.setstate(_py_rng_from_json(state["python_rng"]))
    np.random.set_state(_np_rng_from_json(state["numpy_rng"]))
    return state


def load_for_inference(ckpt_dir: str | Path, base_model_path: str, family_module, dtype: str = "float32"):
    """(model, processor) ready for generation from a checkpoint directory: full weights, or the
    base model plus the adapter merged for speed."""
    d = Path(ckpt_dir)
    if (d / "adapter").exists():
        from peft import PeftModel

        base, processor = family_module.load(base_model_path, dtype=dtype)
        # the base's processor must read inputs as training did (resize, added token ids)
        family_module.check_inference_files(processor, d / "adapter")
        peft_model = PeftModel.from_pretrained(base, str(d / "adapter"))
        _load_extra(peft_model, d / "adapter")
        task_head.load(peft_model, d / "adapter", install_missing=True, processor=processor)
        model = peft_model.merge_and_unload()  # the head stays on the base model
    else:
        model, processor = family_module.load(str(d / "model"), dtype=dtype)  # re-installs a saved task head
    model.eval()
    return model, processor


@contextlib.contextmanager
def local_checkpoint(checkpoint_uri: str, opts=None) -> Iterator[Path]:
    """The checkpoint as a local directory for the with-block: a local one as it is; an S3 one
    downloaded into a temporary directory that is removed when the block ends (also on error)."""
    import tempfile

    from raytrain import storage

    if not storage.is_s3(checkpoint_uri):
        yield Path(checkpoint_uri)
        return
    with tempfile.TemporaryDirectory(prefix="raytrain-ckpt-", ignore_cleanup_errors=True) as d:
        _download(checkpoint_uri, Path(d), opts)
        yield Path(d)


def local_copy(checkpoint_uri: str, opts=None) -> Path:
    """A local directory holding the checkpoint, for a user that keeps the files as long as it lives
    (downloaded from S3 when needed, removed when this process exits; a user that may remove it
    sooner does). A user done with the files at a known point takes `local_checkpoint` instead."""
    from raytrain import storage, tempdirs

    if not storage.is_s3(checkpoint_uri):
        return Path(checkpoint_uri)
    dst = tempdirs.until_exit("raytrain-ckpt-")
    try:
        _download(checkpoint_uri, dst, opts)
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)  # a failed download is of no use to anyone until exit
        raise
    return dst


def _download(checkpoint_uri: str, dst: Path, opts) -> None:
    from raytrain import storage

    fs = storage.fsspec_fs(checkpoint_uri, opts)
    fs.get(storage.strip_scheme(checkpoint_uri).rstrip("/") + "/", str(dst), recursive=True)


def _py_rng_to_json(st):
    return [st[0], list(st[1]), st[2]]


def _py_rng_from_json(st):
    return (st[0], tuple(st[1]), st[2])


def _np_rng_to_json(st):
    return [st[0], st[1].tolist(), int(st[2]), int(st[3]), float(st[4])]


def _np_rng_from_json(st):
    return (st[0], np.array(st[1], dtype=np.uint32), st[2], st[3], st[4])
