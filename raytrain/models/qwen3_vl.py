"""Qwen3-VL family: loading (dense and MoE checkpoints), LoRA targets, freezing, target text, parsing,
tiny preset; `Qwen3_VL` at the bottom binds them into the family object
(`raytrain.models.interface.ModelFamily`): `raytrain.models.family("qwen3_vl")`.

What differs from Qwen2.5-VL (models/qwen2_5_vl.py), and why most of this module is that one's:

* Coordinates: Qwen3-VL writes the same `{"bbox_2d": [x1, y1, x2, y2], "label": ...}` /
  `{"point_2d": [x, y], ...}` JSON, but in 0-1000 RELATIVE coordinates of the image it was given
  (formats/qwen3_vl.py), not absolute pixels of the resized image. Render and parse therefore never
  need the model frame: a target means the same thing at every input size, and the grammar and the
  confidences read numbers in a 1000 x 1000 frame. Answers write digits, so the number loss weighs
  them with range 1000.
* Vision: 16-px patches (merge factor 32 px), learned + 2-D rotary positions, DeepStack mergers
  that add features of early ViT blocks to the first decoder layers: the projector is the merger
  AND the DeepStack mergers (`component`, `apply_freeze_policy`).
* Decoder: Qwen3 (q/k norms, no biases), interleaved M-RoPE. The POSITIONS are computed exactly as
  Qwen2.5-VL's for still images (text counts on; an image block takes (t, row, col) offsets from
  the current position; the text after it continues at current + max(h, w) / merge), only the
  rotary frequencies are assigned to (t, h, w) differently inside the model. So batches, native
  resolution and packing are Qwen2.5-VL's (models/qwen_batch.py: `rope_positions`, `pack`;
  `encode_train`, `encode_prompts`, `prepare_inputs` of models/qwen2_5_vl.py): the processor's
  outputs are the same (`pixel_values`, `image_grid_thw`, `mm_token_type_ids`).
* Chat: Qwen3-VL's template has no default system turn; Instruct checkpoints answer without a
  <think> block, Thinking ones after one, which the parser skips.
* Checkpoints: Qwen/Qwen3-VL-{2B,4B,8B,32B}-Instruct load as `Qwen3VLForConditionalGeneration`,
  Qwen/Qwen3-VL-30B-A3B-Instruct as `Qwen3VLMoeForConditionalGeneration` (`hf_model_class`).

Arguments are plain values; nothing here reads the experiment config.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np

from raytrain import tasks
from raytrain.formats import qwen as qwen_fmt
from raytrain.formats import qwen3_vl as codec
from raytrain.formats import qwen_grammar, text_confidence
from raytrain.formats.numbers import digit_token_ids
from raytrain.models import _quant, qwen2_5_vl, qwen_batch, text_options, tiny
from raytrain.models.qwen_resize import RESIZE_RECORD, check_resize, resize_settings
from raytrain.models.tiny_qwen3 import IMAGE_SIDE, build_tiny_qwen3_vl

NAME = "qwen3_vl"
MODEL_FAMILY = (NAME, "Qwen3_VL")  # read by raytrain.models' registry: (family name, family class)
RELATIVE = "relative"  # the one answer format: 0-1000 relative integers
SCALE = codec.SCALE
NOMINAL_SIDE = 512  # px: the fixed square of stretch / letterbox (1024 patches of 16 px -> 256 LM tokens)
VISION = "model.visual."
VISION_LAYERS = "model.visual.blocks."
PROJECTORS = ("model.visual.merger.", "model.visual.deepstack_merger_list.")
SEQ_KEYS = qwen2_5_vl.SEQ_KEYS
# Prompts: Qwen's grounding phrasing (formats/qwen.py render_prompt, "absolute": the key names and
# "JSON format" are the same for Qwen3-VL, which answers a grounding request in its 0-1000 frame by
# itself); captions and dense captions as Qwen2.5-VL's. A job replaces them with data.text.prompts.
CAPTION_PROMPT = qwen2_5_vl.CAPTION_PROMPT
DENSE_PROMPT = qwen2_5_vl.DENSE_PROMPT


def resolve(name_or_path: str, cache_dir: str | None = None) -> str:
    """'tiny:qwen3_vl' -> local path of the offline preset (built once); anything else unchanged."""
    if tiny.is_tiny(name_or_path):
        return str(tiny.ensure_preset(NAME, build_tiny_qwen3_vl, cache_dir))
    return name_or_path


def load_processor(name_or_path: str, cache_dir: str | None = None):
    """The processor of a hub id, a saved directory or the tiny preset (resize record checked)."""
    from raytrain.models import qwen3_processor  # transformers: imported when a processor loads

    return qwen3_processor.load_processor(resolve(name_or_path, cache_dir))


class Qwen3VLModelClass:
    """Qwen3-VL's two transformers classes behind one, picked by the config's model_type:
    `Qwen3VLForConditionalGeneration` (dense) or `Qwen3VLMoeForConditionalGeneration` (30B-A3B,
    235B-A22B). What `hf_model_class` returns: models/presets.py builds random-weight and meta-device
    models through `_from_config`, export reloads checkpoints through `from_pretrained`."""

    @staticmethod
    def for_config(config) -> type:
        import transformers

        classes = {"qwen3_vl": transformers.Qwen3VLForConditionalGeneration, "qwen3_vl_moe": transformers.Qwen3VLMoeForConditionalGeneration}
        if config.model_type not in classes:
            raise ValueError(f"the qwen3_vl family loads Qwen3-VL checkpoints (model_type {sorted(classes)}), not {config.model_type!r}")
        return classes[config.model_type]

    @classmethod
    def _from_config(cls, config, **kwargs):
        return cls.for_config(config)._from_config(config, **kwargs)

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        from transformers import AutoConfig

        return cls.for_config(AutoConfig.from_pretrained(path)).from_pretrained(path, **kwargs)


def load(name_or_path: str, dtype: str = "float32", cache_dir: str | None = None, device: str | None = None, quant: dict | None = None):
    """(model, processor) through `from_pretrained`, for hub ids and saved presets alike. `quant`
    ({"bits": 4|8, ...}) loads the decoder's linears through bitsandbytes; the vision tower and its
    mergers stay in full precision (the config's PaliGemma-named defaults mapped to Qwen's modules)."""
    import torch

    path = resolve(name_or_path, cache_dir)
    if quant and quant.get("bits"):
        skip = [m.replace("model.vision_tower", "model.visual").replace("model.multi_modal_projector", "model.visual")
                for m in quant.get("skip_modules") or []]
        quant = dict(quant, skip_modules=list(dict.fromkeys(skip)))
    model = Qwen3VLModelClass.from_pretrained(path, dtype=getattr(torch, dtype), **_quant.from_pretrained_kwargs(quant, device))
    _quant.after_load(model, quant, device)
    return model, load_processor(path)


def apply_freeze_policy(model, *, freeze_vision: bool = True, unfreeze_vision_layers: int = 0, train_projector: bool = False,
                        train_language: bool = True) -> None:
    """requires_grad per part, as paligemma.apply_freeze_policy: language model, ViT blocks (frozen
    unless freeze_vision=False; the last `unfreeze_vision_layers` trainable either way), merger and
    DeepStack mergers = the projector (train_projector, or whenever the vision tower trains)."""
    n_layers = len(model.model.visual.blocks)
    keep = tuple(f"{VISION_LAYERS}{i}." for i in range(max(0, n_layers - unfreeze_vision_layers), n_layers))
    for name, p in model.named_parameters():
        if name.startswith(PROJECTORS):
            p.requires_grad_(train_projector or not freeze_vision)
        elif name.startswith(VISION):
            p.requires_grad_((not freeze_vision) or name.startswith(keep))
        else:
            p.requires_grad_(train_language)


def component(param_name: str) -> str:
    """'vision' | 'projector' | 'language' for a parameter name of the transformers 5 layout."""
    if param_name.startswith(PROJECTORS):
        return "projector"
    return "vision" if param_name.startswith(VISION) else "language"


def vision_tower_dims(hf_config) -> dict:
    """Qwen3-VL's ViT: LayerNorm, plain 2-matrix GELU MLP, 2-D rotary (models/memory.py's Tower fields)."""
    v = hf_config.vision_config
    return dict(layers=v.depth, width=v.hidden_size, q=v.hidden_size, kv=v.hidden_size, heads=v.num_heads, mlp=v.intermediate_size,
                n_norm=2, rms=False, rms_fp32_bytes=0, gated=False, rotary=True, eager_softcap=False)


# ----------------------------------------------------------------------------------------------
# target text


def render_with_numbers(task: str, query: str, targets: Sequence, width: int, height: int, fenced: bool = True,
                        empty_answer: str = ""):
    """(user prompt, assistant answer, number spans) for one example, targets in source pixels of a
    width x height image (the relative answer needs no model frame). No targets (a negative):
    `empty_answer`, or the format's own (the empty JSON list)."""
    if empty_answer and not targets and not tasks.per_image(task):
        return render_with_numbers(task, query, targets, width, height, fenced)[0], empty_answer, []
    if task == "caption":
        return CAPTION_PROMPT, targets[0].text.strip(), []
    if task == "dense_caption":
        from raytrain.formats.annotations import Box

        boxes = [Box(r.x1, r.y1, r.x2, r.y2, r.phrase) for r in targets]
        return (DENSE_PROMPT, *codec.render_objects_spans(boxes, width, height, fenced=fenced))
    return (qwen_fmt.render_prompt(task, query, "absolute"), *codec.render_objects_spans(targets, width, height, fenced=fenced))


