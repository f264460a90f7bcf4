"""Qwen2.5-VL family: loading, LoRA targets, freezing, target text, batch encoding, parsing, added
location tokens, tiny preset; `Qwen2_5_VL` at the bottom binds them, with one answer format
(absolute | normalized | tokens | pairs), into the family object (`raytrain.models.interface.ModelFamily`):
`raytrain.models.family("qwen2_5_vl+tokens")`.

What only this family needs: the resize record (`models/qwen_resize.py`: `resize_settings`,
`write_resize_record`, `check_resize`) and added location tokens (`add_loc_tokens`,
`init_new_token_embeddings`, `check_tokenizer`; their warm-up is `raytrain.training.new_tokens`).
Arguments are plain values; nothing here reads the experiment config.

Frames: Qwen2.5-VL answers in pixels of the image AFTER `smart_resize`. By default (data.preprocess
resize "native", the family's first RESIZE_MODES entry) the pipeline resizes each image to its own
`smart_resize` size under the processor's min/max pixels (`input_frame` / `input_size`,
models/qwen_batch.py), as Qwen's own processor does; "stretch" / "letterbox" use one fixed square,
`image_size(processor)`. Either way the processor then sees an image it does not resize again
(`encode_train` / `encode_prompts` switch its resize off for such images), so the model frame is
`smart_resize(image_hw)` = image_hw; targets are rendered from source pixels into that frame and
parsed back. The resize settings are recorded next to the processor files (`raytrain_resize.json`)
and checked whenever a processor is loaded from a directory that has the record: training and
inference must resize the same way or every coordinate means something else.

Batch layout (models/qwen_batch.py, models/qwen_encode.py): Qwen's processor flattens the patches
of a batch into one (sum of patches, C*T*P*P) array plus `image_grid_thw` (images, 3). Ray Data
needs one row per example, so `encode_train` returns each example's own (patches, C*T*P*P) block
of uint8 pixels (stacked when every image has the same size, a ragged column otherwise) with its
per-channel normalisation, and `prepare_inputs` joins them back in row order and normalises them
right before `model(**inputs)`. Packed rows (`pack`) carry several examples with M-RoPE
positions restarting per example.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar


from raytrain import tasks
from raytrain.formats import molmo, qwen_grammar, text_confidence
from raytrain.formats import qwen as fmt
from raytrain.formats.numbers import digit_token_ids
from raytrain.models import _quant, molmo_answers, qwen_batch, text_options, tiny
from raytrain.models.qwen_encode import IGNORE_INDEX, IM_END, encode_prompts, encode_train, prepare_inputs  # noqa: F401
from raytrain.models.qwen_loc_tokens import (  # noqa: F401
    add_loc_tokens,
    add_loc_tokens_to_tokenizer,
    check_tokenizer,
    loc_token_ids,
)
from raytrain.models.qwen_resize import (
    DEFAULT_RESIZE,
    RESIZE_RECORD,
    check_resize,
    resize_settings,
    write_resize_record,
)
from raytrain.models.tiny_qwen import IMAGE_SIDE, build_tiny_qwen2_5_vl

NAME = "qwen2_5_vl"
MODEL_FAMILY = (NAME, "Qwen2_5_VL")  # read by raytrain.models' registry: (family name, family class)
# Per-token (B, T) arrays of encode_train: the recipe trims their shared padding per batch.
# mm_token_type_ids (1 on image tokens) is what the model builds its 3-D M-RoPE positions from.
SEQ_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")
CAPTION_PROMPT = "Describe this image."
# seed 002's dense-captioning instruction shape: every region, a short phrase and its box
DENSE_PROMPT = "Describe every region of the image with a short phrase and output bbox_2d coordinates in JSON format."
# the same request for the other box formats (the answer's shape, as render_prompt words it)
DENSE_PROMPTS = {
    "absolute": DENSE_PROMPT,
    "normalized": "Describe every region of the image with a short phrase and output bbox_2d coordinates normalised to 0-1 in JSON format.",
    "tokens": "Describe every region of the image with a short phrase and output bbox_2d location tokens in JSON format.",
    "pairs": "Describe every region of the image with a short phrase and output a list of (phrase, [x1, y1, x2, y2]) pairs.",
}
NOMINAL_SIDE = 448  # px: the fixed square input real models are fed (1024 patches -> 256 LM tokens)
MOLMO = "molmo"  # answer format: pointing in Molmo's percent text (formats/molmo.py), the rest as absolute
MOLMO_POINT_PROMPT = "Point to every {query} in the image."
# What "nothing found" looks like in this family's formats: an empty JSON / Python list, Molmo's
EMPTY_ANSWERS = ("[]", *molmo.NOTHING_FOUND_ANSWERS)
_END_TOKENS = re.compile(r"<\|im_end\|>|<\|endoftext\|>")
END_OF_TEXT = "<|endoftext|>"


def resolve(name_or_path: str, cache_dir: str | None = None) -> str:
    """'tiny:qwen2_5_vl' -> local path of the offline preset (built once); anything else unchanged
    (a hub id such as Qwen/Qwen2.5-VL-3B-Instruct, or a local directory)."""
    if tiny.is_tiny(name_or_path):
        return str(tiny.ensure_preset(NAME, build_tiny_qwen2_5_vl, cache_dir))
    return name_or_path


def load_processor(name_or_path: str, cache_dir: str | None = None):
    """The processor of a hub id, a saved directory or the tiny preset (resize record checked)."""
    from raytrain.models import (
        qwen_processor,  # transformers: imported when a processor loads
    )

    return qwen_processor.load_processor(resolve(name_or_path, cache_dir))


def load(name_or_path: str, dtype: str = "float32", cache_dir: str | None = None, device: str | None = None, quant: dict | None = None):
    """(model, processor) through `from_pretrained`, for hub ids and saved presets alike.
    `quant` ({"bits": 4|8, ...}) loads the language model through bitsandbytes (seed 002: 4-bit)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    path = resolve(name_or_path, cache_dir)
    if quant and quant.get("bits"):
        # the vision tower and merger stay in full precision (full prefixes: bitsandbytes matches prefixes)
        quant = dict(quant, skip_modules=[m.replace("model.vision_tower", "model.visual").replace("model.multi_modal_projector", "model.visual.merger")
                                          for m in quant.get("skip_modules") or []])
    kwargs = {"dtype": getattr(torch, dtype), **_quant.from_pretrained_kwargs(quant, device)}
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, **kwargs)
    _quant.after_load(model, quant, device)
    return model, load_processor(path)


