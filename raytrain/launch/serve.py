"""Driver side of `raytrain serve`: start Ray Serve on 127.0.0.1 with one base model and an adapter
root, print the URL, and keep serving until interrupted.

    python -m raytrain.launch.serve model=tiny:paligemma adapter_root=checkpoints/adapters
    python -m raytrain.launch.serve -c serve.yaml port=8001 'adapters={a: s3://bucket/run/checkpoint_000003}'
    python -m raytrain.launch.serve --smoke-test        # tiny model, one request, shut down
    python -m raytrain.launch.serve --help-fields       # every ServeConfig field with its default

Settings are the fields of `raytrain.config.ServeConfig` as `key=value` (values parsed as YAML),
optionally from a YAML file of the same keys. Ray starts as for every subcommand (launch/ray_runtime.py,
with the job environment): joins the cluster in RAY_ADDRESS (or --address) when given, otherwise
starts a local one bound to 127.0.0.1. The URL of /predict is the last line printed before serving.
"""

from __future__ import annotations

import argparse
import base64
import json
import signal
import sys
import time
import urllib.request

from raytrain import config as config_mod
from raytrain.config import RayConfig, ServeConfig
from raytrain.launch.ray_runtime import init_ray


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raytrain serve", description="Serve one base model and many LoRA adapters over HTTP on 127.0.0.1.")
    p.add_argument("--config", "-c", default=None, help="YAML file of ServeConfig fields")
    p.add_argument("overrides", nargs="*", help="ServeConfig fields as key=value, e.g. adapter_root=s3://bucket/adapters port=8001")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a new local one)")
    p.add_argument("--smoke-test", action="store_true", help="serve the tiny preset, send one request, print the answer, shut down")
    p.add_argument("--help-fields", action="store_true", help="list every ServeConfig field with its default and help")
    return p


def load_config(path: str | None, overrides: list[str] | None) -> ServeConfig:
    """ServeConfig from an optional YAML file plus key=value overrides (type-checked like the experiment config)."""
    return config_mod.load_section(ServeConfig, path, overrides)


def smoke_request(url: str, adapter: str | None = None, timeout_s: float = 60.0) -> dict:
    """POST one synthetic image to `url`; returns the JSON answer."""
    from raytrain.data import synthetic

    ex = synthetic.make_example(0, seed=0, image_size=64)
    body = {"image": base64.b64encode(ex["image"]).decode(), "task": "point", "prompt": ex["objects"][0].label,
            "max_new_tokens": 8, "debug": True}
    if adapter:
        body["adapter"] = adapter
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from raytrain.serve import app

    if args.help_fields:
        print(config_mod.field_listing(ServeConfig))
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"raytrain serve: config error: {e}", file=sys.stderr)
        return 2
    if args.smoke_test:
        cfg.model, cfg.family, cfg.max_new_tokens, cfg.num_cpus = "tiny:paligemma", "paligemma", 8, min(cfg.num_cpus, 1.0)

    init_ray(RayConfig(address=args.address))
    from ray import serve

    url = app.run(cfg)
    print(f"serving {cfg.model} ({cfg.family}), adapters from {cfg.adapter_root or '-'} {sorted(cfg.adapters) or ''}".rstrip(), flush=True)
    print(url, flush=True)
    if args.smoke_test:
        try:
            print(json.dumps(smoke_request(url), indent=2), flush=True)
        finally:
            serve.shutdown()
        return 0
    # Ctrl-C, and SIGTERM (ray job stop, container stop), end in serve.shutdown(). A background job
    # of a non-interactive shell starts with SIGINT ignored: restore Python's handler explicitly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down", flush=True)
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
