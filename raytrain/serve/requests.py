"""Serve's request side: what a request may ask for (`Limits`), its checks (400/413/415 answers,
never a 5xx for bad input), the errors each carry their HTTP status, and the answer body built from
the predict path's reading of the model output. No torch and no Ray here: the HTTP ingress and
DeploymentHandle callers share these functions, and tests call them directly.
"""

import base64
import binascii
import io
import json
import unicodedata
from dataclasses import dataclass
from typing import Any

import numpy as np

from raytrain import tasks as task_registry
from raytrain.config import ADAPTER_ID  # noqa: F401  (re-exported; the config checks ids with it too)
from raytrain.formats.paligemma import MASK_ANSWER_MIN_TOKENS

TASKS = task_registry.NAMES
"""Every task of the registry; a family answers those in its TASKS (the app checks)."""
FIELDS = ("image", "task", "prompt", "query", "adapter", "max_new_tokens", "debug")
IMAGE_FORMATS = ("PNG", "JPEG")


@dataclass(frozen=True)
class Limits:
    """What a request may ask for; plain values so both deployments can share them."""

    max_body_bytes: int
    max_image_bytes: int
    max_image_pixels: int
    max_image_side: int
    max_query_chars: int
    max_new_tokens: int
    max_new_tokens_limit: int

    @classmethod
    def of(cls, cfg) -> "Limits":
        """The limits of a ServeConfig (any object with these attributes)."""
        return cls(**{k: getattr(cfg, k) for k in cls.__dataclass_fields__})


# ----------------------------------------------------------------------------------------------
# errors: each carries its HTTP status


class ServeError(Exception):
    status = 500
    code = "internal"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code

    def __reduce__(self):  # keep status/code when Ray pickles the exception across processes
        return (_rebuild_error, (type(self), self.message, self.status, self.code))

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


def _rebuild_error(cls, message, status, code):
    return cls(message, status=status, code=code)


class BadRequest(ServeError):
    status = 400
    code = "bad_request"


class AdapterNotFound(ServeError):
    status = 404
    code = "unknown_adapter"


class AdapterIncompatible(ServeError):
    status = 422
    code = "incompatible_adapter"


class TaskUnavailable(ServeError):
    """A task of the family this server cannot answer (PaliGemma's segment without the mask codec).
    Its status is the class's, so it survives Ray's wrapping for DeploymentHandle callers."""

    status = 501
    code = "task_unavailable"


# ----------------------------------------------------------------------------------------------
# request validation (shared by the HTTP ingress and handle callers; no torch here)


def parse_json_body(body: bytes, limits: Limits) -> dict:
    """Raw HTTP body -> JSON object, or BadRequest / 413."""
    if len(body) > limits.max_body_bytes:
        raise BadRequest(f"body of {len(body)} bytes exceeds {limits.max_body_bytes}", status=413, code="too_large")
    if not body.strip():
        raise BadRequest("empty body: send a JSON object", code="invalid_json")
    try:
        payload = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, NaN; absurd nesting
        raise BadRequest(f"body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise BadRequest(f"body must be a JSON object, got {type(payload).__name__}", code="invalid_json")
    return payload


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def validate_request(payload: Any, limits: Limits, adapter: str | None = None) -> dict:
    """Checked request: {"image": HxWx3 uint8, "task", "query", "adapter", "max_new_tokens", "debug"}.

    `adapter` (the multiplexed model id on the model side) overrides the payload's field; the two
    must agree when both are given. Raises BadRequest (4xx) saying what is wrong."""
    if not isinstance(payload, dict):
        raise BadRequest(f"request must be a JSON object / dict, got {type(payload).__name__}")
    unknown = sorted(set(payload) - set(FIELDS))
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown}; known: {list(FIELDS)}", code="unknown_field")

    task = payload.get("task")
    if not isinstance(task, str) or task not in TASKS:
        raise BadRequest(f"task must be one of {list(TASKS)}, got {task!r:.60}", code="unknown_task")

    has_prompt, has_query = payload.get("prompt") is not None, payload.get("query") is not None
    if task_registry.per_image(task):  # caption, dense caption: about the whole image, no prompt
        if has_prompt or has_query:
            raise BadRequest(f"task {task} describes the whole image: send no 'prompt' / 'query'")
        query = ""
    else:
        if has_prompt == has_query:
            raise BadRequest(f"task {task}: give exactly one of 'prompt' or 'query' (the thing to find)")
        query = _check_query(payload["prompt"] if has_prompt else payload["query"], limits)

    body_adapter = payload.get("adapter")
    if body_adapter is not None and not isinstance(body_adapter, str):
        raise BadRequest(f"adapter must be a string or null, got {type(body_adapter).__name__}")
    if adapter and body_adapter and adapter != body_adapter:
        raise BadRequest(f"payload adapter {body_adapter!r} differs from multiplexed_model_id {adapter!r}")
    adapter = adapter or body_adapter or None
    if adapter is not None and not ADAPTER_ID.fullmatch(adapter):
        raise BadRequest(f"adapter id {adapter!r:.80} must match {ADAPTER_ID.pattern}", code="invalid_adapter_id")

    mnt = payload.get("max_new_tokens")
    if mnt is None:  # a segment request gets at least one mask answer's budget (check_budget)
        mnt = min(max(limits.max_new_tokens, _least_tokens(task)), limits.max_new_tokens_limit)
    elif isinstance(mnt, bool) or not isinstance(mnt, int) or not 1 <= mnt <= limits.max_new_tokens_limit:
        raise BadRequest(f"max_new_tokens must be an integer in 1..{limits.max_new_tokens_limit}, got {mnt!r:.40}")

    debug = payload.get("debug", False)
    if not isinstance(debug, bool):
        raise BadRequest(f"debug must be true or false, got {debug!r:.40}")

    if "image" not in payload or payload["image"] is None:
        raise BadRequest("missing 'image' (base64 PNG or JPEG)", code="missing_image")
    image = decode_image(payload["image"], limits)
    return {"image": image, "task": task, "query": query, "adapter": adapter, "max_new_tokens": mnt, "debug": debug}


