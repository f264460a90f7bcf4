"""PaliGemma 1/2 family: loading, LoRA targets, freezing, target text, batch encoding, parsing,
constrained decoding and confidences (`<loc>` answers), tiny preset.

The module's functions are plain and testable on their own; `PaliGemma` at the bottom binds them
into the family object (the `raytrain.models.interface.ModelFamily` interface) that every caller
outside `models/` uses: `raytrain.models.family("paligemma")`.
Arguments are plain values; nothing here reads the experiment config.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np

from raytrain import tasks
from raytrain.formats import molmo
from raytrain.formats import paligemma as fmt
from raytrain.formats.numbers import digit_token_ids, token_place_weights
from raytrain.formats.paligemma import NUM_LOC, loc_token
from raytrain.models import _quant, molmo_answers, paligemma_decoding, text_options, tiny
from raytrain.models._batch import apply_pixel_affine, concat_tokens, fixed_size, join_images, pixel_affine, restarting_positions, to_uint8
from raytrain.models.tiny_paligemma import DEFAULT_IMAGE_SIZE, build_tiny_paligemma

NAME = "paligemma"
MODEL_FAMILY = (NAME, "PaliGemma")  # read by raytrain.models' registry: (family name, family class)
END_TOKEN = "<eos>"
# A suffix written as text starts with sentencepiece's "▁" in the labels the processor builds
# (prompt and suffix are tokenized as a pair): its text grammars expect that leading space.
TEXT_LEAD = " "
IGNORE_INDEX = -100  # label value the loss skips (prefix, image and padding positions)
# Per-token (B, T) arrays of encode_train: the recipe trims their shared padding per batch.
# Every other key (pixel_values, ...) is passed to the model as is.
SEQ_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def resolve(name_or_path: str, cache_dir: str | None = None) -> str:
    """'tiny:paligemma' -> local path of the offline preset (built once); anything else unchanged
    (a hub id such as google/paligemma2-3b-pt-224, or a local directory)."""
    if tiny.is_tiny(name_or_path):
        return str(tiny.ensure_preset(NAME, build_tiny_paligemma, cache_dir))
    return name_or_path


def load_processor(name_or_path: str, cache_dir: str | None = None):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(resolve(name_or_path, cache_dir))


def load(name_or_path: str, dtype: str = "float32", cache_dir: str | None = None, device: str | None = None, quant: dict | None = None):
    """(model, processor) through `from_pretrained`, for hub ids and saved presets alike; a
    directory holding task_head.safetensors gets its task head back (models/task_head.py).
    `quant` ({"bits": 4|8, ...}, see config.QuantConfig) loads the weights through bitsandbytes."""
    import torch
    from transformers import PaliGemmaForConditionalGeneration

    path = resolve(name_or_path, cache_dir)
    kwargs = {"dtype": getattr(torch, dtype)}
    kwargs.update(_quant.from_pretrained_kwargs(quant, device))
    model = PaliGemmaForConditionalGeneration.from_pretrained(path, **kwargs)
    _quant.after_load(model, quant, device)
    processor = load_processor(path)
    from raytrain.models import task_head  # torch: imported only when a model loads

    if (Path(path) / task_head.FILE).exists():  # a full checkpoint trained with the task head
        task_head.load(model, path, install_missing=True, processor=processor)
    return model, processor


VISION_LAYERS = "model.vision_tower.encoder.layers."
PROJECTOR = "model.multi_modal_projector."
VISION = "model.vision_tower."


def apply_freeze_policy(model, *, freeze_vision: bool = True, unfreeze_vision_layers: int = 0, train_projector: bool = False,
                        train_language: bool = True) -> None:
    """requires_grad per part: language model (train_language), vision tower (frozen unless
    freeze_vision=False; the last `unfreeze_vision_layers` encoder layers trainable either way),
    projector (train_projector, or whenever the vision tower trains). Names are matched on the
    unwrapped HF model (strip a peft 'base_model.model.' prefix before calling, or pass the HF model)."""
    n_layers = len(model.model.vision_tower.encoder.layers)
    keep = {f"{VISION_LAYERS}{i}." for i in range(max(0, n_layers - unfreeze_vision_layers), n_layers)}
    for name, p in model.named_parameters():
        if name.startswith(VISION):
            p.requires_grad_((not freeze_vision) or any(name.startswith(k) for k in keep))
        elif name.startswith(PROJECTOR):
            p.requires_grad_(train_projector or not freeze_vision)
        else:
            p.requires_grad_(train_language)


def lora_target_modules(names: Sequence[str], include_vision: bool = False) -> str:
    """peft `target_modules` regex: the named linear layers of the LANGUAGE model only (the vision
    tower and projector are adapted only when asked). Module names are transformers 5's:
    model.language_model.layers.N.self_attn.q_proj, model.vision_tower.encoder.layers.N...."""
    alt = "|".join(sorted(set(names)))
    towers = "language_model|vision_tower" if include_vision else "language_model"
    return rf"^model\.({towers})\..*\.({alt})$"


def loc_token_ids(tokenizer) -> np.ndarray:
    """Vocabulary ids of <loc0000>..<loc1023>, in bin order (they are contiguous in real PaliGemma
    vocabularies and in the tiny preset, but nothing here relies on it)."""
    ids = np.array(tokenizer.convert_tokens_to_ids([loc_token(i) for i in range(NUM_LOC)]), dtype=np.int64)
    if (ids == tokenizer.unk_token_id).any():
        raise ValueError("tokenizer lacks <locNNNN> tokens: not a PaliGemma tokenizer")
    return ids


CAPTION_PREFIX = "caption en"  # PaliGemma's captioning prefix (big_vision transfers)
DENSE_PREFIX = "describe each region"


def _region_boxes(targets: Sequence) -> list:
    from raytrain.formats.annotations import Box

    return [Box(r.x1, r.y1, r.x2, r.y2, r.phrase) for r in targets]


def render_example(task: str, query: str, targets: Sequence, width: int, height: int, image_hw: tuple[int, int] | None = None,
                   answer_format: str = "loc") -> tuple[str, str]:
    """(prefix, suffix) text for one example; targets in source pixels. PaliGemma's <loc> bins are
    normalised, so the model input size (image_hw) does not enter. caption: the first caption;
    dense_caption: every region as `<loc>x4 phrase`, joined by ' ; '. answer_format "molmo":
    pointing answers in Molmo's percent text (formats/molmo.py); the other tasks keep <loc>."""
    return render_with_numbers(task, query, targets, width, height, image_hw, answer_format)[:2]