def parse_output(text: str, task: str, width: int, height: int, empty_answer: str = ""):
    """Model text -> ParseResult with objects in pixels of a width x height image (never raises on
    text); a Thinking model's reasoning is skipped; a "nothing found" answer (the empty list, or
    `empty_answer`) is zero objects and no error."""
    from raytrain.formats.annotations import Caption, ParseError, ParseResult, Region

    answer = codec.strip_reasoning(text)
    if empty_answer and not tasks.per_image(task) and text_options.is_empty_answer(answer, (empty_answer,)):
        return ParseResult([], [])
    if task == "caption":
        clean = answer.strip()
        return ParseResult([Caption(clean)], []) if clean else ParseResult([], [ParseError("empty_output", text)])
    if task == "dense_caption":
        res = codec.parse(answer, "box", width, height)
        return ParseResult([Region(b.x1, b.y1, b.x2, b.y2, b.label) for b in res.objects], res.errors)
    return codec.parse(answer, tasks.kind(task), width, height)


def check_inference_files(processor, saved_dir) -> None:
    """The processor must resize as the checkpoint's training did (its record, when saved)."""
    if (Path(saved_dir) / RESIZE_RECORD).is_file():
        check_resize(processor, saved_dir)


# ----------------------------------------------------------------------------------------------
# the family object (raytrain.models.interface.ModelFamily)


