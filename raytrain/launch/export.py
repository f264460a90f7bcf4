"""`raytrain export`: a checkpoint -> one merged Hugging Face folder that plain `transformers` loads.

    raytrain export CHECKPOINT OUT [--base-model PATH] [--dtype float32|bfloat16|float16] [--vllm]
                    [--push-to-hub REPO [--private] [--hub-dry-run | --hub-local-dir DIR]]
                    [--endpoint-url URL] [--region REGION]

CHECKPOINT is any checkpoint raytrain writes (local dir or s3://): `adapter/` (LoRA or QLoRA, with
the unfrozen base weights of extra_trainable.safetensors and peft trainable tokens for added
<|loc|> rows), `model/` (full fine-tuning) or ZeRO shards (gathered by launch/consolidate.py).
OUT (a local directory) receives:

    OUT/config.json, model*.safetensors   every trained weight merged in (LoRA deltas, unfrozen
                                          layers, token rows), named as in the published
                                          checkpoints (models/vllm_layout.py), which transformers 5
                                          and vLLM both read
    OUT/<processor and tokenizer files>   as training read inputs (added tokens included)
    OUT/raytrain_resize.json              Qwen2.5-VL: the resize its coordinates are written in
    OUT/state.json                        the records of the checkpoint (family spec, preprocess,
                                          base model, step): what `recorded_preprocess` and Serve read
    OUT/vllm.json                         --vllm: how to serve OUT (and the LoRA form) with vLLM
    OUT/vllm_lora/adapter, base           --vllm with a LoRA checkpoint: the adapter as vLLM loads it
                                          (LoRA weights only; published names) and, when the run
                                          changed base weights (token rows, unfrozen layers, LoRA on
                                          modules vLLM cannot adapt), the base with those merged in

LoRA deltas are merged in float32 into the base loaded in float32, then the folder is cast to
--dtype (default: the training dtype recorded for ZeRO, else the base model's). A QLoRA adapter is
merged into the full-precision base, so the export matches the adapter on the unquantized base;
the 4-bit model of training differs from both by the quantization error.

A model trained with seed 004's task attention head (model.task_head_queries) is refused: no
transformers or vLLM architecture has that module, so an export would silently drop it.
Memory: the base in float32 plus the adapter (about 4 bytes per parameter), on one machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("raytrain.launch.export")

EXPORT_FORMAT = "raytrain.export/1"
VLLM_JSON = "vllm.json"
VLLM_LORA = "vllm_lora"
DTYPES = ("float32", "bfloat16", "float16")
TASK_HEAD_REFUSAL = (
    "{ckpt} was trained with seed 004's task attention head (model.task_head_queries, {file}); no transformers "
    "or vLLM architecture has that module, so a merged folder would silently drop it and answer like another "
    "model. Load it with raytrain instead: raytrain.models.family(spec).load(<checkpoint>/model) or "
    "raytrain.training.checkpointing.load_for_inference(<checkpoint>, <base model>, family) (what `raytrain "
    "eval` and Serve do)")


class ExportRefused(ValueError):
    """The checkpoint cannot be exported to a folder plain transformers loads (the reason says why)."""


@dataclass
class ExportResult:
    out_dir: Path
    kind: str
    """'adapter' | 'model' | 'zero': what the checkpoint held."""
    files: list[str]
    vllm: dict = field(default_factory=dict)
    """With --vllm: the content of vllm.json."""


# ----------------------------------------------------------------------------------------------
# the merged model


def _refuse_task_head(ckpt: str, weights_dir: Path) -> None:
    from raytrain.models import task_head

    if (weights_dir / task_head.FILE).exists():
        raise ExportRefused(TASK_HEAD_REFUSAL.format(ckpt=ckpt, file=f"{weights_dir.name}/{task_head.FILE}"))


def _adapter_model(local: Path, fam, base: str):
    """(peft model with the adapter, its unfrozen base weights and token rows, processor), float32."""
    from peft import PeftModel

    from raytrain.training import checkpointing

    model, processor = fam.load(base, dtype="float32")  # QLoRA: the full-precision base, unquantized
    fam.check_inference_files(processor, local / "adapter")  # same resize, same added token ids
    peft_model = PeftModel.from_pretrained(model, str(local / "adapter"))
    checkpointing.load_weights(local, peft_model)  # + extra_trainable.safetensors (unfrozen layers, projector)
    peft_model.eval()
    return peft_model, processor


def _full_model(weights_dir: Path, fam):
    model, processor = fam.load(str(weights_dir), dtype="float32")
    model.eval()
    return model, processor


def _out_dtype(dtype: str | None, state: dict, base: str) -> str:
    """--dtype, else the training dtype ZeRO records, else the base model's saved dtype, else float32."""
    if dtype:
        return dtype
    if state.get("dtype") in DTYPES:
        return state["dtype"]
    from transformers import AutoConfig

    try:
        saved = getattr(AutoConfig.from_pretrained(base), "dtype", None)
    except (OSError, ValueError):
        saved = None
    name = str(saved).replace("torch.", "") if saved is not None else ""
    return name if name in DTYPES else "float32"


