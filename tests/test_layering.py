"""The floors of the package (docs/architecture.md): every import points down, rooms on one floor do not import
each other, and no two modules import each other, directly or around a loop. Imports inside functions count too:
a lazy import is still an arrow."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "cpmctl"

# Lowest first. A module may import from its own room or from a lower floor; rooms that share a floor are
# independent of each other.
FLOORS: list[set[str]] = [
    {""},  # cpmctl/__init__.py: CpmctlError, the version
    {"resources"},  # cpmctl/resources.py: where the shipped configs/, recipes/, assets/ are
    {"io", "recipe", "device", "progress"},  # small shared modules: atomic writes, recipes, device policy, progress
    {"outputs"},  # the output policy and locks, over io's atomic writes
    {"model"},
    {"data"},
    {"tasks"},
    {"train"},
    {"generate"},
    {"evaluate"},
    {"prune", "tune", "serve"},  # serve: the HTTP server and chat, over generate
    {"lifecycle"},
    {"cli"},
    {"__main__"},
]
FLOOR = {room: i for i, rooms in enumerate(FLOORS) for room in rooms}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The cpmctl modules `name` imports (a `from pkg import mod` counts as importing pkg.mod)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "cpmctl")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "cpmctl":
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & known
            found.update(subs or {target})
    found.discard(name)
    return {m for m in found if m in known}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in FLOOR else ""


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def test_every_room_has_a_floor():
    rooms = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    rooms |= {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    missing = sorted(r for r in rooms if r not in FLOOR and r != "assets")
    assert not missing, f"give these a floor in FLOORS and docs/architecture.md: {missing}"


def test_imports_point_down():
    wrong = []
    for module, deps in graph().items():
        if module.startswith("cpmctl.assets"):
            continue
        for dep in deps:
            a, b = room(module), room(dep)
            if a == b:
                continue
            if FLOOR[b] > FLOOR[a]:
                wrong.append(f"{module} -> {dep} (up: {a or 'cpmctl'} is below {b})")
            elif FLOOR[b] == FLOOR[a]:
                wrong.append(f"{module} -> {dep} ({a} and {b} share a floor and must not depend on each other)")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles():
    g = graph()
    # Package __init__ files that re-export their modules are facades, not participants.
    for name in list(g):
        if (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists():
            g[name] = set()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(g[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The checks above can fail: an upward import written to a file is reported by imports_of and room()."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from cpmctl.cli.common import err\n")
    deps = imports_of("cpmctl.model.probe", probe, set(modules()))
    assert deps == {"cpmctl.cli.common"}
    assert FLOOR[room("cpmctl.cli.common")] > FLOOR[room("cpmctl.model.probe")]


def test_modules_stay_small_or_say_why():
    long = []
    for path in PACKAGE.rglob("*.py"):
        if path.parts[-2] == "assets":
            continue
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > 450 and "Longer than 450 lines because" not in text[:3000]:
            long.append(f"{path.relative_to(PACKAGE.parent)}: {text.count(chr(10))} lines")
    assert not long, "split these or state the reason at the top ('Longer than 450 lines because ...'):\n" + "\n".join(long)
