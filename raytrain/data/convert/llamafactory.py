"""LLaMA-Factory ShareGPT-with-images datasets -> canonical rows, one per conversation.

LLaMA-Factory (data/README.md) names a dataset in ``dataset_info.json``; a multimodal sharegpt one::

    "mllm_demo": {"file_name": "mllm_demo.json", "formatting": "sharegpt",
                  "columns": {"messages": "messages", "images": "images"},
                  "tags": {"role_tag": "role", "content_tag": "content",
                           "user_tag": "user", "assistant_tag": "assistant"}}

and the file holds ``[{"messages": [{"role": "user", "content": "<image>..."}, {"role": "assistant",
"content": "..."}], "images": ["mllm_demo_data/1.jpg"]}, ...]``: an optional system turn, then user /
assistant turns alternating, as many ``<image>`` tags as images. Columns and tags default to
LLaMA-Factory's own (``conversations``; ``from`` / ``value`` / ``human`` / ``gpt`` / ``system``).

``path`` (the part after ``llamafactory:`` in ``data.source``) is one of

* ``<folder>`` or ``<folder>/dataset_info.json``: the folder's dataset_info.json, which must then
  hold exactly one sharegpt dataset with a local ``file_name``; ``...#<name>`` picks one by name;
* a data file (``.json`` list or ``.jsonl``) on its own: columns and tags are LLaMA-Factory's
  defaults, or the OpenAI-style ones (``messages`` / ``role`` / ``content`` / ``user`` /
  ``assistant``) when the first row has a ``messages`` list of role/content turns.

Images resolve against ``image_root`` or the dataset_info.json folder (LLaMA-Factory's
``media_dir`` default), or the data file's folder.

Answers are read as Qwen2.5-VL grounding output with ``raytrain.formats.qwen.parse`` in ABSOLUTE
PIXELS OF THE IMAGE FILE (LLaMA-Factory passes answer text through unchanged; a file written in
another frame, e.g. the smart-resized one, has to be converted first): JSON ``bbox_2d`` -> Box,
``point_2d`` -> Point (fenced or bare, a list or one object), seed 002's
``[('phrase', [x1, y1, x2, y2]), ...]`` pairs -> Region; an answer without coordinates is a
Caption. Coordinates are not clipped by the parser: a box more than ``ms_swift.BOX_TOLERANCE_PX``
outside the image is ``coords_out_of_range`` (closer ones are snapped to the edge).

Row reasons, while reading: ``bad_json``, ``missing_field`` (no messages list, no image),
``multi_image``, ``unsupported_role`` (tool calls / observations), ``bad_messages`` (not
alternating user / assistant ending with an answer, non-string content), ``image_tag_mismatch``
(LLaMA-Factory refuses a row whose ``<image>`` tags do not match its images); then
``unparsable_answer`` (coordinates promised, none readable), ``empty_annotations``,
``multi_turn_text`` and ``common.process_record``'s. Object reasons: ``answer_<parse reason>`` for
each fragment the parser rejected (``qwen.PARSE_REASONS``), ``text_turn``. The normalised
messages (and the system column) are kept in the row's ``extra`` (``{"llamafactory": ...}``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
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
from raytrain.data.convert.ms_swift import one_image, read_rows, snap, text_answers
from raytrain.data.shards import PrepReport
from raytrain.formats import qwen
from raytrain.formats.annotations import Box, Obj, Region
from raytrain.storage import StorageOptions

SOURCE = "llamafactory"
INFO_FILE = "dataset_info.json"
DEFAULT_COLUMNS = {"messages": "conversations", "images": "images", "system": None}
DEFAULT_TAGS = {
    "role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
    "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system",
}
OPENAI_TAGS = {**DEFAULT_TAGS, "role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}

_GROUNDING = re.compile(r'"(?:bbox_2d|point_2d)"')
_PAIRS = re.compile(r"""^\s*\[?\s*\(\s*['"]""")


@dataclass(frozen=True)
class Dataset:
    """One LLaMA-Factory dataset: its data file, image folder, columns and tags."""

    file: str
    media_dir: str
    columns: dict = field(default_factory=lambda: dict(DEFAULT_COLUMNS))
    tags: dict = field(default_factory=lambda: dict(DEFAULT_TAGS))
    name: str = ""


def dataset(path: str, opts: StorageOptions | None = None) -> Dataset:
    """Resolve ``path`` (see module doc) to a :class:`Dataset`. Raises ValueError /
    FileNotFoundError for what is not a local sharegpt dataset with images."""
    path, _, name = path.partition("#")
    if path.endswith((".json", ".jsonl")) and not path.endswith(INFO_FILE):
        if name:
            raise ValueError(f"#{name} names a dataset of a dataset_info.json, but {path} is a data file")
        return _bare_file(path, opts)
    info_path = path if path.endswith(INFO_FILE) else storage.join(path, INFO_FILE)
    if not storage.exists(info_path, opts):
        raise FileNotFoundError(f"no {INFO_FILE} at {info_path}")
    info = storage.read_json(info_path, opts)
    if not isinstance(info, dict) or not info:
        raise ValueError(f"{info_path} holds no datasets")
    if name:
        if name not in info:
            raise ValueError(f"dataset {name!r} is not in {info_path}; it has {sorted(info)}")
        entry = info[name]
    else:
        local = [k for k, v in info.items() if isinstance(v, dict) and v.get("file_name") and v.get("formatting") == "sharegpt"]
        if len(local) != 1:
            raise ValueError(f"{info_path} has {len(local)} local sharegpt datasets ({sorted(local)}); pick one with {path}#<name>")
        name, entry = local[0], info[local[0]]
    if not isinstance(entry, dict) or not entry.get("file_name"):
        raise ValueError(f"dataset {name!r}: only local files (file_name) are read, not hub / script / cloud datasets")
    if entry.get("formatting", "alpaca") != "sharegpt":
        raise ValueError(f"dataset {name!r}: formatting {entry.get('formatting', 'alpaca')!r}; only sharegpt is read")
    if entry.get("ranking"):
        raise ValueError(f"dataset {name!r} is a preference (ranking) dataset, not grounding data")
    columns = {**DEFAULT_COLUMNS, **(entry.get("columns") or {})}
    folder = parent(info_path)
    return Dataset(storage.join(folder, entry["file_name"]), folder, columns, {**DEFAULT_TAGS, **(entry.get("tags") or {})}, name)


def _bare_file(path: str, opts: StorageOptions | None) -> Dataset:
    first = next((row for _, row in read_rows(path, None, opts)), {})
    msgs = first.get("messages")
    if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict) and "role" in msgs[0]:
        return Dataset(path, parent(path), {**DEFAULT_COLUMNS, "messages": "messages"}, dict(OPENAI_TAGS))
    return Dataset(path, parent(path))


# ---------------------------------------------------------------------------- one conversation


def _turns(msgs, system, ds: Dataset) -> tuple[list[dict] | None, str | None]:
    """Normalised ``[{"role": system|user|assistant, "content": str}]``, or a reason."""
    t = ds.tags
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
        return None, "missing_field"
    roles = {t["user_tag"]: "user", t["assistant_tag"]: "assistant", t["system_tag"]: "system"}
    out = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
    for i, m in enumerate(msgs):
        role, content = m.get(t["role_tag"]), m.get(t["content_tag"])
        if role in (t["observation_tag"], t["function_tag"]):
            return None, "unsupported_role"
        if role not in roles or not isinstance(content, str) or (roles[role] == "system" and i != 0):
            return None, "bad_messages"
        out.append({"role": roles[role], "content": content})
    chat = [m["role"] for m in out if m["role"] != "system"]
    # LLaMA-Factory: user turns at odd positions, answers at even ones, ending with an answer
    if not chat or len(chat) % 2 or any(r != ("user" if k % 2 == 0 else "assistant") for k, r in enumerate(chat)):
        return None, "bad_messages"
    return out, None


def records(
    path: str,
    image_root: str | None = None,
    report: PrepReport | None = None,
    *,
    source: str = SOURCE,
    opts: StorageOptions | None = None,
) -> Iterator[dict]:
    """One record per conversation of the dataset at ``path`` (see module doc); record ids are
    ``<image>#<row number>``."""
    ds = dataset(path, opts)
    root = image_root or ds.media_dir
    cols = ds.columns
    for n, row in read_rows(ds.file, report, opts):
        turns, reason = _turns(row.get(cols["messages"]), row.get(cols["system"]) if cols.get("system") else None, ds)
        image = None
        if reason is None:
            image, reason = one_image(row.get(cols["images"]) if cols.get("images") else None)
        if reason is None and sum(m["content"].count("<image>") for m in turns) != 1:
            reason = "image_tag_mismatch"
        if reason is not None:
            count(report, reason)
            continue
        admit(report)
        yield record(f"{image}#{n}", resolve_ref(root, image), {"messages": turns}, source=source, split_key=image)


def _answer(text: str, width: int, height: int) -> tuple[list[Obj] | None, Counter, str | None]:
    """``(objects, object drops, row reason)`` of one answer; objects None = a text answer."""
    if _PAIRS.match(text):
        res = qwen.parse(text, "box", width, height, width, height, "pairs", clip=False)
        objs: list[Obj] = [Region(o.x1, o.y1, o.x2, o.y2, o.label) for o in res.objects if isinstance(o, Box)]
    elif _GROUNDING.search(text) or text.lstrip().startswith(("```", "[", "{")):
        kind = "point" if '"point_2d"' in text and '"bbox_2d"' not in text else "box"
        res = qwen.parse(text, kind, width, height, width, height, "absolute", clip=False)
        objs = list(res.objects)
    else:
        return None, Counter(), None
    drops = Counter(f"answer_{e.reason}" for e in res.errors if e.reason != "empty_output")
    if not objs:
        nothing = all(e.reason == "empty_output" for e in res.errors)
        return [], drops, "empty_annotations" if nothing else "unparsable_answer"
    return objs, drops, None


def to_objects(annotation: dict, width: int, height: int) -> Converted:
    """Objects of one conversation in pixels of a ``width`` x ``height`` image."""
    messages = annotation["messages"]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    extra = {"llamafactory": {"messages": messages}}
    objs: list[Obj] = []
    drops: Counter = Counter()
    texts, reasons = [], []
    for a in answers:
        got, d, reason = _answer(a, width, height)
        drops.update(d)
        if got is None:
            texts.append(a)
        elif reason is not None:
            reasons.append(reason)
        else:
            objs += got
    if not objs:
        if reasons:  # the answers promised coordinates: reading them failed, so say why
            return Converted(reason="unparsable_answer" if "unparsable_answer" in reasons else reasons[0], object_drops=dict(drops))
        return text_answers(texts, drops, extra)
    drops["text_turn"] += sum(1 for t in texts if t.strip())
    return Converted(snap(objs, width, height), object_drops={k: v for k, v in drops.items() if v}, extra=extra)