def render_with_numbers(task: str, query: str, targets: Sequence, width: int, height: int, image_hw=None,
                        answer_format: str = "loc", empty_answer: str = ""):
    """(prefix, suffix, number spans of the suffix's coordinates written as digits: Molmo only).
    No targets (a negative): the answer is `empty_answer`, or the format's own (Molmo's
    "There are none.", <loc>: an empty answer)."""
    if not targets and not tasks.per_image(task):
        prefix = render_prefix(task, query)
        return prefix, empty_answer or empty_answers(task, answer_format)[0], []
    if task == "point" and answer_format == "molmo":
        return (render_prefix(task, query), *molmo.render_points_spans(targets, width, height, label=query))
    return (*_render_loc(task, query, targets, width, height), [])


def render_prefix(task: str, query: str) -> str:
    """The family's own prompt of a task (a job's data.text.prompts replace it)."""
    if task == "segment":
        from raytrain.formats import paligemma_masks

        return paligemma_masks.render_prefix(query)
    if task in ("caption", "dense_caption"):
        return CAPTION_PREFIX if task == "caption" else DENSE_PREFIX
    return fmt.render_prefix(task, query)


def empty_answers(task: str, answer_format: str = "loc") -> tuple[str, ...]:
    """The answers that mean "nothing found", the one the family writes first."""
    if task == "point" and answer_format == "molmo":
        return molmo.NOTHING_FOUND_ANSWERS
    return ("",)  # <loc> answers: no object is the end of sequence right away


