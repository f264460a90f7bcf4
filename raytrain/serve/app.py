"""Ray Serve application: ONE base model, many LoRA adapters, dynamic batching per adapter.

One deployment, `GroundingModel`, that is also the HTTP ingress (FastAPI)::

    HTTP (127.0.0.1) -> Serve proxy -> GroundingModel replica
                                         POST /predict: parse + validate (4xx), then
                                         @serve.multiplexed  LRU of LoRA adapters, <adapter_root>/<id>/adapter loaded on demand
                                         @serve.batch        requests decoded together, grouped per adapter
                                         one model thread    set_adapter + generate never interleave

Each replica holds one copy of the base model; adapters are peft adapters loaded into it
(`PeftModel.load_adapter(path, adapter_name=id)`, `set_adapter(id)` per batch; base-model requests
run under `disable_adapter()`). The HTTP ingress lives in the model deployment: one queue, one
place that answers 503, one class. (A separate FastAPI deployment in front was tried: on the tiny
model it cost the same server CPU per request, ~40 ms on 2 shared cores, and added a hop; it would
pay off only where image decoding should move off the GPU nodes.) Large images are decoded in a
worker thread so they do not stall the replica's event loop. Adapter ids are immutable: a new
training run gets a new id (resolved ids are cached per replica).

HTTP API
--------
POST /predict, JSON body::

    {"image": "<base64 PNG/JPEG, optionally a data: URL>",
     "task": "point" | "detect" | "segment" | "caption" | "dense_caption"   (those the family answers),
     "prompt": "red circle"            (or "query"; exactly one of the two; none for caption and
                                        dense_caption, which describe the whole image),
     "adapter": "my-run" | null        (optional; absent/null = the base model),
     "max_new_tokens": 32              (optional, 1..max_new_tokens_limit),
     "debug": false}                   (optional; true adds {"replica", "pid", "batch_size", "device"})

200 ->  {"objects": [{"type": "point", "x", "y", "label"} | {"type": "box", "x1", "y1", "x2", "y2", "label"}
                     | {"type": "mask_rle", "size", "counts", "label", ...} | {"type": "caption", "text"}
                     | {"type": "region", "x1", "y1", "x2", "y2", "phrase"}],
         "text": raw model text, "errors": [{"reason", "text"}] (parse rejections),
         "confidence": [float | null per object], "adapter": id | null, "task", "image_size": [w, h]}

Coordinates are source-image pixels. An adapter's requests are preprocessed as its training data
was (the checkpoint's state.json "preprocess" record, raytrain/data/preprocess.py: stretch or
letterbox to the model input, optional edge blend; no record = stretch) and its answers are mapped
back from that frame; base-model requests go to the processor as sent.

Every request goes through the predict path (raytrain/predict.py) as evaluation does: for grounding
tasks decoding is grammar-constrained (ServeConfig.constrained, on by default: valid objects by
construction, labels from the prompt) for every family and answer format that has a grammar.
Replicas reserve `gpus_per_replica` GPUs and run the model on the GPU when CUDA is visible there
(bfloat16 with dtype auto), else on CPU. PaliGemma's segment answers need the mask codec weights
(`mask_codec`, or RAYTRAIN_MASK_CODEC on the replicas); without them a segment request gets 501.

`confidence` follows the predict path (raytrain/predict.py, the family's object_confidences): the geometric mean of the model's raw probabilities
of the tokens that spell the object (locs, then label); null when the object cannot be placed in
the tokens, or for families without log-probabilities (PaliGemma has them; Qwen2.5-VL answers null
for now).

Errors are `{"error": {"code", "message"}}`: 400 malformed (non-JSON, wrong types, unknown field or
task, a task the family does not answer, a prompt for a whole-image task, bad base64, not an image,
bad adapter id), 404 unknown adapter / route, 405 wrong method, 413 body or image too large, 415
image format other than PNG/JPEG, 422 adapter that cannot share the base model, 501 a task this
server lacks a component for (segment without the mask codec). Never 5xx for bad input; a 500
means a server-side fault (e.g. storage unreachable).

With several replicas, also send the adapter id as the `serve_multiplexed_model_id` header: Serve
then routes the request to a replica that already holds the adapter (the body's "adapter" must
agree with it, or be left out).

Backpressure is Serve's own (`serve.deployment` docs): `max_ongoing_requests` per replica and
`max_queued_requests` per caller. When the queue at the proxy is full the proxy answers
503 with a Retry-After header (`BackpressureConfig`) instead of queueing without bound; a
DeploymentHandle caller gets `ray.serve.exceptions.BackPressureError`. A 503 means "overloaded,
retry later", never "your request is wrong".

GET /healthz -> {"status": "ok"}; GET /stats -> the answering replica's counters (batch sizes
seen, resident adapters, loads/evictions, pid); with several replicas each call may reach another.

Python (DeploymentHandle)
-------------------------
::

    from ray import serve
    from raytrain.serve.app import ServeConfig, build_app

    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    h = serve.run(build_app(ServeConfig(model="tiny:paligemma", adapter_root="checkpoints/adapters")),
                  name="raytrain", route_prefix="/")        # later: serve.get_app_handle("raytrain")
    out = h.options(multiplexed_model_id="my-run").predict.remote(
        {"image": pil_image_or_HxWx3_uint8_or_png_bytes, "task": "point", "prompt": "red circle"}).result()

Through a handle the same payload checks run; failures raise the exceptions below (`BadRequest`,
`AdapterNotFound`, `AdapterIncompatible`, all `ServeError` with `.status`), which Ray re-raises in
the caller as instances of the same classes.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' `Request` annotation at runtime.
import asyncio
import concurrent.futures
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from ray import serve
from starlette.requests import Request

from raytrain import predict as predict_path
from raytrain.config import ServeConfig
from raytrain.serve.requests import (  # noqa: F401  (re-exported: the serve API in one import)
    ADAPTER_ID,
    FIELDS,
    TASKS,
    AdapterIncompatible,
    AdapterNotFound,
    BadRequest,
    Limits,
    ServeError,
    TaskUnavailable,
    answer_body,
    check_budget,
    decode_image,
    parse_json_body,
    validate_request,
)

log = logging.getLogger("raytrain.serve")

DEPLOYMENT = "GroundingModel"


# ----------------------------------------------------------------------------------------------
# configuration




# ----------------------------------------------------------------------------------------------
# prompts (module functions the deployment class uses are defined before it: Serve pickles the
# class, with the globals it refers to, when the decorators below run)


def prompt_for(fam, task: str, query: str, width: int, height: int) -> str:
    """The family's prompt for a request (its training prompt for the task and label); whole-image
    caption prompts are rendered with a placeholder caption, whose text the prompt does not hold."""
    from raytrain import tasks
    from raytrain.formats.annotations import Caption

    targets = [Caption("-")] if tasks.get(task).kind == "caption" else []
    return fam.render_example(task, query, targets, width, height, (height, width))[0]


def unavailable_tasks(fam, image_hw) -> dict[str, str]:
    """Tasks of the family this process cannot render a prompt for, with the reason (PaliGemma's
    segment prompts need the mask codec weights)."""
    from raytrain import tasks

    import numpy as np
    from pycocotools import mask as mask_utils

    from raytrain.formats.annotations import Mask

    h, w = image_hw
    full = mask_utils.encode(np.asfortranarray(np.ones((h, w), np.uint8)))["counts"].decode()
    out = {}
    for task in fam.TASKS:
        try:  # a positive example: an answer with an object (a mask needs the codec to be written or read)
            targets = [Mask((h, w), full, "object")] if tasks.get(task).kind == "mask" else []
            prompt_for(fam, task, "" if tasks.per_image(task) else "object", w, h)
            if targets:
                fam.render_example(task, "object", targets, w, h, (h, w))
        except ValueError as e:
            out[task] = f"task {task} is not available on this server: {e}"
    return out


# ----------------------------------------------------------------------------------------------
# the model deployment


class _AdapterSlot:
    """What the multiplexer caches per adapter id. Serve calls __del__ (in a worker thread) when
    it evicts the id (LRU); the unload then runs on the model thread, after any queued decode."""

    def __init__(self, owner: "GroundingModel", adapter_id: str):
        self.owner, self.adapter_id, self.unloaded = owner, adapter_id, False

    def __del__(self):
        if self.unloaded:
            return
        self.unloaded = True
        try:
            self.owner._model_thread.submit(self.owner._unload_sync, self.adapter_id).result()
        except Exception:  # interpreter shutdown, executor gone: nothing left to free
            pass


api = FastAPI(title="raytrain grounding", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(name=DEPLOYMENT)
@serve.ingress(api)
class GroundingModel:
    """One base model + LoRA adapters multiplexed by id, behind HTTP and DeploymentHandle entry
    points. All model work (adapter load/unload, set_adapter + generate) runs on ONE thread, so a
    batch for adapter A can never decode while adapter B is active, and the asyncio loop stays
    free to accept and batch the next requests meanwhile."""

    def __init__(self, cfg: dict):
        import torch

        from raytrain import storage
        from raytrain.models import family as model_family

        self.cfg = ServeConfig(**cfg)
        self.limits = Limits.of(self.cfg)
        self.fam = model_family(self.cfg.family)
        self.opts = storage.StorageOptions(endpoint_url=self.cfg.endpoint_url, region=self.cfg.region)
        torch.set_num_threads(max(1, int(self.cfg.num_cpus)))
        if self.cfg.mask_codec:
            from raytrain.formats.paligemma_masks import ENV_VAR

            os.environ[ENV_VAR] = self.cfg.mask_codec
        self.device, dtype = predict_path.inference_device(self.cfg.dtype, self.cfg.device)
        self.base, self.processor = self.fam.load(self.cfg.model, dtype=dtype, device=self.device)
        self.base.to(self.device).eval()
        self.image_hw = self.fam.image_size(self.processor)  # the model input adapters were trained on
        self.unavailable = unavailable_tasks(self.fam, self.image_hw)  # task -> why this replica cannot answer it
        self._prep: dict = {}  # adapter id -> preprocess.Preprocess recorded with its checkpoint
        self._fams: dict = {}  # adapter id -> the family bound to the data.text it was trained with (prompts, answers)
        self.peft = None  # PeftModel wrapping self.base once the first adapter is loaded
        self._dormant: str | None = None  # evicted adapter kept because peft needs >= 1 adapter
        self._model_thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._known: dict[str, str] = {}  # adapter id -> checkpoint URI (checked servable; ids are immutable)
        self._rejected: dict[str, tuple] = {}  # adapter id -> (monotonic expiry, error class, message)
        self._resident: set[str] = set()
        self.counters = Counter()
        self.batch_sizes = Counter()
        ctx = serve.get_replica_context()
        self.replica = ctx.replica_id.unique_id if ctx else "local"

        async def load_adapter(adapter_id: str) -> _AdapterSlot:
            return await self._load_adapter(adapter_id)

        # Serve's LRU of adapters per replica; wired at init so its size comes from the config
        # (Ray 2.60 detects multiplexing set up this way at runtime).
        self._get_adapter = serve.multiplexed(max_num_models_per_replica=self.cfg.max_adapters_per_replica)(load_adapter)
        self._predict_batch.set_max_batch_size(self.cfg.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)

    # ---- adapters ---------------------------------------------------------------------------

    def _adapter_uri(self, adapter_id: str) -> str | None:
        from raytrain import storage

        if adapter_id in self.cfg.adapters:
            return self.cfg.adapters[adapter_id]
        if self.cfg.adapter_root:
            return storage.join(self.cfg.adapter_root, adapter_id)
        return None

    async def _check_known(self, adapter_id: str) -> str:
        """URI of a servable adapter, else AdapterNotFound / AdapterIncompatible. Runs BEFORE the
        multiplexer is asked: its LRU evicts a resident adapter before it tries the new one."""
        if adapter_id in self._known:
            return self._known[adapter_id]
        until, cls, message = self._rejected.get(adapter_id, (0.0, None, ""))
        if until > time.monotonic():
            raise cls(message)
        try:
            uri = await asyncio.to_thread(self._inspect_adapter, adapter_id)
        except ServeError as e:
            now = time.monotonic()
            if len(self._rejected) > 1024:  # ids are client-chosen: keep the cache bounded
                self._rejected = {k: v for k, v in self._rejected.items() if v[0] > now}
            self._rejected[adapter_id] = (now + 5.0, type(e), e.message)  # don't hit storage on every retry
            raise
        self._known[adapter_id] = uri
        return uri

    def _inspect_adapter(self, adapter_id: str) -> str:
        """Storage reads only (thread): the adapter exists, is LoRA, touches no base weights, and was
        trained for this family."""
        from raytrain import storage
        from raytrain.models import task_head
        from raytrain.training import checkpointing

        uri = self._adapter_uri(adapter_id)
        if uri is None:
            raise AdapterNotFound(f"unknown adapter {adapter_id!r} (no adapter_root or mapping configured)")
        config_uri = storage.join(uri, "adapter", "adapter_config.json")
        if not storage.exists(config_uri, self.opts):
            raise AdapterNotFound(f"unknown adapter {adapter_id!r} (no {config_uri})")
        try:
            peft_type = storage.read_json(config_uri, self.opts).get("peft_type")
        except (ValueError, AttributeError, OSError) as e:
            raise AdapterIncompatible(f"adapter {adapter_id!r}: unreadable adapter_config.json ({e})") from None
        if peft_type != "LORA":
            raise AdapterIncompatible(f"adapter {adapter_id!r} is {peft_type}; only LoRA adapters are served")
        if storage.exists(storage.join(uri, "adapter", checkpointing.EXTRA), self.opts):
            raise AdapterIncompatible(f"adapter {adapter_id!r} also trained base-model weights (vision layers / projector), "
                                      "so it cannot share the base model; serve it alone via checkpointing.load_for_inference")
        if storage.exists(storage.join(uri, "adapter", task_head.FILE), self.opts):
            raise AdapterIncompatible(f"adapter {adapter_id!r} was trained with a task attention head (model.task_head_queries), "
                                      "so it cannot share the base model; serve it alone via checkpointing.load_for_inference")
        state_uri = storage.join(uri, checkpointing.STATE_JSON)
        state = storage.read_json(state_uri, self.opts) if storage.exists(state_uri, self.opts) else {}
        if state.get("family"):
            from raytrain.models import family as model_family

            try:
                trained = model_family(state["family"])
            except ValueError as e:
                raise AdapterIncompatible(f"adapter {adapter_id!r}: unknown family in state.json ({e})") from None
            if trained != self.fam:  # same family AND answer format, or the answers would be misread
                raise AdapterIncompatible(f"adapter {adapter_id!r} was trained for family {state['family']}, serving {self.fam.spec}")
        if state.get("base_model") and state["base_model"] != self.cfg.model:
            log.warning("adapter %s was trained on %s, served on %s", adapter_id, state["base_model"], self.cfg.model)
        from raytrain.config import Preprocess, TextOptions
        from raytrain.data import preprocess

        try:  # requests are preprocessed as the adapter's training images were (no record: stretch)
            self._prep[adapter_id] = Preprocess.from_dict(state.get("preprocess"))
            preprocess.frame_for(self.fam, self.processor, self._prep[adapter_id])  # a resize this family takes
        except ValueError as e:
            raise AdapterIncompatible(f"adapter {adapter_id!r}: unusable preprocessing record ({e})") from None
        try:  # ... and asked with the prompts it was trained on, its answers read with its "nothing found" answer
            self._fams[adapter_id] = self.fam.with_text(**TextOptions.from_dict(state.get("text")).to_dict())
        except (TypeError, ValueError) as e:
            raise AdapterIncompatible(f"adapter {adapter_id!r}: unusable text record ({e})") from None
        return uri

    async def _load_adapter(self, adapter_id: str) -> _AdapterSlot:
        from raytrain import storage
        from raytrain.training import checkpointing

        adapter_uri = storage.join(await self._check_known(adapter_id), "adapter")
        local = await asyncio.to_thread(checkpointing.local_copy, adapter_uri, self.opts)  # S3: downloads adapter/ only
        try:
            await asyncio.get_running_loop().run_in_executor(self._model_thread, self._load_sync, adapter_id, str(local))
        finally:
            if storage.is_s3(adapter_uri):
                shutil.rmtree(local, ignore_errors=True)  # the weights are in memory now
        self._resident.add(adapter_id)
        self.counters["adapter_loads"] += 1
        return _AdapterSlot(self, adapter_id)

    def _load_sync(self, adapter_id: str, path: str) -> None:
        from peft import PeftModel

        if self.peft is not None and adapter_id in self.peft.peft_config:  # the dormant one, back in use
            self._dormant = None
            return
        try:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base, path, adapter_name=adapter_id)
            else:
                self.peft.load_adapter(path, adapter_name=adapter_id)
        except Exception as e:  # e.g. shape mismatch: a LoRA of another base model
            if self.peft is not None and adapter_id in self.peft.peft_config and len(self.peft.peft_config) > 1:
                self._delete_sync(adapter_id)
            self._known.pop(adapter_id, None)
            raise AdapterIncompatible(f"adapter {adapter_id!r} does not fit base model {self.cfg.model}: {e}"[:2000]) from None
        self.peft.eval()
        if self._dormant is not None and self._dormant != adapter_id:
            self._delete_sync(self._dormant)
            self._dormant = None

    def _unload_sync(self, adapter_id: str) -> None:
        self._resident.discard(adapter_id)
        self.counters["adapter_evictions"] += 1
        if self.peft is None or adapter_id not in self.peft.peft_config:
            return
        if len(self.peft.peft_config) == 1:
            self._dormant = adapter_id  # peft cannot run (even disabled) with zero adapters
            return
        self._delete_sync(adapter_id)

    def _delete_sync(self, adapter_id: str) -> None:
        if self.peft.active_adapter == adapter_id:
            self.peft.set_adapter(next(a for a in self.peft.peft_config if a != adapter_id))
        self.peft.delete_adapter(adapter_id)

    # ---- requests ---------------------------------------------------------------------------

    async def predict(self, payload: dict) -> dict:
        """DeploymentHandle entry point; the adapter comes from `.options(multiplexed_model_id=...)`."""
        adapter = serve.get_multiplexed_model_id() or None
        return await self._predict(validate_request(payload, self.limits, adapter=adapter))

    @api.post("/predict")
    async def http_predict(self, request: Request) -> JSONResponse:
        try:
            size = int(request.headers.get("content-length") or 0)
        except ValueError:
            size = 0
        try:
            if size > self.limits.max_body_bytes:
                raise BadRequest(f"body of {size} bytes exceeds {self.limits.max_body_bytes}", status=413, code="too_large")
            body = await request.body()
            payload = parse_json_body(body, self.limits)
            header_adapter = serve.get_multiplexed_model_id() or None
            if len(body) < 64 * 1024:  # small images: decoding costs less than a thread hop
                req = validate_request(payload, self.limits, header_adapter)
            else:  # big ones off the event loop, so batching goes on meanwhile
                req = await asyncio.to_thread(validate_request, payload, self.limits, header_adapter)
            return JSONResponse(await self._predict(req))
        except ServeError as e:
            return JSONResponse(e.body(), status_code=e.status)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/stats")
    async def http_stats(self) -> dict:
        return self.stats()

    async def _predict(self, req: dict) -> dict:
        h, w = req["image"].shape[:2]
        if req["task"] not in self.fam.TASKS:
            raise BadRequest(f"model family {self.fam.spec} does not answer task {req['task']}; it answers {list(self.fam.TASKS)}",
                             code="unsupported_task")
        if req["task"] in self.unavailable:
            raise TaskUnavailable(self.unavailable[req["task"]])
        check_budget(req, self.limits)
        if req["adapter"]:
            from raytrain.data import preprocess

            await self._check_known(req["adapter"])  # AdapterNotFound before the LRU evicts anything
            await self._get_adapter(req["adapter"])  # loads on a miss (LRU); AdapterIncompatible
        try:
            req["prefix"] = prompt_for(self._family_of(req["adapter"]), req["task"], req["query"], w, h)
        except ValueError as e:
            raise BadRequest(f"prompt cannot be rendered: {e}") from None
        if req["adapter"]:
            prep = self._prep[req["adapter"]]
            req["geometry"] = preprocess.geometry_for(self.fam, prep, preprocess.frame_for(self.fam, self.processor, prep), w, h)
            if w * h <= 512 * 512 and not prep.edge_blend:  # a small resize costs less than a thread hop
                req["model_image"] = preprocess.apply(prep, req["image"], req["geometry"])
            else:
                req["model_image"] = await asyncio.to_thread(preprocess.apply, prep, req["image"], req["geometry"])
        self.counters["requests"] += 1
        return await self._predict_batch(req)

    def _family_of(self, adapter: str | None):
        """The family an adapter's requests are rendered and read with (its recorded data.text); the
        base model's: the served family as configured."""
        return self._fams.get(adapter, self.fam) if adapter else self.fam

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)  # sizes set from the config in __init__
    async def _predict_batch(self, reqs: list[dict]) -> list[dict]:
        # Serve splits batches by multiplexed model id, but HTTP requests that name their adapter
        # only in the body share one: group by adapter here, by max_new_tokens so that each
        # request decodes exactly its own budget, and by task (answers of one task stop together).
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(reqs):
            groups.setdefault((r["adapter"], r["max_new_tokens"], r["task"]), []).append(i)
        loop = asyncio.get_running_loop()
        out: list[dict | None] = [None] * len(reqs)
        for (adapter, mnt, _), idx in groups.items():
            if adapter:
                await self._get_adapter(adapter)  # touch the LRU (reload if evicted meanwhile) ...
            # ... and queue the decode right away: an eviction queued later runs after it
            fut = loop.run_in_executor(self._model_thread, self._generate_sync, adapter, mnt, [reqs[i] for i in idx])
            for i, res in zip(idx, await fut):
                out[i] = res
        return out

    def _generate_sync(self, adapter: str | None, max_new_tokens: int, reqs: list[dict]) -> list[dict]:
        import contextlib

        from PIL import Image

        if adapter:
            if self.peft is None or adapter not in self.peft.peft_config:
                raise RuntimeError(f"adapter {adapter!r} is not resident at decode time")
            if self.peft.active_adapter != adapter:
                self.peft.set_adapter(adapter)
            model, ctx = self.peft, contextlib.nullcontext()
        elif self.peft is not None:
            if self.peft.active_adapter not in self.peft.peft_config:
                self.peft.set_adapter(next(iter(self.peft.peft_config)))
            model, ctx = self.peft, self.peft.disable_adapter()
        else:
            model, ctx = self.base, contextlib.nullcontext()
        # base-model requests: the processor sees the image as sent (identity geometry); adapter
        # requests: the image preprocessed as the adapter's training data was, answers mapped back
        geoms = [r.get("geometry") or predict_path.identity_geometry(r["image"].shape[1], r["image"].shape[0]) for r in reqs]
        options = predict_path.DecodeOptions(max_new_tokens=max_new_tokens, constrained=self.cfg.constrained, confidence=True)
        with ctx:
            preds = predict_path.predict(model, self.processor, self._family_of(adapter), [Image.fromarray(r.get("model_image", r["image"])) for r in reqs],
                                    [r["task"] for r in reqs], [r["query"] for r in reqs], [r["prefix"] for r in reqs], geoms, options)
        self.batch_sizes[len(reqs)] += 1
        results = []
        for r, pred in zip(reqs, preds):
            h, w = r["image"].shape[:2]
            out = answer_body(pred)
            out.update(adapter=adapter, task=r["task"], image_size=[w, h])
            if r["debug"]:
                out["debug"] = {"replica": self.replica, "pid": os.getpid(), "batch_size": len(reqs), "device": str(self.device),
                                "prompt": r["prefix"]}
            results.append(out)
        return results

    def stats(self) -> dict:
        return {
            "replica": self.replica,
            "pid": os.getpid(),
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "max_batch_size_seen": max(self.batch_sizes, default=0),
            "resident_adapters": sorted(self._resident),
            **dict(self.counters),
        }


# ----------------------------------------------------------------------------------------------
# building and reaching the application


def build_app(cfg: ServeConfig):
    """The bound application: `serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)`."""
    from ray.serve.config import BackpressureConfig

    return GroundingModel.options(
        num_replicas=cfg.num_replicas,
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=cfg.retry_after_s),
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.gpus_per_replica},
    ).bind(asdict(cfg))


def run(cfg: ServeConfig, *, blocking: bool = False) -> str:
    """Start Serve's HTTP proxy on cfg.host:cfg.port, deploy the app; returns the /predict URL."""
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=blocking)
    return predict_url(cfg)


def predict_url(cfg: ServeConfig) -> str:
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    return f"http://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}/predict"


def model_handle(app_name: str = "raytrain"):
    """DeploymentHandle of the app: `.options(multiplexed_model_id=id).predict.remote(payload)`."""
    return serve.get_app_handle(app_name)
