"""A stand-in for marketdata and inference: candles and signals at a steady rate."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from decimal import Decimal

from qtrader.bus.errors import BusUnavailable
from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    Candle,
    CandleSource,
    Direction,
    OrderUpdate,
    Signal,
    TradingState,
)
from qtrader.contracts.policy import TradingPolicy
from qtrader.local.control import heartbeat_forever, publish_policy, write_latch
from qtrader_tools.candles import flat_candle
from support.streams import read_all


async def flow(bus: Bus, *, stop: asyncio.Event, every_s: float = 0.05) -> int:
    """Candles and alternating LONG/SHORT signals, one of each every ``every_s`` (20 a second by
    default), until stopped."""
    index = 0
    while not stop.is_set():
        now_ms = int(time.time() * 1000)
        price = Decimal(30_000) + (index % 10) * 10
        candle = Candle(
            symbol="BTCUSDT",
            interval="1m",
            open_time_ms=1_700_000_000_000 + index * 60_000,
            close_time_ms=1_700_000_000_000 + index * 60_000 + 59_999,
            open=price,
            high=price + 5,
            low=price - 5,
            close=price,
            volume=Decimal(1),
            source=CandleSource.SYNTHETIC,
        )
        await bus.publish(subjects.candle_subject("BTCUSDT"), candle)
        signal = Signal(
            signal_id=f"test:{index}",
            symbol="BTCUSDT",
            direction=Direction.LONG if index % 2 == 0 else Direction.SHORT,
            confidence=0.9,
            model_version="test",
            candle_open_time_ms=candle.open_time_ms,
            price=price,
            created_at_ms=now_ms,
        )
        await bus.publish(subjects.signal_subject("BTCUSDT"), signal)
        index += 1
        await asyncio.sleep(every_s)
    return index


@contextlib.asynccontextmanager
async def flowing(bus: Bus, *, every_s: float = 0.05) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(flow(bus, stop=stop, every_s=every_s))
    try:
        yield
    finally:
        stop.set()
        await task


async def order_updates(url: str, *, stack: str | None = None) -> list[OrderUpdate]:
    """Every order update stored in ``stack``'s orders stream (none: the logical names)."""
    stream = subjects.scoped_stream(stack, subjects.ORDERS)
    subject = subjects.scoped_subject(stack, "qtrader.order.update.*")
    return await read_all(url, stream=stream.name, subject=subject, message_type=OrderUpdate)


async def marks_forever(bus: Bus, symbol: str, price: Decimal, *, every_s: float = 0.5) -> None:
    """A flat candle of ``symbol`` at ``price`` every ``every_s`` (a fresh mark: the execution
    worker trusts a price for 30 s); none while the broker cannot take it."""
    minute = int(time.time() // 60) * 60_000
    for index in itertools.count():
        candle = flat_candle(symbol, price, open_time_ms=minute + index * 60_000)
        with contextlib.suppress(BusUnavailable):
            await bus.publish(subjects.candle_subject(symbol), candle)
        await asyncio.sleep(every_s)


@contextlib.asynccontextmanager
async def control_plane(
    url: str, policy: TradingPolicy, *, price: Decimal, name: str
) -> AsyncIterator[Bus]:
    """The control plane a worker test plays: the policy, an ACTIVE latch, a heartbeat every
    0.2 s and fresh marks of the policy's first symbol at ``price`` (both stop while the broker
    hangs); the bus, to publish signals on."""
    bus = Bus(url=url, client_name=name)
    await bus.connect()
    await bus.ensure_topology()
    await publish_policy(bus, policy)
    await write_latch(bus, state=TradingState.ACTIVE, reason="test", issued_by="test")
    tasks = [
        asyncio.create_task(heartbeat_forever(bus, issued_by="test", interval_s=0.2)),
        asyncio.create_task(marks_forever(bus, policy.spec.symbols[0], price)),
    ]
    try:
        yield bus
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await bus.close()
