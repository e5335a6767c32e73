"""The import graph: no cycles, and the pipeline never imports the mock."""

import ast
from pathlib import Path

import desomdb

ROOT = Path(desomdb.__file__).parent


def _graph() -> dict[str, set[str]]:
    """Module -> desomdb modules it imports (module level or inside functions)."""
    mods = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(("desomdb", *path.relative_to(ROOT).with_suffix("").parts))
        mods[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.startswith("desomdb"):
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods
                           else node.module for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[name] |= {t for t in targets if t in mods and t not in (name, "desomdb")}
    return graph


def test_the_import_graph_has_no_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, trail: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle.extend([*trail, node, nxt])
                return True
            if nxt not in state and visit(nxt, [*trail, node]):
                return True
        state[node] = 2
        return False

    for start in sorted(graph):
        if start not in state and visit(start, []):
            break
    assert not cycle, " -> ".join(cycle)


def test_the_pipeline_never_imports_the_mock() -> None:
    """Only the mock itself, the demo and the 'desomdb mock' command import desomdb.mock."""
    allowed = {"desomdb.demo", "desomdb.cli"}
    offenders = sorted(m for m, deps in _graph().items()
                       if not m.startswith("desomdb.mock") and m not in allowed
                       and any(d.startswith("desomdb.mock") for d in deps))
    assert not offenders
