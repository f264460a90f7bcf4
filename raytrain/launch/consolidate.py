"""`raytrain consolidate`: ZeRO shards -> one plain Hugging Face model directory.

    raytrain consolidate CHECKPOINT OUT [--base-model PATH] [--dtype float32|bfloat16]
                         [--endpoint-url URL] [--region REGION]

CHECKPOINT is a ZeRO checkpoint written by recipes/zero.py (local dir or s3://...). The fp32
master weights are gathered from every rank's shard (DeepSpeed's zero_to_fp32), loaded into the
base architecture, and written with `save_pretrained(safe_serialization=True)` plus the
processor, so `from_pretrained(OUT)` loads it. OUT may be s3://; writing it to <CHECKPOINT>/model
makes the checkpoint usable by `raytrain eval` / `checkpointing.load_for_inference` as is.

Memory: the gathered fp32 state dict and the model are both held in CPU RAM (about 8 bytes per
parameter), on one machine; no GPU and no process group are needed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("raytrain.launch.consolidate")

INFO_JSON = "raytrain_consolidated.json"


def consolidate(checkpoint: str, out_dir: str, base_model_path: str | None = None, *, dtype: str | None = None, opts=None) -> str:
    """Write the checkpoint's full weights as an HF model directory at out_dir; returns out_dir.

    base_model_path: the architecture + processor to load into (default: the checkpoint's base
    model, resolved by its family). dtype: default the training dtype recorded in state.json."""
    import torch

    from raytrain import storage
    from raytrain.models import family as model_family
    from raytrain.models import task_head
    from raytrain.training import checkpointing, zero_checkpoint

    with checkpointing.local_checkpoint(checkpoint, opts) as local:  # an S3 download is removed once the shards are read
        state = zero_checkpoint.read_state(local)
        if "zero_stage" not in state:
            raise ValueError(f"{checkpoint} is not a ZeRO checkpoint (strategy {state.get('strategy')!r}); nothing to consolidate")
        sd = zero_checkpoint.fp32_state_dict(local)
    fam = model_family(state["family"])
    base = base_model_path or fam.resolve(state["base_model"])

    model, processor = fam.load(base, dtype="float32")
    task_head.install_from_state_dict(model, sd, processor)  # trained with model.task_head_queries
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"checkpoint/base model mismatch: missing={result.missing_keys[:5]} unexpected={result.unexpected_keys[:5]}")
    del sd
    model.to(getattr(torch, dtype or state["dtype"]))

    def write(d: Path) -> None:
        task_head.save_model(model, d)  # save_pretrained (+ task_head.safetensors)
        fam.save_inference_files(processor, d)
        info = {"source": checkpoint, "step": state["step"], "strategy": state["strategy"], "base_model": state["base_model"],
                "dtype": dtype or state["dtype"]}
        (d / INFO_JSON).write_text(json.dumps(info, indent=2, sort_keys=True))

    if storage.is_s3(out_dir):
        with tempfile.TemporaryDirectory(prefix="raytrain-consolidated-") as tmp:
            write(Path(tmp))
            fs = storage.fsspec_fs(out_dir, opts)
            fs.put(tmp.rstrip("/") + "/", storage.strip_scheme(out_dir).rstrip("/") + "/", recursive=True)
    else:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write(Path(out_dir))
    log.info("consolidated %s (step %d, %s) -> %s", checkpoint, state["step"], state["strategy"], out_dir)
    return out_dir


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raytrain consolidate", description="ZeRO checkpoint shards -> a Hugging Face model directory (safetensors + processor).")
    p.add_argument("checkpoint", help="ZeRO checkpoint directory (local or s3://)")
    p.add_argument("out", help="output directory (local or s3://); <checkpoint>/model makes the checkpoint evaluable")
    p.add_argument("--base-model", default=None, help="base model to load the weights into (default: the checkpoint's)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="saved dtype (default: the training dtype)")
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (e.g. a local moto/minio); credentials come from the environment")
    p.add_argument("--region", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    from raytrain import storage

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = _parser().parse_args(argv)
    opts = storage.StorageOptions(endpoint_url=args.endpoint_url, region=args.region)
    print(consolidate(args.checkpoint, args.out, args.base_model, dtype=args.dtype, opts=opts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
