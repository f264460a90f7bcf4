"""Model families behind one interface (`raytrain.models.interface.ModelFamily`).

A family SPEC names a family and, where it can write answers several ways, the answer format:
"paligemma" (its <loc> tokens), "qwen2_5_vl" (absolute pixels, its default), "qwen2_5_vl+tokens",
"qwen2_5_vl+normalized", "qwen2_5_vl+pairs", "paligemma+molmo", "qwen3_vl" (0-1000 relative). `family(spec)` returns ONE immutable family object for
it; the spec is what checkpoints record (state.json "family") and what eval / Serve take, so a
checkpoint is always read in the format it was trained in. `family_spec(name, answer_format)` builds
a spec from the config's model.family / model.box_format.

Adding a family: a module here declaring `MODEL_FAMILY = (name, class name)` with a frozen dataclass
implementing every ModelFamily member (found by `_discover`, nothing to register), its format codec
under formats/, a tiny preset builder, tests and a job YAML; no other module changes (Qwen3-VL was
added that way: models/qwen3_vl.py, qwen3_processor.py, tiny_qwen3.py, presets_qwen3_vl.py).
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from functools import cache
from pathlib import Path

def _discover() -> dict[str, tuple[str, str]]:
    """Family name -> (module, class) of every module of this package that declares
    `MODEL_FAMILY = ("<name>", "<class>")`, read from the source (no import: family modules load
    only when a family is asked for), so a new family is a new module and nothing else."""
    out: dict[str, tuple[str, str]] = {}
    for info in pkgutil.iter_modules(__path__):
        path = Path(__path__[0]) / f"{info.name}.py"
        if info.ispkg or not path.is_file() or "MODEL_FAMILY" not in (src := path.read_text()):
            continue
        body = ast.parse(src).body
        consts = {t.id: n.value.value for n in body if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)
                  for t in n.targets if isinstance(t, ast.Name)}
        for node in body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "MODEL_FAMILY" for t in node.targets):
                name, cls = (e.value if isinstance(e, ast.Constant) else consts.get(getattr(e, "id", "")) for e in node.value.elts)
                if not (isinstance(name, str) and isinstance(cls, str)):
                    raise ValueError(f"{path}: MODEL_FAMILY must be (name, class name) as string constants")
                out[name] = (f"{__name__}.{info.name}", cls)
    return dict(sorted(out.items()))


FAMILIES: dict[str, tuple[str, str]] = _discover()
"""Family name -> (module, class) of its ModelFamily implementation."""


def _family_class(name: str) -> type:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    module, cls = FAMILIES[name]
    return getattr(importlib.import_module(module), cls)


def answer_formats(name: str) -> tuple[str, ...]:
    """The answer formats family `name` can write; the first is its default."""
    return tuple(_family_class(name).ANSWER_FORMATS)


def parse_family_spec(spec: str) -> tuple[str, str]:
    """'qwen2_5_vl+tokens' -> ('qwen2_5_vl', 'tokens'); 'paligemma' -> ('paligemma', 'loc').
    ValueError for an unknown family or a format the family cannot write."""
    name, _, fmt = spec.partition("+")
    formats = answer_formats(name)
    fmt = fmt or formats[0]
    if fmt not in formats:
        raise ValueError(f"model family {name!r} writes answers as {list(formats)}, not {fmt!r} (spec {spec!r})")
    return name, fmt


def family_spec(name: str, answer_format: str = "") -> str:
    """('qwen2_5_vl', 'tokens') -> 'qwen2_5_vl+tokens'; the family's default format ('' too) adds nothing."""
    formats = answer_formats(name)
    fmt = answer_format or formats[0]
    if fmt not in formats:
        raise ValueError(f"model family {name!r} writes answers as {list(formats)}, not {fmt!r}")
    return name if fmt == formats[0] else f"{name}+{fmt}"


def family(spec):
    """The immutable family object for `spec` (one per spec per process); a family object (e.g.
    one bound to a job's prompts by `with_text`) is returned as it is, so components can take
    either."""
    if not isinstance(spec, str):
        return spec
    return _family_of_spec(spec)


@cache
def _family_of_spec(spec: str):
    name, fmt = parse_family_spec(spec)
    return _family_class(name)(answer_format=fmt)


def ensure_preset(name: str, cache_dir: str | Path | None = None, seed: int = 0, image_size: int | None = None) -> Path:
    """Path of the offline tiny preset 'tiny:<family>' (or '<family>'), built once (models/tiny.py);
    image_size: another input side (the family's builder says which it accepts)."""
    from raytrain.models import tiny

    fam_name = name.split(":", 1)[-1]
    fam = family(fam_name)
    if image_size == fam.TINY_IMAGE_SIZE:
        image_size = None  # the default size is the default preset
    return tiny.ensure_preset(fam_name, fam.build_tiny_preset, cache_dir, seed=seed, image_size=image_size)
