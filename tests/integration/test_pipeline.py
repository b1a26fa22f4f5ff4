"""The four workloads as real processes on a real nats-server, end to end.

Candles in (the synthetic market, seeded), signals from the real ONNX model, orders on the paper
exchange, fills, and a portfolio snapshot whose positions and PnL must equal what the fills in
the stream imply, computed here independently with Fractions.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    Candle,
    CandleSource,
    Fill,
    OrderIntent,
    OrderStatus,
    OrderUpdate,
    RefusedBy,
    Signal,
    TradingState,
)
from qtrader.contracts.policy import TradingPolicy, parse_policy
from qtrader.local.control import heartbeat_forever, publish_policy, write_latch
from qtrader.local.nats_server import EmbeddedNats
from support.ledger_check import cents, independent_portfolio, last_snapshot
from support.streams import publish_raw, read_all
from support.workers import Worker, eventually, start_worker

pytestmark = pytest.mark.integration

SYMBOLS = ["BTCUSDT", "ETHUSDT"]
CAPITAL = Decimal(10_000)


def _policy() -> TradingPolicy:
    return parse_policy(
        {
            "apiVersion": "qtrader.dev/v1alpha1",
            "kind": "TradingPolicy",
            "metadata": {"name": "pipeline-test"},
            "spec": {
                "symbols": SYMBOLS,
                # Every signal the model makes is acted on, so the run has trades to check.
                "risk": {"minConfidence": 0.0, "maxPositionUsd": "1000", "maxOpenPositions": 2},
                "paper": {"initialCapitalUsd": str(CAPITAL), "feeBps": "4", "slippageBps": "2"},
            },
        }
    )


@pytest.fixture
async def control_plane(nats_server: EmbeddedNats) -> AsyncIterator[Bus]:
    """What the operator does: topology, the policy revision and an ACTIVE latch."""
    bus = Bus(url=nats_server.url, client_name="test-control")
    await bus.connect()
    await bus.ensure_topology()
    await publish_policy(bus, _policy())
    await write_latch(bus, state=TradingState.ACTIVE, reason="test", issued_by="test")
    heartbeat = asyncio.create_task(heartbeat_forever(bus, issued_by="test"))
    try:
        yield bus
    finally:
        heartbeat.cancel()
        await asyncio.gather(heartbeat, return_exceptions=True)
        await bus.close()


async def _wait_async(condition: object, *, timeout_s: float, what: str) -> None:
    assert callable(condition)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        if await condition():
            return
        await asyncio.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


_FILLED_OR_EXPIRED = {OrderStatus.FILLED, OrderStatus.EXPIRED}


def _rest_not_chased(update: OrderUpdate) -> bool:
    """CANCELED with part filled: the next attempt's price had left the slippage bound."""
    return (
        update.status is OrderStatus.CANCELED
        and 0 < update.filled_quantity < update.quantity
        and (update.reason or "").startswith("price left the slippage bound")
    )


async def _final_updates(url: str) -> dict[str, OrderUpdate]:
    """Each intent's final order update (FILLED, EXPIRED, ...), by intent id."""
    updates = await read_all(
        url, stream="QT_ORDERS", subject="qtrader.order.update.*", message_type=OrderUpdate
    )
    return {u.intent_id: u for u in updates if u.status.is_final}


def _stop_all(workers: list[Worker]) -> None:
    for worker in workers:
        worker.stop()


