"""The import graph of transferlab/ is layered: no cycles, no module imports the package root, and every import
points down the layers below (DESIGN.md's table, adapted to the modules that exist).

The graph is read with ``ast`` (nothing is imported): every ``import``/``from ... import`` of a transferlab module
at module level, and inside functions too, except an import marked ``# lazy: import cost`` (deferred only so that
``transferlab --help`` does not pay for torch or pandas). A lazy import still has to point down: the marker may
defer an import, never hide an upward one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "transferlab"
LAZY_MARK = "# lazy: import cost"

# Bottom first. A module may import modules of its own layer (never in a cycle) or of any layer below.
LAYERS = [
    ("base", ["_version", "errors", "terminal", "config", "machine"]),
    ("files", ["files"]),  # torch-free atomic writes and hashes
    ("leaves", ["names", "records", "resources", "tables", "stats", "packaged", "arguments", "model_catalog"]),
    ("model registry", ["model_registry"]),
    ("outside models", ["model_sources"]),  # registers into model_registry
    ("zoo and factory", ["models"]),  # imports model_sources once, for its registrations (timm's pattern)
    ("checkpoints", ["store"]),  # load_run builds the model: store sits on the models
    ("data", ["data.spec", "data", "data.canvas", "data.sampling", "data.dataset", "data.registry", "data.cache",
              "data.loaders"]),
    ("engine", ["calibration_cache", "device", "prefix", "predictors", "training", "attacks", "ensemble", "tracking"]),
    ("steps", ["runs", "matrix.spec", "matrix.outputs", "matrix.members", "matrix.craft", "matrix.evaluate",
               "matrix.pairs", "matrix.merge", "matrix.run", "matrix"]),
    ("report: shared", ["report.cells", "report.doc", "report.figures", "report.hypothesis", "report.manifest",
                         "report.reference"]),
    ("report: views", ["report.method", "report.asr", "report.hypothesis_blocks"]),
    ("report: matrix outputs", ["report.matrices", "report.freeze"]),
    ("report: predictors", ["report.predictors"]),
    ("report: study", ["report.study_report"]),
    ("report: package", ["report"]),
    ("orchestration", ["preflight", "study_check", "study.schema", "study.plan", "study.estimate", "study.execute",
                       "study.collect", "study", "executors"]),
    ("library", ["api", "cli_args", ""]),  # "": the package root, which re-exports the API
    ("face", ["cli"]),
]
LAYER_OF = {f"transferlab.{m}" if m else "transferlab": i for i, (_, members) in enumerate(LAYERS) for m in members}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def owning_module(name: str) -> str | None:
    """``transferlab.report.cells.Cells`` -> ``transferlab.report.cells``: the longest prefix that is a module."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str) -> list[tuple[str, int, bool, bool]]:
    """(imported transferlab module, line, inside a function, marked lazy) for every import in ``module``."""
    path = MODULES[module]
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    tree = ast.parse(source)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .x import y
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            # `from transferlab import data` imports the module transferlab.data; `from x import name`, x itself
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        lazy = LAZY_MARK in "\n".join(lines[node.lineno - 1:node.end_lineno])
        for name in names:
            target = owning_module(name) if name.split(".")[0] == "transferlab" else None
            if target and target != module:
                found.append((target, node.lineno, id(node) not in top_level, lazy))
    return found


GRAPH = {module: imports(module) for module in MODULES}


def strongly_connected(edges: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm: the strongly connected components of a directed graph."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            components.append(component)

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return components


def test_the_import_graph_has_no_cycles():
    edges = {m: {target for target, _, _, lazy in found if not lazy} for m, found in GRAPH.items()}
    knots = [sorted(c) for c in strongly_connected(edges) if len(c) > 1]
    assert not knots, f"import cycles (strongly connected components): {knots}"


def test_the_cycle_check_finds_a_cycle():
    """The check above is only worth something if it sees a knot: a <-> b, and c -> d -> e -> c."""
    components = strongly_connected({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c", "a"}})
    assert sorted(sorted(c) for c in components if len(c) > 1) == [["a", "b"], ["c", "d", "e"]]


def test_no_module_imports_the_package_root():
    offenders = [f"{m}:{line}" for m, found in GRAPH.items() for target, line, _, _ in found if target == "transferlab"]
    assert not offenders, f"these import the package root (which imports the API): {offenders}"


def test_every_module_has_a_layer():
    missing = sorted(set(MODULES) - set(LAYER_OF))
    assert not missing, f"add these modules to LAYERS in tests/test_layers.py (see DESIGN.md): {missing}"


def test_imports_point_down_the_layers():
    upward = []
    for module, found in GRAPH.items():
        for target, line, nested, lazy in found:
            if LAYER_OF.get(target, -1) > LAYER_OF.get(module, len(LAYERS)):
                kind = "lazy import" if lazy else "import inside a function" if nested else "import"
                upward.append(f"{module}:{line} {kind} of {target} "
                              f"({LAYERS[LAYER_OF[module]][0]} -> {LAYERS[LAYER_OF[target]][0]})")
    assert not upward, "imports pointing up a layer:\n" + "\n".join(upward)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_uses_another_modules_private_names(module):
    """A name another module needs is public: ``from transferlab.x import _name`` or ``x._name`` is a sign that
    it belongs elsewhere or should say it is shared."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    modules, used = {}, []  # local name -> the transferlab module it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("transferlab"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    used.append(f"line {node.lineno}: from {node.module} import {alias.name}")
                if f"{node.module}.{alias.name}" in MODULES:
                    modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            modules.update({a.asname or a.name: a.name for a in node.names if a.name in MODULES})
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            used.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    assert not used, f"{module} uses private names of other modules: {used}"