def _render_loc(task: str, query: str, targets: Sequence, width: int, height: int) -> tuple[str, str]:
    prefix = render_prefix(task, query)
    if task == "caption":
        return prefix, targets[0].text.strip()
    if task == "dense_caption":
        return prefix, fmt.render_objects(_region_boxes(targets), width, height)
    if task == "segment":  # <loc>x4 <seg>x16 label; needs the mask codec weights (RAYTRAIN_MASK_CODEC)
        from raytrain.formats import paligemma_masks

        return prefix, paligemma_masks.render_segments(targets, width, height)
    return prefix, fmt.render_objects(targets, width, height)


def parse_output(text: str, task: str, width: int, height: int, image_hw: tuple[int, int] | None = None, divisor: int = 1023,
                 answer_format: str = "loc", empty_answer: str = ""):
    """Model text -> ParseResult with objects in source pixels (never raises on text); a "nothing
    found" answer (`empty_answer` or the format's own) is zero objects and no error.
    divisor 1023 inverts big_vision's encoder exactly; 1024 is supervision's / Google's demo parser."""
    from raytrain.formats.annotations import Caption, ParseError, ParseResult, Region

    if not tasks.per_image(task) and text_options.is_empty_answer(
            text.replace("<eos>", "").replace("</s>", ""), (empty_answer, *empty_answers(task, answer_format)) if empty_answer
            else empty_answers(task, answer_format)):
        return ParseResult([], [])
    if task == "point" and answer_format == "molmo":
        return molmo.parse(text.replace("<eos>", ""), width, height)
    if task == "caption":
        clean = text.replace("<eos>", "").strip()
        return ParseResult([Caption(clean)], []) if clean else ParseResult([], [ParseError("empty_output", text)])
    if task == "dense_caption":
        res = fmt.parse(text, width, height, "box", divisor=divisor)
        return ParseResult([Region(b.x1, b.y1, b.x2, b.y2, b.label) for b in res.objects], res.errors)
    if task == "segment":  # masks decoded by the codec of RAYTRAIN_MASK_CODEC
        from raytrain.formats import paligemma_masks

        return paligemma_masks.parse_segments(text, width, height, divisor=divisor)
    return fmt.parse(text, width, height, tasks.kind(task), divisor=divisor)


def image_size(processor) -> tuple[int, int]:
    """(height, width) the processor feeds the vision tower."""
    size = processor.image_processor.size
    return int(size["height"]), int(size["width"])


def _needs_resize(processor, images: Sequence) -> bool:
    """False when every image (PIL or HxWxC array) is already the processor's size: the pipeline and
    Serve resize to the model frame before encoding, and the processor's resize of an image to its own
    size returns the same pixels (checked) at ~0.6 ms per 64-px image of CPU."""
    want = image_size(processor)
    return any(_height_width(im) != want for im in images)


def _height_width(im) -> tuple[int, int] | None:
    """(height, width) of a PIL image or an HxWxC array; None for anything else (resized to be safe)."""
    shape = getattr(im, "shape", None)
    if shape is not None:
        return (int(shape[0]), int(shape[1])) if len(shape) == 3 else None
    size = getattr(im, "size", None)
    return (int(size[1]), int(size[0])) if isinstance(size, tuple) and len(size) == 2 else None


def _prompt(prefix: str) -> str:
    # One <image> placeholder: the processor expands it to image_seq_length tokens and adds
    # <bos> after it and "\n" after the prefix, as big_vision's PaliGemma format does.
    return "<image>" + prefix


