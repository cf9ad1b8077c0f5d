"""configs/ and recipes/ stay at the top of the repository, where users read and copy them; the wheel ships them
inside the package as cpmctl/configs and cpmctl/recipes (found through importlib.resources: cpmctl/resources.py).
A package-dir mapping needs the package list in code: every directory of cpmctl (cpmctl/cli and the data
directories have no __init__.py), plus configs/ and recipes/ with theirs."""

from setuptools import find_namespace_packages, setup

SHIPPED = {"cpmctl.configs": "configs", "cpmctl.recipes": "recipes"}

packages = find_namespace_packages(include=["cpmctl", "cpmctl.*"], exclude=["*__pycache__*"])
for name, where in SHIPPED.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_namespace_packages(where=where)]

setup(packages=packages, package_dir=SHIPPED)
