"""A stand-in for marketdata and inference: candles and signals at a steady rate."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from decimal import Decimal

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import Candle, CandleSource, Direction, OrderUpdate, Signal
from support.streams import read_all


async def flow(bus: Bus, *, stop: asyncio.Event) -> int:
    """Candles and alternating LONG/SHORT signals, 20 a second, until stopped."""
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
        await asyncio.sleep(0.05)
    return index


@contextlib.asynccontextmanager
async def flowing(bus: Bus) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(flow(bus, stop=stop))
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