VISION = "model.visual."
VISION_LAYERS = "model.visual.blocks."
PROJECTOR = "model.visual.merger."


def apply_freeze_policy(model, *, freeze_vision: bool = True, unfreeze_vision_layers: int = 0, train_projector: bool = False,
                        train_language: bool = True) -> None:
    """requires_grad per part, as paligemma.apply_freeze_policy: language model, vision blocks
    (frozen unless freeze_vision=False; the last `unfreeze_vision_layers` trainable either way),
    patch merger = the projector (train_projector, or whenever the vision tower trains)."""
    n_layers = len(model.model.visual.blocks)
    keep = {f"{VISION_LAYERS}{i}." for i in range(max(0, n_layers - unfreeze_vision_layers), n_layers)}
    for name, p in model.named_parameters():
        if name.startswith(PROJECTOR):
            p.requires_grad_(train_projector or not freeze_vision)
        elif name.startswith(VISION):
            p.requires_grad_((not freeze_vision) or any(name.startswith(k) for k in keep))
        else:
            p.requires_grad_(train_language)


def save_inference_files(processor, out_dir: str | Path) -> None:
    """The processor and its resize record travel with every checkpoint so inference resizes as
    training did (the stock processor's save_pretrained does not write the record)."""
    processor.save_pretrained(str(out_dir))
    write_resize_record(processor, out_dir)


def save_adapter_files(processor, out_dir: str | Path) -> None:
    """What an adapter checkpoint needs to be used as trained: the resize record (the base model's
    processor is reused, so no processor copy). The `tokens` view also writes the tokenizer."""
    write_resize_record(processor, out_dir)


