"""``qtrader up`` keeps its processes up as a kubelet would: a killed workload or nats-server is
started again (same port, same store), the summary and the report say so, and a process that
stays down makes it exit non-zero. The processes are found and killed as a person would: by
their command lines under ``qtrader up``'s process id."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from support.local_up import QTRADER, cmdline, find_process

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def _up(tmp_path: Path, duration_s: int) -> Iterator[subprocess.Popen[str]]:
    command = [
        QTRADER, "up", "--policy", "examples/policy.yaml", "--duration", str(duration_s),
        "--candles-per-second", "20", "--data-dir", str(tmp_path / "run"),
        "--report", str(tmp_path / "report.json"),
    ]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_a_killed_broker_and_workload_are_restarted_and_reported(tmp_path: Path) -> None:
    with _up(tmp_path, duration_s=45) as up:
        nats = find_process(up.pid, "nats-server")
        execution = find_process(up.pid, "execution")
        time.sleep(8)  # trading
        os.kill(nats, signal.SIGKILL)
        time.sleep(5)
        os.kill(execution, signal.SIGKILL)
        stdout, stderr = up.communicate(timeout=120)
    assert up.returncode == 0, stdout + stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["restarts"]["nats-server"] == 1
    assert report["restarts"]["execution"] == 1
    assert report["down"] == []
    events = [(e["process"], e["what"].split(" ")[0]) for e in report["supervisor_events"]]
    assert ("nats-server", "exited") in events
    assert ("execution", "restarted") in events
    assert "restarts 2 (execution 1, nats-server 1)" in stdout  # the plain summary shows them
    assert "restarted: execution 1x, nats-server 1x" in stdout  # and the final report
    # Back on the restarted broker (a drawdown trip may leave execution DEGRADED: halted).
    assert {r: h["status"] != "CRITICAL" for r, h in report["health"].items()} == dict.fromkeys(
        ("marketdata", "inference", "execution", "portfolio"), True
    )
    assert report["fills"] > 0
    assert report["portfolio"]["fills_applied"] == report["fills"]


def test_a_workload_that_cannot_come_back_makes_up_exit_non_zero(tmp_path: Path) -> None:
    with _up(tmp_path, duration_s=25) as up:
        execution = find_process(up.pid, "execution")
        line = cmdline(execution)
        port = int(line[line.index("--health-port") + 1])
        time.sleep(5)
        with socket.socket() as squatter:  # its health port taken: every restart fails
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            os.kill(execution, signal.SIGKILL)
            while True:
                try:
                    squatter.bind(("127.0.0.1", port))
                    break
                except OSError:
                    time.sleep(0.05)
            squatter.listen()
            stdout, stderr = up.communicate(timeout=120)
    assert up.returncode == 1, stdout + stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["down"] == ["execution"]
    assert "DOWN at the end: execution" in stdout
    assert sum(1 for e in report["supervisor_events"] if e["process"] == "execution") >= 3
