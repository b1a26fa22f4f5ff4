"""Execution compares the venue's positions with its exposure book (testnet mode, the local
Binance-compatible server, real execution and portfolio processes on a real nats-server).

While it trades, every read agrees: what is in flight widens what the venue may hold, so no
fill on its way to the FILLS stream is taken for a difference. A manual trade on the venue (an
order from its web page, never on our streams) is a position the book cannot explain: once it
has lasted the grace it is a reconciliation risk alert with the figures, ``/health`` says so,
and the gauge shows it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import RiskAlert, RiskAlertKind, TradingState
from qtrader.contracts.policy import parse_policy
from qtrader.local.control import heartbeat_forever, publish_policy, write_latch
from qtrader.local.nats_server import EmbeddedNats
from qtrader_tools.simulators.binance_futures import SimAdmin, SimConfig
from support.binance_sim import KEY, SECRET, sim_in_thread
from support.flow import flowing
from support.streams import read_all
from support.workers import Worker, eventually, start_worker, stop_pipeline

pytestmark = pytest.mark.integration

SYMBOL = "BTCUSDT"
POLICY = parse_policy(
    {
        "apiVersion": "qtrader.dev/v1alpha1",
        "kind": "TradingPolicy",
        "metadata": {"name": "reconcile-test"},
        "spec": {
            "mode": "testnet",
            "symbols": [SYMBOL],
            "risk": {"minConfidence": 0.0, "maxPositionUsd": "1000", "maxSlippageBps": 100},
        },
    }
)
INTERVAL_S, GRACE_S = 0.3, 1.5


@pytest.fixture
def exchange() -> Iterator[SimAdmin]:
    config = SimConfig.from_dict({"prices": {SYMBOL: "30000"}})
    with sim_in_thread(config) as url, SimAdmin(url) as admin:
        yield admin


def _execution(url: str, exchange_url: str, tmp_path: Path) -> Worker:
    env = {"QTRADER_BINANCE_API_KEY": KEY, "QTRADER_BINANCE_API_SECRET": SECRET}
    args = (
        *("--worker-id", "exec-reconcile", "--exchange-url", exchange_url),
        *("--reconcile-interval", str(INTERVAL_S), "--reconcile-grace", str(GRACE_S)),
    )
    return start_worker("execution", nats_url=url, log_dir=tmp_path, args=args, env=env)


async def _reconciliation_alerts(url: str) -> list[RiskAlert]:
    alerts = await read_all(
        url,
        stream=subjects.RISK.name,
        subject=subjects.all_of(subjects.RISK_ALERT_PREFIX),
        message_type=RiskAlert,
    )
    return [a for a in alerts if a.alert_kind is RiskAlertKind.RECONCILIATION]


@pytest.mark.invariants_exempt(
    "exposure",
    "orders",
    reason="a manual trade on the venue is a position and a trade no order of ours explains",
)
async def test_trading_agrees_with_the_venue_and_a_manual_trade_is_a_reconciliation_alert(
    nats_server: EmbeddedNats, exchange: SimAdmin, tmp_path: Path
) -> None:
    url = nats_server.url
    bus = Bus(url=url, client_name="test-control")
    await bus.connect()
    await bus.ensure_topology()
    await publish_policy(bus, POLICY)
    await write_latch(bus, state=TradingState.ACTIVE, reason="test", issued_by="test")
    heartbeat = asyncio.create_task(heartbeat_forever(bus, issued_by="test", interval_s=0.2))
    workers = [start_worker("portfolio", nats_url=url, log_dir=tmp_path)]
    execution = _execution(url, exchange.base_url, tmp_path)
    workers.append(execution)
    agreed = lambda: execution.metric(  # noqa: E731
        "qtrader_venue_reconciliations_total", outcome="agrees"
    )
    try:
        async with flowing(bus):
            await eventually(
                lambda: len([o for o in exchange.orders() if o["status"] == "FILLED"]) >= 5,
                timeout_s=30,
                what="five orders filled at the exchange",
                worker=execution,
            )
            await asyncio.sleep(3 * GRACE_S)  # trading on, read after read
        assert await _reconciliation_alerts(url) == [], "a difference while only trading"
        assert execution.metric("qtrader_venue_position_mismatch", symbol=SYMBOL) == 0
        assert agreed() >= 5

        await eventually(
            lambda: execution.dependency("venue-positions")["status"] == "OK",
            timeout_s=10,
            what="the venue agreeing once the flow stopped",
            worker=execution,
        )
        exchange.manual_trade(KEY, SYMBOL, "BUY", Decimal("0.005"))
        found: list[RiskAlert] = []

        async def alerted() -> bool:
            found[:] = await _reconciliation_alerts(url)
            return bool(found)

        await eventually(alerted, timeout_s=15, what="a reconciliation alert", worker=execution)
        (alert,) = found
        assert alert.symbol == SYMBOL
        assert alert.value - alert.threshold == Decimal("0.005")  # the venue's minus the book's
        assert "manual trade" in alert.detail
        health = execution.dependency("venue-positions")
        assert health["status"] == "DEGRADED", health
        assert execution.metric("qtrader_venue_position_mismatch", symbol=SYMBOL) == 1
        await asyncio.sleep(3 * INTERVAL_S)  # one alert per episode, however many reads
        assert len(await _reconciliation_alerts(url)) == 1
    finally:
        heartbeat.cancel()
        await asyncio.gather(heartbeat, return_exceptions=True)
        await stop_pipeline(workers, nats_url=url)
        await bus.close()
