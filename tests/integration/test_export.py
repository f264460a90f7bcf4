"""`raytrain export` (raytrain/launch/export.py) on checkpoints written by the real recipes.

Checkpoints come from the smoke path (`launch.smoke.smoke` + `run_local`: the job's recipe for a few
steps on the tiny presets, no Ray): PaliGemma LoRA with an unfrozen vision layer and projector
(extra_trainable.safetensors), Qwen2.5-VL full fine-tuning, Qwen2.5-VL `tokens` LoRA (peft trainable
tokens on the added <|loc|> rows, plus an unfrozen vision block), PaliGemma ZeRO-3 shards, and a
PaliGemma run with seed 004's task head (refused). Each export is loaded with plain transformers
(`<Class>.from_pretrained(OUT)` and the processor saved in OUT) and its logits must equal, within
1e-4, those of the model training left: the recipes' own model (`training.model.build_model`) with the
checkpoint's weights (`checkpointing.load_weights`), adapter applied, not merged.

The vLLM form: the exported weight names, mapped as vLLM maps them, must land on vLLM's modules
(see test_exported_names_are_the_layout_vllm_loads for the source read), the LoRA-only adapter has
no weight vLLM refuses, and base + adapter give the trained logits too. The Hub push runs only
against a local directory (LocalHubTarget) and as a dry run: nothing here touches the network.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from raytrain import config as config_mod
from raytrain.launch import export, smoke
from raytrain.models import family, vllm_layout
from raytrain.training import checkpointing
from raytrain.training.loop import batch_to_model
from raytrain.training.model import build_model

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-4


# ----------------------------------------------------------------------------------------------
# checkpoints through the real recipes


def _train(tmp: Path, job: str, overrides: list[str], cache: str, steps: int = 4):
    """(shrunk config, tiny preset path, last checkpoint) of a smoke run of `job` + overrides."""
    cfg = smoke.smoke(config_mod.load(str(REPO / job), overrides), steps=steps, root=str(tmp / "runs"))
    res = smoke.run_local(cfg, tmp / "ckpts", n_batches=4, preset_cache=cache)
    assert res.losses[-1] < res.losses[0], res.losses  # it trained
    return cfg, res.model_path, res.checkpoints[-1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("export-presets"))


@pytest.fixture(scope="module")
def pg_lora(tmp_path_factory, cache):
    return _train(tmp_path_factory.mktemp("pg-lora"), "jobs/tiny/shapes.yaml", [
        "train.strategy=lora", "lora.r=4", "lora.alpha=8", "model.freeze_vision=true", "model.unfreeze_vision_layers=1",
        "model.train_projector=true"], cache)


@pytest.fixture(scope="module")
def qwen_tokens(tmp_path_factory, cache):
    return _train(tmp_path_factory.mktemp("qwen-tokens"), "jobs/tiny/shapes_qwen.yaml", [
        "train.strategy=lora", "lora.r=4", "lora.alpha=8", "model.box_format=tokens", "model.freeze_vision=true",
        "model.unfreeze_vision_layers=1", "loss.loc_sigma=0"], cache)


# ----------------------------------------------------------------------------------------------
# logits


def _batch(cfg, processor_path: str):
    """One training micro-batch of the smoke data, encoded with the processor found at processor_path."""
    return smoke.synthetic_batches(cfg, processor_path, n_batches=1)[0]


def _logits(model, batch, fam) -> torch.Tensor:
    inputs, _ = batch_to_model(batch, fam, torch.device("cpu"), torch.float32)
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits.float()


def _trained(cfg, model_path: str, ckpt: Path):
    """The model as training left it: the recipe's model (peft-wrapped for LoRA) + the checkpoint."""
    model, _, _ = build_model(cfg, model_path)
    checkpointing.load_weights(ckpt, model)
    return model


def _assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    diff = (a - b).abs().max().item()
    print(f"\n{what}: max |logit diff| = {diff:.2e}")
    assert diff <= TOL, (what, diff)


def _same_inputs(a: dict, b: dict) -> None:
    """The exported processor encodes exactly as the training processor did."""
    for k in ("input_ids", "attention_mask"):
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------------------------
# merged folders in plain transformers


