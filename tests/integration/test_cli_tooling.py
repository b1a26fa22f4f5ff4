"""``qtrader bench`` and ``qtrader stress`` without the tooling, as a runtime image has them.

A real ``qtrader`` process in which the tooling cannot be imported (``qtrader_tools`` blocked
in ``sys.modules``, which is how Python answers for a package that is not there): the commands
are still listed with the same help, and any use of them exits 2 with one line saying what to
install. The suite itself runs with the tooling, so it is blocked here rather than uninstalled.
A tooling that is installed but fails to import (one of its own modules blocked) is not
reported as missing: the line names what failed.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from qtrader.commands.tools import INSTALL

pytestmark = pytest.mark.integration

BLOCKING = (
    "import sys; sys.modules[sys.argv.pop(1)] = None; "
    "from qtrader.cli import main; sys.exit(main(sys.argv[1:]))"
)


def qtrader(*args: str, tooling: bool) -> subprocess.CompletedProcess[str]:
    command = ["-c", BLOCKING, "qtrader_tools"] if not tooling else ["-m", "qtrader"]
    return subprocess.run(
        [sys.executable, *command, *args], capture_output=True, text=True, timeout=60
    )


def qtrader_blocking(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``qtrader ARGS`` in a process where ``module`` cannot be imported."""
    return subprocess.run(
        [sys.executable, "-c", BLOCKING, module, *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    "args",
    [
        ["stress"],
        ["stress", "--scenario", "poison", "--scale", "1"],
        ["bench", "halt", "--trips", "5"],
        ["bench"],
    ],
)
def test_a_tool_command_without_the_tooling_exits_2_saying_what_to_install(
    args: list[str],
) -> None:
    done = qtrader(*args, tooling=False)
    assert done.returncode == 2
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line == f"qtrader {args[0]} needs the tooling (quantum-trader-tools), " + (
        f"not installed here: {INSTALL}"
    )


def test_the_command_list_is_the_same_with_and_without_the_tooling() -> None:
    with_tooling = qtrader("--help", tooling=True)
    without = qtrader("--help", tooling=False)
    assert with_tooling.returncode == without.returncode == 0
    assert without.stdout == with_tooling.stdout
    assert "bench" in without.stdout
    assert "stress" in without.stdout


def test_a_runtime_command_without_the_tooling_still_refuses_what_it_does_not_know() -> None:
    done = qtrader("marketdata", "--no-such-flag", tooling=False)
    assert done.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in done.stderr


def test_with_the_tooling_the_commands_take_its_arguments() -> None:
    done = qtrader("stress", "--scenario", "meteor-strike", tooling=True)
    assert done.returncode == 2
    assert "invalid choice: 'meteor-strike'" in done.stderr


@pytest.mark.parametrize(
    ("args", "module"),
    [
        (["stress", "--scenario", "poison"], "qtrader_tools.stress.result"),
        (["bench", "halt"], "qtrader_tools.benchmarks"),
    ],
)
def test_a_tooling_that_does_not_import_is_reported_as_broken_not_as_missing(
    args: list[str], module: str
) -> None:
    done = qtrader_blocking(module, *args)
    assert done.returncode == 2
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith(f"qtrader {args[0]}: the tooling (quantum-trader-tools) is installed ")
    assert module in line
    assert "not installed here" not in line
    listed = qtrader_blocking(module, "--help")
    assert listed.returncode == 0
    assert listed.stdout == qtrader("--help", tooling=True).stdout
