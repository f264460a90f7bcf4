"""`raytrain <subcommand>`: one console command; options come from the config dataclasses.

    raytrain train   --config jobs/tiny/shapes.yaml [a.b=value ...] [--verbose]
    raytrain prepare --config jobs/tiny/shapes.yaml [a.b=value ...]
    raytrain eval    --config jobs/tiny/shapes.yaml [eval.checkpoint=URI] [eval.split=val]
    raytrain tune    --config jobs/tiny/shapes_sweep.yaml [a.b=value ...]   # rerun resumes the sweep
    raytrain report  --run <run uri> --out <dir> [--data <uri>]
    raytrain serve   model=tiny:paligemma adapter_root=<dir or s3://> [port=8000]
    raytrain export  <checkpoint> <out> [--vllm] [--push-to-hub REPO]
    raytrain config  [--config FILE] [a.b=value ...]    # print the resolved config
    raytrain config  --help-fields                      # every field, its default and its help
                                                        # (job YAML sections, then `raytrain serve` settings)

train / eval / tune / prepare print raytrain's own lines (progress every train.log_every steps, one
line per evaluation pass) and warnings a user can act on; --verbose adds Ray's worker logs and every
library's output (launch/console.py).
"""

from __future__ import annotations

import argparse
import sys

from raytrain import config as config_mod


# Subcommands with their own flags (not an experiment config): module whose main(argv) runs them.
PASSTHROUGH = {
    "report": ("raytrain.eval.report", "HTML + PNG report of a run: overlays, curves, error analytics"),
    "consolidate": ("raytrain.launch.consolidate", "ZeRO checkpoint shards -> a Hugging Face model directory (safetensors + processor)"),
    "export": ("raytrain.launch.export", "a checkpoint -> one merged Hugging Face folder (+ --vllm form, --push-to-hub)"),
    "serve": ("raytrain.launch.serve", "Ray Serve app on 127.0.0.1: one base model, many LoRA adapters, batched"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raytrain", description="Fine-tune vision-language models for visual grounding on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (
        ("train", "prepare data (synthetic default), train, evaluate; prints the metrics JSON path last"),
        ("prepare", "write the dataset's Parquet shards and prep report"),
        ("eval", "evaluate a checkpoint (default: the run's latest) on a whole split; prints the metrics JSON path last"),
        ("tune", "Ray Tune sweep (the job's `tune:` block) of TorchTrainer trials; prints best.json's path last"),
        ("config", "print the resolved experiment config"),
    ):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--config", "-c", default=None, help="experiment YAML (jobs/...); default: built-in defaults")
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 scale.num_workers=1")
        sp.add_argument("--verbose", "-v", action="store_true",
                        help="print Ray's worker logs and every library's output (default: raytrain's lines and actionable warnings)")
        if name == "config":
            sp.add_argument("--help-fields", action="store_true", help="list every config field with default and help")
    for name, (_, help_) in PASSTHROUGH.items():
        sub.add_parser(name, help=help_ + f" (raytrain {name} --help)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from raytrain.launch import console

    if argv and argv[0] in PASSTHROUGH:
        import importlib

        # report / consolidate / serve print as they always did (console.setup is not called)
        rc = importlib.import_module(PASSTHROUGH[argv[0]][0]).main(argv[1:])
        return rc if isinstance(rc, int) else 0
    args = _parser().parse_args(argv)
    console.setup(verbose=args.verbose)
    if args.command == "config" and args.help_fields:
        print(config_mod.field_listing())
        print("\n# raytrain serve settings (its own YAML / key=value; raytrain serve --help-fields)")
        print(config_mod.field_listing(config_mod.ServeConfig))
        return 0
    if args.command == "tune":
        from raytrain.launch import tune as launch_tune

        try:
            cfg, sweep = launch_tune.load_job(args.config, args.overrides)
        except (ValueError, FileNotFoundError) as e:
            print(f"raytrain: config error: {e}", file=sys.stderr)
            return 2
        return 0 if launch_tune.main(cfg, sweep) else 130  # 130: interrupted, rerun to resume
    try:
        cfg = config_mod.load(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"raytrain: config error: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(config_mod.dumps(cfg))
        return 0
    if args.command == "prepare":
        from raytrain.launch import prepare as launch_prepare

        launch_prepare.main(cfg)
        return 0
    if args.command == "eval":
        from raytrain.launch import eval as launch_eval

        launch_eval.main(cfg)
        return 0
    if args.command == "train":
        from raytrain.launch import train as launch_train

        launch_train.main(cfg)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