def encode_train(processor, images: Sequence, prefixes: Sequence[str], suffixes: Sequence[str], max_len: int,
                 numbers: Sequence | None = None) -> dict:
    """Tokenize a batch for teacher-forced training, padded/truncated to exactly `max_len`.

    Returns numpy arrays: input_ids, attention_mask, token_type_ids (0 = prefix: image + prompt,
    attended bidirectionally; 1 = suffix), labels (suffix ids, IGNORE_INDEX elsewhere),
    pixel_values (B, 3, H, W) **uint8** with `pixel_scale`/`pixel_offset` (B, 3) float32 — the
    processor's rescale + normalisation as one affine map, applied by `prepare_inputs` on the
    worker — and `length` (untruncated tokens) so callers can count and drop examples that would
    not fit instead of silently cutting their targets.

    Shipping uint8 instead of the processor's float32 makes every tokenized example 4x smaller in
    `numbers` (per example, the suffix's coordinate NumberSpans, `render_with_numbers`): also
    `num_place` (B, max_len) float32, each coordinate digit's signed place weight at its label
    position (formats/numbers.py), for the distance-aware number loss.

    Ray's object store and skips the per-pixel float work on the CPU data stage (measured:
    0.43 -> 0.19 ms per example at 64 px; bench/README.md); the model sees the same values
    (tests/integration/test_tiny_preset.py and tests/unit/models/test_paligemma_encode.py check them
    against the processor's own output).
    """
    images = list(images)
    enc = processor(
        text=[_prompt(p) for p in prefixes],
        images=images,
        suffix=list(suffixes),
        padding="longest",
        return_tensors="np",
        do_resize=_needs_resize(processor, images),
        do_rescale=False,
        do_normalize=False,
    )
    scale, offset = pixel_affine(processor)
    length = enc["attention_mask"].sum(axis=1).astype(np.int32)
    pad_id = processor.tokenizer.pad_token_id

    def fit(a: np.ndarray, fill) -> np.ndarray:
        b, n = a.shape
        if n >= max_len:
            return a[:, :max_len]
        return np.concatenate([a, np.full((b, max_len - n), fill, dtype=a.dtype)], axis=1)

    out = {
        "input_ids": fit(enc["input_ids"].astype(np.int32), pad_id),
        "attention_mask": fit(enc["attention_mask"].astype(np.int8), 0),
        "token_type_ids": fit(enc["token_type_ids"].astype(np.int8), 0),
        "labels": fit(enc["labels"].astype(np.int32), IGNORE_INDEX),
        "pixel_values": to_uint8(enc["pixel_values"]),
        "pixel_scale": np.broadcast_to(scale, (len(images), 3)).copy(),
        "pixel_offset": np.broadcast_to(offset, (len(images), 3)).copy(),
        "length": length,
    }
    if numbers is not None:
        out["num_place"] = _num_place(processor.tokenizer, out["labels"], suffixes, numbers)
    return out


def _num_place(tokenizer, labels: np.ndarray, suffixes: Sequence[str], numbers: Sequence) -> np.ndarray:
    """Signed digit place weights at the label positions of each suffix's coordinate digits. The
    suffix is tokenized alone for its character offsets; a row whose ids differ from its labels
    (a tokenizer that merges across the prefix boundary) gets no weights rather than wrong ones."""
    out = np.zeros(labels.shape, dtype=np.float32)
    for i, (suffix, spans) in enumerate(zip(suffixes, numbers)):
        if not spans:
            continue
        enc = tokenizer(suffix, add_special_tokens=False, return_offsets_mapping=True)
        pos = np.nonzero(labels[i] != IGNORE_INDEX)[0]
        ids = enc["input_ids"]
        if len(pos) < len(ids) or labels[i, pos[: len(ids)]].tolist() != list(ids):
            continue
        w = token_place_weights(suffix, spans, enc["offset_mapping"])
        out[i, pos[: len(ids)]] = w
    return out


