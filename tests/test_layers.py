"""The package's layers: every import (module level or inside a function) points downward, no cycles.

The layers, lowest first, are the table below; README "Development" draws the same picture. A module may
import modules of its own layer (its own package) and of lower layers. ``ltstudy.testing`` sits on top: it
is for tests, and nothing in the package imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "ltstudy"

LAYERS: list[tuple[str, ...]] = [
    ("ltstudy", "ltstudy.errors", "ltstudy.runtime"),  # user errors; device, autocast, the default step
    ("ltstudy.metrics",),
    ("ltstudy.data",),
    ("ltstudy.models",),
    ("ltstudy.methods",),
    ("ltstudy.config",),  # TrainConfig + the method's Params -> TrialConfig (needs the method registry)
    ("ltstudy.features",),
    ("ltstudy.train",),
    ("ltstudy.study",),
    ("ltstudy.experiments",),
    ("ltstudy.cli",),
    ("ltstudy.testing",),
]
#: inner layers stay pure torch: Ray and MLflow belong to ``study`` and above
NO_RAY_OR_MLFLOW_BELOW = "ltstudy.study"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best, depth = None, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and name.count(".") > depth:
                best, depth = i, name.count(".")
    assert best is not None, f"{module} is in no layer; add it to LAYERS"
    return best


def imports(path: Path, root: Path = ROOT) -> list[tuple[str, int]]:
    """Every module an ``import`` or ``from ... import`` names, anywhere in the file, with its line."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            # ``from ltstudy.x import y`` may name a submodule y
            found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
    return found


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def internal_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for me, path in MODULES.items():
        for target, _ in imports(path):
            if target in MODULES and target != me:
                edges[me].add(target)
    return edges


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_downward(module):
    path = MODULES[module]
    mine = layer_of(module)
    for target, line in imports(path):
        if target == "ltstudy" or not target.startswith("ltstudy.") or target not in MODULES:
            continue
        assert layer_of(target) <= mine, (
            f"{path.relative_to(ROOT.parent)}:{line} imports {target} "
            f"(layer {layer_of(target)}) from layer {mine}")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_inner_layers_never_import_ray_or_mlflow(module):
    if layer_of(module) >= layer_of(NO_RAY_OR_MLFLOW_BELOW):
        return
    for target, line in imports(MODULES[module]):
        top = target.split(".")[0]
        assert top not in ("ray", "mlflow", "optuna"), f"{module}:{line} imports {target}"


def test_no_import_cycles():
    edges = internal_edges()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """The checker can fail: an upward import hidden in a function, and a relative one, are both seen."""
    probe = tmp_path / "ltstudy" / "data" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("def f():\n    from ltstudy.train import run_trial\n    from . import loader\n")
    found = [target for target, _ in imports(probe, root=tmp_path / "ltstudy")]
    assert "ltstudy.train" in found and "ltstudy.data.loader" in found
    assert layer_of("ltstudy.train") > layer_of(module_name(probe, root=tmp_path / "ltstudy"))
