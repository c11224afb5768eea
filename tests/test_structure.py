"""The package's shape, read from its source (function-level imports included): the sub-packages are
the bands of the architecture, and each may import only the bands below it.

    cli, __main__            parse and call: may import anything
    bench                    benchmarks: may run the commands (never imported by them)
    commands                 search, kfold, selection, train
    tuning                   the only band that imports ray
    results                  reads and writes experiment folders; never reaches Ray
    training                 models, the loop, evaluation; never reaches Ray
    data                     sources, readers, splits, the device store
    core                     config, spaces, stats, the trial protocol: no torch, no Ray
"""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tune_cifar"
TOP = "top"                      # cli.py, __main__.py, __init__.py
ALLOWED = {                      # band -> the bands it may import (besides itself)
    "core": set(),
    "data": {"core"},
    "training": {"core", "data"},
    "results": {"core", "data", "training"},
    "tuning": {"core", "data", "training", "results"},
    "commands": {"core", "data", "training", "results", "tuning"},
    "bench": {"core", "data", "training", "results", "tuning", "commands"},
    TOP: {"core", "data", "training", "results", "tuning", "commands", "bench"},
}
NO_TORCH = {"core"}
RAY_BAND = "tuning"
MAX_FLOORS = 10                  # the longest chain of imports, module to module
MAX_LINES = 400


def module_name(path: Path, package: Path = PACKAGE) -> str:
    rel = path.relative_to(package).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts) or "__init__"


def band(module: str) -> str:
    head = module.split(".")[0]
    return head if head in ALLOWED else TOP


def imports(package: Path = PACKAGE) -> dict[str, tuple[set[str], set[str]]]:
    """module -> (package modules it imports, third-party top-level packages it imports)."""
    modules = {module_name(p, package): p for p in package.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        here = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
        own, third = set(), set()
        for node in runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[:len(here) - (node.level - 1)] if node.level > 1 else here
                    target = ".".join(base + ([node.module] if node.module else []))
                    candidates = [target] if node.module else [f"{target}.{a.name}".strip(".") for a in node.names]
                elif (node.module or "").split(".")[0] == "tune_cifar":
                    candidates = [node.module.split(".", 1)[1]] if "." in node.module else []
                else:
                    third.add((node.module or "").split(".")[0])
                    continue
                for c in candidates:
                    # `from .x import y`: y may be a module of package x, or a name in module x
                    own |= {c} & set(modules)
                    own |= {f"{c}.{a.name}" for a in node.names} & set(modules)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "tune_cifar":
                        if a.name.count("."):
                            own.add(a.name.split(".", 1)[1])
                    else:
                        third.add(a.name.split(".")[0])
        graph[name] = (own - {name}, third)
    return graph


def runtime_nodes(tree: ast.AST):
    """Every node but those under `if TYPE_CHECKING:` (imports for type hints only, never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                todo.extend(child.orelse)
                continue
            todo.append(child)


def reach(graph, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()][0]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def floors(graph) -> int:
    """The longest chain of imports (1 = a module that imports nothing of the package)."""
    @lru_cache(maxsize=None)
    def height(m: str) -> int:
        return 1 + max((height(n) for n in graph[m][0]), default=0)
    return max(height(m) for m in graph)


def band_violations(graph) -> list[str]:
    out = []
    for module, (own, third) in graph.items():
        b = band(module)
        for target in own:
            tb = band(target)
            if tb != b and tb not in ALLOWED[b]:
                out.append(f"{module} ({b}) imports {target} ({tb})")
        if "ray" in third and b != RAY_BAND:
            out.append(f"{module} ({b}) imports ray: only {RAY_BAND}/ may")
        if "torch" in third and b in NO_TORCH:
            out.append(f"{module} ({b}) imports torch")
    return out


@lru_cache(maxsize=1)
def package_graph():
    return imports()


def test_the_bands_are_folders():
    present = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert present == set(ALLOWED) - {TOP}
    loose = {p.name for p in PACKAGE.glob("*.py")}
    assert loose == {"__init__.py", "__main__.py", "cli.py"}


def test_no_import_cycle():
    graph = package_graph()
    for module in graph:
        assert module not in reach(graph, module), f"{module} imports itself through {reach(graph, module)}"


def test_each_band_imports_only_the_bands_below_it():
    assert band_violations(package_graph()) == []


def test_the_rules_catch_a_broken_layering(tmp_path):
    """The checks are not vacuous: a copy of the package with one import pointing up, one ray import
    outside tuning/ and a torch import in core/ fails each rule by name."""
    import shutil
    copy = tmp_path / "tune_cifar"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "training" / "up.py").write_text("from ..tuning import runner\n")
    (copy / "results" / "rayed.py").write_text("import ray\n")
    (copy / "core" / "torched.py").write_text("import torch\n")
    found = band_violations(imports(copy))
    assert any(v.startswith("training.up (training) imports tuning.runner") for v in found), found
    assert "results.rayed (results) imports ray: only tuning/ may" in found
    assert "core.torched (core) imports torch" in found


def test_readers_of_experiment_folders_and_training_never_reach_ray():
    graph = package_graph()
    for module in graph:
        if band(module) in ("core", "data", "training", "results"):
            touched = {module} | reach(graph, module)
            assert not any("ray" in graph[m][1] for m in touched), \
                f"{module} reaches Ray through {sorted(m for m in touched if 'ray' in graph[m][1])}"


def test_nothing_below_the_cli_imports_the_commands():
    graph = package_graph()
    for module, (own, _) in graph.items():
        if band(module) not in ("commands", "bench", TOP):
            assert not {m for m in own if band(m) == "commands"}, module


def test_the_import_graph_is_at_most_ten_floors_high():
    assert floors(package_graph()) <= MAX_FLOORS


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_readme_architecture_lists_every_module():
    """README's architecture section names each package and module, under its package, and nothing
    that is not in the tree."""
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme[readme.index("### Architecture"):readme.index("## When things go wrong")]
    listed, package = set(), None
    for line in section.splitlines():
        words = line.split()
        if not line.startswith("    ") or not words:
            continue
        if line.startswith("    ") and not line.startswith("      ") and words[0].endswith("/"):
            package = words[0].rstrip("/")
        elif line.startswith("      ") and words[0].endswith(".py") and package:
            listed.add(f"{package}/{words[0]}")
    present = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
               if p.parent != PACKAGE and p.name != "__init__.py"}
    assert listed == present
