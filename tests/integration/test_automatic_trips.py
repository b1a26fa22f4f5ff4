"""Automatic trips in local mode: the control plane's risk monitor over a real nats-server.

Each test runs ``LocalControlPlane`` (as ``qtrader up`` does) with one trigger set, feeds the
streams what a misbehaving market or exchange would produce, and reads back the risk alert on
the RISK stream (with its figures), the stop's spec and status, and the halt latch.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any

import pytest

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    Candle,
    HaltLatch,
    OrderStatus,
    OrderUpdate,
    RiskAlert,
    RiskAlertKind,
    Side,
    TradingState,
)
from qtrader.contracts.policy import parse_policy
from qtrader.control.ess_resource import parse_emergency_stop
from qtrader.control.ess_status import EssState
from qtrader.local.control import publish_policy
from qtrader.local.control_plane import LocalControlPlane
from qtrader.local.nats_server import EmbeddedNats
from qtrader_tools.candles import flat_candle
from support.streams import read_all

pytestmark = pytest.mark.integration


def _stop(**triggers: Any) -> Any:
    return parse_emergency_stop(
        {
            "apiVersion": "qtrader.dev/v1alpha1",
            "kind": "EmergencyStop",
            "metadata": {"name": "main"},
            "spec": {"cooldownSeconds": 60, "triggers": triggers},
        }
    )


async def _policy(bus: Bus) -> None:
    await publish_policy(
        bus,
        parse_policy(
            {
                "apiVersion": "qtrader.dev/v1alpha1",
                "kind": "TradingPolicy",
                "metadata": {"name": "trips"},
                "spec": {"symbols": ["BTCUSDT", "ETHUSDT"]},
            }
        ),
    )


def _candle(symbol: str, at_s: int, close: str) -> Candle:
    return flat_candle(symbol, close, open_time_ms=at_s * 1000, interval="1s")


def _rejected(n: int) -> OrderUpdate:
    return OrderUpdate(
        client_order_id=f"qt-{n}",
        intent_id=f"i-{n}",
        symbol="BTCUSDT",
        side=Side.BUY,
        status=OrderStatus.REJECTED,
        quantity=Decimal("0.001"),
        filled_quantity=Decimal(0),
        avg_price=Decimal(0),
        exchange="binance",
        reason="Rejected: -2019 margin is insufficient",
        ts_ms=1_700_000_000_000 + n,
    )


async def _eventually(check: Callable[[], Awaitable[bool]], *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


class Running:
    def __init__(self, bus: Bus, control: LocalControlPlane, url: str) -> None:
        self.bus, self.control, self.url = bus, control, url

    async def alerts(self, kind: RiskAlertKind) -> list[RiskAlert]:
        return await read_all(
            self.url,
            stream=subjects.RISK.name,
            subject=subjects.risk_alert_subject(kind.value),
            message_type=RiskAlert,
        )

    async def tripped(self) -> bool:
        return self.control.status.state is EssState.TRIPPED

    async def latch(self) -> HaltLatch | None:
        return await self.bus.kv_get(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch)


@contextlib.asynccontextmanager
async def _running(url: str, **triggers: Any) -> AsyncIterator[Running]:
    bus = Bus(url=url, client_name="test-trips")
    await bus.connect()
    await bus.ensure_topology()
    control = LocalControlPlane(bus, resource=_stop(**triggers), interval_s=0.2)
    task: asyncio.Task[None] | None = None
    try:
        await _policy(bus)
        await control.start()
        task = asyncio.create_task(control.run())
        await asyncio.sleep(0.3)  # the monitor's subscriptions are in place
        yield Running(bus, control, url)
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await bus.close()


async def _expect_trip(running: Running, kind: RiskAlertKind) -> RiskAlert:
    await _eventually(running.tripped, timeout_s=10, what=f"the {kind.value} trip")
    alerts = await running.alerts(kind)
    assert len(alerts) == 1, alerts
    status = running.control.status
    assert status.tripped_by == f"risk:{kind.value}"
    assert status.reason.startswith(f"auto: {kind.value}: ")
    latch = await running.latch()
    assert latch is not None
    assert latch.state is TradingState.HALTED
    return alerts[0]


async def test_a_fall_beyond_flash_crash_pct_within_the_window_trips(
    nats_server: EmbeddedNats,
) -> None:
    async with _running(nats_server.url, flashCrashPct="15", flashCrashWindowSeconds=30) as running:
        for at_s, close in enumerate(["100", "101", "99", "90", "88"]):  # 12.9%: not yet
            await running.bus.publish(
                subjects.candle_subject("BTCUSDT"), _candle("BTCUSDT", at_s, close)
            )
        await asyncio.sleep(1.0)
        assert running.control.status.state is EssState.ARMED
        await running.bus.publish(
            subjects.candle_subject("BTCUSDT"), _candle("BTCUSDT", 5, "85.8")
        )  # 15.05% below the window's high of 101
        alert = await _expect_trip(running, RiskAlertKind.FLASH_CRASH)
        assert alert.symbol == "BTCUSDT"
        assert alert.threshold == Decimal(15)
        assert alert.value == Decimal("15.0495")
        assert "101" in alert.detail
        assert "85.8" in alert.detail


async def test_a_symbol_of_the_policy_without_candles_trips_as_stale(
    nats_server: EmbeddedNats,
) -> None:
    async with _running(nats_server.url, staleMarketDataSeconds=2) as running:
        # ETHUSDT keeps coming; BTCUSDT, also in the policy, never does.
        for at_s in range(6):
            await running.bus.publish(
                subjects.candle_subject("ETHUSDT"), _candle("ETHUSDT", at_s, "2000")
            )
            await asyncio.sleep(0.5)
        alert = await _expect_trip(running, RiskAlertKind.STALE_MARKET_DATA)
        assert alert.symbol == "BTCUSDT"
        assert alert.value > Decimal(2)
        assert await running.alerts(RiskAlertKind.STALE_MARKET_DATA) == [alert]


async def test_an_execution_error_rate_beyond_the_trigger_trips(
    nats_server: EmbeddedNats,
) -> None:
    async with _running(nats_server.url, executionErrorRate=0.5) as running:
        for n in range(9):  # below the minimum sample: a 100% rate of 9 orders does not trip
            await running.bus.publish(subjects.order_update_subject("BTCUSDT"), _rejected(n))
        await asyncio.sleep(1.0)
        assert running.control.status.state is EssState.ARMED
        await running.bus.publish(subjects.order_update_subject("BTCUSDT"), _rejected(9))
        alert = await _expect_trip(running, RiskAlertKind.EXECUTION_ERROR_RATE)
        assert alert.value == Decimal(1)
        assert "10 of 10 orders" in alert.detail


async def test_an_alert_below_the_stops_threshold_does_not_trip(
    nats_server: EmbeddedNats,
) -> None:
    async with _running(nats_server.url, drawdownPct="5") as running:
        # The portfolio's alert at a policy limit of 3%: the stop asks for 5%.
        below = RiskAlert(
            alert_id="drawdown:all:1",
            alert_kind=RiskAlertKind.DRAWDOWN,
            source="portfolio/p1",
            value=Decimal("3.2"),
            threshold=Decimal(3),
            detail="drawdown 3.2%",
            ts_ms=1,
        )
        await running.bus.publish(subjects.risk_alert_subject("drawdown"), below)
        await asyncio.sleep(1.5)
        assert running.control.status.state is EssState.ARMED
        beyond = below.model_copy(
            update={"alert_id": "drawdown:all:2", "value": Decimal("5.1"), "detail": "5.1%"}
        )
        await running.bus.publish(subjects.risk_alert_subject("drawdown"), beyond)
        await _eventually(running.tripped, timeout_s=10, what="the drawdown trip")
        assert running.control.status.tripped_by == "risk:drawdown"