# ----------------------------------------------------------------------------------------------
# writing a folder in the published layout


def rename_to_published(folder: str | Path, family_name: str) -> int:
    """Rewrite the safetensors files `save_pretrained` wrote in `folder` with the published weight
    names (models/vllm_layout.py), shard by shard, and the shard index with them; returns the number
    of names changed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from raytrain.models import vllm_layout

    d = Path(folder)
    changed = 0
    for shard in sorted(d.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            names = list(f.keys())
            meta = f.metadata() or {}
            if all(vllm_layout.is_published(family_name, n) for n in names):
                continue
            tensors = {vllm_layout.published_name(family_name, n): f.get_tensor(n) for n in names}
        changed += sum(1 for n in names if not vllm_layout.is_published(family_name, n))
        save_file(tensors, str(shard), metadata={**meta, "format": "pt"})
    index = d / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {vllm_layout.published_name(family_name, k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2, sort_keys=True))
    return changed


def save_published(model, processor, fam, out: Path, dtype: str) -> None:
    """`save_pretrained` (safetensors) in `dtype` + the processor / inference files, weights renamed
    to the published layout."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    model.to(getattr(torch, dtype))
    model.config.use_cache = True  # training may have turned the KV cache off
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size="5GB")
    fam.save_inference_files(processor, out)
    rename_to_published(out, fam.name)


def _write_record(out: Path, checkpoint: str, state: dict, kind: str, dtype: str) -> None:
    from raytrain.training import checkpointing

    record = {
        "format": EXPORT_FORMAT,
        "source": checkpoint,
        "kind": kind,
        "family": state["family"],
        "base_model": state.get("base_model"),
        "preprocess": state.get("preprocess"),  # eval / Serve preprocess images as training did
        "step": state.get("step"),
        "strategy": state.get("strategy"),
        "dtype": dtype,
        "metrics": state.get("metrics", {}),
    }
    (out / checkpointing.STATE_JSON).write_text(json.dumps(record, indent=2, sort_keys=True))


# ----------------------------------------------------------------------------------------------
# vLLM: the LoRA-only form


