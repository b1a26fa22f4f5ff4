"""``stop_processes``: SIGTERM, one grace period for the whole group, then SIGKILL."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from qtrader.local.stopping import stop_processes

# Prints a line once its handler is in place, so the test never signals it before.
IGNORES_SIGTERM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(60)"
)
OBEYS_SIGTERM = "import time; print('ready', flush=True); time.sleep(60)"


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for process in processes:  # whatever a failed test left running
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()


def _start(started: list[subprocess.Popen[str]], code: str) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    started.append(process)
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready"
    return process


def test_stop_when_processes_obey_sigterm_then_they_end_by_it(
    started: list[subprocess.Popen[str]],
) -> None:
    group = [_start(started, OBEYS_SIGTERM) for _ in range(2)]
    stop_processes(group, grace_s=10)
    assert [p.returncode for p in group] == [-signal.SIGTERM, -signal.SIGTERM]


def test_stop_when_processes_ignore_sigterm_then_one_grace_period_and_sigkill(
    started: list[subprocess.Popen[str]],
) -> None:
    group = [_start(started, IGNORES_SIGTERM) for _ in range(3)]
    began = time.monotonic()
    stop_processes(group, grace_s=0.5)
    assert [p.returncode for p in group] == [-signal.SIGKILL] * 3
    assert time.monotonic() - began < 1.4  # one grace period for the group, not one each


def test_stop_when_asked_to_kill_then_sigkill_at_once(
    started: list[subprocess.Popen[str]],
) -> None:
    process = _start(started, OBEYS_SIGTERM)
    stop_processes([process], grace_s=10, kill=True)
    assert process.returncode == -signal.SIGKILL


def test_stop_when_already_ended_then_nothing_to_do(started: list[subprocess.Popen[str]]) -> None:
    process = _start(started, "print('ready', flush=True)")
    process.wait()
    stop_processes([process], grace_s=10)
    assert process.returncode == 0