def prepare_inputs(inputs: dict) -> dict:
    """Batch as Ray Data delivers it -> `model(**inputs)` keywords: uint8 `pixel_values` from
    `encode_train` become the float values the processor would have produced
    (`x * pixel_scale + pixel_offset`, per channel), on whatever device the batch already is.
    Packed rows (`pack`) hold several images each: their per-image arrays are joined in row order
    (the order the model fills <image> placeholders in), and the attention_mask is dropped so that
    transformers builds the mask from the restarting `position_ids` (causal, never across examples)
    together with token_type_ids (bidirectional over each example's image + prefix): each example's
    own prefix-LM mask. Anything else passes through unchanged."""
    pv = inputs.get("pixel_values")
    if "position_ids" not in inputs and (pv is None or "pixel_scale" not in inputs):
        return inputs
    out = dict(inputs)
    if "position_ids" in out:
        out.pop("attention_mask", None)
    if pv is None or "pixel_scale" not in out:
        return out
    pv = join_images(pv, 4)
    scale, offset = join_images(out.pop("pixel_scale"), 2), join_images(out.pop("pixel_offset"), 2)
    out["pixel_values"] = apply_pixel_affine(pv, scale, offset)
    return out


TOKEN_PADS = {"input_ids": None, "attention_mask": 0, "token_type_ids": 0, "labels": IGNORE_INDEX, "num_place": 0.0}
"""Per-token arrays of encode_train and their pad values in a packed row (input_ids: the pad id)."""


def pack(examples: Sequence[dict], length: int, pad_id: int) -> dict:
    """One packed row from encoded examples (each one row of `encode_train`, per-token arrays cut
    to the example's length): per-token arrays concatenated and right-padded to `length`;
    `position_ids` 1, 2, ... restarting per example (PaliGemma counts from 1, as its forward does
    unpacked) and once more for the padding; pixels / pixel maps stacked (images, ...)."""
    if not examples:
        raise ValueError("nothing to pack")
    row = concat_tokens(examples, dict(TOKEN_PADS, input_ids=pad_id), length)
    row["position_ids"] = restarting_positions([len(e["input_ids"]) for e in examples], length, start=1)
    for k in ("pixel_values", "pixel_scale", "pixel_offset"):
        row[k] = np.stack([np.asarray(e[k]) for e in examples])
    return row


def encode_prompts(processor, images: Sequence, prefixes: Sequence[str]) -> dict:
    """Left-padded prompt batch for generation (torch tensors)."""
    tok = processor.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"  # generation appends on the right: pad on the left
    try:
        images = list(images)
        enc = processor(text=[_prompt(p) for p in prefixes], images=images, padding="longest", return_tensors="pt",
                        do_resize=_needs_resize(processor, images))
    finally:
        tok.padding_side = side
    enc.pop("labels", None)
    return dict(enc)


def save_inference_files(processor, out_dir: str | Path) -> None:
    """The processor travels with every full checkpoint so inference uses the training settings."""
    processor.save_pretrained(str(out_dir))


# ----------------------------------------------------------------------------------------------
# the family object (raytrain.models.interface.ModelFamily)

_GRAMMARS: dict[int, paligemma_decoding.PaliGemmaGrammars] = {}
GRAMMAR_KINDS = ("point", "box", "mask")  # kinds whose answers name labels of the query


def _grammars(processor) -> paligemma_decoding.PaliGemmaGrammars:
    """One grammar builder per processor (it caches label ids), dropped with the processor."""
    key = id(processor)
    if key not in _GRAMMARS:
        _GRAMMARS[key] = paligemma_decoding.PaliGemmaGrammars(processor)
        weakref.finalize(processor, _GRAMMARS.pop, key, None)
    return _GRAMMARS[key]


def vision_tower_dims(hf_config) -> dict:
    """SigLIP: LayerNorm, GELU MLP, learned positions (models/memory.py's Tower fields)."""
    v = hf_config.vision_config
    return dict(layers=v.num_hidden_layers, width=v.hidden_size, q=v.hidden_size, kv=v.hidden_size, heads=v.num_attention_heads,
                mlp=v.intermediate_size, n_norm=2, rms=False, rms_fp32_bytes=0, gated=False, rotary=False, eager_softcap=False)


