"""The package's structure, checked: the layer contracts (import-linter, configured in pyproject.toml), no
import cycles, no private names imported across modules, and no torch in the processes that must stay light."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "posttrain"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if path.name == "__init__.py" else parts)


def imports_of(path: Path, modules: set[str]) -> list[tuple[str, list[str], int]]:
    """(module imported, names taken from it, line) for every import in ``path`` (inside functions too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            names = [alias.name for alias in node.names]
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
            found += [(module, [], node.lineno) for module in submodules]
            found.append((base, [n for n in names if f"{base}.{n}" not in modules], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
    return found


def package_graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        for target, _, _ in imports_of(path, set(files)):
            while target and target not in files:
                target = target.rpartition(".")[0]
            if target and target != name:
                graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_layer_contracts_hold():
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint_imports), "--no-cache", "--config", str(PACKAGE.parent / "pyproject.toml")],
                            cwd=PACKAGE.parent, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_there_is_no_import_cycle_inside_the_package():
    assert cycles(package_graph()) == []


def test_the_cycle_finder_finds_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_module_imports_another_modules_private_names():
    modules = {module_name(path) for path in PACKAGE.rglob("*.py")}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for target, names, line in imports_of(path, modules):
            if target.startswith("posttrain") and target != module_name(path):
                offenders += [f"{path.relative_to(PACKAGE.parent)}:{line}: {target}.{n}"
                              for n in names if n.startswith("_") and not n.startswith("__")]
    assert offenders == []


@pytest.mark.parametrize("module", ["posttrain.service.app", "posttrain.client", "posttrain.llama_stack.jobs",
                                    "posttrain.llama_stack.mapping", "posttrain.llama_stack.served",
                                    "posttrain.commands.jobs"])
def test_the_api_process_the_client_and_the_providers_import_no_training_library(module: str):
    probe = (f"import importlib, json, sys; importlib.import_module({module!r}); "
             "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules)))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout) == []
