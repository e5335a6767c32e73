"""The import graph: layered, no cycles, and the pipeline never imports the mock.

:data:`LAYERS` is the one statement of the package's floor plan (``docs/architecture.md`` draws
it): a module may import from its own layer and the layers below, never from a layer above.
"""

import ast
from pathlib import Path

import desomdb

ROOT = Path(desomdb.__file__).parent

#: Bottom to top. A top-level module is named by itself, a subpackage by its folder.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("_version", "errors", "constants", "atomic"),
    ("runtime",),
    ("archive",),
    ("survey",),
    ("science",),
    ("som",),
    ("query",),
    ("pipeline",),
    ("products",),
    ("web", "mock"),
    ("cli", "demo"),
)


def _graph() -> dict[str, set[str]]:
    """Module -> desomdb modules it imports (module level or inside functions)."""
    mods = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(("desomdb", *path.relative_to(ROOT).with_suffix("").parts))
        mods[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        for block in ast.walk(tree):  # imports for type checkers only do not run
            if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING":
                block.body = []
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.startswith("desomdb"):
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods
                           else node.module for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[name] |= {t for t in targets if t in mods and t not in (name, "desomdb")}
    return graph


def layer_of(module: str) -> int:
    """Index in :data:`LAYERS` of a ``desomdb.*`` module (the package itself is the top)."""
    parts = module.split(".")
    if len(parts) == 1:
        return len(LAYERS)
    for i, floor in enumerate(LAYERS):
        if parts[1] in floor:
            return i
    raise AssertionError(f"{module} is in no layer: add its folder or name to LAYERS")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import from a module to a module of a higher layer, as 'a -> b'."""
    return sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                  if layer_of(d) > layer_of(m))


def test_every_module_sits_in_a_layer_and_imports_only_downward() -> None:
    graph = _graph()
    assert len(graph) > 60  # the walk found the package
    assert not upward_imports(graph)


def test_an_injected_upward_import_is_refused() -> None:
    graph = _graph()
    graph["desomdb.science.spectra"].add("desomdb.pipeline.labels")
    assert upward_imports(graph) == ["desomdb.science.spectra -> desomdb.pipeline.labels"]


def test_at_most_a_dozen_modules_stay_at_the_top() -> None:
    top = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(top) <= 12, top


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
    allowed = {"desomdb.demo", "desomdb.cli.build"}  # the top layer
    offenders = sorted(m for m, deps in _graph().items()
                       if not m.startswith("desomdb.mock") and m not in allowed
                       and any(d.startswith("desomdb.mock") for d in deps))
    assert not offenders


def test_the_public_entry_points_of_before_the_floors_still_resolve() -> None:
    """README, catalog and users' code named these at the top of the package."""
    from desomdb import calibrate, similar, stack, templates
    from desomdb.products import stack as stack_mod

    assert stack.stack is stack_mod.stack
    assert desomdb.stack.stack is stack_mod.stack
    assert callable(similar.similar_galaxies) and callable(calibrate.coverage)
    assert callable(templates.load) and callable(desomdb.intake_catalog.open_catalog)
    assert desomdb.intake_catalog.ArchiveSQL.__module__ == "desomdb.query.intake_catalog"
    assert callable(desomdb.connect) and callable(desomdb.predict_spectra)


def test_the_architecture_page_names_every_floor_and_module() -> None:
    """docs/architecture.md draws LAYERS; a module it does not name fails here."""
    text = (ROOT.parent / "docs" / "architecture.md").read_text()
    for floor in LAYERS:
        for name in floor:
            assert name in text, name
    for path in ROOT.rglob("*.py"):
        if path.stem.startswith("__"):
            continue
        assert path.stem in text, f"docs/architecture.md does not name {path.stem}"