async def test_pipeline_when_candles_flow_then_portfolio_matches_the_fills(
    nats_server: EmbeddedNats, control_plane: Bus, tmp_path: Path
) -> None:
    url = nats_server.url
    market_args = ("--seed", "11", "--candles-per-second", "40", "--max-candles", "160")
    workers = [start_worker("marketdata", nats_url=url, log_dir=tmp_path, args=market_args)]
    workers += [
        start_worker(role, nats_url=url, log_dir=tmp_path)
        for role in ("inference", "execution", "portfolio")
    ]
    try:
        marketdata = workers[0]
        await eventually(
            lambda: "ended" in str(marketdata.health()),
            timeout_s=60,
            what="the synthetic feed to end",
            worker=marketdata,
        )
        candles = await read_all(
            url, stream="QT_MARKET", subject="qtrader.market.candle.*", message_type=Candle
        )
        last_close = {c.symbol: c.close for c in candles}

        seen: list[tuple[int, int]] = []

        async def settled() -> bool:
            """Every intent filled and applied, and nothing new for two checks in a row (the
            execution worker decides queued signals in cycles, after the feed has ended)."""
            fills = await read_all(
                url, stream="QT_FILLS", subject="qtrader.fill.*", message_type=Fill
            )
            intents = await read_all(
                url, stream="QT_ORDERS", subject="qtrader.order.intent.*", message_type=OrderIntent
            )
            finals = await _final_updates(url)
            snapshot = await last_snapshot(url)
            seen.append((len(intents), len(fills)))
            if snapshot is None or snapshot.fills_applied != len(fills):
                return False
            if len(finals) != len(intents) or seen[-5:] != [seen[-1]] * 5:
                return False
            marks = {p.symbol: p.mark_price for p in snapshot.positions}
            return all(marks.get(s, last_close[s]) == last_close[s] for s in marks)

        await _wait_async(settled, timeout_s=60, what="the portfolio to apply every fill")

        signals = await read_all(
            url, stream="QT_SIGNALS", subject="qtrader.signal.*", message_type=Signal
        )
        intents = await read_all(
            url, stream="QT_ORDERS", subject="qtrader.order.intent.*", message_type=OrderIntent
        )
        fills = await read_all(url, stream="QT_FILLS", subject="qtrader.fill.*", message_type=Fill)
        snapshot = await last_snapshot(url)
        assert snapshot is not None

        assert len(candles) == 2 * 160
        # 32 candles fill a window; every later candle of every symbol gives one signal.
        assert len(signals) == 2 * (160 - 31)
        assert len(intents) > 0
        finals = await _final_updates(url)
        assert set(finals) == {i.intent_id for i in intents}
        # Paper fills an attempt whole or not at all (a limit at the slippage bound that the
        # price has left expires); an attempt the exposure book cut to what the limits leave
        # is followed by one for the rest, or the intent ends CANCELED: by the book, or with the
        # rest not chased because the price has left the slippage bound meanwhile. Either way
        # each final update accounts for exactly its intent's fills.
        filled_by_intent: dict[str, Decimal] = {}
        for fill in fills:
            stem = fill.client_order_id[:32]
            filled_by_intent[stem] = filled_by_intent.get(stem, Decimal(0)) + fill.quantity
        for update in finals.values():
            assert filled_by_intent.get(update.client_order_id[:32], 0) == update.filled_quantity
        assert any(u.status is OrderStatus.FILLED for u in finals.values())
        # What the book refuses or cuts short (a reduce-only order with nothing left to reduce,
        # a flip beyond the limit once an intent in flight ended unfilled) ends with its reason,
        # never sent; a remainder is not chased past the slippage bound; anything else must
        # have filled or expired.
        others = [
            u
            for u in finals.values()
            if u.status not in _FILLED_OR_EXPIRED
            and u.refused_by is not RefusedBy.EXPOSURE_BOOK
            and "reduce_only" not in (u.reason or "")
            and not _rest_not_chased(u)
        ]
        assert others == [], [(u.status, u.reason) for u in others]
        realized, fees, unrealized, quantities = independent_portfolio(fills, last_close)
        assert snapshot.fills_applied == len(fills)
        assert cents(snapshot.realized_pnl) == cents(realized)
        assert cents(snapshot.fees) == cents(fees)
        assert cents(snapshot.unrealized_pnl) == cents(unrealized)
        assert cents(snapshot.equity) == cents(Fraction(CAPITAL) + realized - fees + unrealized)
        by_symbol = {p.symbol: Fraction(p.quantity) for p in snapshot.positions}
        for symbol, quantity in quantities.items():
            assert by_symbol[symbol] == quantity
        for worker in workers:
            assert worker.health()["status"] in {"OK", "DEGRADED"}, worker.health()
    finally:
        _stop_all(workers)


async def test_inference_when_malformed_and_unknown_version_then_skips_counts_and_continues(
    nats_server: EmbeddedNats, control_plane: Bus, tmp_path: Path
) -> None:
    url = nats_server.url
    inference = start_worker("inference", nats_url=url, log_dir=tmp_path)
    try:
        subject = subjects.candle_subject("BTCUSDT")
        await publish_raw(url, subject, b"{not json", msg_id="bad-1")
        future = _candle(0).model_dump(mode="json") | {"schema_version": 99}
        await publish_raw(url, subject, json.dumps(future).encode(), msg_id="bad-2")
        for index in range(40):
            candle = _candle(index)
            await control_plane.publish(subject, candle)

        def counted() -> bool:
            return (
                inference.metric(
                    "qtrader_messages_rejected_total",
                    consumer="inference-candles",
                    reason="malformed",
                )
                == 1
                and inference.metric(
                    "qtrader_messages_rejected_total",
                    consumer="inference-candles",
                    reason="unknown_version",
                )
                == 1
            )

        await eventually(counted, timeout_s=20, what="both rejections counted", worker=inference)

        async def nine_signals() -> bool:
            signals = await read_all(
                url, stream="QT_SIGNALS", subject="qtrader.signal.*", message_type=Signal
            )
            return len(signals) == 40 - 31

        await _wait_async(nine_signals, timeout_s=20, what="signals after the bad messages")
        assert inference.process.poll() is None
        assert inference.log().count("skipped a message") == 2
    finally:
        inference.stop()


def _candle(index: int) -> Candle:
    price = Decimal(30_000) + index * 10
    open_time = 1_700_000_000_000 + index * 60_000
    return Candle(
        symbol="BTCUSDT",
        interval="1m",
        open_time_ms=open_time,
        close_time_ms=open_time + 59_999,
        open=price,
        high=price + 20,
        low=price - 20,
        close=price + 5,
        volume=Decimal(10 + index % 7),
        source=CandleSource.REPLAY,
    )


async def test_worker_when_nats_stops_then_not_ready_and_critical_and_recovers_on_restart(
    nats_server: EmbeddedNats, control_plane: Bus, tmp_path: Path
) -> None:
    await control_plane.close()
    worker = start_worker("portfolio", nats_url=nats_server.url, log_dir=tmp_path)
    try:
        await eventually(
            lambda: worker.get("/readyz").status_code == 200, timeout_s=20, what="ready"
        )
        nats_server.stop()
        await eventually(
            lambda: worker.get("/readyz").status_code == 503,
            timeout_s=20,
            what="not ready after NATS stopped",
            worker=worker,
        )
        health = worker.health()
        assert health["status"] == "CRITICAL"
        dependencies = {d["name"]: d["status"] for d in health["dependencies"]}  # type: ignore[attr-defined]
        assert dependencies["nats"] == "CRITICAL"
        nats_server.start()
        await eventually(
            lambda: worker.get("/readyz").status_code == 200,
            timeout_s=30,
            what="ready again after NATS returned",
            worker=worker,
        )
        await eventually(
            lambda: worker.health()["status"] == "OK",
            timeout_s=10,
            what=f"OK health again: {worker.health()}",
            worker=worker,
        )
        assert worker.metric("qtrader_bus_reconnects_total") >= 1
    finally:
        worker.stop()
