"""Serve answers every task through the predict path: caption, dense caption and segment requests
(besides point and detect) for LoRA adapters of PaliGemma (with a mask codec for segment) and of
Qwen2.5-VL, on real Ray Serve bound to 127.0.0.1. Per-image tasks take no prompt; a task the family
does not answer is a 400, never a 5xx."""

import base64
import json
import socket
import time

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.integration


def _lora_adapter(fam_spec: str, model_path: str, out, seed: int) -> None:
    """A LoRA checkpoint in training/checkpointing.py's layout (adapter/ + state.json) with random,
    non-zero LoRA weights on the language model's attention projections."""
    from peft import LoraConfig, get_peft_model

    from raytrain.models import family

    fam = family(fam_spec)
    torch.manual_seed(seed)
    base, _ = fam.load(model_path)
    # strong enough to move the tiny random model's greedy answers (a weak one leaves both at the empty answer)
    lcfg = LoraConfig(r=8, lora_alpha=64, init_lora_weights=False,
                      target_modules=fam.lora_target_modules(["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]))
    model = get_peft_model(base, lcfg)
    model.save_pretrained(str(out / "adapter"))
    fam.save_adapter_files(fam.load_processor(model_path), out / "adapter")
    (out / "state.json").write_text(json.dumps({"step": 0, "strategy": "lora", "family": fam_spec, "base_model": model_path}))


@pytest.fixture(scope="module")
def mask_codec(tmp_path_factory):
    """A random mask codec saved in vae-oid.npz's key layout (no real weights are downloaded)."""
    from raytrain.formats import paligemma_masks as pm

    path = tmp_path_factory.mktemp("codec") / "vae-oid.npz"
    np.savez(path, **{k: v.detach().numpy() for k, v in pm.MaskCodec.random(0).state_dict().items()})
    return str(path)


@pytest.fixture(scope="module")
def apps(ray_cluster, tiny_model_path, tiny_qwen_path, mask_codec, tmp_path_factory):
    from ray import serve

    from raytrain.serve import app

    root = tmp_path_factory.mktemp("task-adapters")
    _lora_adapter("paligemma", tiny_model_path, root / "pg", seed=1)
    _lora_adapter("qwen2_5_vl", tiny_qwen_path, root / "qw", seed=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = dict(adapter_root=str(root), port=port, num_cpus=0.5, max_new_tokens=12, max_new_tokens_limit=32, max_batch_size=4,
                  max_ongoing_requests=8)
    t0 = time.perf_counter()
    urls = {
        "pg": app.run(app.ServeConfig(family="paligemma", model=tiny_model_path, app_name="tasks-pg", route_prefix="/pg",
                                      mask_codec=mask_codec, **common)),
        "qw": app.run(app.ServeConfig(family="qwen2_5_vl", model=tiny_qwen_path, app_name="tasks-qw", route_prefix="/qw", **common)),
    }
    print(f"two apps up in {time.perf_counter() - t0:.1f}s: {urls}")
    yield urls
    serve.delete("tasks-pg")
    serve.delete("tasks-qw")


def _image(seed: int = 0) -> tuple[str, str]:
    from raytrain.data import synthetic

    ex = synthetic.make_example(seed, seed=11, image_size=64)
    return base64.b64encode(ex["image"]).decode(), ex["objects"][0].label


def _post(url: str, body: dict):
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


TYPES = {"caption": "caption", "dense_caption": "region", "segment": "mask_rle", "point": "point", "detect": "box"}


@pytest.mark.parametrize("name,tasks", [("pg", ("caption", "dense_caption", "segment", "detect")), ("qw", ("caption", "dense_caption", "point"))])
def test_every_task_of_the_family_is_answered_for_an_adapter(apps, name, tasks):
    image, label = _image(3)
    for task in tasks:
        body = {"image": image, "task": task, "adapter": name}
        if task in ("segment", "point", "detect"):
            body["prompt"] = label
        status, out = _post(apps[name], body)
        assert status == 200, (task, out)
        assert out["task"] == task and out["adapter"] == name and out["image_size"] == [64, 64]
        assert isinstance(out["text"], str) and len(out["confidence"]) == len(out["objects"])
        assert all(o["type"] == TYPES[task] for o in out["objects"]), (task, out)
        if task in ("detect", "point"):  # constrained decoding: labels come from the prompt only
            assert all(o["label"] == label for o in out["objects"]), out
        print(name, task, repr(out["text"][:80]), len(out["objects"]))
    # the adapter changes the answers: the base model says something else for at least one task
    base = [_post(apps[name], {"image": image, "task": t, **({"prompt": label} if t in ("point", "detect", "segment") else {})})[1]["text"]
            for t in tasks]
    adapted = [_post(apps[name], {"image": image, "task": t, "adapter": name, **({"prompt": label} if t in ("point", "detect", "segment") else {})})[1]["text"]
               for t in tasks]
    assert base != adapted


def test_whole_image_tasks_take_no_prompt_and_unknown_family_tasks_are_400(apps):
    image, label = _image(4)
    status, out = _post(apps["pg"], {"image": image, "task": "caption", "prompt": "describe"})
    assert status == 400 and "whole image" in out["error"]["message"]
    status, out = _post(apps["qw"], {"image": image, "task": "segment", "prompt": label})  # Qwen2.5-VL has no mask format
    assert status == 400 and out["error"]["code"] == "unsupported_task", out
    status, out = _post(apps["qw"], {"image": image, "task": "segment"})
    assert status == 400
