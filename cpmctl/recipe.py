"""Typed recipes: flat dataclasses loaded from YAML, with `section.key=value` overrides from the command line.

Unknown keys and wrong types are rejected with the YAML path named (`train.lr: expected a number, got 'fast'`).
A recipe class is a dataclass whose fields are scalars, lists of scalars, Optional[...] or nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from cpmctl import CpmctlError

T = TypeVar("T")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _type_name(tp) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp, path: str):
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except CpmctlError:
                continue
        raise CpmctlError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise CpmctlError(f"{path}: expected one of {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise CpmctlError(f"{path}: expected a list, got {value!r}")
        (item,) = get_args(tp)
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise CpmctlError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise CpmctlError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise CpmctlError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads `lr: 1e-3` as a string
        raise CpmctlError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise CpmctlError(f"{path}: expected a string, got {value!r}")
    if tp is Any:
        return value
    raise CpmctlError(f"{path}: unsupported field type {tp}")


def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CpmctlError(f"{path or 'recipe'}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f"{path}." if path else ""
        raise CpmctlError(f"unknown recipe key '{where}{unknown[0]}' (known: {', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{path}.{name}" if path else name)
    return cls(**kwargs)


def to_dict(recipe) -> dict:
    return dataclasses.asdict(recipe)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise CpmctlError(f"override '{text}' is not key=value (for example train.lr=1e-3)")
    key, raw = text.split("=", 1)
    if not key:
        raise CpmctlError(f"override '{text}' has an empty key")
    # YAML parsing gives 1e-3 -> float, true -> bool, [a, b] -> list; plain words stay strings.
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-3 as a string; a recipe user means the number
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides or []:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            if node.get(k) is None:
                node[k] = {}
            if not isinstance(node[k], dict):
                raise CpmctlError(f"override '{text}': '{k}' is not a section")
            node = node[k]
        node[keys[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CpmctlError(f"recipe not found: {path}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise CpmctlError(f"{path}:{where} not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CpmctlError(f"{path}: a recipe must be a YAML mapping")
    return data


def load_recipe(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None) -> T:
    """Defaults of `cls`, updated by `base`, then the YAML file, then the overrides."""
    data: dict = {}
    if base:
        _deep_update(data, base)
    if path is not None:
        _deep_update(data, load_yaml(path))
    apply_overrides(data, overrides or [])
    try:
        return from_dict(cls, data)
    except CpmctlError as e:
        if path is not None:
            raise CpmctlError(f"{path}: {e}") from None
        raise


def _deep_update(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v
    return dst


def dump_recipe(recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False, allow_unicode=True)
