"""Two stacks on one nats-server (two policies, or two installs) never see each other's
messages, consumers or KV values, over every kind of traffic the bus carries."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    Candle,
    ControlHeartbeat,
    Direction,
    HaltLatch,
    Signal,
    TradingState,
)
from qtrader.local.nats_server import EmbeddedNats
from qtrader_tools.candles import flat_candle

pytestmark = pytest.mark.integration

ALPHA, BETA = subjects.stack_id("trading", "alpha"), subjects.stack_id("trading", "beta")


@pytest.fixture
async def buses(nats_server: EmbeddedNats) -> AsyncIterator[dict[str | None, Bus]]:
    """A connected bus per stack, and one without a stack (local mode's names)."""
    opened: dict[str | None, Bus] = {}
    for stack in (ALPHA, BETA, None):
        bus = Bus(url=nats_server.url, client_name=f"test-{stack}", stack=stack)
        await bus.connect()
        await bus.ensure_topology()
        opened[stack] = bus
    try:
        yield opened
    finally:
        for bus in opened.values():
            await bus.close()


def _signal(signal_id: str) -> Signal:
    return Signal(
        signal_id=signal_id,
        symbol="BTCUSDT",
        direction=Direction.LONG,
        confidence=0.9,
        model_version="test",
        candle_open_time_ms=1,
        price=Decimal(1),
        created_at_ms=int(time.time() * 1000),
    )


def _candle(close: str) -> Candle:
    return flat_candle("BTCUSDT", close, open_time_ms=0)


async def _collect_consumer(bus: Bus, seconds: float) -> list[str]:
    seen: list[str] = []

    async def on_signal(signal: Signal) -> None:
        seen.append(signal.signal_id)

    task = asyncio.create_task(bus.consume(subjects.EXECUTION_SIGNALS, Signal, on_signal))
    await asyncio.sleep(seconds)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return seen


async def test_each_stacks_durable_consumer_gets_only_its_own_signals(
    buses: dict[str | None, Bus],
) -> None:
    for stack, bus in buses.items():
        await bus.publish(subjects.signal_subject("BTCUSDT"), _signal(f"from-{stack}"))
    for stack, bus in buses.items():
        assert await _collect_consumer(bus, 1.5) == [f"from-{stack}"]


async def test_kv_values_and_last_messages_are_per_stack(buses: dict[str | None, Bus]) -> None:
    states = {ALPHA: TradingState.HALTED, BETA: TradingState.ACTIVE, None: TradingState.REDUCING}
    for stack, bus in buses.items():
        latch = HaltLatch(state=states[stack], revision=1, issued_at_ms=1)
        await bus.kv_put(subjects.HALT_BUCKET, subjects.HALT_KEY, latch)
        await bus.publish(subjects.candle_subject("BTCUSDT"), _candle("1" if stack else "2"))
    for stack, bus in buses.items():
        read = await bus.kv_get(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch)
        assert read is not None
        assert read.state is states[stack]
    alpha_last = await buses[ALPHA].last_message(
        subjects.MARKET, subjects.candle_subject("BTCUSDT"), Candle
    )
    local_last = await buses[None].last_message(
        subjects.MARKET, subjects.candle_subject("BTCUSDT"), Candle
    )
    assert alpha_last is not None
    assert alpha_last.close == 1
    assert local_last is not None
    assert local_last.close == 2
    assert await buses[BETA].last_message(
        subjects.MARKET, subjects.candle_subject("BTCUSDT"), Candle
    ) == _candle("1")  # beta published its own candle too


async def test_broadcasts_and_replays_stay_in_their_stack(buses: dict[str | None, Bus]) -> None:
    heard: dict[str | None, list[str]] = {stack: [] for stack in buses}
    replayed: dict[str | None, list[str]] = {stack: [] for stack in buses}
    tasks = []
    for stack, bus in buses.items():

        async def on_heartbeat(beat: ControlHeartbeat, stack: str | None = stack) -> None:
            heard[stack].append(beat.issued_by)

        async def on_candle(candle: Candle, stack: str | None = stack) -> None:
            replayed[stack].append(str(candle.close))

        tasks.append(
            asyncio.create_task(
                bus.subscribe(
                    subjects.CONTROL_HEARTBEAT, ControlHeartbeat, on_heartbeat, label="beat"
                )
            )
        )
        await bus.publish(
            subjects.candle_subject("ETHUSDT"),
            _candle("3" if stack == ALPHA else "4").model_copy(update={"symbol": "ETHUSDT"}),
        )
        tasks.append(
            asyncio.create_task(
                bus.replay(
                    subjects.MARKET,
                    subjects.candle_subject("ETHUSDT"),
                    Candle,
                    on_candle,
                    label="replay",
                )
            )
        )
    await asyncio.sleep(0.5)
    await buses[ALPHA].broadcast(
        subjects.CONTROL_HEARTBEAT,
        ControlHeartbeat(issued_by="alpha-control", latch_revision=1, ts_ms=1),
    )
    await asyncio.sleep(0.5)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert heard == {ALPHA: ["alpha-control"], BETA: [], None: []}
    assert replayed == {ALPHA: ["3"], BETA: ["4"], None: ["4"]}
