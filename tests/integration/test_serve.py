"""The Serve app (raytrain/serve/app.py) on real Ray Serve bound to 127.0.0.1: one tiny base model,
two LoRA adapters with different random weights (one also read from S3 via moto), HTTP
and DeploymentHandle access, per-adapter batching, 4xx for malformed input, Serve's 503
backpressure, and 1,000 requests from 8 loopback clients (bench/serve_load.py)."""

import base64
import importlib.util
import io
import json
import shutil
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _load_bench():
    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "bench" / "serve_load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------------------------- adapters


def _random_adapter(model_path: str, out: Path, seed: int) -> None:
    """A LoRA checkpoint in the layout of training/checkpointing.py (adapter/ = peft save_pretrained,
    state.json) with random, non-zero LoRA weights: a different seed gives a different model."""
    from peft import LoraConfig, get_peft_model

    from raytrain.models import paligemma

    torch.manual_seed(seed)
    base, _ = paligemma.load(model_path)
    lcfg = LoraConfig(r=8, lora_alpha=64, init_lora_weights=False,  # B != 0: the adapter changes outputs
                      target_modules=paligemma.lora_target_modules(["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]))
    get_peft_model(base, lcfg).save_pretrained(str(out / "adapter"))
    state = {"step": 0, "strategy": "lora", "family": "paligemma", "base_model": model_path}
    (out / "state.json").write_text(json.dumps(state))


@pytest.fixture(scope="module")
def adapter_root(tiny_model_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    _random_adapter(tiny_model_path, root / "a", seed=1)
    _random_adapter(tiny_model_path, root / "b", seed=2)
    # a checkpoint whose training also unfroze base weights: cannot share the base model
    shutil.copytree(root / "a", root / "withbase")
    (root / "withbase" / "adapter" / "extra_trainable.safetensors").write_bytes(b"")
    # a checkpoint trained with the task attention head (model.task_head_queries): the same
    shutil.copytree(root / "a", root / "withhead")
    (root / "withhead" / "adapter" / "task_head.safetensors").write_bytes(b"")
    # a checkpoint trained with its own prompts (data.text, recorded in state.json)
    shutil.copytree(root / "a", root / "prompted")
    state = json.loads((root / "prompted" / "state.json").read_text())
    state["text"] = {"prompts": {"point": "Point at the {query}"}, "system_prompt": "", "empty_answer": "", "multi_label": False}
    (root / "prompted" / "state.json").write_text(json.dumps(state))
    return root


@pytest.fixture(scope="module")
def served(ray_cluster, tiny_model_path, adapter_root, s3_server):
    """The app on 127.0.0.1:<free port>; adapter 's3b' is a copy of 'b' read from S3 (moto)."""
    import boto3
    from ray import serve

    from raytrain import storage
    from raytrain.serve import app

    bucket = "raytrain-serve-test"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    fs = storage.fsspec_fs("s3://x", storage.StorageOptions(endpoint_url=s3_server))
    fs.put(str(adapter_root / "b") + "/", f"{bucket}/ckpts/b", recursive=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = app.ServeConfig(
        model=tiny_model_path, adapter_root=str(adapter_root), adapters={"s3b": f"s3://{bucket}/ckpts/b"},
        endpoint_url=s3_server, region="us-east-1", port=port, app_name="raytrain-test", num_cpus=1.0,
        max_adapters_per_replica=2,  # three adapters in play: the LRU evicts and reloads
        max_batch_size=8, batch_wait_timeout_s=0.01, max_ongoing_requests=16, max_queued_requests=16,
        max_new_tokens=8, max_new_tokens_limit=16, max_body_bytes=512 * 1024, max_image_bytes=256 * 1024,
        max_image_pixels=512 * 512, max_image_side=1024, max_query_chars=64)
    t0 = time.perf_counter()
    url = app.run(cfg)
    print(f"serve up in {time.perf_counter() - t0:.1f}s at {url}")
    yield url, cfg
    serve.shutdown()


# ---------------------------------------------------------------------------------------------- helpers


def _png(seed: int = 0, size: int = 64) -> tuple[str, str]:
    from raytrain.data import synthetic

    ex = synthetic.make_example(seed, seed=3, image_size=size)
    return base64.b64encode(ex["image"]).decode(), ex["objects"][0].label


def _post(url: str, body, timeout: float = 60.0, raw: bool = False, method: str = "POST", headers: dict | None = None):
    data = body if raw else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data if method == "POST" else None, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            payload = json.loads(text)
        except ValueError:
            payload = text.decode(errors="replace")
        return e.code, payload, {k.lower(): v for k, v in e.headers.items()}


def _ask(url, image, label, adapter=None, **extra):
    body = {"image": image, "task": "point", "prompt": label, "debug": True, **extra}
    if adapter:
        body["adapter"] = adapter
    status, out, _ = _post(url, body)
    assert status == 200, out
    return out


# ---------------------------------------------------------------------------------------------- tests


def test_two_adapters_one_replica_http_and_handle(served):
    from raytrain.serve import app

    url, cfg = served
    images = [_png(i) for i in range(4)]
    outs = {name: [_ask(url, img, label, name) for img, label in images] for name in ("a", "b", "s3b", None)}
    texts = {name: [o["text"] for o in v] for name, v in outs.items()}
    # the two adapters really are different models, and both differ from what the base says
    assert texts["a"] != texts["b"], texts
    assert texts["a"] != texts[None] or texts["b"] != texts[None], texts
    assert texts["s3b"] == texts["b"]  # the same weights, read from S3
    # ... all answered by the same replica process holding one base model
    replicas = {(o["debug"]["replica"], o["debug"]["pid"]) for v in outs.values() for o in v}
    assert len(replicas) == 1, replicas
    for name, v in outs.items():
        for o in v:
            assert o["adapter"] == name and o["task"] == "point" and o["image_size"] == [64, 64]
            assert len(o["confidence"]) == len(o["objects"])
            assert all(c is None or 0.0 < c <= 1.0 for c in o["confidence"])
            for obj in o["objects"]:
                assert 0 <= obj["x"] <= 64 and 0 <= obj["y"] <= 64
    print("texts:", texts)
    # the adapter may also come as Serve's multiplexing header (routing to a replica that holds it)
    img0, label0 = images[1]
    mux = {"serve_multiplexed_model_id": "b"}
    status, out, _ = _post(url, {"image": img0, "task": "point", "prompt": label0}, headers=mux)
    assert status == 200 and out["adapter"] == "b" and out["text"] == texts["b"][1]
    status, out, _ = _post(url, {"image": img0, "task": "point", "prompt": label0, "adapter": "a"}, headers=mux)
    assert status == 400, out  # header and body disagree

    # the same through a DeploymentHandle (image as an array, adapter as the multiplexed model id)
    h = app.model_handle(cfg.app_name)
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(images[0][0]))).convert("RGB"))
    res = h.options(multiplexed_model_id="a").predict.remote({"image": img, "task": "point", "query": images[0][1]}).result()
    assert res["text"] == texts["a"][0] and res["adapter"] == "a"
    with pytest.raises(app.AdapterNotFound) as e:
        h.options(multiplexed_model_id="nope").predict.remote({"image": img, "task": "point", "query": "x"}).result()
    assert e.value.status == 404
    with pytest.raises(app.ServeError) as e:  # a known task this server cannot do: no mask codec configured
        h.predict.remote({"image": img, "task": "segment", "query": "x"}).result()
    assert e.value.status == 501 and "mask codec" in e.value.message

    stats = json.loads(urllib.request.urlopen(url.rsplit("/", 1)[0] + "/stats", timeout=30).read())
    assert stats["pid"] == replicas.pop()[1] and stats["adapter_loads"] >= 3


def test_an_adapter_is_asked_with_the_prompts_it_was_trained_on(served):
    url, _ = served
    image, label = _png(4)
    assert _ask(url, image, label, adapter="prompted")["debug"]["prompt"] == f"Point at the {label}"  # its data.text
    assert _ask(url, image, label, adapter="a")["debug"]["prompt"] == f"point to {label}"  # no record: the family's
    assert _ask(url, image, label)["debug"]["prompt"] == f"point to {label}"  # the base model


def test_concurrent_requests_batch_per_adapter_without_mixing(served):
    """Interleaved requests for three adapters (two LRU slots, so adapters are evicted and reloaded
    while others decode) and the base model: every answer equals the one the same adapter gives
    alone, and requests were batched."""
    url, cfg = served
    image, label = _png(5)
    ref = {name: _ask(url, image, label, name)["text"] for name in ("a", "b", "s3b", None)}
    assert ref["a"] != ref["b"] and ref["b"] == ref["s3b"]
    order = ["a", "a", "b", None, "a", "s3b", None, "a"] * 6  # 48 requests, 16 in flight
    with ThreadPoolExecutor(16) as ex:
        outs = list(ex.map(lambda name: _ask(url, image, label, name), order))
    for name, o in zip(order, outs):
        assert o["adapter"] == name
        assert o["text"] == ref[name], (name, o["text"], ref[name])  # never decoded with another adapter active
    sizes = [o["debug"]["batch_size"] for o in outs]
    print("batch sizes seen:", sorted(sizes))
    assert max(sizes) > 1
    stats = json.loads(urllib.request.urlopen(url.rsplit("/", 1)[0] + "/stats", timeout=30).read())
    print("stats:", stats)
    assert stats["adapter_evictions"] > 0 and len(stats["resident_adapters"]) <= cfg.max_adapters_per_replica
    assert int(max(stats["batch_sizes"], key=int)) > 1


MALFORMED = [
    # (name, body (bytes: sent raw; dict: merged into a good request, None values removing fields), status)
    ("not json", b"this is not json", 400),
    ("empty body", b"", 400),
    ("json array", b"[1, 2, 3]", 400),
    ("json string", b'"point to the cat"', 400),
    ("invalid utf-8", b"\xff\xfe\xfa{", 400),
    ("NaN literal", b'{"image": NaN, "task": "point", "prompt": "x"}', 400),
    ("absurd nesting", b"[" * 100_000 + b"]" * 100_000, 400),
    ("missing image", {"image": None}, 400),
    ("image not a string", {"image": 123, "task": "point", "prompt": "red circle"}, 400),
    ("invalid base64", {"image": "!!!not base64!!!", "task": "point", "prompt": "red circle"}, 400),
    ("base64 of text", {"image": base64.b64encode(b"hello, not an image").decode(), "task": "point", "prompt": "x"}, 400),
    ("malformed data url", {"image": "data:image/png,AAAA", "task": "point", "prompt": "x"}, 400),
    ("unknown task", {"task": "segmentation"}, 400),
    ("prompt for a whole-image task", {"task": "caption"}, 400),
    ("query for a whole-image task", {"task": "dense_caption", "prompt": None, "query": "cat"}, 400),
    ("task not a string", {"task": ["point"]}, 400),
    ("missing prompt", {"prompt": None}, 400),
    ("prompt and query", {"query": "blue square"}, 400),
    ("prompt not a string", {"prompt": 42}, 400),
    ("blank prompt", {"prompt": "   "}, 400),
    ("prompt with newline", {"prompt": "red\ncircle"}, 400),
    ("prompt too long", {"prompt": "x" * 65}, 400),
    ("unknown field", {"max_tokens": 4}, 400),
    ("max_new_tokens zero", {"max_new_tokens": 0}, 400),
    ("max_new_tokens huge", {"max_new_tokens": 10**9}, 400),
    ("max_new_tokens string", {"max_new_tokens": "4"}, 400),
    ("max_new_tokens bool", {"max_new_tokens": True}, 400),
    ("debug not bool", {"debug": "yes"}, 400),
    ("adapter not a string", {"adapter": 5}, 400),
    ("adapter path traversal", {"adapter": "../a"}, 400),
    ("unknown adapter", {"adapter": "nope"}, 404),
    ("adapter that trained base weights", {"adapter": "withbase"}, 422),
    ("adapter trained with a task head", {"adapter": "withhead"}, 422),
]


def _image_bytes(fmt: str, size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


def test_malformed_requests_get_4xx_never_5xx(served):
    url, cfg = served
    image, label = _png(1)
    good = {"image": image, "task": "point", "prompt": label}
    cases = []
    for name, body, status in MALFORMED:
        if isinstance(body, dict):
            body = {**good, **body}
            body = {k: v for k, v in body.items() if v is not None}
        cases.append((name, body, status))
    png = _image_bytes("PNG")
    cases += [
        ("gif image", {**good, "image": base64.b64encode(_image_bytes("GIF")).decode()}, 415),
        ("truncated png", {**good, "image": base64.b64encode(png[: len(png) // 2]).decode()}, 400),
        ("image over the pixel limit", {**good, "image": base64.b64encode(_image_bytes("PNG", (600, 600))).decode()}, 413),
        ("body over the limit", {**good, "image": "A" * (cfg.max_body_bytes + 10)}, 413),
    ]
    assert len(cases) >= 15
    seen = {}
    for name, body, want in cases:
        status, out, _ = _post(url, body, raw=isinstance(body, bytes))
        seen[name] = status
        assert status == want, (name, status, out)
        assert isinstance(out, dict) and out["error"]["message"], (name, out)
    # wrong method / route: Serve's FastAPI answers 405 / 404
    assert _post(url, None, method="GET")[0] == 405
    assert _post(url.replace("/predict", "/nope"), good)[0] == 404
    assert all(400 <= s < 500 for s in seen.values())
    # still healthy afterwards
    assert _post(url, good)[0] == 200


def test_overload_answers_503_from_serve_backpressure(served):
    """Capacity is 16 ongoing (one replica) + 16 queued at the proxy: a burst of 80 long requests
    overflows it, and Serve answers 503 (Retry-After) instead of queueing without bound."""
    url, _ = served
    image, label = _png(2)
    body = {"image": image, "task": "detect", "prompt": label, "max_new_tokens": 16}
    with ThreadPoolExecutor(80) as ex:
        results = list(ex.map(lambda _: _post(url, body), range(80)))
    statuses = [r[0] for r in results]
    print("burst statuses:", {s: statuses.count(s) for s in set(statuses)})
    assert set(statuses) <= {200, 503}
    assert 503 in statuses and 200 in statuses
    assert all(r[2].get("retry-after") for r in results if r[0] == 503)
    assert _post(url, body)[0] == 200  # recovers


def test_load_1000_requests_8_clients(served, tmp_path, record_property):
    bench = _load_bench()
    url, _ = served
    bodies = bench.make_payloads(n_images=16, image_size=64, adapters=["a", "b", None], max_new_tokens=2)
    rep = bench.run_load(url, bodies, n_requests=1000, concurrency=8, timeout_s=30, deadline_s=85)
    out = tmp_path / "serve_load.json"
    out.write_text(json.dumps(rep, indent=2))
    print(json.dumps(rep, indent=2))
    print(bench.headline(rep))
    for k in ("throughput_rps", "seconds"):
        record_property(k, rep[k])
    record_property("latency_ms", json.dumps(rep["latency_ms"]))
    assert rep["completed"] == 1000 and not rep["stopped_early"], rep
    assert rep["http_5xx"] == 0 and not rep["connection_failures"], rep
    assert rep["status_counts"] == {"200": 1000}, rep


def test_http_proxy_listens_on_loopback_only(served):
    import psutil

    _, cfg = served
    listening = [c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == cfg.port]
    assert listening, f"nothing listens on port {cfg.port}"
    assert {c.laddr.ip for c in listening} == {"127.0.0.1"}, listening


def test_answer_body_and_decode_are_the_predict_path(tiny_model_path):
    """The response body: objects in source pixels and per-object confidences, read by the one
    predict path (raytrain/predict.py) from the token log-probabilities its decode returns."""
    import math

    from raytrain import predict
    from raytrain.formats.annotations import Point
    from raytrain.models import family
    from raytrain.serve.app import answer_body

    fam = family("paligemma")
    model, proc = fam.load(tiny_model_path)
    model.eval()
    tok = proc.tokenizer
    objs = [Point(10.0, 20.0, "red circle"), Point(40.0, 30.0, "blue square")]
    text = fam.render_example("point", "x", objs, 64, 48)[1]
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    gen = predict.Generation(text, ids, [math.log(0.5)] * len(ids))
    out = answer_body(predict.read_answer(fam, proc, "point", "red circle ; blue square", gen, predict.identity_geometry(64, 48)))
    assert [o["label"] for o in out["objects"]] == ["red circle", "blue square"] and not out["errors"]
    assert abs(out["objects"][0]["x"] - 10) < 0.1 and abs(out["objects"][1]["y"] - 30) < 0.1
    assert out["confidence"] == [pytest.approx(0.5), pytest.approx(0.5)]
    no_lp = predict.read_answer(fam, proc, "point", "x", predict.Generation(text, ids, []), predict.identity_geometry(64, 48))
    assert answer_body(no_lp)["confidence"] == [None, None]
    # decoding with log-probs changes no text: one log-prob per generated token
    images = [Image.new("RGB", (64, 48), (200, 30, 30)), Image.new("RGB", (32, 32), (30, 70, 220))]
    prefixes = ["point to red circle", "detect blue square"]
    got = predict.decode(model, proc, fam, images, prefixes, max_new_tokens=6, logprobs=True)
    assert [g.text for g in got] == [g.text for g in predict.decode(model, proc, fam, images, prefixes, max_new_tokens=6)]
    assert all(len(g.token_ids) == len(g.logprobs) and all(lp <= 0 for lp in g.logprobs) for g in got)


def test_launcher_config_and_fields():
    from raytrain.launch import serve as launch_serve

    cfg = launch_serve.load_config(None, ["model=tiny:paligemma", "adapter_root=s3://b/adapters", "port=8123", "adapters={x: /tmp/x}"])
    assert (cfg.port, cfg.adapter_root, cfg.adapters, cfg.host) == (8123, "s3://b/adapters", {"x": "/tmp/x"}, "127.0.0.1")
    with pytest.raises(ValueError):
        launch_serve.load_config(None, ["port=eighty"])
    with pytest.raises(ValueError):
        launch_serve.load_config(None, ["max_batch_size=32", "max_ongoing_requests=8"])
    assert launch_serve.main(["--help-fields"]) == 0
    assert launch_serve.main(["nonsense_key=1"]) == 2
