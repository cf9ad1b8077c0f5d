"""The files that ship with cpmctl: the model configs (configs/), the built-in recipes (recipes/) and the bundled
data (cpmctl/assets/), found through importlib.resources.

configs/ and recipes/ are top-level directories of the repository; the wheel installs them inside the package as
cpmctl/configs and cpmctl/recipes (setup.py maps them). An editable install imports the package from the checkout,
so there they are found beside the package instead. Either way a caller gets a real directory.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from cpmctl import CpmctlError
from cpmctl.assets import ASSETS_DIR

# The package directory: a regular package on the file system (a zipped install is not supported).
PACKAGE_DIR = Path(str(files("cpmctl")))
RECIPE_SUFFIX = ".yaml"


def _shipped(name: str) -> Path:
    """configs or recipes: inside the installed package, else beside it in the repository checkout."""
    inside, beside = PACKAGE_DIR / name, PACKAGE_DIR.parent / name
    return inside if inside.is_dir() or not beside.is_dir() else beside


def configs_dir() -> Path:
    return _shipped("configs")


def recipes_dir() -> Path:
    return _shipped("recipes")


def assets_dir() -> Path:
    return ASSETS_DIR  # a package of its own: package data inside cpmctl in either install


def import_root() -> Path:
    """The directory the cpmctl package is imported from, so a child `python -m cpmctl` runs the same code."""
    return PACKAGE_DIR.parent


def builtin_recipes() -> dict[str, Path]:
    """Built-in recipe name (`pretrain/mini`) -> its YAML file, sorted by name."""
    root = recipes_dir()
    found = {p.relative_to(root).with_suffix("").as_posix(): p for p in root.rglob(f"*{RECIPE_SUFFIX}")}
    return dict(sorted(found.items()))


def builtin_recipe(name: str) -> Path | None:
    """The YAML file of a built-in recipe named `pretrain/mini`, `pretrain/mini.yaml` or
    `recipes/pretrain/mini.yaml` (the path in the repository); None when there is none."""
    key = name.strip().removeprefix("./").removeprefix("recipes/").removesuffix(RECIPE_SUFFIX)
    return builtin_recipes().get(key)


def require_builtin_recipe(name: str) -> Path:
    path = builtin_recipe(name)
    if path is None:
        known = ", ".join(builtin_recipes()) or "none: recipes/ is missing from this install"
        raise CpmctlError(f"no built-in recipe '{name}' (built-in: {known})")
    return path


def find_recipe(path: str | Path) -> Path:
    """`--recipe` as given: a file that exists, else a built-in recipe's name; else the path unchanged (the
    loader then reports it as not found)."""
    given = Path(path)
    if given.exists():
        return given
    return builtin_recipe(str(path)) or given


def bundled(path: str) -> str:
    """A relative path in a lifecycle recipe that names shipped files (`recipes/tune/mini.yaml`,
    `cpmctl/assets/corpus/batch1.jsonl`, `configs/mini-10b.json`) and does not exist from the working directory:
    the shipped file's path. Anything else is returned unchanged."""
    p = Path(path)
    if not path or p.is_absolute() or p.exists():
        return path
    parts = p.parts
    if parts[:2] == ("cpmctl", "assets"):
        candidate = assets_dir().joinpath(*parts[2:])
    elif parts[0] in ("configs", "recipes"):
        candidate = _shipped(parts[0]).joinpath(*parts[1:])
    else:
        return path
    return str(candidate) if candidate.exists() else path
