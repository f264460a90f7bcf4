"""The package's shape, checked by parsing its source (nothing is imported):

* no import cycles inside raytrain/ (module-level and function-level imports alike);
* no module imports or reads another package's private (underscore) names;
* nothing outside raytrain/models/ and raytrain/formats/ knows which family it is talking to:
  no comparison with a family name, no table keyed by family names;
* no module over 600 lines;
* every family implements every member of the interface (models/interface.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "raytrain"
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def _package(module: str) -> str:
    """'raytrain.launch.train' -> 'raytrain.launch'; top-level modules are their own package."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    is_pkg = MODULES[module].name == "__init__.py"
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported raytrain module, imported name or None, line) for every import in `module`."""
    out = []
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.startswith("raytrain")]
        elif isinstance(node, ast.ImportFrom):
            src = _resolve(module, node)
            if not src.startswith("raytrain"):
                continue
            for a in node.names:
                sub = f"{src}.{a.name}"
                out.append((sub, None, node.lineno) if sub in MODULES else (src, a.name, node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    g: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for target, _, _ in _imports(m):
            if target in MODULES and target != m:
                g[m].add(target)
    return g


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_names_of_another_package():
    bad = []
    for m in MODULES:
        aliases: dict[str, str] = {}  # local name -> raytrain module it is bound to
        for node in ast.walk(TREES[m]):
            if isinstance(node, ast.ImportFrom):
                src = _resolve(m, node)
                for a in node.names:
                    sub = f"{src}.{a.name}"
                    if sub in MODULES:
                        aliases[a.asname or a.name] = sub
                    elif src.startswith("raytrain") and a.name.startswith("_") and _package(src) != _package(m):
                        bad.append(f"{m}:{node.lineno} imports {src}.{a.name}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in MODULES and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(TREES[m]):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and _package(aliases[node.value.id]) != _package(m)):
                bad.append(f"{m}:{node.lineno} reads {aliases[node.value.id]}.{node.attr}")
    assert bad == []


def _family_names() -> set[str]:
    from raytrain.models import FAMILIES  # discovered from the family modules' MODEL_FAMILY markers

    return set(FAMILIES)


def _is_family_literal(node: ast.AST, names: set[str]) -> bool:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value in names or node.value.split("+")[0] in names and "+" in node.value
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_is_family_literal(e, names) for e in node.elts)
    return False


def test_no_family_name_checks_outside_models_and_formats():
    names = _family_names()
    assert {"paligemma", "qwen2_5_vl"} <= names
    bad = []
    for m, tree in TREES.items():
        if m.startswith(("raytrain.models", "raytrain.formats")):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(_is_family_literal(x, names) for x in [node.left, *node.comparators]):
                bad.append(f"{m}:{node.lineno} compares with a family name")
            elif isinstance(node, ast.Dict) and any(k is not None and _is_family_literal(k, names) for k in node.keys):
                bad.append(f"{m}:{node.lineno} keys a table by family name")
            elif (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in ("hasattr", "getattr")
                  and len(node.args) >= 2 and isinstance(node.args[0], ast.Name) and node.args[0].id in ("fam", "family_module", "family")):
                bad.append(f"{m}:{node.lineno} probes the family object with {node.func.id if hasattr(node.func, 'id') else node.func.attr}")
    assert bad == []


def test_the_family_name_check_sees_comparisons():
    names = {"paligemma"}
    tree = ast.parse("if fam == 'paligemma': pass\nx = {'paligemma': 1}\ny = s in ('paligemma+loc', 'z')")
    compares = [n for n in ast.walk(tree) if isinstance(n, ast.Compare)]
    assert all(any(_is_family_literal(x, names) for x in [c.left, *c.comparators]) for c in compares) and len(compares) == 2


def test_no_module_over_600_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


@pytest.mark.parametrize("spec", ["paligemma", "qwen2_5_vl", "qwen2_5_vl+tokens", "qwen3_vl"])
def test_every_family_implements_the_whole_interface(spec):
    import inspect

    from raytrain.models import FAMILIES, family
    from raytrain.models.interface import REQUIRED_MEMBERS, ModelFamily

    assert len(FAMILIES) >= 2
    fam = family(spec)
    assert isinstance(fam, ModelFamily)
    assert [m for m in REQUIRED_MEMBERS if not hasattr(fam, m)] == []
    # same parameter names as the protocol, so every caller can use keywords
    for name, proto in vars(ModelFamily).items():
        if name.startswith("_") or not callable(proto):
            continue
        want = [p for p in inspect.signature(proto).parameters if p != "self"]
        have = list(inspect.signature(getattr(fam, name)).parameters)
        assert have[: len(want)] == want, (spec, name, have, want)
    assert fam.spec == spec and family(fam.spec) == fam
