"""The floors of docs/design.md, read off the code: every import statement of megacoca and its kernels (at the top
of a module or inside a function) goes down a floor or stays on its own, and no modules import each other in a
circle. A new import that runs back up fails here, naming the module and what it imported."""

from __future__ import annotations

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BELOW_PARALLEL = {"config", "launch", "metrics", "models", "kernels", "data"}
BELOW_CHECKPOINT = BELOW_PARALLEL | {"parallel", "losses", "optim", "step_guard"}
BELOW_TRAINER = BELOW_CHECKPOINT | {"checkpoint", "engine", "schedules"}
# What each floor (a subpackage of megacoca, a top-level module, or the kernels) may import besides itself.
ALLOWED = {
    "config": set(),
    "kernels": set(),
    "launch": {"config"},
    "metrics": {"config", "launch"},
    "models": {"config", "kernels"},
    "data": {"config"},
    "parallel": {"config", "launch", "metrics", "models", "kernels"},
    "losses": {"config", "parallel"},
    "optim": {"config"},
    "step_guard": {"config", "launch"},
    "checkpoint": BELOW_CHECKPOINT,
    "engine": BELOW_CHECKPOINT,
    "schedules": BELOW_CHECKPOINT | {"checkpoint"},
    "trainer": BELOW_TRAINER,
    "plan": {"config", "launch", "metrics", "models", "kernels", "parallel", "optim"},
    "eval": BELOW_CHECKPOINT | {"checkpoint"},
    "profiling": BELOW_TRAINER | {"trainer", "plan", "eval"},
    "cli": BELOW_TRAINER | {"trainer", "plan", "eval", "profiling"},
    "train": {"cli", "launch"},
    "__main__": {"cli", "launch"},
    "__init__": {"checkpoint", "data"},  # megacoca.load / load_tokenizer, imported when called
}


def _modules() -> dict[str, str]:
    """Dotted module name -> file, for megacoca and for kernels/ under its import name megacoca_kernels."""
    found = {}
    for folder, name in (("megacoca", "megacoca"), ("kernels", "megacoca_kernels")):
        for directory, _, files in os.walk(os.path.join(REPO, folder)):
            for file in files:
                if not file.endswith(".py"):
                    continue
                path = os.path.join(directory, file)
                parts = [name, *os.path.relpath(path, os.path.join(REPO, folder))[:-3].split(os.sep)]
                if parts[-1] == "__init__":
                    parts.pop()
                found[".".join(parts)] = path
    return found


def _imports(modules: dict[str, str]) -> dict[str, set[str]]:
    """Module -> the megacoca modules its import statements name (`from pkg import name` names pkg.name when that
    is a module)."""
    graph = {}
    for module, path in modules.items():
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            else:
                continue
            for name in names:
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name and name != module:
                    targets.add(name)
        graph[module] = targets
    return graph


def _floor(module: str) -> str:
    if module.startswith("megacoca_kernels"):
        return "kernels"
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


MODULES = _modules()
GRAPH = _imports(MODULES)


def test_the_module_list_is_complete():
    assert {"megacoca.config.layout", "megacoca.trainer", "megacoca.schedules.base", "megacoca.cli.train",
            "megacoca_kernels.flash_attention"} <= set(MODULES)
    assert set(map(_floor, MODULES)) <= set(ALLOWED), set(map(_floor, MODULES)) - set(ALLOWED)


@pytest.mark.parametrize("floor", sorted(ALLOWED))
def test_imports_go_down_the_floors(floor):
    wrong = sorted(f"{module} imports {target}" for module, targets in GRAPH.items() if _floor(module) == floor
                   for target in targets if _floor(target) not in ALLOWED[floor] | {floor})
    assert not wrong, wrong


def test_no_import_circle():
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(module):  # Tarjan's strongly connected components
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in GRAPH[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            visit(module)
    assert not circles, circles
