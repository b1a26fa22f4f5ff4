"""The execution worker's exposure book against the portfolio's ledger, compared continuously.

A real execution worker (paper mode) on a real nats-server; the test plays the portfolio and
publishes snapshots whose positions disagree with the fills the worker has seen (none). After
the grace period ``/health`` is DEGRADED naming the symbol and both figures, and the
``qtrader_position_mismatch`` gauge says so; snapshots that agree clear both.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import PortfolioSnapshot, PositionView, TradingState
from qtrader.contracts.policy import parse_policy
from qtrader.local.control import heartbeat_forever, publish_policy, write_latch
from qtrader.local.nats_server import EmbeddedNats
from support.workers import Worker, eventually, start_worker

pytestmark = pytest.mark.integration

GRACE_S = 10.0  # ExecutionConfig.position_mismatch_grace_s


def _snapshot(sequence: int, positions: dict[str, Decimal]) -> PortfolioSnapshot:
    views = tuple(
        PositionView(
            symbol=symbol,
            quantity=quantity,
            avg_entry_price=Decimal(30_000),
            mark_price=Decimal(30_000),
            unrealized_pnl=Decimal(0),
            realized_pnl=Decimal(0),
            fees=Decimal(0),
        )
        for symbol, quantity in positions.items()
    )
    return PortfolioSnapshot(
        sequence=sequence,
        ts_ms=int(time.time() * 1000),
        fills_applied=0,
        initial_capital=Decimal(10_000),
        realized_pnl=Decimal(0),
        unrealized_pnl=Decimal(0),
        fees=Decimal(0),
        equity=Decimal(10_000),
        peak_equity=Decimal(10_000),
        drawdown_pct=Decimal(0),
        max_drawdown_pct=Decimal(0),
        positions=views,
    )


@contextlib.asynccontextmanager
async def _snapshots(bus: Bus, positions: dict[str, Decimal]) -> AsyncIterator[None]:
    async def publish() -> None:
        sequence = 0
        while True:
            sequence += 1
            await bus.publish(subjects.PORTFOLIO_SNAPSHOT, _snapshot(sequence, positions))
            await asyncio.sleep(0.5)

    task = asyncio.create_task(publish())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _positions_health(worker: Worker) -> tuple[str, str]:
    for dependency in worker.health().get("dependencies", []):  # type: ignore[attr-defined]
        if dependency["name"] == "positions":
            return str(dependency["status"]), str(dependency.get("detail"))
    return "absent", ""


async def test_a_portfolio_that_disagrees_with_the_book_beyond_the_grace_is_degraded(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    bus = Bus(url=nats_server.url, client_name="test-reconcile")
    await bus.connect()
    await bus.ensure_topology()
    policy = {
        "apiVersion": "qtrader.dev/v1alpha1",
        "kind": "TradingPolicy",
        "metadata": {"name": "reconcile"},
        "spec": {"symbols": ["BTCUSDT"]},
    }
    await publish_policy(bus, parse_policy(policy))
    await write_latch(bus, state=TradingState.ACTIVE, reason="test", issued_by="test")
    heartbeat = asyncio.create_task(heartbeat_forever(bus, issued_by="test", interval_s=0.2))
    execution = start_worker("execution", nats_url=nats_server.url, log_dir=tmp_path)
    try:
        async with _snapshots(bus, {"BTCUSDT": Decimal("0.5")}):
            started = time.monotonic()
            await eventually(
                lambda: _positions_health(execution)[0] == "DEGRADED",
                timeout_s=GRACE_S + 10,
                what="/health DEGRADED on the mismatch",
                worker=execution,
            )
            assert time.monotonic() - started >= GRACE_S - 1  # not before the grace
            _, detail = _positions_health(execution)
            assert "BTCUSDT" in detail
            assert "execution 0" in detail
            assert "portfolio 0.5" in detail
            assert execution.metric("qtrader_position_mismatch", symbol="BTCUSDT") == 1
        async with _snapshots(bus, {}):
            await eventually(
                lambda: _positions_health(execution)[0] == "OK",
                timeout_s=10,
                what="/health OK once they agree",
                worker=execution,
            )
            assert execution.metric("qtrader_position_mismatch", symbol="BTCUSDT") == 0
    finally:
        heartbeat.cancel()
        execution.stop()
        await bus.close()
