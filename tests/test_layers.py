"""The package's layers: every import (module level or inside a function) points downward, no cycles;
inside ``study/`` the sub-packages keep their chain; no function is longer than a screen.

The layers, lowest first, are the table below; docs/development.md draws the same picture. A module may
import modules of its own layer (its own package) and of lower layers.
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


#: inside ``ltstudy.study``: the sub-packages' chain (each imports only those before it) and the one that
#: stands beside it; ``_compat`` and ``storage`` import nothing of the study, so every module may use them
STUDY_CHAIN = ("search", "tracking", "results")
STUDY_BESIDE = ("cluster",)
STUDY_LEAVES = ("ltstudy.study._compat", "ltstudy.study.storage")


def study_room(module: str) -> str | None:
    """``search`` / ``tracking`` / ``results`` / ``cluster`` for a study sub-package's module, ``leaf`` for
    the leaves, ``root`` for the main line, None outside the study."""
    if module in STUDY_LEAVES or module == "ltstudy.study":  # the package itself holds only its docstring
        return "leaf"
    parts = module.split(".")
    if parts[:2] != ["ltstudy", "study"]:
        return None
    if len(parts) > 2 and parts[2] in (*STUDY_CHAIN, *STUDY_BESIDE):
        return parts[2]
    return "root"


def study_import_allowed(me: str, target: str) -> bool:
    mine, theirs = study_room(me), study_room(target)
    if theirs is None or mine in (None, "root") or mine == theirs:
        return True
    if theirs == "leaf":
        return True
    if mine == "leaf" or theirs == "root" or mine in STUDY_BESIDE or theirs in STUDY_BESIDE:
        return False
    return STUDY_CHAIN.index(theirs) < STUDY_CHAIN.index(mine)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if study_room(m) not in (None, "root")))
def test_study_subpackages_keep_their_chain(module):
    """search -> tracking -> results, cluster beside; no sub-package imports the main line at the root."""
    for target, line in imports(MODULES[module]):
        if target in MODULES and target != module:
            assert study_import_allowed(module, target), (
                f"{MODULES[module].relative_to(ROOT.parent)}:{line} imports {target} "
                f"({study_room(module)} -> {study_room(target)}; see ltstudy/study/__init__.py)")


def test_the_study_rule_can_fail():
    assert not study_import_allowed("ltstudy.study.search.space", "ltstudy.study.tracking.store")
    assert not study_import_allowed("ltstudy.study.tracking.store", "ltstudy.study.run")
    assert not study_import_allowed("ltstudy.study.cluster.shape", "ltstudy.study.search.space")
    assert not study_import_allowed("ltstudy.study._compat", "ltstudy.study.search.space")
    assert study_import_allowed("ltstudy.study.results.export", "ltstudy.study.tracking.records")
    assert study_import_allowed("ltstudy.study.search.schedulers", "ltstudy.study._compat")
    assert study_import_allowed("ltstudy.study.run", "ltstudy.study.results.summary")


#: the longest function a reader should have to hold in their head (a typer command's signature excepted:
#: its options are declarations, counted from the first line of its body)
MAX_FUNCTION_LINES = 60
#: the longest module of the study (one concern per module; split it when it grows past this)
MAX_MODULE_LINES = 400


def function_lengths(path: Path) -> list[tuple[int, str, int]]:
    """(lines, name, first line) of every function in a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            command = any(isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "command"
                          for d in node.decorator_list)
            start = node.body[0].lineno if command else node.lineno
            out.append((node.end_lineno - start + 1, node.name, node.lineno))
    return out


@pytest.mark.parametrize("module", sorted(MODULES))
def test_functions_and_modules_stay_short(module):
    path = MODULES[module]
    lines = len(path.read_text().splitlines())
    if study_room(module) is not None:
        assert lines <= MAX_MODULE_LINES, f"{path.relative_to(ROOT.parent)} has {lines} lines"
    for length, name, line in function_lengths(path):
        assert length <= MAX_FUNCTION_LINES, f"{path.relative_to(ROOT.parent)}:{line} {name} has {length} lines"


def test_the_length_rule_sees_a_long_function(tmp_path):
    probe = tmp_path / "long.py"
    probe.write_text("def f():\n" + "    x = 1\n" * 70)
    assert function_lengths(probe)[0][0] == 71