def _bake_for_vllm(peft_model, family_name: str) -> tuple[dict[str, str], list[str]]:
    """Merge into the base, in place, every adapter part vLLM cannot apply as a LoRA (trainable token
    rows; LoRA on modules vLLM has no LoRA for); return ({kept LoRA module: scope}, [merged modules])."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    from torch import nn

    from raytrain.models import vllm_layout

    kept, baked = {}, []
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, TrainableTokensLayer):
            module.merge()  # vLLM refuses trainable_tokens_delta keys ("unsupported LoRA weight")
            baked.append(name)
        elif isinstance(module, LoraLayer):
            scope = vllm_layout.vllm_lora_scope(family_name, vllm_layout.published_name(family_name, name))
            if scope is None or not isinstance(module.get_base_layer(), nn.Linear):
                module.merge()
                baked.append(name)
            else:
                kept[name] = scope
    return kept, baked


def _lora_tensors(adapter_dir: Path, modules: set[str]) -> dict:
    """The adapter file's lora_A / lora_B weights of `modules` (names without peft's prefix)."""
    from safetensors import safe_open

    prefix = "base_model.model."
    out = {}
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            for part in (".lora_A.weight", ".lora_B.weight"):
                if key.endswith(part) and key.startswith(prefix) and key[len(prefix):-len(part)] in modules:
                    out[key] = f.get_tensor(key)
    return out


def _write_adapter(dst: Path, config: dict, tensors: dict, rename=None) -> None:
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    if rename is not None:
        tensors = {rename(k): v for k, v in tensors.items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    (dst / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def _stored_in_published_layout(base: str, family_name: str) -> bool:
    """True when the base model's weight files already use the published names (a hub id is taken
    to be a released checkpoint, which does)."""
    from safetensors import safe_open

    from raytrain.models import vllm_layout

    d = Path(base)
    if not d.is_dir():
        return True
    for shard in d.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            if not all(vllm_layout.is_published(family_name, k) for k in f.keys()):
                return False
    return True


def _vllm_lora_form(peft_model, processor, fam, local: Path, base: str, out: Path, final: Path, dtype: str):
    """Write out/vllm_lora/{adapter,base} from the float32 peft model (`final`: where out will be
    renamed to); return (the fully merged model for OUT, the vllm.json 'lora' entry). The merged
    model is the vLLM base plus the kept LoRA, merged the way vLLM applies it."""
    from peft import PeftModel

    from raytrain.models import vllm_layout
    from raytrain.training import checkpointing

    adapter_dir = local / "adapter"
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    kept, baked = _bake_for_vllm(peft_model, fam.name)
    extra = (adapter_dir / checkpointing.EXTRA).exists()
    tensors = _lora_tensors(adapter_dir, set(kept))
    base_model = peft_model.unload()  # LoRA layers out, not merged: the base vLLM adds the adapter to

    lora_cfg = dict(config, trainable_token_indices=None, modules_to_save=None,
                    target_modules=sorted({m.rsplit(".", 1)[-1] for m in kept}))
    need_base = bool(baked or extra or not _stored_in_published_layout(base, fam.name))
    root = out / VLLM_LORA
    if need_base:
        import copy

        # the merge below stays in float32: cast (and save) a copy unless the export is float32
        save_published(base_model if dtype == "float32" else copy.deepcopy(base_model), processor, fam, root / "base", dtype)
        lora_cfg["base_model_name_or_path"] = str(final / VLLM_LORA / "base")
    prefix = "base_model.model."

    def published(key: str) -> str:
        body, part = key[len(prefix):].rsplit(".lora_", 1)
        return prefix + vllm_layout.published_name(fam.name, body) + ".lora_" + part

    _write_adapter(root / "adapter", lora_cfg, tensors, rename=published)

    merged = base_model
    if kept:  # the same LoRA, in transformers' names, added onto the vLLM base: what vLLM serves
        with tempfile.TemporaryDirectory(prefix="raytrain-export-lora-") as tmp:
            _write_adapter(Path(tmp), dict(lora_cfg, target_modules=sorted(kept)), tensors)
            merged = PeftModel.from_pretrained(base_model, tmp).merge_and_unload()
    scopes = sorted(set(kept.values()))
    entry = {
        "adapter": f"{VLLM_LORA}/adapter",
        "base": f"{VLLM_LORA}/base" if need_base else base,
        "max_lora_rank": int(config.get("r", 0)),
        "enable_tower_connector_lora": any(s != "language" for s in scopes),
        "lora_scopes": scopes,
        "merged_into_base": baked + (["extra_trainable.safetensors"] if extra else []),
    }
    return merged, entry


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed --max-lora-rank values


def _vllm_commands(info: dict, out: Path) -> list[str]:
    """`vllm serve` lines for the merged folder and, for a LoRA checkpoint, the LoRA-only form."""
    cmds = [f"vllm serve {out}"]
    lora = info.get("lora")
    if lora:
        rank = next((r for r in VLLM_LORA_RANKS if r >= lora["max_lora_rank"]), lora["max_lora_rank"])
        flags = f"--enable-lora --max-lora-rank {rank}"
        if lora["enable_tower_connector_lora"]:
            flags += " --enable-tower-connector-lora"
        base = out / lora["base"] if lora["base"].startswith(VLLM_LORA) else lora["base"]
        cmds.append(f"vllm serve {base} {flags} --lora-modules raytrain={out / lora['adapter']}")
    return cmds


# ----------------------------------------------------------------------------------------------
# export


def export(checkpoint: str, out_dir: str | Path, base_model_path: str | None = None, *, dtype: str | None = None,
           vllm: bool = False, opts=None) -> ExportResult:
    """Write the checkpoint as one merged Hugging Face folder at out_dir (local); see the module
    docstring. base_model_path: the base the adapter / shards belong to (default: the checkpoint's,
    resolved by its family). ExportRefused when plain transformers could not load what it trained."""
    from raytrain.models import family as model_family
    from raytrain.training import checkpointing

    out = Path(out_dir).resolve()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: export writes a fresh folder")
    with checkpointing.local_checkpoint(checkpoint, opts) as local:  # an S3 download is removed afterwards
        state = checkpointing.read_state(local)
        for weights in ("adapter", "model"):  # before any loading (ZeRO shards: once gathered, below)
            _refuse_task_head(checkpoint, local / weights)
        fam = model_family(state["family"])
        base = base_model_path or fam.resolve(state["base_model"])
        dtype = _out_dtype(dtype, state, base)
        # written next to OUT and renamed at the end: a failed export leaves no half-written OUT
        stage = out.with_name(f".{out.name}.partial")
        shutil.rmtree(stage, ignore_errors=True)
        try:
            kind, info = _write_export(local, checkpoint, state, fam, base, stage, out, dtype, vllm)
            if out.exists():
                out.rmdir()  # empty (checked above)
            stage.rename(out)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    log.info("exported %s (%s, step %s, %s) -> %s", checkpoint, kind, state.get("step"), dtype, out)
    return ExportResult(out, kind, files, info)


def _write_export(local: Path, checkpoint: str, state: dict, fam, base: str, stage: Path, final: Path, dtype: str,
                  vllm: bool) -> tuple[str, dict]:
    """Everything OUT holds, written into `stage` (renamed to `final` by the caller); returns
    (kind of checkpoint, vllm.json content)."""
    from raytrain.launch import consolidate

    info: dict = {}
    with tempfile.TemporaryDirectory(prefix="raytrain-export-") as tmp:
        if (local / "adapter").exists():
            kind = "adapter"
            peft_model, processor = _adapter_model(local, fam, base)
            if vllm:
                model, info["lora"] = _vllm_lora_form(peft_model, processor, fam, local, base, stage, final, dtype)
            else:
                model = peft_model.merge_and_unload()  # LoRA deltas and token rows into the weights
        elif (local / "model").exists():
            kind = "model"
            model, processor = _full_model(local / "model", fam)
        elif "zero_stage" in state:
            kind = "zero"
            consolidate.consolidate(str(local), tmp, base, dtype="float32")  # gather the fp32 shards
            _refuse_task_head(checkpoint, Path(tmp))
            model, processor = _full_model(Path(tmp), fam)
        else:
            raise FileNotFoundError(f"{checkpoint}: no adapter/, model/ or ZeRO shards to export")
        save_published(model, processor, fam, stage, dtype)
    _write_record(stage, checkpoint, state, kind, dtype)
    if vllm:
        info["merged"] = "."
        info["commands"] = _vllm_commands(info, final)
        (stage / VLLM_JSON).write_text(json.dumps(info, indent=2, sort_keys=True))
    return kind, info


# ----------------------------------------------------------------------------------------------
# Hugging Face Hub


def upload_list(folder: str | Path) -> list[str]:
    """The files `HfApi.upload_folder` sends from `folder` (its default ignore patterns applied)."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    root = Path(folder)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return list(filter_repo_objects(files, ignore_patterns=DEFAULT_IGNORE_PATTERNS))


