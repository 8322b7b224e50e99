"""Imports run one way: every module of the package imports only modules of lower layers (or, inside
one sub-package, files below it), and the core never imports the layer above it. The layers, bottom
up: the math and checks, the problem families, the episode record, behaviour and serialization, the
data side and the backbones, the agent, the evaluation, the module, the callbacks, the CLI, and on
top what uses all of them (checkpoint loading, compare, sweeps, the probes' API)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "icrl_lightning"

LAYERS = {
    "checks": 0, "qlearning": 0, "objective": 1,
    "envs": 2, "episodes": 3, "behaviour": 4, "serialize": 4,
    "data": 5, "backbones": 5, "agent": 6, "evaluation": 7, "module": 8, "callbacks": 9, "cli": 10,
    "__main__": 11, "checkpoints": 11, "compare": 12, "diagnostics": 12, "sweep": 12,
}


def _unit(module: str) -> str:
    """``icrl_lightning.data.stream`` -> ``data``."""
    return module.split(".")[1] if module.count(".") else "__init__"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("icrl_lightning"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("icrl_lightning")}
    return out


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def test_every_module_has_a_layer():
    units = {_unit(m) for m in _modules() if m != "icrl_lightning"}
    assert units - {"experimental"} <= set(LAYERS), sorted(units - set(LAYERS))


def test_imports_run_one_way():
    bad = []
    for module, path in _modules().items():
        if module == "icrl_lightning":
            continue
        unit = _unit(module)
        for imported in _imports(path):
            target = _unit(imported)
            if target == "experimental" and unit != "experimental":
                bad.append(f"{module} imports {imported}: the core never imports the experimental place")
            elif target == unit or unit == "experimental":
                continue  # inside one sub-package (checked for cycles below), or experimental code on top
            elif LAYERS[target] >= LAYERS[unit]:
                bad.append(f"{module} (layer {LAYERS[unit]}) imports {imported} (layer {LAYERS[target]})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles_inside_a_sub_package():
    graph = {m: {i for i in _imports(p) if i != m and _unit(i) == _unit(m) and i in _modules()}
             for m, p in _modules().items()}
    # A package's __init__ re-exports its files; only the files among themselves must be acyclic.
    graph = {m: {i for i in deps if i.count(".") > 1} for m, deps in graph.items() if m.count(".") > 1}
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join([*trail, m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for i in graph.get(m, ()):
            visit(i, [*trail, m])
        state[m] = 2

    for m in graph:
        visit(m, [])
