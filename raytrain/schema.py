"""Typed dataclasses from YAML: type checking, dotted overrides, the field listing.

The machinery behind `raytrain.config` (which holds every section and every default). Nothing
here knows a field name: it walks the dataclasses it is given.

    build(TrainConfig, {"steps": 10}, "train")           -> TrainConfig(steps=10, ...)
    parse_overrides(["train.steps=10"])                  -> {"train": {"steps": 10}}
    merge({"a": {"b": 1}}, {"a": {"c": 2}})              -> {"a": {"b": 1, "c": 2}}
    load(Experiment, "job.yaml", ["train.steps=10"])     -> Experiment
    field_help(Experiment)                               -> [("train.steps", "2000", "Optimizer steps ..."), ...]
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import types
import typing
from pathlib import Path
from typing import Any

import yaml

def coerce(tp: Any, value: Any, where: str) -> Any:
    """Check/convert a YAML value to the dataclass field type `tp` (raises ValueError naming `where`)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(a, value, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        # fixed length, e.g. tuple[int, int, int] (YAML has lists only)
        inner = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(inner):
            raise ValueError(f"{where}: expected a list of {len(inner)}, got {value!r}")
        return tuple(coerce(t, v, f"{where}[{i}]") for i, (t, v) in enumerate(zip(inner, value)))
    if origin is dict:
        k_t, v_t = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return {coerce(k_t, k, where): coerce(v_t, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "2e-3" (no dot) as a string; accept what float() accepts
        try:
            return float(value)
        except ValueError:
            pass
    if tp is Any:
        return value
    if isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ValueError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def build(cls: type, values: dict, where: str = "") -> Any:
    """A `cls` instance from a mapping: unknown keys raise, every value is type-checked. A section
    may name keys that moved elsewhere in a class attribute `MOVED_KEYS` ({old key: new place}):
    an old YAML is then told where each went."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(values) - names
    if unknown:
        moved_to = getattr(cls, "MOVED_KEYS", {})
        moved = [f"{k} is now {moved_to[k]}" for k in sorted(unknown) if k in moved_to]
        raise ValueError(f"unknown config key(s) {sorted(unknown)} in {where or 'top level'}; known: {sorted(names)}"
                         + (f" ({'; '.join(moved)})" if moved else ""))
    kwargs = {k: coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in values.items()}
    return cls(**kwargs)


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """tree["a"]["b"] = value for dotted "a.b", creating sections on the way."""
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted}: {k} is not a section")
    node[keys[-1]] = value


def dotted_tree(dotted: dict[str, Any]) -> dict:
    """{"train.lr": 1e-3} -> {"train": {"lr": 1e-3}}."""
    tree: dict = {}
    for key, value in dotted.items():
        set_dotted(tree, key, value)
    return tree


def parse_overrides(overrides: list[str] | None) -> dict:
    """`["train.steps=10", "data.tasks=[point]"]` -> nested dict; values parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like a.b=value")
        key, raw = item.split("=", 1)
        set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    return tree


def merge(base: dict, extra: dict) -> dict:
    """`extra` over `base`, section by section (neither is modified)."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path | None) -> dict:
    """A YAML file's top-level mapping ({} for None or an empty file)."""
    if path is None:
        return {}
    values = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: top level must be a mapping")
    return values


def load(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """A `cls` from a YAML file (None = all defaults) with dotted overrides applied."""
    return build(cls, merge(read_yaml(path), parse_overrides(overrides)))


def _field_docs(cls: type) -> dict[str, str]:
    """The string literal under each annotated field of a dataclass (its help text)."""
    docs: dict[str, str] = {}
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return docs
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[union-attr]
    return docs


def field_listing(cls: type) -> str:
    """The CLI's --help-fields text: `name = default` lines, each followed by its indented help."""
    return "\n".join(f"{name} = {default}\n    {help_}" if help_ else f"{name} = {default}" for name, default, help_ in field_help(cls))


def field_help(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, help) for every leaf field, nested sections flattened."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's fields are documented where they are declared
        if dataclasses.is_dataclass(klass):
            docs.update(_field_docs(klass))
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(field_help(hints[f.name], name + "."))
        else:
            if f.default is not dataclasses.MISSING:
                default = repr(f.default)
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = repr(f.default_factory())  # type: ignore[misc]
            else:
                default = "(required)"
            rows.append((name, default, docs.get(f.name, "")))
    return rows
