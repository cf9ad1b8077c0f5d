"""Typed recipes: flat dataclasses loaded from YAML, with `section.key=value` overrides from the command line.

Unknown keys, wrong types and choices outside a `typing.Literal` are rejected with the YAML path named
(`train.lr: expected a number, got 'fast'`, `train.precision: expected one of 'fp32' | 'bf16' | 'fp16', got 'fp8'`).
A recipe class is a dataclass whose fields are scalars, Literal choices, lists, Optional[...] or nested dataclasses.

A field's default is its only default. A section nested in another starts from the parent field's default
(`train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-3))`), so a YAML `train:` section that sets
two keys keeps the stage's other defaults. CLI options become overrides only when given (`flags=`), applied
after the YAML file and before `key=value` overrides.

Rules a type cannot state (ranges, keys that depend on each other) go in a `check(self, at)` method on the section:
`at` is where the section sits in the recipe (`train`, `mask`, `recovery`), so the same TrainConfig names
`mask.steps` in a prune recipe and `train.steps` in a pretrain one. `check_recipe` runs every field's type check
and every section's `check`, children first; the loader runs it, and so does a core function handed an instance
built in Python.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import os
import re
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar, get_args, get_origin, get_type_hints

import yaml

from cpmctl import CpmctlError
from cpmctl.resources import builtin_recipes, find_recipe

T = TypeVar("T")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _type_name(tp) -> str:
    """A type in an error message: an integer, a number, list of a string, 'a' | 'b'."""
    return type_label(tp, prose=True)


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
        if isinstance(value, (str, int, float, os.PathLike)) and not isinstance(value, bool):
            return str(value)
        raise CpmctlError(f"{path}: expected a string, got {value!r}")
    if tp is Any:
        return value
    raise CpmctlError(f"{path}: unsupported field type {tp}")


def join(at: str, name: str) -> str:
    """The key path of `name` in the section at `at` ('' is the recipe's top level)."""
    return f"{at}.{name}" if at else name


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _is_section(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def from_dict(cls: type[T], data: Any, path: str = "", base: T | None = None) -> T:
    """An instance of `cls` from a mapping: `base` (or the field defaults) updated by the keys of `data`. A nested
    section starts from its field's default in the parent, so the parent's defaults for it survive."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CpmctlError(f"{path or 'recipe'}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise CpmctlError(f"unknown recipe key '{join(path, unknown[0])}' (known: {', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        tp, key = hints[name], join(path, name)
        if _is_section(tp):
            start = getattr(base, name) if base is not None else _field_default(fields[name])
            kwargs[name] = from_dict(tp, value, key, start if isinstance(start, tp) else None)
        else:
            kwargs[name] = _coerce(value, tp, key)
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def check_recipe(recipe, at: str = "") -> None:
    """Check a recipe instance, loaded or built in Python: every field against its type (a choice against its
    Literal), then each section's `check(at)` hook with the section's key path, children before parents."""
    hints = get_type_hints(type(recipe))
    for f in dataclasses.fields(recipe):
        value, tp, key = getattr(recipe, f.name), hints[f.name], join(at, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_recipe(value, key)
        elif _is_section(tp):
            raise CpmctlError(f"{key}: expected a {tp.__name__} section, got {value!r}")
        else:
            _coerce(value, tp, key)
    hook = getattr(recipe, "check", None)
    if callable(hook):
        hook(at)


# ----- helpers for `check(at)` hooks: one message shape, `key: must ..., got value` ----------------------------
def fail(at: str, name: str, message: str) -> NoReturn:
    raise CpmctlError(f"{join(at, name)}: {message}")


def positive(section, at: str, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and value <= 0:
            fail(at, name, f"must be positive, got {value}")


def non_negative(section, at: str, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and value < 0:
            fail(at, name, f"must not be negative, got {value}")


def at_least(section, at: str, names: str | tuple[str, ...], minimum, why: str = "") -> None:
    """Each named field (one name or a tuple of them) is null or >= minimum."""
    for name in (names,) if isinstance(names, str) else names:
        value = getattr(section, name)
        if value is not None and value < minimum:
            fail(at, name, f"must be >= {minimum}{f' ({why})' if why else ''}, got {value}")


def within(section, at: str, name: str, low: float, high: float, *, open_low: bool = False,
           open_high: bool = False) -> None:
    value = getattr(section, name)
    if value is None:
        return
    above = value > low if open_low else value >= low
    below = value < high if open_high else value <= high
    if not (above and below):
        span = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        fail(at, name, f"must be within {span}, got {value}")


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
        _set(data, keys, value, text)
    return data


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CpmctlError(f"recipe not found: {path}") from None
    except IsADirectoryError:
        raise CpmctlError(f"--recipe {path}: is a directory; name a recipe .yaml file") from None
    except UnicodeDecodeError as e:
        raise CpmctlError(f"{path}: not UTF-8 text (byte {e.start}); save the recipe as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise CpmctlError(f"{path}:{where} not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CpmctlError(f"{path}: a recipe must be a YAML mapping")
    return data


def load_recipe_file(path: str | Path) -> dict:
    """`--recipe`: a YAML file, or the name of a built-in recipe (`pretrain/mini`; `cpmctl recipes list`)."""
    found = find_recipe(path)
    if not found.exists():
        names = ", ".join(builtin_recipes()) or "none"
        raise CpmctlError(f"recipe not found: {path} (not a file, nor a built-in recipe: {names})")
    return load_yaml(found)


def load_recipe(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                flags: dict[str, Any] | None = None) -> T:
    """Defaults of `cls`, updated by the YAML file (or built-in recipe), then `flags` (dotted key -> value as CLI options give them,
    None = not given), then the `key=value` overrides; then checked (`check_recipe`)."""
    data: dict = {}
    if path is not None:
        _deep_update(data, load_recipe_file(path))
    for key, value in (flags or {}).items():
        if value is not None:
            _set(data, key.split("."), value, key)
    apply_overrides(data, overrides or [])
    try:
        recipe = from_dict(cls, data)
        check_recipe(recipe)
    except CpmctlError as e:
        # Name where the bad value came from: the override that set the key, else the recipe file.
        key = str(e).split(":", 1)[0].split("[", 1)[0]
        given = [text for text in overrides or [] if text.partition("=")[0].strip() == key]
        if given:
            raise CpmctlError(f"{e} (set by the override '{given[-1]}')") from None
        if path is not None and key not in {k for k, v in (flags or {}).items() if v is not None}:
            raise CpmctlError(f"{path}: {e}") from None
        raise
    return recipe


def _set(data: dict, keys: list[str], value, text: str) -> None:
    node = data
    for k in keys[:-1]:
        if node.get(k) is None:
            node[k] = {}
        if not isinstance(node[k], dict):
            raise CpmctlError(f"override '{text}': '{k}' is not a section")
        node = node[k]
    node[keys[-1]] = value


def default_of(cls, key: str):
    """The default of a dotted key of a recipe class (`default_of(EvalRecipe, 'eval.split')` -> 'test'), for help
    texts that show it without restating it."""
    value = cls()
    for name in key.split("."):
        value = getattr(value, name)
    return value


def _deep_update(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v
    return dst


def dump_recipe(recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False, allow_unicode=True)


# ----- documentation: `cpmctl recipes show` ---------------------------------------------------------------------
# A recipe key's meaning is the comment on its field's line in the dataclass (or the comment lines just above it):
# the code's comments are the one place it is written, and these functions read them back.
def field_docs(cls) -> dict[str, str]:
    """Field name -> its comment, read from the dataclass's source. A dataclass built in code (no source) borrows
    the comments of a dataclass with the same fields (DecodeOverrides from GenerationConfig)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        twin = _twin(cls)
        return field_docs(twin) if twin is not None else {}
    lines = source.splitlines()
    trailing, alone = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row = tok.start[0]
            text = tok.string.lstrip("#").strip()
            (alone if not lines[row - 1][: tok.start[1]].strip() else trailing)[row] = text
    docs, hints = {}, get_type_hints(cls)
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, row = [], node.lineno - 1
        while row in alone:
            above.insert(0, alone[row])
            row -= 1
        doc = (trailing.get(node.lineno) or " ".join(above)).rstrip(".")
        choices = _alias_doc(cls, node.annotation)  # `precision: Precision`: what the alias's comment says
        if set(re.split(r"[\s|]+", choices.strip())) <= {str(a) for a in get_args(hints.get(node.target.id))}:
            choices = ""  # it only lists the choices, which the type shows
        docs[node.target.id] = f"{doc}; {choices}" if doc and choices else doc or choices
    return docs


def _alias_doc(cls, annotation: ast.expr) -> str:
    """The trailing comment of a module-level type alias (`Precision = Literal[...]  # fp32 | bf16 ...`)."""
    if not isinstance(annotation, ast.Name):
        return ""
    try:
        lines = inspect.getsource(sys.modules[cls.__module__]).splitlines()
    except (OSError, TypeError, KeyError):
        return ""
    for line in lines:
        if line.startswith(f"{annotation.id} = ") and "  # " in line:
            return line.split("  # ", 1)[1].strip()
    return ""


def _twin(cls):
    """A dataclass with `cls`'s fields defined in source: in cls's module, else in any loaded cpmctl module
    (make_dataclass names no module of ours)."""
    names = [f.name for f in dataclasses.fields(cls)]
    home = [sys.modules[cls.__module__]] if cls.__module__ in sys.modules else []
    for module in home + [m for n, m in list(sys.modules.items()) if n.startswith("cpmctl.") and m is not None]:
        for other in vars(module).values():
            if other is not cls and _is_section(other) and [f.name for f in dataclasses.fields(other)] == names:
                return other
    return None


_PROSE = {int: "an integer", float: "a number", str: "a string", bool: "true/false"}


def type_label(tp, prose: bool = False) -> str:
    """A recipe key's type as `recipes show` prints it (int, float, str, bool, 'a' | 'b', list[str], str | null),
    or with `prose` as an error message says it (an integer, list of a string)."""
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_label(a, prose) for a in get_args(tp))
    if prose and origin is list:
        return f"list of {type_label(get_args(tp)[0], prose)}"
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_label(a, prose) for a in get_args(tp))}]"
    if tp is type(None):
        return "null"
    return (_PROSE.get(tp) if prose else None) or getattr(tp, "__name__", str(tp))


