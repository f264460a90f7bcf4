"""The task registry: what each task raytrain trains and evaluates is, in one place.

    from raytrain import tasks
    spec = tasks.get("detect")          # TaskSpec(name="detect", kind="box", ...)
    spec.object_type                     # formats.annotations.Box: the objects its targets hold

Each task names
  kind         the object kind its answers hold: "point" | "box" | "mask" | "caption" | "region";
  object_type  the annotation type(s) its targets are (segment: pixel masks, or PaliGemma VQ codes);
               parsers take it (`fmt.parse(text, ..., kind)`), scoring and reports group by it
  per_image    True when one example covers the whole image (caption, dense caption: no query);
               False when there is one example per (image, label)
  prompt       the default prompt template ("{query}" is the label), the family-neutral wording
               (PaliGemma's own prefixes); families with their own phrasing render it themselves
  metrics      the metric family `raytrain eval` aggregates it with (eval/metrics/<metrics>.py)
  baseline     the blind baseline scored beside the model: "centre_point", "centred_box" or None
  grounding    True when answers hold coordinates (constrained decoding and confidences apply)
  json_type    the "type" its objects carry in objects JSON (formats/annotations.py)

Nothing here imports torch or a model family; families, the data pipeline, eval, Serve and the
report all read this table instead of keeping their own task -> kind maps.
"""

from __future__ import annotations

from dataclasses import dataclass

from raytrain.formats.annotations import Box, Caption, CodedMask, Mask, Point, Region


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str
    object_type: type | tuple[type, ...]
    per_image: bool
    prompt: str
    metrics: str
    baseline: str | None
    grounding: bool
    json_type: str


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("point", "point", Point, False, "point to {query}", "pointing", "centre_point", True, "point"),
        TaskSpec("detect", "box", Box, False, "detect {query}", "boxes", "centred_box", True, "box"),
        TaskSpec("segment", "mask", (Mask, CodedMask), False, "segment {query}", "segmentation", None, True, "mask_rle"),
        TaskSpec("caption", "caption", Caption, True, "caption en", "captions", None, False, "caption"),
        TaskSpec("dense_caption", "region", Region, True, "describe each region", "dense_captions", None, True, "region"),
    )
}
NAMES: tuple[str, ...] = tuple(TASKS)


def get(task: str) -> TaskSpec:
    """The registry entry of `task`; ValueError naming the known tasks otherwise."""
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; known: {list(NAMES)}") from None


def kind(task: str) -> str:
    """'detect' -> 'box' (the object kind of the task's answers)."""
    return get(task).kind


def object_type(task: str) -> type:
    return get(task).object_type


def per_image(task: str) -> bool:
    return get(task).per_image


def render_prompt(task: str, query: str) -> str:
    """The family-neutral default prompt: 'detect {query}' -> 'detect cat'."""
    return get(task).prompt.format(query=query)


def grounding(task: str) -> bool:
    return get(task).grounding
