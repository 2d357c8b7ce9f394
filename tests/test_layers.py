"""The package's layers import only downward, without cycles, and no module takes another's private names.

Layers, bottom to top: ``functional`` (tensor maths) <- ``presses`` <- ``integration`` and the model
loaders (``weights``, ``model_loading``, ``tiny_vlm``) <- ``eval``, ``benchmarks``, ``demos``,
``harnesses``, ``serving`` <- ``commands``. Every import counts, also those inside functions and under
``TYPE_CHECKING``; the one accepted upward call is a press entering its session
(``with press(model)``), as in kvpress.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mixkv"

LAYERS = {
    "mixkv.functional": 0,
    "mixkv.presses": 1,
    "mixkv.integration": 2,
    "mixkv.weights": 2,
    "mixkv.model_loading": 2,
    "mixkv.tiny_vlm": 2,
    "mixkv.eval": 3,
    "mixkv.benchmarks": 3,
    "mixkv.demos": 3,
    "mixkv.harnesses": 3,
    "mixkv.serving": 3,
    "mixkv.commands": 4,
    "mixkv.__main__": 5,
    "mixkv": 5,  # the package's own __init__: the public API
}

# A press's ``__call__`` returns the session that attaches it (``with press(model): ...``).
ACCEPTED_UPWARD = {
    ("mixkv.presses.base", "mixkv.integration.session"),
    ("mixkv.presses.decoding", "mixkv.integration.session"),
}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str]]:
    """``(imported module, imported name)`` for every ``mixkv`` import of a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.append((submodule, "") if submodule in modules else (target, alias.name))
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
    return [(target, imported) for target, imported in found if target.split(".")[0] == "mixkv"]


def _layer(module: str) -> int:
    owner = max((prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")), key=len)
    return LAYERS[owner]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {target for target, _ in _imports(name, path, modules) if target in modules and target != name}
        for name, path in modules.items()
    }


def test_every_module_belongs_to_a_layer():
    unplaced = [
        m for m in _modules() if not any(m == p or m.startswith(p + ".") for p in LAYERS if p != "mixkv")
    ]
    assert sorted(unplaced) == ["mixkv"]


def test_no_module_imports_a_layer_above_its_own():
    upward = sorted(
        (module, target)
        for module, targets in _graph().items()
        for target in targets
        if _layer(target) > _layer(module) and (module, target) not in ACCEPTED_UPWARD
    )
    assert upward == []


def test_the_import_graph_has_no_cycle():
    graph = {m: {t for t in targets if (m, t) not in ACCEPTED_UPWARD} for m, targets in _graph().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    private = sorted(
        (name, f"{target}.{imported}")
        for name, path in modules.items()
        for target, imported in _imports(name, path, modules)
        if imported.startswith("_") and not imported.startswith("__") and target != name
    )
    assert private == []


def test_no_two_modules_share_a_file_name():
    names = [path.name for path in PACKAGE.rglob("*.py") if path.name not in ("__init__.py", "__main__.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