def test_paligemma_lora_with_unfrozen_vision_layer_exports_with_the_trained_logits(pg_lora, tmp_path):
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    cfg, model_path, ckpt = pg_lora
    fam = family(cfg.model.spec)
    assert (ckpt / "adapter" / checkpointing.EXTRA).exists()  # the unfrozen layer + projector ride next to LoRA
    out = tmp_path / "out"
    res = export.export(str(ckpt), out, model_path, vllm=True)
    assert res.kind == "adapter"

    merged = PaliGemmaForConditionalGeneration.from_pretrained(out)  # plain transformers
    AutoProcessor.from_pretrained(out)  # the saved processor loads as such
    batch = _batch(cfg, str(out))
    _same_inputs(batch, _batch(cfg, model_path))
    want = _logits(_trained(cfg, model_path, ckpt), batch, fam)
    _assert_close(_logits(merged, batch, fam), want, "paligemma lora + unfrozen layer, merged")
    base = PaliGemmaForConditionalGeneration.from_pretrained(model_path)
    assert (_logits(base, batch, fam) - want).abs().max() > 1e-2  # the export is not the base model

    # records travel: family spec, preprocessing, base model
    state = json.loads((out / "state.json").read_text())
    trained_state = checkpointing.read_state(ckpt)
    assert state["format"] == export.EXPORT_FORMAT and state["family"] == "paligemma" and state["kind"] == "adapter"
    assert state["preprocess"] == trained_state["preprocess"] and state["base_model"] == "tiny:paligemma"
    assert checkpointing.recorded_preprocess(str(out)) == trained_state["preprocess"]

    # the LoRA-only form: a base with the unfrozen weights merged, plus the LoRA vLLM applies
    info = json.loads((out / "vllm.json").read_text())
    assert info["lora"]["base"] == "vllm_lora/base" and info["lora"]["lora_scopes"] == ["language"]
    assert info["lora"]["merged_into_base"] == ["extra_trainable.safetensors"]
    assert not info["lora"]["enable_tower_connector_lora"]
    _assert_close(_lora_form_logits(out, fam, batch, PaliGemmaForConditionalGeneration), want,
                  "paligemma vllm base + LoRA-only adapter")


