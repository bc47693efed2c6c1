"""The package's import graph: no cycles, and every import points down the floors of docs/architecture.md."""

import ast
from pathlib import Path

import kandinsky3

ROOT = Path(kandinsky3.__file__).parent

# The floors, bottom up. A module may import its own floor's package or any floor below, never one above.
FLOORS = {
    "models": 0,
    "diffusion": 1,
    "images": 1,
    "registry": 1,
    "vocabulary": 1,
    "offload": 1,
    "devices": 1,
    "checkpoints": 2,
    "requests": 2,
    "world": 2,
    "edges": 2.5,  # between checkpoints (its HED weights) and tasks (the control task extracts edges)
    "tasks": 3,
    "superres": 3,
    "prompts": 3,
    "pipeline": 4,
    "eval": 5,
    "training": 5,
    "batch": 5,
    "serve": 5,
    "cli": 6,
    "__init__": 6,
    "__main__": 6,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, name: str) -> set[str]:
    """Our modules that ``name`` imports, anywhere in the file (function-level imports count too)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] if node.level > 1 else package
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("kandinsky3"):
                target = node.module.removeprefix("kandinsky3").lstrip(".")
            else:
                continue
            for alias in node.names:
                candidate = f"{target}.{alias.name}" if target else alias.name
                found.add(candidate if candidate in MODULES else target)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("kandinsky3.") for a in node.names if a.name.startswith("kandinsky3.")}
    return {m for m in found if m in MODULES and m != name}


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}
GRAPH = {name: _imports(path, name) for name, path in MODULES.items()}


def _floor(module: str) -> int:
    return FLOORS[module.split(".")[0]]


def test_every_module_has_a_floor():
    assert {m.split(".")[0] for m in MODULES} <= set(FLOORS), set(m.split(".")[0] for m in MODULES) - set(FLOORS)


def test_imports_point_down():
    upward = [
        (m, t)
        for m, targets in GRAPH.items()
        for t in targets
        if _floor(t) > _floor(m) or (_floor(t) == _floor(m) and t.split(".")[0] != m.split(".")[0])
    ]
    assert not upward, f"imports that point up or sideways: {upward}"


def test_no_import_cycles():
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    # a package's __init__ re-exporting its submodules is not a cycle of behaviour: drop package ↔ submodule pairs
    real = [c for c in cycles if not all(a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(c, c[1:]))]
    assert not real, f"import cycles: {real}"