def _least_tokens(task: str) -> int:
    return MASK_ANSWER_MIN_TOKENS if task == "segment" else 1


def check_budget(req: dict, limits: Limits) -> None:
    """A mask answer is at least MASK_ANSWER_MIN_TOKENS long and constrained decoding never cuts one
    into a valid answer: a segment request whose budget is smaller could only ever get "nothing
    found", so it is refused (400) instead. Called once the server knows it can answer the task
    (a family without masks says so first, a server without the mask codec answers 501)."""
    least = _least_tokens(req["task"])
    if req["max_new_tokens"] < least:
        raise BadRequest(f"task segment: max_new_tokens {req['max_new_tokens']} cannot hold one mask answer (<loc> x4, "
                         f"<seg> x16, label, <eos>: >= {least} tokens; this server allows up to {limits.max_new_tokens_limit})")


def _check_query(query: Any, limits: Limits) -> str:
    if not isinstance(query, str):
        raise BadRequest(f"prompt must be a string, got {type(query).__name__}")
    query = query.strip()
    if not query:
        raise BadRequest("prompt is empty")
    if len(query) > limits.max_query_chars:
        raise BadRequest(f"prompt has {len(query)} characters, limit {limits.max_query_chars}")
    if any(unicodedata.category(c) == "Cc" for c in query):
        raise BadRequest("prompt contains control characters (newlines end the prompt in PaliGemma's format)")
    return query


def decode_image(value: Any, limits: Limits) -> np.ndarray:
    """base64 str / data URL / encoded bytes / PIL image / array -> HxWx3 uint8 RGB array."""
    from PIL import Image

    if isinstance(value, np.ndarray):
        return _check_array(value, limits)
    if isinstance(value, Image.Image):
        _check_size(value.width, value.height, limits)
        return np.asarray(value.convert("RGB"))
    if isinstance(value, str):
        raw = _b64decode(value, limits)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
    else:
        raise BadRequest(f"image must be a base64 string, got {type(value).__name__}", code="invalid_image")
    if len(raw) > limits.max_image_bytes:
        raise BadRequest(f"image of {len(raw)} bytes exceeds {limits.max_image_bytes}", status=413, code="too_large")
    if not raw:
        raise BadRequest("image is empty", code="invalid_image")
    try:
        im = Image.open(io.BytesIO(raw))
    except Exception:  # PIL raises several types for undecodable input
        raise BadRequest("image is not a decodable PNG or JPEG", code="invalid_image") from None
    if im.format not in IMAGE_FORMATS:
        raise BadRequest(f"image format {im.format} not supported; send PNG or JPEG", status=415, code="unsupported_image_format")
    _check_size(im.width, im.height, limits)  # from the header, before any pixel is decoded
    try:
        im.load()
        return np.asarray(im.convert("RGB"))
    except Exception as e:
        raise BadRequest(f"image data is corrupt or truncated ({type(e).__name__})", code="invalid_image") from None


def _b64decode(s: str, limits: Limits) -> bytes:
    if s.startswith("data:"):
        head, sep, s = s.partition(",")
        if not sep or not head.endswith(";base64"):
            raise BadRequest("data URL must look like data:image/png;base64,<data>", code="invalid_image")
    if len(s) > (limits.max_image_bytes + 2) // 3 * 4 + 1024:  # base64 is 4/3 of the bytes (+ line breaks)
        raise BadRequest(f"image exceeds {limits.max_image_bytes} bytes", status=413, code="too_large")
    try:
        return base64.b64decode("".join(s.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("image is not valid base64", code="invalid_base64") from None


def _check_size(w: int, h: int, limits: Limits) -> None:
    if w < 1 or h < 1:
        raise BadRequest(f"image has no pixels ({w}x{h})", code="invalid_image")
    if w * h > limits.max_image_pixels or max(w, h) > limits.max_image_side:
        raise BadRequest(f"image {w}x{h} exceeds the limit ({limits.max_image_pixels} pixels, side {limits.max_image_side})",
                         status=413, code="too_large")


def _check_array(a: np.ndarray, limits: Limits) -> np.ndarray:
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4))):
        raise BadRequest(f"image array must be uint8 HxW, HxWx1, HxWx3 or HxWx4, got {a.dtype} {a.shape}", code="invalid_image")
    _check_size(a.shape[1], a.shape[0], limits)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3])


# ----------------------------------------------------------------------------------------------
# decoding and answers (run on the model thread)


def answer_body(pred) -> dict:
    """The response body for one answer read by the predict path (raytrain/predict.py): objects
    in source pixels, the raw text, parse rejections, one confidence per object (None when the
    family has none or the object could not be placed in the tokens)."""
    from raytrain.formats.annotations import objects_to_json

    return {
        "objects": json.loads(objects_to_json(pred.objects)),
        "text": pred.text,
        "errors": [{"reason": e.reason, "text": e.text} for e in pred.errors],
        "confidence": [None if c is None else round(float(c), 6) for c in pred.scores],
    }