def _lora_form_logits(out: Path, fam, batch, cls) -> torch.Tensor:
    """Logits of OUT/vllm_lora/base with OUT/vllm_lora/adapter applied by peft: the adapter's
    published module names mapped back onto the transformers model's own."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    base = cls.from_pretrained(out / "vllm_lora" / "base")
    back = {}
    for n, _ in base.named_modules():
        try:
            back[vllm_layout.published_name(fam.name, n)] = n
        except ValueError:
            pass  # a container ("", "model"), not a layer an adapter names
    src = out / "vllm_lora" / "adapter"
    tmp = out.parent / "adapter-transformers-names"
    tmp.mkdir()
    prefix = "base_model.model."
    tensors = {}
    for k, v in load_file(str(src / "adapter_model.safetensors")).items():
        body, part = k[len(prefix):].rsplit(".lora_", 1)
        tensors[prefix + back[body] + ".lora_" + part] = v
    save_file(tensors, str(tmp / "adapter_model.safetensors"))
    shutil.copy(src / "adapter_config.json", tmp / "adapter_config.json")
    return _logits(PeftModel.from_pretrained(base, str(tmp)).merge_and_unload(), batch, fam)


def test_qwen_tokens_lora_merges_the_added_loc_rows(qwen_tokens, tmp_path):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    cfg, model_path, ckpt = qwen_tokens
    fam = family(cfg.model.spec)
    with safe_open(str(ckpt / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert any("trainable_tokens_delta" in k for k in f.keys())  # peft trainable tokens: the <|loc|> rows
    out = tmp_path / "out"
    export.export(str(ckpt), out, model_path, vllm=True)

    merged = Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    loc_ids = fam.loc_token_ids(tok)
    assert len(loc_ids) == 1024 and list(loc_ids) == fam.new_token_ids(fam.load_processor(model_path))
    batch = _batch(cfg, str(out))
    _same_inputs(batch, _batch(cfg, model_path))
    assert torch.isin(batch["input_ids"], torch.as_tensor(loc_ids)).any()  # the answers use the added tokens
    want = _logits(_trained(cfg, model_path, ckpt), batch, fam)
    _assert_close(_logits(merged, batch, fam), want, "qwen tokens lora, merged")
    base_emb = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_path).get_input_embeddings().weight
    rows = torch.as_tensor(loc_ids)
    assert not torch.allclose(merged.get_input_embeddings().weight[rows], base_emb[rows])  # trained rows merged
    assert (out / "raytrain_resize.json").exists()  # the frame its pixel coordinates are written in

    info = json.loads((out / "vllm.json").read_text())
    assert "model.language_model.embed_tokens.token_adapter" in info["lora"]["merged_into_base"]
    cfg_json = json.loads((out / "vllm_lora" / "adapter" / "adapter_config.json").read_text())
    assert cfg_json["trainable_token_indices"] is None and cfg_json["modules_to_save"] is None
    _assert_close(_lora_form_logits(out, fam, batch, Qwen2_5_VLForConditionalGeneration), want,
                  "qwen vllm base (token rows merged) + LoRA-only adapter")


def test_qwen_full_finetuning_exports_from_s3(tmp_path, cache, s3_bucket, s3_opts):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from raytrain import storage

    cfg, model_path, ckpt = _train(tmp_path, "jobs/tiny/shapes_qwen.yaml", [], cache)
    assert cfg.train.strategy == "full" and (ckpt / "model").exists()
    uri = storage.join(s3_bucket, "run", ckpt.name)
    storage.fsspec_fs(uri, s3_opts).put(str(ckpt) + "/", storage.strip_scheme(uri) + "/", recursive=True)
    out = tmp_path / "out"
    assert export.export(uri, out, model_path, opts=s3_opts).kind == "model"

    fam = family(cfg.model.spec)
    batch = _batch(cfg, str(out))
    _assert_close(_logits(Qwen2_5_VLForConditionalGeneration.from_pretrained(out), batch, fam),
                  _logits(_trained(cfg, model_path, ckpt), batch, fam), "qwen full, from s3")
    assert json.loads((out / "state.json").read_text())["source"] == uri


def test_zero3_shards_export_with_the_gathered_weights(tmp_path, cache, monkeypatch):
    import torch.distributed as dist
    from transformers import PaliGemmaForConditionalGeneration

    from raytrain.training import zero_checkpoint

    monkeypatch.setenv("LOCAL_RANK", "0")  # read by deepspeed.zero.Init while loading (one rank, this process)
    try:
        cfg, model_path, ckpt = _train(tmp_path, "jobs/tiny/shapes.yaml", ["train.strategy=zero3"], cache)
    finally:
        if dist.is_initialized():  # through DeepSpeed: its cached groups go too (a later in-process ZeRO run reuses them)
            import deepspeed.comm

            deepspeed.comm.destroy_process_group()
    assert (ckpt / "zero").is_dir() and not (ckpt / "model").exists()
    out = tmp_path / "out"
    assert export.export(str(ckpt), out, model_path).kind == "zero"

    fam = family(cfg.model.spec)
    merged = PaliGemmaForConditionalGeneration.from_pretrained(out)
    ref = PaliGemmaForConditionalGeneration.from_pretrained(model_path)
    ref.load_state_dict(zero_checkpoint.fp32_state_dict(ckpt), strict=True)  # the engine's gathered master weights
    batch = _batch(cfg, str(out))
    _assert_close(_logits(merged, batch, fam), _logits(ref, batch, fam), "paligemma zero3, merged")


def test_a_task_head_checkpoint_is_refused_with_a_reason(tmp_path, cache, capsys):
    from raytrain import cli

    cfg, _, ckpt = _train(tmp_path, "jobs/tiny/shapes.yaml", ["model.task_head_queries=16"], cache)
    assert cfg.model.task_head_queries == 16
    out = tmp_path / "out"
    with pytest.raises(export.ExportRefused, match="task attention head"):
        export.export(str(ckpt), out)
    assert cli.main(["export", str(ckpt), str(out)]) == 2
    err = capsys.readouterr().err
    assert "task attention head" in err and "load_for_inference" in err
    assert not out.exists() or not any(out.iterdir())  # nothing half-written


# ----------------------------------------------------------------------------------------------
# vLLM's loader


# What vLLM does with a checkpoint's names, as read in vllm-project/vllm:
# * vllm/model_executor/models/qwen2_5_vl.py, Qwen2_5_VLForConditionalGeneration: `hf_to_vllm_mapper`
#   (orig_to_new_prefix below) applied by `load_weights` -> AutoWeightsLoader(self).load_weights(weights,
#   mapper=self.hf_to_vllm_mapper); modules `visual` (Qwen2_5_VisionTransformer: patch_embed, blocks,
#   merger) and `language_model` (Qwen2ForCausalLM: model, lm_head).
# * vllm/model_executor/models/paligemma.py, PaliGemmaForConditionalGeneration.load_weights ->
#   AutoWeightsLoader over its modules `vision_tower` (siglip.py SiglipVisionModel, whose only child
#   is `vision_model`: SiglipVisionModel.__init__ / load_weights), `multi_modal_projector` (`linear`)
#   and `language_model` (Gemma(2)ForCausalLM); the transformers-4.52 prefixes below are the mapper the
#   multimodal models of that generation carry (gemma3_mm.py, llava_next_video.py); published names
#   pass through it unchanged.
# * LoRA: vllm/lora/utils.py parse_fine_tuned_lora_name strips `base_model.model.`, applies the same
#   mapper and accepts only `.lora_A.weight` / `.lora_B.weight` (anything else, e.g. peft's
#   `trainable_tokens_delta`, raises "unsupported LoRA weight"); vllm/lora/lora_model.py
#   LoRAModel.from_local_checkpoint; vllm/lora/peft_helper.py refuses `modules_to_save`.
VLLM_MAPPER = {
    "qwen2_5_vl": {"model.language_model.": "language_model.model.", "model.visual.": "visual.",
                   "lm_head.": "language_model.lm_head.", "model.": "language_model.model."},
    "paligemma": {"model.language_model.": "language_model.model.", "model.vision_tower.": "vision_tower.",
                  "model.multi_modal_projector.": "multi_modal_projector.", "lm_head.": "language_model.lm_head."},
}
VLLM_MODULES = {
    "qwen2_5_vl": ("visual.patch_embed.", "visual.blocks.", "visual.merger.", "language_model.model.", "language_model.lm_head."),
    "paligemma": ("vision_tower.vision_model.embeddings.", "vision_tower.vision_model.encoder.layers.",
                  "vision_tower.vision_model.post_layernorm.", "multi_modal_projector.linear.", "language_model.model.",
                  "language_model.lm_head."),
}


def _vllm_name(fam_name: str, name: str) -> str:
    """WeightsMapper._map_name with orig_to_new_prefix: every matching prefix, in order."""
    for old, new in VLLM_MAPPER[fam_name].items():
        if name.startswith(old):
            name = new + name[len(old):]
    return name


def _lands_in_vllm(fam_name: str, names) -> list[str]:
    """The names vLLM's loader would not place on one of its modules."""
    return [n for n in names if not _vllm_name(fam_name, n).startswith(VLLM_MODULES[fam_name])]