def image_size(processor, nominal: int = NOMINAL_SIDE) -> tuple[int, int]:
    """(height, width) the pipeline stretches images to: the square `smart_resize` makes of a
    nominal x nominal image under the processor's settings, so the processor never resizes again
    and every image of a batch has the same number of patches. Tiny preset: 112x112."""
    s = resize_settings(processor)
    return fmt.smart_resize(nominal, nominal, s["factor"], s["min_pixels"], s["max_pixels"])


def _model_frame(width: int, height: int, image_hw, resize: dict | None) -> tuple[int, int]:
    """(resized_w, resized_h): smart_resize of the model input (image_hw), or of the source image
    when image_hw is None (images fed at their own resolution, as in Qwen's own use)."""
    s = resize or DEFAULT_RESIZE
    h, w = (height, width) if image_hw is None else (int(image_hw[0]), int(image_hw[1]))
    rh, rw = fmt.smart_resize(h, w, s["factor"], s["min_pixels"], s["max_pixels"])
    return rw, rh


# ----------------------------------------------------------------------------------------------
# LoRA, location tokens


def lora_target_modules(names: Sequence[str], include_vision: bool = False) -> str:
    """peft `target_modules` regex: the named linear layers of the LANGUAGE model only. Module names
    are transformers 5's: model.language_model.layers.N.self_attn.q_proj / .mlp.gate_proj; the vision
    tower (model.visual.blocks.N.attn.qkv, .mlp.gate_proj, merger) is adapted only when asked
    (its MLP shares the gate/up/down names, hence the anchored tower name)."""
    alt = "|".join(sorted(set(names)))
    towers = "language_model|visual" if include_vision else "language_model"
    return rf"^model\.({towers})\..*\.({alt})$"


# ----------------------------------------------------------------------------------------------
# target text


def render_example(
    task: str,
    query: str,
    targets: Sequence,
    width: int,
    height: int,
    image_hw: tuple[int, int] | None = None,
    representation: str = "absolute",
    resize: dict | None = None,
    fenced: bool = True,
) -> tuple[str, str]:
    """(user prompt, assistant answer) for one example; targets in source pixels (width x height),
    rendered in the model frame smart_resize(image_hw) (see _model_frame). The chat template is
    applied at encoding time, not here."""
    return render_with_numbers(task, query, targets, width, height, image_hw, representation, resize, fenced)[:2]


def render_with_numbers(task: str, query: str, targets: Sequence, width: int, height: int, image_hw=None,
                        representation: str = "absolute", resize: dict | None = None, fenced: bool = True, empty_answer: str = ""):
    """(prompt, answer, number spans): `render_example` plus the span and range of every coordinate
    number of the answer, recorded while rendering it (formats/numbers.py). No targets (a
    negative): `empty_answer`, or the format's own (an empty JSON list, Molmo's "There are none.")."""
    if empty_answer and not targets and not tasks.per_image(task):
        return render_with_numbers(task, query, targets, width, height, image_hw, representation, resize, fenced)[0], empty_answer, []
    if representation == MOLMO:  # Molmo's percent points for pointing; the rest as absolute JSON
        if task == "point":
            return MOLMO_POINT_PROMPT.format(query=query), *molmo.render_points_spans(targets, width, height, label=query)
        representation = "absolute"
    rw, rh = _model_frame(width, height, image_hw, resize)
    if task == "caption":
        return CAPTION_PROMPT, targets[0].text.strip(), []
    if task == "dense_caption":
        from raytrain.formats.annotations import Box

        boxes = [Box(r.x1, r.y1, r.x2, r.y2, r.phrase) for r in targets]
        return (DENSE_PROMPTS.get(representation, DENSE_PROMPT),
                *fmt.render_objects_spans(boxes, width, height, rw, rh, representation, fenced=fenced))
    prompt = fmt.render_prompt(task, query, representation)
    return (prompt, *fmt.render_objects_spans(targets, width, height, rw, rh, representation, fenced=fenced))


