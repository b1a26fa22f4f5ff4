"""A clock skew that a resync cannot cure, seen by a testnet-mode execution worker.

The local Binance-compatible server runs in its own process; it checks timestamps on a clock
20 s behind the time it reports, so the worker's resync after a -1021 measures an offset that
does not help and every signed request is rejected. The worker is a real process on a real
nats-server; the test plays the control plane and the upstream pipeline, and reads what reached
the exchange from the exchange's own records.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qtrader.bus.nats_bus import Bus
from qtrader.contracts.messages import TradingState
from qtrader.contracts.policy import parse_policy
from qtrader.exchange.binance import CLOCK_SKEW_CRITICAL_AFTER
from qtrader.local.control import heartbeat_forever, publish_policy, write_latch
from qtrader.local.nats_server import EmbeddedNats
from qtrader_tools.simulators.binance_futures import SimAdmin
from support.binance_sim import KEY, SECRET, sim_process
from support.flow import flowing
from support.workers import Worker, eventually, start_worker, stop_pipeline

pytestmark = pytest.mark.integration

POLICY = parse_policy(
    {
        "apiVersion": "qtrader.dev/v1alpha1",
        "kind": "TradingPolicy",
        "metadata": {"name": "skew-test"},
        "spec": {
            "mode": "testnet",
            "symbols": ["BTCUSDT"],
            "risk": {"minConfidence": 0.0, "maxPositionUsd": "1000", "maxSlippageBps": 100},
        },
    }
)


@pytest.fixture
def exchange(tmp_path: Path) -> Iterator[SimAdmin]:
    with (
        sim_process({"prices": {"BTCUSDT": "30000"}}, tmp_path / "sim") as url,
        SimAdmin(url) as admin,
    ):
        yield admin


def _exchange_health(worker: Worker) -> dict[str, Any]:
    dependencies: list[dict[str, Any]] = worker.health()["dependencies"]  # type: ignore[assignment]
    return next(d for d in dependencies if d["name"] == "exchange")


def _accepted_orders(exchange: SimAdmin, *, since: int = 0) -> list[dict[str, Any]]:
    return [
        e
        for e in exchange.log(since)
        if (e["method"], e["path"]) == ("POST", "/fapi/v1/order") and e["status"] == 200
    ]


async def test_skew_a_resync_does_not_cure_makes_health_critical_until_orders_go_through(
    nats_server: EmbeddedNats, exchange: SimAdmin, tmp_path: Path
) -> None:
    url = nats_server.url
    bus = Bus(url=url, client_name="test-control")
    await bus.connect()
    await bus.ensure_topology()
    await publish_policy(bus, POLICY)
    await write_latch(bus, state=TradingState.ACTIVE, reason="test", issued_by="test")
    heartbeat = asyncio.create_task(heartbeat_forever(bus, issued_by="test", interval_s=0.2))
    env = {"QTRADER_BINANCE_API_KEY": KEY, "QTRADER_BINANCE_API_SECRET": SECRET}
    args = ("--worker-id", "exec-skew", "--exchange-url", exchange.base_url)
    workers = [start_worker("portfolio", nats_url=url, log_dir=tmp_path)]
    execution = start_worker("execution", nats_url=url, log_dir=tmp_path, args=args, env=env)
    workers.append(execution)
    rejections = lambda: execution.metric("qtrader_exchange_clock_rejections_total")  # noqa: E731
    try:
        async with flowing(bus):
            await eventually(
                lambda: len(_accepted_orders(exchange)) >= 2,
                timeout_s=30,
                what="orders accepted before the skew",
                worker=execution,
            )
            assert _exchange_health(execution)["status"] == "OK"

            exchange.clock(skew_ms=-20_000)  # timestamps checked on a clock 20 s behind ...
            exchange.report_time_offset(20_000)  # ... the time the server reports
            skewed_from = len(exchange.log())
            await eventually(
                lambda: _exchange_health(execution)["status"] == "CRITICAL",
                timeout_s=20,
                what="/health CRITICAL after repeated -1021",
                worker=execution,
            )
            health = _exchange_health(execution)
            assert "clock skew" in health["detail"], health
            assert "rejected -1021 after a resync" in health["detail"], health
            assert execution.health()["status"] == "CRITICAL"
            assert rejections() >= 2 * CLOCK_SKEW_CRITICAL_AFTER  # each resynced once
            assert "qtrader_exchange_clock_offset_ms " in execution.get("/metrics").text
            for _ in range(10):  # signals keep coming; none accepted, and health stays CRITICAL
                await asyncio.sleep(0.1)
                assert _exchange_health(execution)["status"] == "CRITICAL"
            assert _accepted_orders(exchange, since=skewed_from) == []
            assert execution.process.poll() is None

            exchange.report_time_offset(0)  # the reported time agrees again: a resync cures it
            await eventually(
                lambda: len(_accepted_orders(exchange, since=skewed_from)) >= 1,
                timeout_s=20,
                what="orders accepted once the skew can be measured",
                worker=execution,
            )
            await eventually(
                lambda: _exchange_health(execution)["status"] == "OK",
                timeout_s=10,
                what="/health OK again",
                worker=execution,
            )
        # The offset the worker measured: the server's checking clock, 20 s behind ours.
        assert execution.metric("qtrader_exchange_clock_offset_ms") < -19_000
    finally:
        heartbeat.cancel()
        await asyncio.gather(heartbeat, return_exceptions=True)
        await stop_pipeline(workers, nats_url=url)
        await bus.close()