class LocalHubTarget:
    """An `upload_folder`-compatible target that writes into a local directory laid out as the
    repos would be (<root>/<repo_id>/...): an offline mirror, and the way tests exercise the push
    without a network."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def create_repo(self, repo_id: str, *, private: bool | None = None, exist_ok: bool = False, repo_type: str | None = None, **_):
        d = self.root / repo_id
        if d.exists() and not exist_ok:
            raise FileExistsError(f"repo {repo_id} exists in {self.root}")
        d.mkdir(parents=True, exist_ok=True)
        (d / ".repo.json").write_text(json.dumps({"private": bool(private), "repo_type": repo_type or "model"}))
        return str(d)

    def upload_folder(self, *, repo_id: str, folder_path: str | Path, commit_message: str | None = None, **_):
        d = self.root / repo_id
        if not d.is_dir():
            raise FileNotFoundError(f"repo {repo_id} does not exist in {self.root} (create_repo first)")
        for rel in upload_list(folder_path):
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(folder_path) / rel, d / rel)
        (d / ".last_commit").write_text(commit_message or "")
        return str(d)


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None, api=None,
                dry_run: bool = False, commit_message: str | None = None) -> list[str]:
    """Create `repo_id` (if needed) and upload `folder` to it with huggingface_hub's HfApi (or
    `api`: anything with HfApi's create_repo / upload_folder, e.g. LocalHubTarget). dry_run: only
    return the files that would be uploaded. Credentials: `token`, else huggingface_hub's own
    (HF_TOKEN, `hf auth login`); raytrain stores none."""
    files = upload_list(folder)
    if dry_run:
        return files
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                      commit_message=commit_message or "raytrain export")
    return files


# ----------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raytrain export", description="A checkpoint -> one merged Hugging Face folder "
                                "(safetensors + processor + config) that transformers' from_pretrained loads.")
    p.add_argument("checkpoint", help="checkpoint directory (local or s3://): adapter/, model/ or ZeRO shards")
    p.add_argument("out", help="output directory (local, new or empty)")
    p.add_argument("--base-model", default=None, help="base model the checkpoint was trained from (default: its state.json's)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="saved dtype (default: the training / base model dtype)")
    p.add_argument("--vllm", action="store_true", help="also write vllm.json and, for LoRA checkpoints, the LoRA-only form vLLM loads")
    p.add_argument("--push-to-hub", default=None, metavar="REPO", help="upload OUT to this Hugging Face Hub repo (huggingface_hub)")
    p.add_argument("--private", action="store_true", help="create the Hub repo private")
    p.add_argument("--hub-dry-run", action="store_true", help="list the files the push would upload; upload nothing")
    p.add_argument("--hub-local-dir", default=None, help="push into this local directory (<dir>/<REPO>/...) instead of the Hub")
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (e.g. a local moto/minio); credentials come from the environment")
    p.add_argument("--region", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    from raytrain import storage

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.hub_dry_run or args.hub_local_dir or args.private) and not args.push_to_hub:
        parser.error("--hub-dry-run, --hub-local-dir and --private go with --push-to-hub REPO")
    opts = storage.StorageOptions(endpoint_url=args.endpoint_url, region=args.region)
    try:
        res = export(args.checkpoint, args.out, args.base_model, dtype=args.dtype, vllm=args.vllm, opts=opts)
    except (ExportRefused, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"raytrain export: {e}", file=sys.stderr)
        return 2
    for cmd in res.vllm.get("commands", []):
        print(f"vLLM: {cmd}", flush=True)
    if args.push_to_hub:
        api = LocalHubTarget(args.hub_local_dir) if args.hub_local_dir else None
        files = push_to_hub(res.out_dir, args.push_to_hub, private=args.private, api=api, dry_run=args.hub_dry_run)
        verb = "would upload" if args.hub_dry_run else "uploaded"
        where = f"{args.hub_local_dir}/{args.push_to_hub}" if args.hub_local_dir else args.push_to_hub
        print(f"{verb} {len(files)} files to {where}:", flush=True)
        for f in files:
            print(f"  {f}", flush=True)
    print(res.out_dir, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
