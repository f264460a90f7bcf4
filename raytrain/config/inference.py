"""Config sections of what runs a trained model: `raytrain eval` (the job's `eval` section, with its
decoding grid) and `raytrain serve` (`ServeConfig`, its own YAML). Split out of raytrain/config/__init__.py,
which re-exports every name here; defaults live here and nowhere else, like the rest of raytrain/config/.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

ADAPTER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""A Serve adapter id: one path segment, letters, digits, '.', '_', '-', starting with a letter or digit (never '..')."""

DTYPES = ("auto", "float32", "bfloat16", "float16")
"""Inference dtypes: auto = bfloat16 where the model runs on a GPU, float32 on CPU."""

DECODING_KEYS = ("max_new_tokens", "num_beams", "do_sample", "temperature", "top_p", "top_k", "no_repeat_ngram_size",
                 "length_penalty", "early_stopping", "seed")
"""What one decoding of eval.grid.decodings may set (raytrain.eval.grid.DecodingConfig's fields)."""


def _check_dtype(where: str, value: str) -> None:
    if value not in DTYPES:
        raise ValueError(f"{where} must be one of {list(DTYPES)}, got {value!r}")


@dataclass
class GridConfig:
    """`raytrain eval`'s decoding grid (seed 003): every checkpoint x prompt x decoding is one
    evaluation of the split, all in one table. Empty (the default): one plain evaluation."""

    prompts: dict[str, str] = field(default_factory=dict)
    """Row name -> prompt the model is given instead of the family's own ("{query}" is the label of a
    grounding example; caption prompts have none). Empty: the family's prompt only."""
    decodings: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Row name -> decoding settings (max_new_tokens, num_beams, do_sample, temperature, top_p, top_k,
    no_repeat_ngram_size, length_penalty, early_stopping, seed), e.g. {G: {}, B+S: {num_beams: 4,
    do_sample: true, top_p: 0.9}}. Empty: eval.decoding only."""
    checkpoints: dict[str, str] = field(default_factory=dict)
    """Row name -> checkpoint URI; "" = the run's latest (or eval.checkpoint), "base" = the untrained
    base model. Empty: eval.checkpoint (or the run's latest) only."""
    metrics: list[str] = field(default_factory=list)
    """Table columns as dotted metric names (e.g. captions.bleu_1, captions.meteor, coco.map,
    point_prf.f1); empty = every headline metric the cells have."""

    def __post_init__(self):
        for name, d in self.decodings.items():
            unknown = sorted(set(d) - set(DECODING_KEYS))
            if unknown:
                raise ValueError(f"eval.grid.decodings.{name}: unknown key(s) {unknown}; known: {list(DECODING_KEYS)}")

    @property
    def active(self) -> bool:
        return bool(self.prompts or self.decodings or self.checkpoints)


@dataclass
class EvalConfig:
    split: str = "test"
    batch_size: int = 64
    """Examples one predictor decodes together (per actor)."""
    bucket_batches: int = 4
    """Length bucketing: each actor call takes up to this many batches, orders them by task and prompt
    length and decodes them batch by batch, so answers of one task stop together and prompts need
    little padding. 1 = off (batches as they come)."""
    max_new_tokens: int = 16
    num_actors: int = 2
    """Predictor actors in the Ray Data evaluation pool (a fixed pool; see max_actors)."""
    min_actors: int = 0
    """With max_actors > 0: the autoscaling pool's lower bound (0 = 1)."""
    max_actors: int = 0
    """> 0: an autoscaling pool of min_actors..max_actors predictors that grows while the cluster has
    room (Ray Data's actor autoscaler); 0 = num_actors, fixed."""
    cpus_per_actor: float = 0.5
    gpus_per_actor: float = 0.0
    """GPUs each predictor actor reserves (fractions share a GPU, e.g. 0.5 = two actors per GPU);
    0 = CPU predictors. The model is placed on the actor's GPU when CUDA is visible there, else on CPU."""
    accelerator_type: str | None = None
    """Pin GPU predictors to a GPU type (e.g. 'H100' for a model that needs 80 GB in bfloat16)."""
    cpu_fallback: bool = True
    """With gpus_per_actor > 0 on a cluster that has no GPU at all: run the pool on CPU (printed).
    False: keep asking for GPUs (clusters whose GPU workers start on demand, cluster.yaml)."""
    dtype: str = "auto"
    """Predictor weights: auto (bfloat16 on a GPU, float32 on CPU) | float32 | bfloat16 | float16."""
    limit: int = 0
    """Score only this many rows (images) of the split, each asked every task; 0 = the whole split."""
    limit_random: bool = False
    """With limit: a random sample of the split's rows (seeded by eval.seed) instead of the first ones."""
    seed: int = 0
    """Seed of eval.limit_random and of sampled decoding (each batch is seeded from it and its first example)."""
    baselines: bool = True
    """Also score the untrained model and the blind centre baselines."""
    checkpoint: str = ""
    """`raytrain eval`: checkpoint URI to evaluate; empty = the run's latest checkpoint."""
    constrained: bool = True
    """Grammar-constrained decoding for grounding tasks (every family and answer format with a
    grammar): valid output by construction, labels from the query."""
    max_objects: int = 0
    """With constrained decoding: at most this many objects per output (0 = no limit)."""
    confidence: bool = True
    """Per-object confidence from token log-probabilities (geometric mean over its loc + label tokens):
    COCO AP ranks by it, calibration measures it."""
    nms_iou: float = 0.0
    """> 0: class-aware non-maximum suppression of each answer's boxes at this IoU (needs confidences)."""
    calibration_bins: int = 10
    """Equal-width confidence bins of the reliability diagram / ECE."""
    clip_path: str = ""
    """A local CLIP model folder (save_pretrained): caption examples also get CLIPScore (Hessel et al.
    2021) against their image. "" = no CLIPScore. Nothing is downloaded."""
    decoding: dict[str, Any] = field(default_factory=dict)
    """Extra generate() kwargs, e.g. {num_beams: 2} or {do_sample: true, top_p: 0.9} (greedy if empty)."""
    grid: GridConfig = field(default_factory=GridConfig)

    def __post_init__(self):
        _check_dtype("eval.dtype", self.dtype)
        if self.batch_size < 1 or self.bucket_batches < 1 or self.max_new_tokens < 1:
            raise ValueError("eval.batch_size, eval.bucket_batches and eval.max_new_tokens must be >= 1")
        if self.gpus_per_actor < 0 or self.cpus_per_actor < 0:
            raise ValueError("eval.gpus_per_actor and eval.cpus_per_actor must be >= 0")
        if self.max_actors < 0 or self.min_actors < 0 or self.min_actors > self.max_actors:
            raise ValueError(f"need 0 <= eval.min_actors <= eval.max_actors (max_actors 0 = a fixed pool of num_actors), "
                             f"got {self.min_actors}, {self.max_actors}")
        if self.num_actors < 1:
            raise ValueError("eval.num_actors must be >= 1")
        if self.limit < 0:
            raise ValueError("eval.limit must be >= 0 (0 = the whole split)")
        if not 0.0 <= self.nms_iou < 1.0:
            raise ValueError(f"eval.nms_iou is an IoU threshold in [0, 1) (0 = off), got {self.nms_iou}")
        if self.calibration_bins < 1:
            raise ValueError("eval.calibration_bins must be >= 1")

    @property
    def pool_size(self) -> int | tuple[int, int]:
        """Ray Data's `concurrency` of the predictor pool: n (fixed) or (min, max) (autoscaling)."""
        return (max(1, self.min_actors), self.max_actors) if self.max_actors else self.num_actors


@dataclass
class ServeConfig:
    """`raytrain serve` settings (raytrain/serve/app.py): its own YAML file (`-c serve.yaml`) and
    key=value overrides, listed by `raytrain serve --help-fields` and `raytrain config --help-fields`."""

    family: str = "paligemma"
    """Model family spec (raytrain.models.family): paligemma | qwen2_5_vl | qwen2_5_vl+tokens | ..."""
    model: str = "tiny:paligemma"
    """Base model: hub id, local dir, or 'tiny:<family>' (offline preset). Every adapter must be a LoRA of it."""
    adapter_root: str | None = None
    """Adapter id X maps to <adapter_root>/X, a checkpoint dir holding adapter/ (local dir or s3://)."""
    adapters: dict[str, str] = field(default_factory=dict)
    """Explicit id -> checkpoint dir (local or s3://); checked before adapter_root."""
    endpoint_url: str | None = None
    """S3 endpoint for s3:// adapters (e.g. http://127.0.0.1:9000); None = AWS. Keys only from the environment."""
    region: str | None = None
    dtype: str = "auto"
    """Base model dtype: auto (bfloat16 on a GPU, float32 on CPU) | float32 | bfloat16 | float16."""
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
    gpus_per_replica: float = 0.0
    """GPUs each model replica reserves (Ray actor option num_gpus; fractions share a GPU)."""
    constrained: bool = True
    """Grammar-constrained decoding for grounding tasks (valid answers by construction, labels from the prompt)."""
    mask_codec: str = ""
    """PaliGemma segment answers: path of the mask codec weights (big_vision's vae-oid.npz) on the replicas'
    nodes; "" = RAYTRAIN_MASK_CODEC of their environment (without either, segment requests get 501)."""
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

    MOVED_KEYS = {"num_gpus": "gpus_per_replica"}

    def __post_init__(self):
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}), or a replica never sees a full batch")
        if not 1 <= self.max_new_tokens <= self.max_new_tokens_limit:
            raise ValueError("need 1 <= max_new_tokens <= max_new_tokens_limit")
        if self.gpus_per_replica < 0:
            raise ValueError("gpus_per_replica must be >= 0")
        _check_dtype("dtype", self.dtype)
        for k in self.adapters:
            if not ADAPTER_ID.fullmatch(k):
                raise ValueError(f"adapter id {k!r} must match {ADAPTER_ID.pattern}")