def parse_output(
    text: str,
    task: str,
    width: int,
    height: int,
    image_hw: tuple[int, int] | None = None,
    representation: str = "absolute",
    resize: dict | None = None,
    empty_answer: str = "",
):
    """Model text -> ParseResult with objects in source pixels (never raises on text); a "nothing
    found" answer (an empty list, Molmo's, or `empty_answer`) is zero objects and no error."""
    from raytrain.formats.annotations import Caption, ParseError, ParseResult, Region

    if not tasks.per_image(task):
        body = _END_TOKENS.sub(" ", text)
        if text_options.is_empty_answer(body, (*EMPTY_ANSWERS, *((empty_answer,) if empty_answer else ()))):
            return ParseResult([], [])
    if representation == MOLMO:
        if task == "point":
            return molmo.parse(text, width, height)
        representation = "absolute"
    rw, rh = _model_frame(width, height, image_hw, resize)
    if task == "caption":
        clean = text.strip()
        return ParseResult([Caption(clean)], []) if clean else ParseResult([], [ParseError("empty_output", text)])
    if task == "dense_caption":
        res = fmt.parse(text, "box", width, height, rw, rh, representation)
        return ParseResult([Region(b.x1, b.y1, b.x2, b.y2, b.label) for b in res.objects], res.errors)
    return fmt.parse(text, tasks.kind(task), width, height, rw, rh, representation)


# ----------------------------------------------------------------------------------------------
# the family object (raytrain.models.interface.ModelFamily)


def vision_tower_dims(hf_config) -> dict:
    """Qwen2.5-VL's ViT: RMSNorm, SwiGLU, 2-D rotary (models/memory.py's Tower fields)."""
    v = hf_config.vision_config
    return dict(layers=v.depth, width=v.hidden_size, q=v.hidden_size, kv=v.hidden_size, heads=v.num_heads, mlp=v.intermediate_size,
                n_norm=2, rms=True, rms_fp32_bytes=6, gated=True, rotary=True, eager_softcap=False)


def component(param_name: str) -> str:
    """'vision' | 'projector' | 'language' for a parameter name of the transformers 5 layout."""
    if param_name.startswith(PROJECTOR):
        return "projector"
    if param_name.startswith(VISION):
        return "vision"
    return "language"


def stop_token_ids(tokenizer) -> list[int]:
    """<|im_end|> ends an assistant turn; <|endoftext|> is the pad / end of a plain completion."""
    return [int(i) for i in tokenizer.convert_tokens_to_ids([IM_END, END_OF_TEXT]) if i is not None]