def _weight_names(folder: Path) -> list[str]:
    names = []
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            names += list(f.keys())
    return names


def test_exported_names_are_the_layout_vllm_loads(pg_lora, qwen_tokens, tmp_path):
    """See VLLM_MAPPER above for the vLLM source read (files and functions)."""
    for fixture, fam_name in ((pg_lora, "paligemma"), (qwen_tokens, "qwen2_5_vl")):
        cfg, model_path, ckpt = fixture
        out = tmp_path / fam_name
        export.export(str(ckpt), out, model_path, vllm=True)
        names = _weight_names(out)
        assert names and _lands_in_vllm(fam_name, names) == [], fam_name
        mapped = {_vllm_name(fam_name, n) for n in names}
        assert len(mapped) == len(names)  # no two weights on one vLLM parameter
        model_params = {n for n, _ in family(cfg.model.spec).hf_model_class().from_pretrained(out).state_dict().items()}
        tied = 1 if "lm_head.weight" in model_params else 0  # tied lm_head: not written, as in the releases
        assert len(names) == len(model_params) - tied

        adapter = out / "vllm_lora" / "adapter"
        keys = _weight_names(adapter)
        assert keys and all(k.endswith((".lora_A.weight", ".lora_B.weight")) and k.startswith("base_model.model.") for k in keys)
        modules = {k[len("base_model.model."):].rsplit(".lora_", 1)[0] for k in keys}
        assert _lands_in_vllm(fam_name, (m + ".weight" for m in modules)) == []
        assert _lands_in_vllm(fam_name, _weight_names(out / "vllm_lora" / "base")) == []

    # what transformers 5 itself saves for PaliGemma would not load in vLLM: the check sees the difference
    saved = _weight_names(Path(pg_lora[1]))
    assert any(n.startswith("vision_tower.encoder.") for n in saved)
    assert _lands_in_vllm("paligemma", saved) != []