def _flow(value) -> str:
    """One value as YAML on one line (lists and mappings in flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**9)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def _section_doc(cls) -> str:
    doc = cls.__doc__ or ""
    return "" if doc.startswith(f"{cls.__name__}(") else doc.strip().split("\n")[0]  # not the generated signature


def describe_recipe(recipe, defaults=None, indent: str = "") -> list[str]:
    """The recipe as YAML lines, each key with a comment: its type, its default (the dataclass field's, a nested
    section's as its parent sets it) and what it means. The output loads back as the same recipe."""
    cls = type(recipe)
    hints, docs = get_type_hints(cls), field_docs(cls)
    defaults = cls() if defaults is None else defaults
    lines = []
    for f in dataclasses.fields(recipe):
        value, default, doc = getattr(recipe, f.name), getattr(defaults, f.name), docs.get(f.name, "")
        if _is_section(hints[f.name]):
            about = doc or _section_doc(hints[f.name])
            lines.append(f"{indent}{f.name}:" + (f"  # {about}" if about else ""))
            lines += describe_recipe(value, default, indent + "  ")
            continue
        shown = _flow(default)
        if value == default and len(shown) > 40:
            shown = "this value"  # a long list is not printed twice
        note = f"{type_label(hints[f.name])}; default {shown}" + (f"; {doc}" if doc else "")
        lines.append(f"{indent}{f.name}: {_flow(value)}  # {note}")
    return lines
