"""runners/ is layered by role (README "Layout"): record/ (what a run writes) at the bottom, engine/ (the
run's machinery) above it, sweeps/ above that, and the run (train.py) and the command-line tools at the
top. Imports point only downward, and no module name repeats one in tasks/."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNNERS = ROOT / "runners"
LAYERS = {"record": 0, "engine": 1, "sweeps": 2}  # the top-level modules of runners/ are layer 3
TOP = 3
LAYERS_MODULES = {f"runners.{name}" for name in LAYERS}  # `from runners.engine import distributed`


def _layer(module: str) -> int:
    """The layer of `runners.<...>` (a top-level runners module is the top)."""
    parts = module.split(".")
    return LAYERS.get(parts[1], TOP) if len(parts) > 1 else TOP


def _module_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _type_checking_only(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(path: Path) -> list[str]:
    """Every runners module `path` imports at run time, at module level or inside a function."""
    tree = ast.parse(path.read_text())
    hidden = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _type_checking_only(node)
              for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if id(node) in hidden:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("runners"):
            found += [f"{node.module}.{a.name}" if node.module == "runners" or node.module in LAYERS_MODULES
                      else node.module for a in node.names]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("runners")]
    return found


def test_imports_point_only_downward():
    upward = []
    for path in sorted(RUNNERS.rglob("*.py")):
        own = _module_of(path)
        for target in _imports(path):
            if _layer(target) > _layer(own) or (_layer(own) == TOP and _layer(target) == TOP
                                                and target != own):
                upward.append(f"{own} imports {target}")
    assert upward == []


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The check above can fail: a record module importing the engine is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from runners.engine import env\n")
    assert _imports(bad) == ["runners.engine.env"]
    assert _layer("runners.engine.env") > _layer("runners.record.builder")


def test_no_module_name_in_runners_repeats_one_in_tasks():
    runners = {p.stem for p in RUNNERS.rglob("*.py")} - {"__init__"}
    tasks = {p.stem for p in (ROOT / "tasks").rglob("*.py")} - {"__init__"}
    assert runners & tasks == set()


def test_package_inits_import_nothing():
    """`import runners.record.schema` must not load torch: no package __init__ imports anything."""
    inits = [p for p in RUNNERS.rglob("__init__.py")
             if any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(ast.parse(p.read_text())))]
    assert inits == []
