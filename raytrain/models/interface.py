"""The model-family interface: every member a family provides, in one place.

A family object is one model family (PaliGemma, Qwen2.5-VL, ...) bound to one answer format (how
its answers write coordinates: PaliGemma's <loc> tokens; Qwen2.5-VL's absolute pixels, normalized
0-1, added location tokens or (phrase, box) pairs). `raytrain.models.family(spec)` returns one
immutable object per spec ("paligemma", "qwen2_5_vl+tokens"); every caller outside `models/` talks
to it through these members only, never by comparing family names or probing with hasattr.

Each family module (`models/<family>.py`) implements ALL of it as a frozen dataclass, a no-op where
nothing applies. No implementation inheritance between families: a member two families share is a
plain function both call. A new family adds a module here that declares `MODEL_FAMILY = (name, class name)` (the registry,
`raytrain.models.FAMILIES`, finds it), its answer-format codec under `formats/`, a tiny preset
builder, its real-size presets, tests and a job YAML; nothing else changes.

Arguments are plain values: no family member reads the experiment config.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable


@runtime_checkable
class ModelFamily(Protocol):
    # ---- identity ------------------------------------------------------------------------------
    name: ClassVar[str]
    """Family name: the part of a spec before '+', the key in raytrain.models.FAMILIES."""
    ANSWER_FORMATS: ClassVar[tuple[str, ...]]
    """Answer formats this family can be trained to write; the first is its default."""
    answer_format: str
    """The format this object renders, parses, constrains and scores."""
    prompts: tuple[tuple[str, str], ...]
    """(task, template) pairs replacing the family's own prompts ("{query}" = the label(s))."""
    system_prompt: str
    """Chat families: the system turn ("" = the template's default); others refuse a non-empty one."""
    empty_answer: str
    """The "nothing found" answer of negatives ("" = the format's own); always accepted by parse and grammar."""
    multi_label: bool
    """One example per image and task with every label's objects (the pipeline reads it)."""
    SEQ_KEYS: ClassVar[tuple[str, ...]]
    """Per-token (B, T) arrays of `encode_train` whose shared right padding the recipe trims."""
    TASKS: ClassVar[tuple[str, ...]]
    """Tasks (raytrain.tasks names) this family renders and parses."""
    supports_task_head: ClassVar[bool]
    """Whether seed 004's task attention head (models/task_head.py) fits the family's prompt layout."""

    @property
    def spec(self) -> str:
        """'qwen2_5_vl+tokens' ('qwen2_5_vl' for the default format): what checkpoints record."""
        ...

    def with_text(self, prompts=None, system_prompt: str = "", empty_answer: str = "", multi_label: bool = False):
        """A copy bound to a job's text options (config.TextOptions / a checkpoint's "text" record)."""
        ...

    # ---- loading -------------------------------------------------------------------------------
    def resolve(self, name_or_path: str, cache_dir: str | None = None) -> str:
        """'tiny:<family>' -> the offline preset's directory (built once); anything else unchanged."""
        ...

    def load(self, name_or_path: str, dtype: str = "float32", cache_dir: str | None = None, device: str | None = None,
             quant: dict | None = None) -> tuple[Any, Any]:
        """(model, processor) through `from_pretrained`; `quant` = config.QuantConfig as a dict."""
        ...

    def load_processor(self, name_or_path: str, cache_dir: str | None = None) -> Any: ...

    def real_presets(self) -> list:
        """The released checkpoints' architectures as models.preset_spec.Preset (memory planner,
        parameter counts, random-weight benchmarks)."""
        ...

    def hf_model_class(self) -> type:
        """The transformers class (for random-weight real-size models and checkpoint loading)."""
        ...

    def build_tiny_preset(self, out_dir: str | Path, seed: int = 0, image_size: int | None = None) -> Path:
        """Build the offline tiny preset (tokenizer + processor + random-init model) into out_dir."""
        ...

    TINY_IMAGE_SIZE: ClassVar[int]
    """The tiny preset's default input side (ensure_preset maps it to the default cache entry)."""

    # ---- training ------------------------------------------------------------------------------
    def lora_target_modules(self, names: Sequence[str], include_vision: bool = False) -> str:
        """peft `target_modules` regex over the language model's (and optionally the tower's) linears."""
        ...

    def apply_freeze_policy(self, model, *, freeze_vision: bool = True, unfreeze_vision_layers: int = 0,
                            train_projector: bool = False, train_language: bool = True) -> None: ...

    def component(self, param_name: str) -> str:
        """'vision' | 'projector' | 'language' for a parameter name of the transformers layout."""
        ...

    def new_token_ids(self, processor) -> list[int]:
        """Vocabulary rows the answer format adds (trained by LoRA's trainable tokens, warmed up first)."""
        ...

    def loc_token_ids(self, tokenizer):
        """int64 array of the coordinate-bin token ids in bin order (the distance-aware loss's bins);
        empty when the format writes coordinates as text."""
        ...

    def image_tokens(self, processor) -> int | None:
        """Language-model tokens per image, or None when it varies per image."""
        ...

    def vision_tower_dims(self, hf_config) -> dict:
        """The vision tower's shape for the memory planner (models/memory.py Tower fields)."""
        ...

    PREFIX_LM_MASK: ClassVar[bool]
    """True when training builds a 4-D prefix-LM attention mask (memory planner)."""

    # ---- export (models/vllm_layout.py applies these) -------------------------------------------
    PUBLISHED_RENAMES: ClassVar[tuple[tuple[str, str], ...]]
    """(prefix as a weight name may come, prefix in the released checkpoints' layout), first match wins."""
    VLLM_LORA_SCOPES: ClassVar[tuple[tuple[str, str], ...]]
    """(published module prefix, 'language' | 'tower' | 'connector'): where vLLM can carry a LoRA."""

    # ---- text: prompts, targets, parsing ---------------------------------------------------------
    def render_example(self, task: str, query: str, targets: Sequence, width: int, height: int,
                       image_hw: tuple[int, int] | None = None) -> tuple[str, str]:
        """(prompt, answer) for one example; targets in source pixels of a width x height image,
        answer in the frame of the model input image_hw."""
        ...

    def parse_output(self, text: str, task: str, width: int, height: int, image_hw: tuple[int, int] | None = None):
        """Model text -> ParseResult in source pixels; never raises on text."""
        ...

    def answer_numbers(self, task: str, query: str, targets: Sequence, width: int, height: int,
                       image_hw: tuple[int, int] | None = None) -> list:
        """The coordinate numbers written as digits in `render_example`'s answer for the same
        arguments: formats.numbers.NumberSpan (span, range) each, recorded while rendering; [] for
        formats without digits (<loc> / <|loc|> tokens)."""
        ...

    def digit_token_ids(self, tokenizer):
        """int64 ids of the tokens '0'..'9' (the number loss's digit distribution), or None."""
        ...

    # ---- encoding and generation -------------------------------------------------------------------
    def image_size(self, processor) -> tuple[int, int]:
        """(height, width) of the family's fixed model input for this processor (stretch / letterbox)."""
        ...

    RESIZE_MODES: ClassVar[tuple[str, ...]]
    """data.preprocess.resize modes the family takes (stretch | letterbox | native); the first is its
    default (what an experiment's empty resize resolves to)."""

    def input_frame(self, processor, resize: str, min_pixels: int = 0, max_pixels: int = 0):
        """The model input images are sized to under `resize`, as a plain (picklable) value for data
        tasks: the fixed (H, W) of `image_size` for stretch / letterbox; for "native", the family's
        per-image sizing settings (a dict; min/max_pixels > 0 replace the processor's bounds).
        ValueError for a mode the family does not take."""
        ...

    def input_size(self, frame, width: int, height: int) -> tuple[int, int]:
        """(H, W) of the model input of one width x height source image under `frame` (what
        `input_frame` returned): the fixed size, or the family's own size for this image."""
        ...

    def pack(self, examples: Sequence[dict], length: int, pad_id: int) -> dict:
        """One packed training row of `length` tokens from encoded examples (each one row of
        `encode_train`'s output, its per-token arrays cut to the example's length): per-token arrays
        concatenated in order and right-padded (input_ids with `pad_id`, labels ignored), per-image
        arrays joined in order, and `position_ids` restarting at every example (and for the padding)
        exactly as each example is positioned alone, from which `prepare_inputs` makes the model
        attend within each example only (with the family's own mask inside it). The loss over a
        packed batch equals the loss over the same examples unpacked."""
        ...

    def encode_train(self, processor, images: Sequence, prefixes: Sequence[str], suffixes: Sequence[str], max_len: int,
                     numbers: Sequence | None = None) -> dict:
        """Teacher-forced batch padded to max_len (numpy); `numbers` (answer_numbers per example)
        adds `num_place`, each coordinate digit's signed place weight at its label position."""
        ...

    def encode_prompts(self, processor, images: Sequence, prefixes: Sequence[str]) -> dict:
        """Left-padded, model-ready prompt batch (torch tensors) for generation."""
        ...

    def prepare_inputs(self, inputs: dict) -> dict:
        """A delivered training batch -> `model(**inputs)` keywords (pixels normalised, per-image arrays
        of the rows joined in row order, packed rows' positions in the model's layout)."""
        ...

    def stop_token_ids(self, tokenizer) -> list[int]:
        """Token ids that end an answer."""
        ...

    # ---- constrained decoding and confidences -----------------------------------------------------
    def grammar(self, processor, kind: str, labels: Sequence[str], image_hw: tuple[int, int], max_objects: int | None = None):
        """A decoding grammar (the `allowed(generated_ids, remaining)` / `loc_ids` interface of
        formats/grammar.py) for answers of `kind` naming only `labels`, or None when the format has
        no grammar for that kind (captions: free text)."""
        ...

    def object_confidences(self, logprobs: Sequence[float], token_ids: Sequence[int], processor, kind: str,
                           labels: Sequence[str], image_hw: tuple[int, int]) -> list[float]:
        """One confidence per object of the parsed answer (same order; NaN where an object cannot be
        placed in the tokens; [] where the format has none): the geometric mean of the raw
        probabilities of the tokens that spell its coordinates and label. `labels`: the query's."""
        ...

    # ---- checkpoints: inference files and adapter extras ---------------------------------------
    def save_inference_files(self, processor, out_dir: str | Path) -> None:
        """What a full-weights checkpoint needs to be used as trained (processor, resize record...)."""
        ...

    def save_adapter_files(self, processor, out_dir: str | Path) -> None:
        """What an adapter checkpoint needs beside its weights (resize record, added tokenizer...)."""
        ...

    def check_inference_files(self, processor, saved_dir: str | Path) -> None:
        """Raise ValueError when `processor` would not read inputs as the files saved in
        `saved_dir` say training did (another resize, other token ids); no-op when nothing is saved."""
        ...


REQUIRED_MEMBERS: tuple[str, ...] = tuple(sorted(
    {n for n in ModelFamily.__annotations__ if not n.startswith("_")}
    | {n for n, v in vars(ModelFamily).items() if not n.startswith("_") and (callable(v) or isinstance(v, property))}
))
"""Every member name of the interface (the tests check each family provides all of them)."""
