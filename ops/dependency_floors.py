#!/usr/bin/env python3
"""Find dependency floors that are true: the lowest version of each package that raytrain works with.

    nice -n 19 python ops/dependency_floors.py [--venv /work/venvs/floors] [--packages transformers peft ...]
                                               [--apply] [--skip-unit-while-bisecting]

1. A fresh venv (outside the repo) gets raytrain installed editable from this checkout with its
   `dev` and `track` extras, torch from constraints-cpu.txt, every other package at the newest
   version pyproject.toml allows: the reference, which must pass.
2. The lowest versions pyproject.toml allows of all CHECKED packages at once are tried first.
3. Per package (the others at the reference), the first release of each minor series that
   pyproject.toml allows, up to the reference, is bisected for the lowest one that passes (a
   failure, at install or later, means "too old"; passing is assumed to be monotone in the version).
4. The floors found are tried all together (the lowest set pip would pick), and with --apply written
   to pyproject.toml as `pkg>=X.Y` (the minor series' first release passed).

A probe passes when the package installs with the rest pinned to the reference, raytrain and the
package import, every tiny training of PROBE_JOBS for that package succeeds (`raytrain train
--config jobs/tiny/shapes*.yaml` with TINY overrides: 2 workers, a few steps, evaluation; each
strategy that uses the package), and the unit tests pass (`pytest -x tests/unit`). The unit tests
take most of a probe's time; with --skip-unit-while-bisecting the bisection uses the trainings
only and the unit tests run at each package's floor (a floor whose unit tests fail moves up one
minor series) and for the final set; with --unit-only-together as well, for the final set only.

Results are cached in <venv>/results.json (a rerun skips the probes it has), logs in <venv>/logs/,
the summary in <venv>/floors.json. Needs PyPI. Takes hours on 2 cores; run it niced.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO  # the checkout probes install and test: a snapshot of REPO's HEAD (Venv.create), so editing REPO meanwhile is safe
CHECKED = ("transformers", "peft", "ray", "accelerate", "bitsandbytes", "deepspeed")
IMPORT_NAME = {"transformers": "transformers", "peft": "peft", "ray": "ray.train", "accelerate": "accelerate",
               "bitsandbytes": "bitsandbytes", "deepspeed": "deepspeed"}
TINY = ["data.num_images=160", "train.steps=6", "train.log_every=2", "train.checkpoint_every=6", "train.warmup_steps=1",
        "eval.baselines=false", "eval.num_actors=1", "eval.batch_size=16"]
# Each package's tiny trainings: every strategy / family that exercises the package, the one most
# likely to break first (a probe stops at its first failure).
SHAPES, QWEN = "jobs/tiny/shapes.yaml", "jobs/tiny/shapes_qwen.yaml"
LORA = ["train.strategy=lora", "lora.r=8", "lora.alpha=16"]
QLORA4 = LORA + ["quant.bits=4", "quant.quant_type=nf4"]
PROBE_JOBS: dict[str, list[tuple[str, list[str]]]] = {
    "transformers": [(QWEN, []), (SHAPES, [])],  # the Qwen2.5-VL code is where transformers 5.19 broke
    "peft": [(SHAPES, LORA), (QWEN, LORA)],
    "ray": [(SHAPES, [])],
    "accelerate": [(SHAPES, QLORA4)],  # transformers' quantized loading goes through accelerate
    "bitsandbytes": [(SHAPES, QLORA4)],
    "deepspeed": [(SHAPES, ["train.strategy=zero2"])],
}


def sh(cmd: list[str], log: Path, *, timeout: float, env: dict | None = None, cwd: Path | None = None) -> bool:
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        try:
            return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=env, cwd=cwd or SRC).returncode == 0
        except subprocess.TimeoutExpired:
            f.write(f"TIMEOUT after {timeout} s\n")
            return False


def version_key(v: str) -> tuple:
    return tuple(int(x) if x.isdigit() else -1 for x in re.findall(r"\d+|[a-z]+", v.lower()))


class Venv:
    def __init__(self, root: Path):
        self.root = root
        self.python = str(root / "bin" / "python")
        self.logs = root / "logs"
        self.results_path = root / "results.json"

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS", "VIRTUAL_ENV")}
        env["PATH"] = f"{self.root / 'bin'}:{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(self.root)
        # also in pip's isolated build environments (sdists: deepspeed): the CPU torch on disk
        env["PIP_CONSTRAINT"] = str(SRC / "constraints-cpu.txt")
        return env

    def pip(self, args: list[str], log: Path, timeout: float = 3600) -> bool:
        return sh([self.python, "-m", "pip", "--disable-pip-version-check", *args], log, timeout=timeout, env=self.env())

    def create(self) -> None:
        global SRC
        self.logs.mkdir(parents=True, exist_ok=True)
        if not Path(self.python).exists():
            subprocess.run([sys.executable, "-m", "venv", str(self.root)], check=True)
        SRC = self.root / "src"
        if not SRC.exists():
            SRC.mkdir()
            archive = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD"], check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(SRC)], input=archive, check=True)
        log = self.logs / "setup.log"
        # imgaug without its dependencies: one test reads the photograph its package ships (README)
        if not (self.pip(["install", "-c", str(SRC / "constraints-cpu.txt"), "-e", f"{SRC}[dev]"], log)
                and self.pip(["install", "--no-deps", "imgaug"], log)):
            raise SystemExit(f"installing raytrain into {self.root} failed: see {log}")

    def installed(self, pkg: str) -> str:
        out = subprocess.run([self.python, "-c", f"import importlib.metadata as m; print(m.version({pkg!r}))"],
                             capture_output=True, text=True, env=self.env())
        return out.stdout.strip()

    def available(self, pkg: str) -> list[str]:
        out = subprocess.run([self.python, "-m", "pip", "index", "versions", pkg], capture_output=True, text=True, env=self.env())
        m = re.search(r"Available versions:\s*(.+)", out.stdout)
        return [v.strip() for v in m.group(1).split(",")] if m else []

    def results(self) -> dict:
        return json.loads(self.results_path.read_text()) if self.results_path.exists() else {}

    def save(self, key: str, value: dict) -> None:
        res = self.results()
        res[key] = value
        self.results_path.write_text(json.dumps(res, indent=1, sort_keys=True))


def specifiers() -> dict:
    from packaging.requirements import Requirement

    deps = tomllib.loads((SRC / "pyproject.toml").read_text())["project"]["dependencies"]
    return {(r := Requirement(d)).name.lower(): r.specifier for d in deps}


def candidates(venv: Venv, pkg: str, reference: str) -> list[str]:
    """First release of each minor series pyproject allows, up to the reference (ascending)."""
    from packaging.version import Version

    spec = specifiers()[pkg]
    allowed = [v for v in venv.available(pkg) if not Version(v).is_prerelease and spec.contains(v) and Version(v) <= Version(reference)]
    first: dict[tuple[int, int], str] = {}
    for v in sorted(allowed, key=Version):
        first.setdefault(Version(v).release[:2], v)
    out = sorted(first.values(), key=Version)
    return out if reference in out else out + [reference]


# Failures of the machine, not of the versions under test: Ray's node not starting in time on an
# overloaded host. A training that fails with one of these is retried (twice, after a pause).
INFRA_FAILURES = ("The current node timed out during startup", "Failed to connect to GCS")


def train(venv: Venv, yaml: str, extra: list[str], log: Path, retries: int = 2) -> bool:
    for attempt in range(retries + 1):
        start = log.stat().st_size if log.exists() else 0
        with tempfile.TemporaryDirectory(prefix="floors-") as tmp:
            cmd = [str(venv.root / "bin" / "raytrain"), "train", "--config", yaml, f"storage.root={tmp}", *TINY, *extra]
            if sh(cmd, log, timeout=1800, env=venv.env()):
                return True
        with open(log, errors="replace") as f:
            f.seek(start)
            if not any(m in f.read() for m in INFRA_FAILURES) or attempt == retries:
                return False
        time.sleep(30)
    return False


def probe(venv: Venv, pins: dict[str, str], focus: list[str], *, unit: bool, label: str) -> dict:
    """Install `pins` (pkg -> version), then: imports, the tiny trainings of the `focus` packages,
    and (unit) the unit tests. Cached by label."""
    cached = venv.results().get(label)
    if cached and (cached["ok"] is False or cached.get("unit") or not unit):
        return cached
    log = venv.logs / f"{label}.log"
    log.unlink(missing_ok=True)
    t0 = time.time()
    res = {"pins": pins, "ok": False, "stage": "install", "unit": unit}
    args = ["install", "-c", str(SRC / "constraints-cpu.txt"), *[f"{k}=={v}" for k, v in pins.items()]]
    if venv.pip(args, log, timeout=3600):
        res["stage"] = "import"
        mods = ", ".join(["raytrain.cli", "raytrain.recipes.ddp"] + [IMPORT_NAME[p] for p in pins])
        if sh([venv.python, "-c", f"import {mods}"], log, timeout=600, env=venv.env()):
            res["stage"] = "train"
            jobs = [j for p in focus for j in PROBE_JOBS[p]]
            ok = True
            for i, (yaml, extra) in enumerate(dict.fromkeys((y, tuple(e)) for y, e in jobs)):
                if not train(venv, yaml, extra, log):
                    ok, res["failed_job"] = False, " ".join([yaml, *extra])
                    break
            if ok and unit:
                res["stage"] = "unit"
                ok = sh([venv.python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/unit"], log, timeout=7200, env=venv.env())
            if ok:
                res["ok"], res["stage"] = True, "passed"
    res["seconds"] = round(time.time() - t0)
    venv.save(label, res)
    print(f"  {label}: {'PASS' if res['ok'] else 'fail at ' + res['stage']} ({res['seconds']} s)", flush=True)
    return res


def bisect(venv: Venv, pkg: str, reference: dict[str, str], *, unit: bool) -> str:
    """Lowest passing first-of-minor version of `pkg`, the others at the reference."""
    cands = candidates(venv, pkg, reference[pkg])
    print(f"{pkg}: {len(cands)} candidates {cands[0]} .. {cands[-1]}", flush=True)
    pins = lambda v: {**reference, pkg: v}  # noqa: E731
    if probe(venv, pins(cands[0]), [pkg], unit=unit, label=f"{pkg}-{cands[0]}")["ok"]:
        return cands[0]
    lo, hi = 0, len(cands) - 1  # cands[lo] fails, cands[hi] passes (the reference)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if probe(venv, pins(cands[mid]), [pkg], unit=unit, label=f"{pkg}-{cands[mid]}")["ok"]:
            hi = mid
        else:
            lo = mid
    return cands[hi]


def apply_floors(floors: dict[str, str]) -> None:
    from packaging.version import Version

    path = REPO / "pyproject.toml"
    text = path.read_text()
    for pkg, v in floors.items():
        major, minor = Version(v).release[:2]
        floor = f"{major}.{minor}" if Version(v).release[2:] in ((), (0,)) else v
        pat = re.compile(rf'"({re.escape(pkg)}(\[[^\]]*\])?)\s*(>=[^",;]*)?"')
        text, n = pat.subn(lambda m: f'"{m.group(1)}>={floor}"', text, count=1)
        if n != 1:
            raise SystemExit(f"{pkg} not found in {path}'s dependencies")
    path.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--venv", default="/work/venvs/floors")
    ap.add_argument("--packages", nargs="*", default=list(CHECKED))
    ap.add_argument("--apply", action="store_true", help="write the floors found to pyproject.toml")
    ap.add_argument("--skip-unit-while-bisecting", action="store_true")
    ap.add_argument("--unit-only-together", action="store_true",
                    help="with --skip-unit-while-bisecting: no unit run at each package's floor, one for the floors together "
                         "(a failure there names no package: rerun without this flag to find it)")
    args = ap.parse_args()
    venv = Venv(Path(args.venv))
    print(f"venv {venv.root}: installing raytrain from {REPO}'s HEAD", flush=True)
    venv.create()
    reference = {p: venv.installed(p) for p in CHECKED}
    print(f"reference (newest allowed): {reference}", flush=True)
    unit_in_bisect = not args.skip_unit_while_bisecting
    if not probe(venv, reference, list(CHECKED), unit=unit_in_bisect, label="reference")["ok"]:
        raise SystemExit(f"the reference set fails: see {venv.logs / 'reference.log'}")

    lowest = {p: candidates(venv, p, reference[p])[0] for p in args.packages}
    print(f"lowest allowed by pyproject.toml: {lowest}", flush=True)
    probe(venv, {**reference, **lowest}, list(args.packages), unit=unit_in_bisect, label="lowest-allowed")

    floors = {}
    for pkg in args.packages:
        floor = bisect(venv, pkg, reference, unit=unit_in_bisect)
        cands = candidates(venv, pkg, reference[pkg])
        while not args.unit_only_together and not probe(venv, {**reference, pkg: floor}, [pkg], unit=True, label=f"{pkg}-{floor}")["ok"]:
            floor = cands[cands.index(floor) + 1]  # its unit tests failed: the next minor series
        floors[pkg] = floor
        print(f"{pkg} floor: {floor}", flush=True)

    final = probe(venv, {**reference, **floors}, list(args.packages), unit=True, label="floors-together")
    summary = {"reference": reference, "floors": floors, "together_ok": final["ok"], "results": venv.results()}
    (venv.root / "floors.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    print(json.dumps({"floors": floors, "together_ok": final["ok"]}, indent=1))
    if args.apply and final["ok"]:
        apply_floors(floors)
        print(f"wrote the floors to {REPO / 'pyproject.toml'}")
    # leave the venv at the reference, ready for the next run
    venv.pip(["install", "-c", str(SRC / "constraints-cpu.txt"), *[f"{k}=={v}" for k, v in reference.items()]], venv.logs / "restore.log")
    return 0 if final["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