def test_a_vision_tower_lora_keeps_vllms_tower_names(tiny_model_path, tmp_path):
    """An adapter with LoRA on the SigLIP layers (the recipe adapts the language model only; others
    do): exported under vision_tower.vision_model.* so vLLM's --enable-tower-connector-lora finds it
    instead of silently ignoring it, and base + adapter give the merged logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import PaliGemmaForConditionalGeneration

    fam = family("paligemma")
    model, processor = fam.load(tiny_model_path)
    target = fam.lora_target_modules(["q_proj", "v_proj", "fc1"], include_vision=True)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=target))
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # a trained-looking adapter (peft starts B at zero)
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    ckpt = tmp_path / "ckpt"
    checkpointing.save(ckpt, model=peft_model, optimizer=opt, scheduler=None,
                       state={"step": 1, "epoch": 0, "batch_in_epoch": 1, "strategy": "lora", "base_model": tiny_model_path,
                              "family": "paligemma", "preprocess": None, "metrics": {}})
    out = tmp_path / "out"
    info = export.export(str(ckpt), out, vllm=True).vllm["lora"]
    assert info["lora_scopes"] == ["language", "tower"] and info["enable_tower_connector_lora"]
    assert "--enable-tower-connector-lora" in json.loads((out / "vllm.json").read_text())["commands"][1]
    keys = _weight_names(out / "vllm_lora" / "adapter")
    assert any(k.startswith("base_model.model.vision_tower.vision_model.encoder.layers.") for k in keys)
    assert _lands_in_vllm("paligemma", (k.rsplit(".lora_", 1)[0][len("base_model.model."):] + ".weight" for k in keys)) == []

    cfg = smoke.smoke(config_mod.load(str(REPO / "jobs/tiny/shapes.yaml")), steps=4, root=str(tmp_path / "runs"))
    batch = _batch(cfg, tiny_model_path)
    peft_model.eval()
    want = _logits(peft_model, batch, fam)
    _assert_close(_logits(PaliGemmaForConditionalGeneration.from_pretrained(out), batch, fam), want, "vision lora, merged")
    _assert_close(_lora_form_logits(out, fam, batch, PaliGemmaForConditionalGeneration), want, "vision lora, vllm form")


# ----------------------------------------------------------------------------------------------
# Hub push (local only) and the CLI


def test_push_to_hub_writes_the_folder_to_a_local_target_and_dry_runs(pg_lora, tmp_path, capsys):
    from raytrain import cli

    _, model_path, ckpt = pg_lora
    out, hub = tmp_path / "out", tmp_path / "hub"
    assert cli.main(["export", str(ckpt), str(out), "--base-model", model_path, "--push-to-hub", "me/tiny-pali",
                     "--private", "--hub-local-dir", str(hub)]) == 0
    printed = capsys.readouterr().out
    repo = hub / "me" / "tiny-pali"
    files = export.upload_list(out)
    assert {"config.json", "model.safetensors", "state.json", "tokenizer.json"} <= set(files)
    for f in files:
        assert (repo / f).read_bytes() == (out / f).read_bytes(), f
    assert json.loads((repo / ".repo.json").read_text()) == {"private": True, "repo_type": "model"}
    assert f"uploaded {len(files)} files" in printed and printed.strip().endswith(str(out))

    (out / ".git").mkdir()
    (out / ".git" / "HEAD").write_text("ref")  # upload_folder's default ignore patterns apply
    assert export.push_to_hub(out, "me/other", dry_run=True) == files
    with pytest.raises(FileExistsError):  # a fresh folder only: never mixes two exports
        export.export(str(ckpt), out, model_path)
