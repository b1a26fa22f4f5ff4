"""``qtrader health`` (the real CLI, as a process) against real workloads on a real nats-server.

Before any policy exists the workloads say DEGRADED ("waiting for policy"): exit 1. Once the
policy is published they are OK: exit 0, also when the targets come from ``.qtrader/up.json``.
With NATS stopped, the NATS row and the workloads' bus dependency are CRITICAL: exit 2. A
stopped workload is unreachable, which is CRITICAL too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from qtrader.bus.nats_bus import Bus
from qtrader.contracts.policy import parse_policy
from qtrader.local.control import publish_policy
from qtrader.local.nats_server import EmbeddedNats
from qtrader.local.up_state import UpState, claim
from support.workers import Worker, eventually, start_worker

pytestmark = pytest.mark.integration

POLICY = parse_policy(
    {
        "apiVersion": "qtrader.dev/v1alpha1",
        "kind": "TradingPolicy",
        "metadata": {"name": "health-test"},
        "spec": {"symbols": ["BTCUSDT"]},
    }
)


@pytest.fixture
def workers(nats_server: EmbeddedNats, tmp_path: Path) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    try:
        for role in ("marketdata", "portfolio"):
            started.append(start_worker(role, nats_url=nats_server.url, log_dir=tmp_path))
        yield started
    finally:
        for worker in started:
            worker.stop()


def _health(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qtrader", "health", "--timeout", "3", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


def _rows(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """component -> status, from the table."""
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["COMPONENT", "KIND", "STATUS"], result.stdout
    return {line.split()[0]: line.split()[2] for line in lines[1:-1]}


async def test_health_when_policy_missing_then_ready_then_nats_down_exit_1_0_2(
    nats_server: EmbeddedNats, workers: list[Worker], tmp_path: Path
) -> None:
    urls = [arg for worker in workers for arg in ("--url", worker.base_url)]
    targets = [*urls, "--nats-url", nats_server.url]

    degraded = _health(*targets)
    assert degraded.returncode == 1, degraded.stdout + degraded.stderr
    rows = _rows(degraded)
    assert rows["portfolio"] == "DEGRADED"
    assert rows["nats"] == "OK"
    assert degraded.stdout.splitlines()[-1] == "overall: DEGRADED"

    bus = Bus(url=nats_server.url, client_name="test-control")
    await bus.connect()
    try:
        await bus.ensure_topology()
        await publish_policy(bus, POLICY)
    finally:
        await bus.close()
    await eventually(lambda: _health(*targets).returncode == 0, timeout_s=30, what="every row OK")
    ok = _rows(_health(*targets))
    assert set(ok) >= {"marketdata", "portfolio", "nats"}
    assert any(name.startswith("portfolio/") for name in ok)
    assert set(ok.values()) == {"OK"}

    # The local stack's file names the same workloads: same answer, no --url needed.
    health = {worker.role: f"{worker.base_url}/health" for worker in workers}
    assert (
        claim(UpState(nats_url=nats_server.url, pid=os.getpid(), health=health), tmp_path) is None
    )
    from_stack = _health("--json", cwd=tmp_path)
    assert from_stack.returncode == 0, from_stack.stdout + from_stack.stderr
    body = json.loads(from_stack.stdout)
    assert body["status"] == "OK"
    assert {c["component"] for c in body["components"]} >= {"marketdata", "portfolio", "nats"}

    nats_server.stop()
    await eventually(
        lambda: _health(*targets).returncode == 2, timeout_s=30, what="NATS down to be CRITICAL"
    )
    down = _health(*targets)
    rows = _rows(down)
    assert rows["nats"] == "CRITICAL"
    assert "CRITICAL" in {rows["marketdata"], rows["portfolio"]}
    assert down.stdout.splitlines()[-1] == "overall: CRITICAL"


def test_health_when_a_workload_stops_then_it_is_unreachable_and_exit_2(
    workers: list[Worker],
) -> None:
    marketdata, portfolio = workers
    portfolio.stop()
    result = _health("--url", marketdata.base_url, "--url", portfolio.base_url, "--json")
    assert result.returncode == 2
    body = json.loads(result.stdout)
    [gone] = [c for c in body["components"] if c["component"] == f"127.0.0.1:{portfolio.port}"]
    assert gone["status"] == "CRITICAL"
    assert "unreachable" in gone["detail"]
    assert any(c["component"] == "marketdata" for c in body["components"])
