"""Dependencies point one way: each package of ``qtrader`` (and the operator) imports only from
its own layer or the layers below, and no two packages import each other.

The layers, from the bottom: the wire contracts; the bus and the health contract; the worker
runtime; the adapters (the exchange, market data, the viewer stream); the roles; the control
plane and research (datasets, evaluation); the local stack and the backtest; training (which
judges models with the backtest); the operator and the command line. The tooling (simulators,
benchmarks, stress: ``tools/qtrader_tools``) stands above all of it and ships apart: the
runtime never imports it, not even by name (its commands find it through an entry point).
Read from the source with ``ast`` (imports inside functions count too), so a lazy import cannot
hide an upward edge.

``KNOWN_UPWARD`` lists the upward imports that exist today, each with why it is still there:
the test fails on any other, and also when one of them is gone (so the list only shrinks).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {"qtrader": ROOT / "workloads" / "qtrader", "qtrader_operator": ROOT / "operator"}

LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"instruments", "contracts", "money"}),
    frozenset({"health", "bus"}),
    frozenset({"policy_watch", "runtime", "startup_heap"}),
    frozenset({"exchange", "marketdata", "viewer"}),
    frozenset({"risk", "execution", "inference", "portfolio"}),
    frozenset({"control", "research"}),
    frozenset({"local", "backtest"}),
    frozenset({"training"}),
    frozenset({"qtrader_operator", "cli", "commands", "__main__", "__init__"}),
)
KNOWN_UPWARD: set[tuple[str, str]] = set()  # none left


def _layer(package: str) -> int:
    for index, layer in enumerate(LAYERS):
        if package in layer:
            return index
    raise AssertionError(f"package {package!r} has no layer: add it to LAYERS")


def _package_of(path: Path, top: str) -> str:
    if top == "qtrader_operator":
        return top
    return path.relative_to(SOURCES["qtrader"]).parts[0].removesuffix(".py")


def _imported(tree: ast.AST) -> set[str]:
    """The ``qtrader`` packages a module imports (``qtrader.<package>...``)."""
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "qtrader" and len(parts) > 1:
                found.add(parts[1])
            elif parts[0] == "qtrader_operator":
                found.add("qtrader_operator")
    return found


def package_edges() -> set[tuple[str, str]]:
    edges = set()
    for top, directory in SOURCES.items():
        base = directory if top == "qtrader" else directory / "qtrader_operator"
        for path in base.rglob("*.py"):
            source = _package_of(path, top)
            for target in _imported(ast.parse(path.read_text(), filename=str(path))):
                if target != source:
                    edges.add((source, target))
    return edges


def test_every_package_has_a_layer() -> None:
    for source, target in package_edges():
        _layer(source)
        _layer(target)


def test_no_package_imports_from_a_layer_above_it_but_the_known_ones() -> None:
    upward = {(s, t) for s, t in package_edges() if _layer(t) > _layer(s)}
    assert upward - KNOWN_UPWARD == set(), "new upward imports"
    assert KNOWN_UPWARD - upward == set(), "gone: remove them from KNOWN_UPWARD"


def test_no_two_packages_import_each_other() -> None:
    edges = package_edges()
    mutual = {tuple(sorted((s, t))) for s, t in edges if (t, s) in edges}
    assert mutual - {tuple(sorted(known)) for known in KNOWN_UPWARD} == set(), mutual


TOOLING = "qtrader_tools"


def _tooling_references(tree: ast.AST) -> list[int]:
    """Lines that import the tooling, or name one of its modules in a string (an import by
    name through importlib would hide from the import statements alone)."""
    lines = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = node.value.split()
        if any(name == TOOLING or name.startswith(TOOLING + ".") for name in names):
            lines.append(node.lineno)
    return lines


def test_the_runtime_never_imports_the_tooling() -> None:
    found = {}
    for top, directory in SOURCES.items():
        base = directory if top == "qtrader" else directory / "qtrader_operator"
        for path in base.rglob("*.py"):
            lines = _tooling_references(ast.parse(path.read_text(), filename=str(path)))
            if lines:
                found[str(path.relative_to(ROOT))] = lines
    assert found == {}, "the runtime must not import qtrader_tools"


def test_the_tooling_check_sees_an_import_and_a_name() -> None:
    for source in (
        "from qtrader_tools.stress import runner",
        "import qtrader_tools",
        "importlib.import_module('qtrader_tools.benchmarks.halt')",
    ):
        assert _tooling_references(ast.parse(source)) == [1], source
    assert _tooling_references(ast.parse("import qtrader_toolsy, qtrader")) == []
