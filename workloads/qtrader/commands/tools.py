"""``qtrader bench`` and ``qtrader stress``: run by the tooling when it is installed.

The tooling (the benchmarks, the stress scenarios, the simulator) is a distribution of its own,
``quantum-trader-tools`` (``tools/`` in the repository), which no runtime image carries. The
runtime never imports it (``tests/unit/test_import_graph.py`` fails on such an import): the
tooling registers each command under the entry-point group ``qtrader.commands`` as a module with
``add_arguments(parser)`` and ``run(args) -> int``, and this module finds it by name. Without the
tooling both commands are still listed, with the same help, and any use of them exits 2 with one
line saying what to install. A tooling that is installed but does not import (a dependency or one
of its own modules missing) is not reported as missing: the line says what failed to import.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Protocol, cast

from qtrader.commands.args import Commands

GROUP = "qtrader.commands"
INSTALL = "pip install -e ./tools (from the repository root; make setup does it)"
_HELP = {
    "bench": "run a benchmark; it prints its figures beside a baseline from the same run",
    "stress": "run the stress scenarios; print and report each pass criterion",
}


class ToolCommand(Protocol):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


def missing(name: str) -> str:
    """The one line ``qtrader NAME`` prints without the tooling."""
    return f"qtrader {name} needs the tooling (quantum-trader-tools), not installed here: {INSTALL}"


def broken(name: str, error: ImportError) -> str:
    """The one line ``qtrader NAME`` prints when the tooling is installed but does not import."""
    return f"qtrader {name}: the tooling (quantum-trader-tools) is installed but fails: {error}"


@functools.cache
def find(name: str) -> ToolCommand | str:
    """The tooling's ``name`` command, or the line that says why there is none."""
    for entry in entry_points(group=GROUP, name=name):
        try:
            return cast(ToolCommand, entry.load())
        except ImportError as error:
            # Only the tooling's own package gone (its registration left behind) means it is not
            # installed; any other module missing is a broken install, which must not pass for
            # an absent one.
            gone = importlib.util.find_spec(entry.module.partition(".")[0]) is None
            return missing(name) if gone else broken(name, error)
    return missing(name)


def add_bench(commands: Commands) -> None:
    _add(commands, "bench")


def add_stress(commands: Commands) -> None:
    _add(commands, "stress")


def _add(commands: Commands, name: str) -> None:
    parser = commands.add_parser(name, help=_HELP[name])
    tool = find(name)
    if not isinstance(tool, str):
        tool.add_arguments(parser)
        return
    # Takes any arguments (``cli.main`` lets them through for this command), so that whatever
    # was asked, the answer is why the command is not there; ``--help`` says it too.
    parser.description = tool
    parser.set_defaults(tool_missing=True)


def _runner(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        tool = find(name)
        if isinstance(tool, str):
            print(tool, file=sys.stderr)
            return 2
        return tool.run(args)

    return run


RUNNERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "bench": _runner("bench"),
    "stress": _runner("stress"),
}
