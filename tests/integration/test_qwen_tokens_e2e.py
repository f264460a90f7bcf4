"""model.box_format=tokens end to end on real Ray: a Qwen base WITHOUT <|loc|> tokens (untied
lm_head) gets them in the Ray Data tokenizers, in two DDP workers (LoRA + peft trainable tokens,
new-token warm-up first) and in the eval actors, all from the family spec the launcher passes."""

import json
from pathlib import Path

import pytest

from raytrain import config as config_mod
from raytrain.launch import job
from raytrain.launch import train as launch_train
from raytrain.models import qwen2_5_vl as qw
from raytrain.models import tiny_qwen
from raytrain.training import checkpointing
from raytrain.training.metrics import read_history

pytestmark = pytest.mark.integration


def test_tokens_box_format_with_warmup_trains_and_evaluates(tmp_path, ray_cluster, tmp_path_factory):
    base = str(tiny_qwen.build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen-bare") / "base", loc_tokens=False, tie_embeddings=False))
    cfg = config_mod.load("jobs/tiny/shapes_qwen.yaml", [
        f"storage.root={tmp_path}", f"model.name_or_path={base}", "model.box_format=tokens", "model.freeze_vision=true",
        "model.train_projector=false", "train.strategy=lora", "lora.r=8", "lora.alpha=16", "train.new_token_warmup_steps=4",
        "loss.loc_sigma=60", "data.tasks=[detect]", "data.num_images=120", "train.steps=8", "train.micro_batch_size=4",
        "train.checkpoint_every=4", "train.log_every=2", "train.warmup_steps=0", "train.lr=5e-3", "eval.baselines=false",
        "eval.batch_size=8", "eval.cpus_per_actor=0.25", "eval.max_new_tokens=24"])
    assert cfg.scale.num_workers == 2  # DDP: the warm-up must not upset gradient reduction
    out = launch_train.main(cfg)
    metrics = json.loads(Path(out).read_text())
    assert metrics["run"]["final_step"] == 8 and metrics["trained"]["examples"] > 0
    rows = read_history(job.history_uri(cfg))
    assert [r["step"] for r in rows if "loss" in r][-1] == 8

    ckpt = Path(metrics["run"]["checkpoint"])
    state = checkpointing.read_state(ckpt)
    assert state["family"] == "qwen2_5_vl+tokens"
    adapter = json.loads((ckpt / "adapter" / "adapter_config.json").read_text())
    n0 = len(qw.load_processor(base).tokenizer)
    assert sorted(adapter["trainable_token_indices"]) == ["embed_tokens", "lm_head"]  # untied: both matrices' rows
    assert adapter["trainable_token_indices"]["lm_head"] == list(range(n0, n0 + 1024))
    assert not (ckpt / "adapter" / "processor_config.json").exists()  # the tokenizer only, not a processor copy
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ckpt / "adapter"))
    assert len(tok) == n0 + 1024 and qw.loc_token_ids(tok).tolist() == list(range(n0, n0 + 1024))

    # the eval actors decoded with the added vocabulary and parsed the tokens format into SOURCE pixels
    preds = [json.loads(line) for line in (Path(out).parent / "predictions_test.jsonl").read_text().splitlines()]
    assert preds and all(p["task"] == "detect" for p in preds)
    for p in preds:
        for o in p["objects"]:
            assert all(0 <= o[k] <= 64 for k in ("x1", "y1", "x2", "y2")), o