@dataclass(frozen=True)
class Qwen2_5_VL:
    """Qwen2.5-VL bound to one answer format (`raytrain.models.family("qwen2_5_vl+<format>")`).

    "tokens": `load_processor` adds the 1024 <|loc_DDDD|> tokens to the tokenizer, `load` adds them
    to tokenizer and model (resized embeddings, new rows initialised by init_new_token_embeddings),
    and `save_adapter_files` also writes the tokenizer. Adding is deterministic and a no-op where
    the tokens exist (the tiny preset, a saved tokens checkpoint), so data workers, trainer and eval
    agree on every id without shipping a tokenizer around.
    """

    answer_format: str = "absolute"
    prompts: tuple[tuple[str, str], ...] = ()
    """(task, template) pairs replacing the family's own prompts (`with_text`)."""
    system_prompt: str = ""
    """The chat's system turn; "" = the chat template's default."""
    empty_answer: str = ""
    """The "nothing found" answer of negatives; "" = the format's own."""
    multi_label: bool = False
    """One example per image and task with every label's objects ("cat ; dog")."""

    name: ClassVar[str] = NAME
    ANSWER_FORMATS: ClassVar[tuple[str, ...]] = (*fmt.REPRESENTATIONS, MOLMO)
    SEQ_KEYS: ClassVar[tuple[str, ...]] = SEQ_KEYS
    TASKS: ClassVar[tuple[str, ...]] = ("point", "detect", "caption", "dense_caption")
    supports_task_head: ClassVar[bool] = False  # variable image tokens per image (models/task_head.py)
    TINY_IMAGE_SIZE: ClassVar[int] = IMAGE_SIDE
    PREFIX_LM_MASK: ClassVar[bool] = False  # causal attention throughout
    # Weight names of the released Qwen/Qwen2.5-VL-*-Instruct checkpoints (transformers 5 saves them
    # so already): models/vllm_layout.py applies them.
    PUBLISHED_RENAMES: ClassVar[tuple[tuple[str, str], ...]] = (
        ("model.language_model.", "model."),  # transformers 5 module names
        ("model.visual.", "visual."),
        ("visual.", "visual."),
        ("lm_head.", "lm_head."),
        ("model.", "model."),  # the published language model (after the two rules above)
    )
    # vLLM LoRA scopes by published prefix (tower / connector need --enable-tower-connector-lora)
    VLLM_LORA_SCOPES: ClassVar[tuple[tuple[str, str], ...]] = (
        ("model.layers.", "language"),
        ("visual.blocks.", "tower"),
        ("visual.merger.", "connector"),
    )
    RESIZE_MODES: ClassVar[tuple[str, ...]] = ("native", "stretch", "letterbox")  # native: Qwen's own per-image size

    def __post_init__(self):
        if self.answer_format not in self.ANSWER_FORMATS:
            raise ValueError(f"unknown Qwen2.5-VL answer format {self.answer_format!r}; known: {list(self.ANSWER_FORMATS)}")

    @property
    def spec(self) -> str:
        return NAME if self.answer_format == self.ANSWER_FORMATS[0] else f"{NAME}+{self.answer_format}"

    def with_text(self, prompts=None, system_prompt: str = "", empty_answer: str = "", multi_label: bool = False):
        return replace(self, prompts=text_options.prompt_table(prompts), system_prompt=system_prompt,
                       empty_answer=empty_answer, multi_label=multi_label)

    @property
    def _json_format(self) -> str:
        """The representation boxes (and, but for Molmo, points) are written in."""
        return "absolute" if self.answer_format == MOLMO else self.answer_format

    @property
    def _tokens(self) -> bool:
        return self.answer_format == "tokens"

    # loading
    resolve = staticmethod(resolve)

    def load(self, name_or_path: str, dtype: str = "float32", cache_dir: str | None = None, device: str | None = None,
             quant: dict | None = None):
        model, processor = load(name_or_path, dtype=dtype, cache_dir=cache_dir, device=device, quant=quant)
        if self._tokens:
            add_loc_tokens(model, processor.tokenizer)
        return model, processor

    def load_processor(self, name_or_path: str, cache_dir: str | None = None):
        processor = load_processor(name_or_path, cache_dir)
        if self._tokens:
            add_loc_tokens_to_tokenizer(processor.tokenizer)
        return processor

    def real_presets(self) -> list:
        from raytrain.models import presets_qwen2_5_vl

        return presets_qwen2_5_vl.real_presets()

    def hf_model_class(self) -> type:
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    def build_tiny_preset(self, out_dir, seed: int = 0, image_size: int | None = None) -> Path:
        return build_tiny_qwen2_5_vl(out_dir, seed=seed, image_size=image_size)

    # training
    lora_target_modules = staticmethod(lora_target_modules)
    apply_freeze_policy = staticmethod(apply_freeze_policy)
    component = staticmethod(component)
    loc_token_ids = staticmethod(loc_token_ids)
    vision_tower_dims = staticmethod(vision_tower_dims)

    def new_token_ids(self, processor) -> list[int]:
        return [int(i) for i in loc_token_ids(processor.tokenizer)] if self._tokens else []

    def image_tokens(self, processor) -> int | None:
        return None  # smart_resize: the count follows each image's size

    # text
    def _render(self, task, query, targets, width, height, image_hw):
        prompt, answer, numbers = render_with_numbers(task, query, targets, width, height, image_hw, representation=self.answer_format,
                                                      empty_answer=self.empty_answer)
        return text_options.prompt_for(self.prompts, task, query, prompt), answer, numbers

    def render_example(self, task, query, targets, width, height, image_hw=None):
        return self._render(task, query, targets, width, height, image_hw)[:2]

    def parse_output(self, text, task, width, height, image_hw=None):
        return parse_output(text, task, width, height, image_hw, representation=self.answer_format, empty_answer=self.empty_answer)

    def answer_numbers(self, task, query, targets, width, height, image_hw=None) -> list:
        return self._render(task, query, targets, width, height, image_hw)[2]

    def digit_token_ids(self, tokenizer):
        return digit_token_ids(tokenizer)

    # encoding
    image_size = staticmethod(image_size)
    def encode_train(self, processor, images, prefixes, suffixes, max_len, numbers=None) -> dict:
        return encode_train(processor, images, prefixes, suffixes, max_len, numbers, system=self.system_prompt or None)

    def encode_prompts(self, processor, images, prefixes) -> dict:
        return encode_prompts(processor, images, prefixes, system=self.system_prompt or None)

    prepare_inputs = staticmethod(prepare_inputs)
    stop_token_ids = staticmethod(stop_token_ids)
    input_size = staticmethod(qwen_batch.input_size)

    def input_frame(self, processor, resize: str, min_pixels: int = 0, max_pixels: int = 0):
        if resize == "native":
            return qwen_batch.native_frame(resize_settings(processor), min_pixels, max_pixels)
        if resize in ("stretch", "letterbox"):
            return image_size(processor)
        raise ValueError(f"Qwen2.5-VL resizes {' | '.join(self.RESIZE_MODES)}, not {resize!r}")

    def pack(self, examples, length: int, pad_id: int) -> dict:
        return qwen_batch.pack(examples, length, pad_id)

    # constrained decoding, confidences
    def grammar(self, processor, kind: str, labels, image_hw, max_objects: int | None = None):
        if self.answer_format == MOLMO and kind == "point":
            return molmo_answers.grammar(processor, labels, max_objects, self.empty_answer, IM_END)
        fw, fh = _model_frame(image_hw[1], image_hw[0], image_hw, None)
        if kind == "region":  # dense captions: boxes with free phrases, no labels from the query
            return qwen_grammar.compiled_region_grammar(processor.tokenizer, self._json_format, fw, fh, max_objects or None, (IM_END,))
        if kind not in fmt.KINDS or not labels:
            return None  # captions: free text
        return qwen_grammar.compiled_grammar(processor.tokenizer, kind, tuple(labels), self._json_format, fw, fh, max_objects or None,
                                             self.empty_answer, end_tokens=(IM_END,))

    def object_confidences(self, logprobs, token_ids, processor, kind: str, labels, image_hw) -> list[float]:
        if self.answer_format == MOLMO and kind == "point":
            return molmo_answers.confidences(logprobs, token_ids, processor, labels, image_hw, self.empty_answer, IM_END)
        g = self.grammar(processor, kind, labels, image_hw)
        if g is None:
            return []
        fw, fh = _model_frame(image_hw[1], image_hw[0], image_hw, None)
        shape = "box" if kind == "region" else kind  # a region is read as a box labelled with its phrase
        # the same parse read_answer makes (no label filter), in frame units: objects match by order
        return text_confidence.text_object_confidences(
            logprobs, token_ids, g, lambda text: fmt.parse(text, shape, fw, fh, fw, fh, self._json_format).objects)

    # checkpoints
    save_inference_files = staticmethod(save_inference_files)

    def save_adapter_files(self, processor, out_dir) -> None:
        save_adapter_files(processor, out_dir)
        if self._tokens:
            processor.tokenizer.save_pretrained(str(out_dir))  # check_tokenizer compares it on load

    def check_inference_files(self, processor, saved_dir) -> None:
        d = Path(saved_dir)
        if (d / RESIZE_RECORD).is_file():
            check_resize(processor, d)  # the base's processor must resize as training did
        check_tokenizer(processor, d)  # added <|loc|> tokens: the same ids as in training
