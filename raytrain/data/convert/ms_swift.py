"""ms-swift grounding JSONL -> canonical rows, one per line (one image each).

The layout of ms-swift's docs (Customization / Custom-dataset, "Grounding"), one JSON object a line::

    {"messages": [{"role": "system", "content": "..."},
                  {"role": "user", "content": "<image>Find the <ref-object> in the image"},
                  {"role": "assistant", "content": "<bbox><bbox>"}],
     "images": ["/data/x.jpg"],
     "objects": {"ref": ["sheep"], "bbox": [[90.9, 160.8, 135, 212.8], [360.9, 480.8, 495, 532.8]],
                 "bbox_type": "real"}}

ms-swift fills the k-th ``<ref-object>`` with ``ref[k]`` and the k-th ``<bbox>`` with ``bbox[k]``,
two counters running through the messages in order. Read the same way here:

* a ``<bbox>`` in an ASSISTANT turn is a target: a :class:`Box` for 4 numbers, a :class:`Point`
  for 2, labelled with the last ``<ref-object>`` before it in any turn. So
  ``"<ref-object><bbox> and <ref-object><bbox>"`` pairs each phrase with its box, and
  ``"Find the <ref-object>"`` answered ``"<bbox><bbox>"`` gives that phrase both boxes;
* a row without objects and tags is a caption row: its one assistant answer is a :class:`Caption`.

``bbox_type``: ``"real"`` (default, pixels of the image) or ``"norm1"`` (fractions of it). ms-swift
reads ANY other value as real pixels, so a file saying ``"norm1000"`` (Qwen2-VL's thousandths) would
be misread there; it is refused here (``unknown_bbox_type``) rather than guessed either way.
Images are resolved like the JSONL converter's: relative paths against ``image_root`` or the
file's folder (ms-swift itself resolves them against its working directory).

Row reasons, while reading: ``bad_json``, ``missing_field`` (no messages list, no image),
``multi_image`` (raytrain rows hold one image), ``unsupported_media`` (videos / audios),
``bad_messages`` (not role/content strings, unknown roles, no assistant answer), ``bad_objects``,
``unknown_bbox_type``, ``placeholder_mismatch`` (more tags than refs / boxes: ms-swift fails on
it), ``region_query`` (boxes only in user turns: the answer is text about a given region);
then, with the image: ``empty_annotations`` (no usable answer), ``multi_turn_text`` (several
answers, none grounded: a conversation, not a caption) and ``common.process_record``'s (a box
more than ``BOX_TOLERANCE_PX`` outside the image is ``coords_out_of_range``; closer ones are
snapped to the edge). Object reasons (row kept): ``bad_bbox`` (not 2 or 4 finite numbers),
``missing_ref`` (no ``<ref-object>`` before the box), ``unreferenced_bbox`` (a box no tag uses:
ms-swift ignores it too), ``text_turn`` (a text answer in a row whose other answers are grounded).
The source messages and objects are kept verbatim in the row's ``extra`` (``{"ms_swift": ...}``)
for the prompts they carry.

The helpers at the bottom (reading JSON rows, one image per row, snapping) are shared with the
LLaMA-Factory converter.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from raytrain import storage
from raytrain.data.convert.common import (
    Converted,
    admit,
    count,
    parent,
    record,
    resolve_ref,
)
from raytrain.data.shards import PrepReport
from raytrain.formats.annotations import Box, Caption, Obj, Point, Region
from raytrain.storage import StorageOptions

SOURCE = "ms_swift"
BBOX_TYPES = ("real", "norm1")
BOX_TOLERANCE_PX = 1.0
ROLES = ("system", "user", "assistant")
_TAG = re.compile(r"<ref-object>|<bbox>")


def find_file(folder: str, opts: StorageOptions | None = None) -> str:
    """The single ``*.jsonl`` (or, if none, ``*.json``) data file in ``folder``."""
    fs = storage.fsspec_fs(folder, opts)
    for ext in ("jsonl", "json"):
        found = sorted(fs.glob(storage.strip_scheme(storage.join(folder, f"*.{ext}"))))
        if len(found) == 1:
            return storage.S3_SCHEME + found[0] if storage.is_s3(folder) else found[0]
        if len(found) > 1:
            raise FileNotFoundError(f"several *.{ext} files in {folder}: {found}; name the data file instead")
    raise FileNotFoundError(f"no *.jsonl or *.json data file in {folder}")


# ---------------------------------------------------------------------------- one row's structure


@dataclass
class Walk:
    """What the tags of one row say, before the image is known."""

    reason: str | None = None
    targets: list[tuple[object, str | None]] = field(default_factory=list)
    """(coordinates as given, label) of every box an assistant turn names, in order."""
    answers: list[str] = field(default_factory=list)
    """Assistant turns with their <ref-object> tags filled in."""
    grounded: list[bool] = field(default_factory=list)
    """Per answer: does it name a box."""
    drops: Counter = field(default_factory=Counter)
    bbox_type: str = "real"


def messages_ok(messages) -> bool:
    """A list of {"role": system|user|assistant, "content": str}, with at least one assistant turn."""
    return (
        isinstance(messages, list)
        and all(isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages)
        and any(m["role"] == "assistant" for m in messages)
    )


def load_objects(objects) -> tuple[dict | None, str | None]:
    """The ``objects`` field as a dict (hub datasets store it as a JSON string), or a reason."""
    if objects is None or objects == "" or objects == {}:
        return {}, None
    if isinstance(objects, str):
        try:
            objects = json.loads(objects)
        except json.JSONDecodeError:
            return None, "bad_objects"
    if not isinstance(objects, dict):
        return None, "bad_objects"
    refs, boxes = objects.get("ref") or [], objects.get("bbox") or []
    ids = objects.get("image_id") or []
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs) or not isinstance(boxes, list):
        return None, "bad_objects"
    if not isinstance(ids, list) or any(i != 0 for i in ids):  # one image per row: every box is on image 0
        return None, "bad_objects"
    bbox_type = objects.get("bbox_type") or "real"
    if bbox_type not in BBOX_TYPES:
        return None, "unknown_bbox_type"
    return objects, None


def walk(messages, objects) -> Walk:
    """Fill the tags of ``messages`` from ``objects`` as ms-swift does (see module doc)."""
    if not messages_ok(messages):
        return Walk("bad_messages")
    objs, reason = load_objects(objects)
    if reason is not None:
        return Walk(reason)
    refs, boxes = objs.get("ref") or [], objs.get("bbox") or []
    out = Walk(bbox_type=objs.get("bbox_type") or "real")
    n_ref = n_box = user_boxes = 0
    current: str | None = None
    for m in messages:
        if m["role"] == "system":
            continue
        text, grounded = [], False
        pos = 0
        for t in _TAG.finditer(m["content"]):
            text.append(m["content"][pos : t.start()])
            pos = t.end()
            if t.group() == "<ref-object>":
                if n_ref >= len(refs):
                    return Walk("placeholder_mismatch")
                current = refs[n_ref]
                text.append(current)
                n_ref += 1
                continue
            if n_box >= len(boxes):
                return Walk("placeholder_mismatch")
            if m["role"] == "assistant":
                out.targets.append((boxes[n_box], current))
                grounded = True
            else:
                user_boxes += 1
            n_box += 1
        text.append(m["content"][pos:])
        if m["role"] == "assistant":
            out.answers.append("".join(text).strip())
            out.grounded.append(grounded)
    if len(boxes) > n_box:
        out.drops["unreferenced_bbox"] += len(boxes) - n_box
    if user_boxes and not out.targets:
        return Walk("region_query")
    return out


# ---------------------------------------------------------------------------- records


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def records(
    path: str,
    image_root: str | None = None,
    report: PrepReport | None = None,
    *,
    source: str = SOURCE,
    opts: StorageOptions | None = None,
) -> Iterator[dict]:
    """One record per row of ``path`` (``.jsonl``, or a ``.json`` list; local or s3://). Record ids
    are ``<image>#<row number>`` (1-based: the line number of a JSONL file)."""
    root = image_root or parent(path)
    for n, row in read_rows(path, report, opts):
        if not isinstance(row.get("messages"), list):
            count(report, "missing_field")
            continue
        image, reason = one_image(row.get("images"))
        if reason is None and (row.get("videos") or row.get("audios")):
            reason = "unsupported_media"
        w = walk(row["messages"], row.get("objects")) if reason is None else None
        reason = reason or w.reason
        if reason is not None:
            count(report, reason)
            continue
        admit(report)
        objects, _ = load_objects(row.get("objects"))
        yield record(
            f"{image}#{n}",
            resolve_ref(root, image),
            {"messages": row["messages"], "objects": objects},
            source=source,
            split_key=image,
        )


def to_objects(annotation: dict, width: int, height: int) -> Converted:
    """Objects of one row in pixels of a ``width`` x ``height`` image."""
    w = walk(annotation["messages"], annotation.get("objects"))
    if w.reason is not None:
        return Converted(reason=w.reason)
    drops = Counter(w.drops)
    extra = {"ms_swift": {"messages": annotation["messages"], "objects": annotation.get("objects") or None}}
    if not w.targets:
        return text_answers(w.answers, drops, extra)
    sx, sy = (width, height) if w.bbox_type == "norm1" else (1.0, 1.0)
    objs: list[Obj] = []
    for coords, label in w.targets:
        if not isinstance(coords, list) or len(coords) not in (2, 4) or not all(_finite(v) for v in coords):
            drops["bad_bbox"] += 1
            continue
        if not label or not label.strip():
            drops["missing_ref"] += 1
            continue
        xy = [float(v) * (sx if i % 2 == 0 else sy) for i, v in enumerate(coords)]
        objs.append(Point(xy[0], xy[1], label.strip()) if len(xy) == 2 else Box(*xy, label=label.strip()))
    drops["text_turn"] += sum(1 for g, a in zip(w.grounded, w.answers) if not g and a)
    return Converted(snap(objs, width, height), object_drops={k: v for k, v in drops.items() if v}, extra=extra)


# ---------------------------------------------------------------------------- shared with llamafactory


def text_answers(answers: list[str], drops: Counter, extra: dict | None) -> Converted:
    """A row whose answers hold no coordinates: one answer is a caption; several are a
    conversation (``multi_turn_text``); none is ``empty_annotations``."""
    said = [a for a in answers if a.strip()]
    if not said:
        return Converted(reason="empty_annotations")
    if len(said) > 1:
        return Converted(reason="multi_turn_text")
    return Converted([Caption(" ".join(said[0].split()))], object_drops={k: v for k, v in drops.items() if v}, extra=extra)


def read_rows(path: str, report: PrepReport | None, opts: StorageOptions | None = None) -> Iterator[tuple[int, dict]]:
    """``(row number, row)`` of a JSONL file (numbered by line; blank lines skipped) or of a JSON
    list (numbered from 1). Undecodable lines count as ``bad_json``, non-objects as ``missing_field``."""
    with storage.fsspec_fs(path, opts).open(storage.strip_scheme(path), "r", encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):  # a JSON list (LLaMA-Factory's usual file); a broken one is a config error
        rows: Iterable[tuple[int, object]] = enumerate(json.loads(stripped), start=1)
    else:
        rows = _jsonl_rows(text, report)
    for n, row in rows:
        if not isinstance(row, dict):
            count(report, "missing_field")
            continue
        yield n, row


def _jsonl_rows(text: str, report: PrepReport | None) -> Iterator[tuple[int, object]]:
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError:
            count(report, "bad_json")


def one_image(images) -> tuple[str | None, str | None]:
    """The row's single image path / URL, or a reason: ``missing_field`` (none) or ``multi_image``.
    Entries may be strings or ``{"path": ...}`` dicts (hub datasets with an Image column)."""
    if isinstance(images, (str, dict)):
        images = [images]
    if not isinstance(images, list) or not images:
        return None, "missing_field"
    if len(images) > 1:
        return None, "multi_image"
    im = images[0].get("path") if isinstance(images[0], dict) else images[0]
    if not isinstance(im, str) or not im.strip():
        return None, "missing_field"
    return im.strip(), None


def snap(objs: list[Obj], width: int, height: int, tol: float = BOX_TOLERANCE_PX) -> list[Obj]:
    """Coordinates within ``tol`` pixels outside the image moved onto its edge (annotation tools
    write 640.3 on a 640-pixel image); farther ones are left for ``check_objects`` to reject."""

    def c(v: float, hi: int) -> float:
        return min(max(v, 0.0), float(hi)) if -tol <= v <= hi + tol else v

    out: list[Obj] = []
    for o in objs:
        if isinstance(o, Point):
            out.append(Point(c(o.x, width), c(o.y, height), o.label))
        elif isinstance(o, Box):
            out.append(Box(c(o.x1, width), c(o.y1, height), c(o.x2, width), c(o.y2, height), o.label))
        elif isinstance(o, Region):
            out.append(Region(c(o.x1, width), c(o.y1, height), c(o.x2, width), c(o.y2, height), o.phrase))
        else:
            out.append(o)
    return out
