"""The wheel ships configs/ and recipes/ (top-level in the repository) inside the package, where
cpmctl/resources.py finds them through importlib.resources; CI (.ci/run) also installs it and runs commands."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_configs_recipes_and_assets(tmp_path):
    pytest.importorskip("build")
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside the sources
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("cpmctl", "configs", "recipes"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"),
                           str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    [wheel] = (tmp_path / "dist").glob("cpmctl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("configs", "recipes"):
        shipped = {f"cpmctl/{folder}/{p.relative_to(REPO / folder).as_posix()}" for p in (REPO / folder).rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts}
        assert shipped and shipped <= names, sorted(shipped - names)
    assert "cpmctl/cli/app.py" in names and "cpmctl/resources.py" in names  # cli/ has no __init__.py
    assert "cpmctl/assets/tasks/lcsts-mini/test.jsonl" in names
    assert not any(n.startswith(("tests/", "configs/", "recipes/")) for n in names)


def test_resources_find_the_shipped_files():
    from cpmctl.model.config import ladder_names
    from cpmctl.resources import builtin_recipes, configs_dir, require_builtin_recipe

    assert (configs_dir() / "mini-10b.json").is_file() and "mini-10b" in ladder_names()
    assert require_builtin_recipe("pretrain/mini") == builtin_recipes()["pretrain/mini"]
    assert require_builtin_recipe("recipes/tune/mini.yaml").name == "mini.yaml"