@dataclass(frozen=True)
class Qwen3_VL:
    """Qwen3-VL bound to its answer format ("relative") and a job's text options."""

    answer_format: str = RELATIVE
    prompts: tuple[tuple[str, str], ...] = ()
    """(task, template) pairs replacing the family's own prompts (`with_text`)."""
    system_prompt: str = ""
    """The chat's system turn; "" = none (Qwen3-VL's template has no default one)."""
    empty_answer: str = ""
    """The "nothing found" answer of negatives; "" = the format's own (the empty JSON list)."""
    multi_label: bool = False
    """One example per image and task with every label's objects ("cat ; dog")."""

    name: ClassVar[str] = NAME
    ANSWER_FORMATS: ClassVar[tuple[str, ...]] = (RELATIVE,)
    SEQ_KEYS: ClassVar[tuple[str, ...]] = SEQ_KEYS
    TASKS: ClassVar[tuple[str, ...]] = ("point", "detect", "caption", "dense_caption")
    supports_task_head: ClassVar[bool] = False  # variable image tokens per image (models/task_head.py)
    TINY_IMAGE_SIZE: ClassVar[int] = IMAGE_SIDE
    PREFIX_LM_MASK: ClassVar[bool] = False  # causal attention throughout
    # The released Qwen/Qwen3-VL-* checkpoints name weights as transformers 5 does (model.language_model.*,
    # model.visual.*, lm_head), which is also what vLLM's qwen3_vl loader maps from.
    PUBLISHED_RENAMES: ClassVar[tuple[tuple[str, str], ...]] = (
        ("model.language_model.", "model.language_model."),
        ("model.visual.", "model.visual."),
        ("lm_head.", "lm_head."),
    )
    VLLM_LORA_SCOPES: ClassVar[tuple[tuple[str, str], ...]] = (
        ("model.language_model.layers.", "language"),
        ("model.visual.blocks.", "tower"),
        ("model.visual.merger.", "connector"),
        ("model.visual.deepstack_merger_list.", "connector"),
    )
    RESIZE_MODES: ClassVar[tuple[str, ...]] = qwen2_5_vl.Qwen2_5_VL.RESIZE_MODES  # native: Qwen's own per-image size

    def __post_init__(self):
        if self.answer_format not in self.ANSWER_FORMATS:
            raise ValueError(f"unknown Qwen3-VL answer format {self.answer_format!r}; known: {list(self.ANSWER_FORMATS)}")

    @property
    def spec(self) -> str:
        return NAME

    def with_text(self, prompts=None, system_prompt: str = "", empty_answer: str = "", multi_label: bool = False):
        return replace(self, prompts=text_options.prompt_table(prompts), system_prompt=system_prompt,
                       empty_answer=empty_answer, multi_label=multi_label)

    # loading
    resolve = staticmethod(resolve)

    def load(self, name_or_path: str, dtype: str = "float32", cache_dir: str | None = None, device: str | None = None,
             quant: dict | None = None):
        return load(name_or_path, dtype=dtype, cache_dir=cache_dir, device=device, quant=quant)

    def load_processor(self, name_or_path: str, cache_dir: str | None = None):
        return load_processor(name_or_path, cache_dir)

    def real_presets(self) -> list:
        from raytrain.models import presets_qwen3_vl

        return presets_qwen3_vl.real_presets()

    def hf_model_class(self) -> type:
        return Qwen3VLModelClass

    def build_tiny_preset(self, out_dir, seed: int = 0, image_size: int | None = None) -> Path:
        return build_tiny_qwen3_vl(out_dir, seed=seed, image_size=image_size)

    # training
    lora_target_modules = staticmethod(qwen2_5_vl.lora_target_modules)  # model.language_model / model.visual, as Qwen2.5-VL
    apply_freeze_policy = staticmethod(apply_freeze_policy)
    component = staticmethod(component)
    vision_tower_dims = staticmethod(vision_tower_dims)

    def new_token_ids(self, processor) -> list[int]:
        return []  # digits only: nothing added to the vocabulary

    def loc_token_ids(self, tokenizer):
        return np.zeros(0, dtype=np.int64)

    def image_tokens(self, processor) -> int | None:
        return None  # smart_resize: the count follows each image's size

    # text
    def _render(self, task, query, targets, width, height):
        prompt, answer, numbers = render_with_numbers(task, query, targets, width, height, empty_answer=self.empty_answer)
        return text_options.prompt_for(self.prompts, task, query, prompt), answer, numbers

    def render_example(self, task, query, targets, width, height, image_hw=None):
        return self._render(task, query, targets, width, height)[:2]

    def parse_output(self, text, task, width, height, image_hw=None):
        return parse_output(text, task, width, height, empty_answer=self.empty_answer)

    def answer_numbers(self, task, query, targets, width, height, image_hw=None) -> list:
        return self._render(task, query, targets, width, height)[2]

    def digit_token_ids(self, tokenizer):
        return digit_token_ids(tokenizer)

    # encoding: Qwen2.5-VL's (same processor outputs and chat message layout; see the module doc)
    def image_size(self, processor) -> tuple[int, int]:
        return qwen2_5_vl.image_size(processor, NOMINAL_SIDE)

    def encode_train(self, processor, images, prefixes, suffixes, max_len, numbers=None) -> dict:
        return qwen2_5_vl.encode_train(processor, images, prefixes, suffixes, max_len, numbers, system=self.system_prompt or None)

    def encode_prompts(self, processor, images, prefixes) -> dict:
        return qwen2_5_vl.encode_prompts(processor, images, prefixes, system=self.system_prompt or None)

    prepare_inputs = staticmethod(qwen2_5_vl.prepare_inputs)
    stop_token_ids = staticmethod(qwen2_5_vl.stop_token_ids)
    input_size = staticmethod(qwen_batch.input_size)

    def input_frame(self, processor, resize: str, min_pixels: int = 0, max_pixels: int = 0):
        if resize == "native":
            return qwen_batch.native_frame(resize_settings(processor), min_pixels, max_pixels)
        if resize in ("stretch", "letterbox"):
            return self.image_size(processor)
        raise ValueError(f"Qwen3-VL resizes {' | '.join(self.RESIZE_MODES)}, not {resize!r}")

    def pack(self, examples, length: int, pad_id: int) -> dict:
        return qwen_batch.pack(examples, length, pad_id)

    # constrained decoding, confidences: Qwen2.5-VL's JSON grammar in the 1000 x 1000 frame
    def grammar(self, processor, kind: str, labels, image_hw, max_objects: int | None = None):
        if kind == "region":  # dense captions: boxes with free phrases in the 0-1000 frame
            return qwen_grammar.compiled_region_grammar(processor.tokenizer, "absolute", SCALE, SCALE, max_objects or None,
                                                        (qwen2_5_vl.IM_END,))
        if kind not in codec.KINDS or not labels:
            return None  # captions: free text
        return qwen_grammar.compiled_grammar(processor.tokenizer, kind, tuple(labels), "absolute", SCALE, SCALE, max_objects or None,
                                             self.empty_answer, end_tokens=(qwen2_5_vl.IM_END,))

    def object_confidences(self, logprobs, token_ids, processor, kind: str, labels, image_hw) -> list[float]:
        g = self.grammar(processor, kind, labels, image_hw)
        if g is None:
            return []
        shape = "box" if kind == "region" else kind  # a region is read as a box labelled with its phrase
        # the same parse read_answer makes (no label filter), in frame units: objects match by order
        return text_confidence.text_object_confidences(logprobs, token_ids, g, lambda text: codec.parse(text, shape, SCALE, SCALE).objects)

    # checkpoints: the processor and its resize record, as Qwen2.5-VL's
    save_inference_files = staticmethod(qwen2_5_vl.save_inference_files)
    save_adapter_files = staticmethod(qwen2_5_vl.save_adapter_files)
    check_inference_files = staticmethod(check_inference_files)
