"""The package's shape, read from its source: every import (function-level ones included) points down,
the modules that read experiment folders or train never reach Ray, and nothing below the CLI
imports both Ray and the report."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tune_cifar"
TOP = {"cli", "__main__"}                       # parses and calls: may import anything
# Never Ray, not even through another module of the package: the training loop, the data and the
# models, and everything that reads an experiment folder (report, export, compare, dashboard).
RAY_FREE = {"fit", "features", "data", "models", "config", "folders", "spaces", "stats", "gpu_share",
            "train_command", "report", "compare", "export", "dashboard"}


def imports() -> dict[str, tuple[set[str], bool]]:
    """module -> (package modules it imports, whether it imports ray itself)."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        own, ray = set(), False
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    own |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
                elif node.module and node.module.split(".")[0] == "tune_cifar":
                    own.add(node.module.split(".")[1])
                ray |= node.level == 0 and (node.module or "").split(".")[0] == "ray"
            elif isinstance(node, ast.Import):
                ray |= any(a.name.split(".")[0] == "ray" for a in node.names)
        graph[path.stem] = (own & {p.stem for p in PACKAGE.glob("*.py")}, ray)
    return graph


def reach(graph, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()][0]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_import_cycle():
    graph = imports()
    for module in graph:
        assert module not in reach(graph, module), f"{module} imports itself through {reach(graph, module)}"


def test_training_and_folder_readers_never_reach_ray():
    graph = imports()
    for module in RAY_FREE:
        touched = {module} | reach(graph, module)
        assert not any(graph[m][1] for m in touched), \
            f"{module} reaches Ray through {sorted(m for m in touched if graph[m][1])}"


def test_nothing_below_the_cli_imports_both_ray_and_the_report():
    graph = imports()
    for module in set(graph) - TOP - {"report"}:
        touched = {module} | reach(graph, module)
        assert not ("report" in touched and any(graph[m][1] for m in touched)), module