def component(param_name: str) -> str:
    """'vision' | 'projector' | 'language' for a parameter name of the transformers 5 layout."""
    if param_name.startswith(VISION):
        return "vision"
    if param_name.startswith(PROJECTOR):
        return "projector"
    return "language"


@dataclass(frozen=True)
class PaliGemma:
    """PaliGemma 1/2 with its `<loc>` answer format (`raytrain.models.family("paligemma")`)."""

    answer_format: str = "loc"
    prompts: tuple[tuple[str, str], ...] = ()
    """(task, template) pairs replacing the family's own prompts (`with_text`)."""
    system_prompt: str = ""
    empty_answer: str = ""
    """The "nothing found" answer of negatives; "" = the format's own."""
    multi_label: bool = False
    """One example per image and task with every label's objects ("detect cat ; dog")."""

    name: ClassVar[str] = NAME
    ANSWER_FORMATS: ClassVar[tuple[str, ...]] = ("loc", "molmo")
    """loc: <loc> tokens (big_vision's); molmo: pointing answers in Molmo's percent text (seed 000),
    the other tasks in <loc> tokens."""
    SEQ_KEYS: ClassVar[tuple[str, ...]] = SEQ_KEYS
    TASKS: ClassVar[tuple[str, ...]] = ("point", "detect", "segment", "caption", "dense_caption")
    supports_task_head: ClassVar[bool] = True
    TINY_IMAGE_SIZE: ClassVar[int] = DEFAULT_IMAGE_SIZE
    PREFIX_LM_MASK: ClassVar[bool] = True  # image + prefix attend bidirectionally
    # Weight names of the released google/paligemma* checkpoints (what vLLM loads; transformers 5
    # saves the vision tower without SigLIP's vision_model level): models/vllm_layout.py applies them.
    PUBLISHED_RENAMES: ClassVar[tuple[tuple[str, str], ...]] = (
        ("vision_tower.vision_model.", "vision_tower.vision_model."),
        ("model.vision_tower.", "vision_tower.vision_model."),  # transformers 5 module names
        ("vision_tower.", "vision_tower.vision_model."),  # transformers 5.6+ save_pretrained
        ("language_model.model.", "language_model.model."),
        ("model.language_model.", "language_model.model."),
        ("language_model.lm_head.", "language_model.lm_head."),
        ("lm_head.", "language_model.lm_head."),
        ("multi_modal_projector.", "multi_modal_projector."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    )
    # vLLM LoRA scopes by published prefix; the projector is a plain nn.Linear in vLLM (no LoRA: merged)
    VLLM_LORA_SCOPES: ClassVar[tuple[tuple[str, str], ...]] = (
        ("language_model.model.layers.", "language"),
        ("vision_tower.vision_model.encoder.layers.", "tower"),
    )
    RESIZE_MODES: ClassVar[tuple[str, ...]] = ("stretch", "letterbox")  # SigLIP takes one fixed size: no native

    def __post_init__(self):
        if self.answer_format not in self.ANSWER_FORMATS:
            raise ValueError(f"PaliGemma writes answers as {list(self.ANSWER_FORMATS)}, not {self.answer_format!r}")
        if self.system_prompt:
            raise ValueError("PaliGemma has no chat template: a system prompt applies to chat families (Qwen2.5-VL)")

    def with_text(self, prompts=None, system_prompt: str = "", empty_answer: str = "", multi_label: bool = False):
        return replace(self, prompts=text_options.prompt_table(prompts), system_prompt=system_prompt,
                       empty_answer=empty_answer, multi_label=multi_label)

    @property
    def spec(self) -> str:
        return NAME if self.answer_format == self.ANSWER_FORMATS[0] else f"{NAME}+{self.answer_format}"

    # loading
    resolve = staticmethod(resolve)
    load = staticmethod(load)
    load_processor = staticmethod(load_processor)

    def real_presets(self) -> list:
        from raytrain.models import presets_paligemma

        return presets_paligemma.real_presets()

    def hf_model_class(self) -> type:
        from transformers import PaliGemmaForConditionalGeneration

        return PaliGemmaForConditionalGeneration

    def build_tiny_preset(self, out_dir, seed: int = 0, image_size: int | None = None) -> Path:
        return build_tiny_paligemma(out_dir, seed=seed, image_size=image_size)

    # training
    lora_target_modules = staticmethod(lora_target_modules)
    apply_freeze_policy = staticmethod(apply_freeze_policy)
    component = staticmethod(component)
    loc_token_ids = staticmethod(loc_token_ids)
    vision_tower_dims = staticmethod(vision_tower_dims)

    def new_token_ids(self, processor) -> list[int]:
        return []  # <loc>/<seg> are part of every PaliGemma vocabulary

    def image_tokens(self, processor) -> int | None:
        return int(processor.image_seq_length)

    # text
    def render_example(self, task, query, targets, width, height, image_hw=None):
        prefix, suffix, _ = render_with_numbers(task, query, targets, width, height, image_hw, self.answer_format, self.empty_answer)
        return text_options.prompt_for(self.prompts, task, query, prefix), suffix

    def parse_output(self, text, task, width, height, image_hw=None):
        return parse_output(text, task, width, height, image_hw, answer_format=self.answer_format, empty_answer=self.empty_answer)

    def answer_numbers(self, task, query, targets, width, height, image_hw=None) -> list:
        return render_with_numbers(task, query, targets, width, height, image_hw, self.answer_format, self.empty_answer)[2]

    def digit_token_ids(self, tokenizer):
        return digit_token_ids(tokenizer)

    # encoding
    image_size = staticmethod(image_size)
    encode_train = staticmethod(encode_train)
    encode_prompts = staticmethod(encode_prompts)
    prepare_inputs = staticmethod(prepare_inputs)
    pack = staticmethod(pack)

    def input_frame(self, processor, resize: str, min_pixels: int = 0, max_pixels: int = 0):
        if resize not in self.RESIZE_MODES:
            raise ValueError(f"PaliGemma's vision tower takes one fixed input size: data.preprocess.resize must be "
                             f"{' | '.join(self.RESIZE_MODES)}, not {resize!r}")
        return image_size(processor)

    def input_size(self, frame, width: int, height: int) -> tuple[int, int]:
        return fixed_size(frame)

    def stop_token_ids(self, tokenizer) -> list[int]:
        return [int(tokenizer.eos_token_id)]

    # constrained decoding, confidences
    def grammar(self, processor, kind: str, labels, image_hw, max_objects: int | None = None):
        if self.answer_format == "molmo" and kind == "point":
            return molmo_answers.grammar(processor, labels, max_objects, self.empty_answer, END_TOKEN, TEXT_LEAD)
        if kind == "region":  # dense captions: free phrases, no labels
            return _grammars(processor).for_regions(max_objects or None)
        if kind not in GRAMMAR_KINDS or not labels:  # captions: free text, no grammar
            return None
        # the "nothing found" answer is always allowed: a negative's answer is valid output
        return _grammars(processor).for_labels(kind, list(labels), max_objects or None, self.empty_answer)

    def object_confidences(self, logprobs, token_ids, processor, kind: str, labels, image_hw) -> list[float]:
        if self.answer_format == "molmo" and kind == "point":
            return molmo_answers.confidences(logprobs, token_ids, processor, labels, image_hw, self.empty_answer, END_TOKEN, TEXT_LEAD)
        if kind not in GRAMMAR_KINDS + ("region",):
            return []  # captions: no per-object confidence
        return paligemma_decoding.object_confidences(logprobs, token_ids, processor.tokenizer, kind)

    # checkpoints
    save_inference_files = staticmethod(save_inference_files)

    def save_adapter_files(self, processor, out_dir) -> None:
        return None  # the base model's processor is the adapter's: nothing to add

    def check_inference_files(self, processor, saved_dir) -> None:
        return None  # PaliGemma's processor has a fixed input size and vocabulary
