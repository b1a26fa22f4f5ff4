"""A reader of only each subject's newest message (``Bus.follow_latest``), on a real nats-server.

Execution and the portfolio follow the candles only for prices to mark by. Decoding every candle
of a backlog was a third of the portfolio's CPU and a quarter of execution's in the pipeline
benchmark; a price replaced before its turn is worth nothing to them.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable
from decimal import Decimal

import pytest
from prometheus_client import REGISTRY

from qtrader.bus.nats_bus import REPLAY_HEARTBEAT_S, Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import Candle, RejectReason
from qtrader.local.nats_server import EmbeddedNats
from qtrader_tools.candles import flat_candle
from support.hang import hang, resume
from support.streams import publish_raw

pytestmark = pytest.mark.integration

_START_MS = 1_700_000_000_000
_MINUTE_MS = 60_000


def _superseded(label: str) -> float:
    value = REGISTRY.get_sample_value("qtrader_messages_superseded_total", {"consumer": label})
    return value or 0.0


def _rejected(label: str) -> float:
    samples = (
        REGISTRY.get_sample_value(
            "qtrader_messages_rejected_total", {"consumer": label, "reason": reason.value}
        )
        for reason in RejectReason
    )
    return sum(value or 0.0 for value in samples)


def _candle(symbol: str, step: int) -> Candle:
    return flat_candle(symbol, 30_000 + step, open_time_ms=_START_MS + step * _MINUTE_MS)


async def _until(condition: Callable[[], bool], *, what: str, timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_a_slow_reader_skips_to_each_symbols_newest_candle_in_order(
    nats_server: EmbeddedNats,
) -> None:
    label = "test-latest-slow"
    bus = Bus(url=nats_server.url, client_name=label)
    await bus.connect()
    await bus.ensure_topology()
    seen: dict[str, list[int]] = defaultdict(list)

    async def slow_mark(candle: Candle) -> None:
        seen[candle.symbol].append(candle.open_time_ms)
        await asyncio.sleep(0.01)  # far slower than the candles come

    reader = asyncio.create_task(
        bus.follow_latest(
            subjects.MARKET,
            subjects.all_of(subjects.CANDLE_PREFIX),
            Candle,
            slow_mark,
            label=label,
            from_last=True,  # the first candle is read whether stored before or after
        )
    )
    symbols = ("BTCUSDT", "ETHUSDT")
    try:
        # Once the first candle is handled, the reader follows the stream.
        await bus.publish(subjects.candle_subject("BTCUSDT"), _candle("BTCUSDT", 0))
        await _until(lambda: bool(seen["BTCUSDT"]), what="the first candle")
        superseded_before = _superseded(label)
        steps = range(1, 401)
        for step in steps:
            await bus.publish_many(
                [(subjects.candle_subject(symbol), _candle(symbol, step)) for symbol in symbols]
            )
        last_ms = _START_MS + steps[-1] * _MINUTE_MS
        await _until(
            lambda: all(seen[symbol] and seen[symbol][-1] == last_ms for symbol in symbols),
            what="each symbol's last candle",
        )
        await asyncio.sleep(0.3)  # anything still to come would come now
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await bus.close()

    published = len(steps) * len(symbols)
    handled = sum(len(seen[symbol]) for symbol in symbols) - 1  # less the first candle
    for symbol in symbols:
        times = seen[symbol]
        assert times == sorted(set(times)), f"{symbol}: a candle came twice or out of order"
        assert times[-1] == last_ms
    assert handled < published / 2, f"{handled} of {published} candles read: none skipped"
    # Every candle is either read or counted as replaced by a newer one: none lost unaccounted.
    assert handled + (_superseded(label) - superseded_before) == published


async def test_candles_of_different_symbols_never_replace_each_other(
    nats_server: EmbeddedNats,
) -> None:
    label = "test-latest-symbols"
    bus = Bus(url=nats_server.url, client_name=label)
    await bus.connect()
    await bus.ensure_topology()
    symbols = [f"SYM{index}USDT" for index in range(16)]
    marks: dict[str, Decimal] = {}
    gate = asyncio.Event()

    async def mark(candle: Candle) -> None:
        marks[candle.symbol] = candle.close
        await gate.wait()  # the first one holds the reader while the step is stored

    reader = asyncio.create_task(
        bus.follow_latest(
            subjects.MARKET,
            subjects.all_of(subjects.CANDLE_PREFIX),
            Candle,
            mark,
            label=label,
            from_last=True,  # the first candle is read whether stored before or after
        )
    )
    try:
        await bus.publish(subjects.candle_subject("BTCUSDT"), _candle("BTCUSDT", 0))
        await _until(lambda: "BTCUSDT" in marks, what="the first candle")
        superseded_before = _superseded(label)
        await bus.publish_many(
            [(subjects.candle_subject(symbol), _candle(symbol, 1)) for symbol in symbols]
        )
        await asyncio.sleep(0.3)  # the step is delivered and set aside while the reader waits
        gate.set()
        await _until(lambda: all(symbol in marks for symbol in symbols), what="every symbol")
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await bus.close()
    assert {marks[symbol] for symbol in symbols} == {Decimal(30_001)}
    assert _superseded(label) == superseded_before


async def test_a_newest_candle_that_does_not_decode_is_refused_and_the_reader_goes_on(
    nats_server: EmbeddedNats,
) -> None:
    label = "test-latest-poison"
    bus = Bus(url=nats_server.url, client_name=label)
    await bus.connect()
    await bus.ensure_topology()
    seen: list[int] = []
    held = asyncio.Event()
    gate = asyncio.Event()

    async def mark(candle: Candle) -> None:
        seen.append(candle.open_time_ms)
        if len(seen) == 1:
            held.set()
            await gate.wait()

    reader = asyncio.create_task(
        bus.follow_latest(
            subjects.MARKET,
            subjects.all_of(subjects.CANDLE_PREFIX),
            Candle,
            mark,
            label=label,
            from_last=True,  # the first candle is read whether stored before or after
        )
    )
    subject = subjects.candle_subject("BTCUSDT")
    try:
        await bus.publish(subject, _candle("BTCUSDT", 0))
        await _until(held.is_set, what="the first candle")
        rejected_before, superseded_before = _rejected(label), _superseded(label)
        # While the reader is busy: a good candle, then one that is not JSON on the same symbol.
        await bus.publish(subject, _candle("BTCUSDT", 1))
        await publish_raw(nats_server.url, subject, b"{not json", msg_id="latest-poison")
        await asyncio.sleep(0.3)
        gate.set()
        await _until(lambda: _rejected(label) > rejected_before, what="the refusal")
        await bus.publish(subject, _candle("BTCUSDT", 2))
        await _until(lambda: len(seen) == 2, what="the next good candle")
        await asyncio.sleep(0.3)
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await bus.close()
    # The good candle the bad one replaced was never read; the next good one was.
    assert seen == [_START_MS, _START_MS + 2 * _MINUTE_MS]
    assert _rejected(label) - rejected_before == 1
    assert _superseded(label) - superseded_before == 1


# Two missed heartbeats, a check's period more, and the reconnect (as for a replay).
RESUMED_WITHIN_S = 4 * REPLAY_HEARTBEAT_S + 3


@pytest.mark.parametrize("fault", ["restart", "hang"])
async def test_the_newest_candle_is_read_soon_after_the_broker_comes_back(
    nats_server: EmbeddedNats, fault: str
) -> None:
    """A restarted broker forgot the reader's consumer; a hung one (SIGSTOP, 6 s) made the
    client reconnect. Either way a price stored afterwards is read within the replay's bound,
    and nothing stored before it comes back."""
    label = f"test-latest-{fault}"
    bus = Bus(url=nats_server.url, client_name=label)
    await bus.connect()
    await bus.ensure_topology()
    seen: list[int] = []

    async def mark(candle: Candle) -> None:
        seen.append(candle.open_time_ms)

    reader = asyncio.create_task(
        bus.follow_latest(
            subjects.MARKET,
            subjects.all_of(subjects.CANDLE_PREFIX),
            Candle,
            mark,
            label=label,
        )
    )
    subject = subjects.candle_subject("BTCUSDT")
    try:
        await bus.publish(subject, _candle("BTCUSDT", 0))
        await _until(lambda: seen == [_START_MS], what="the first candle")
        if fault == "restart":
            await asyncio.to_thread(nats_server.stop)
            await asyncio.to_thread(nats_server.start)
        else:
            pid = nats_server.pid
            assert pid is not None
            hang(pid)
            await asyncio.sleep(6)
            resume(pid)
        await _until(lambda: bus.connected, what="the bus connected", timeout_s=15)
        await bus.publish(subject, _candle("BTCUSDT", 1))
        published = time.monotonic()
        await _until(
            lambda: len(seen) == 2, what="the candle stored after", timeout_s=RESUMED_WITHIN_S
        )
        print(f"\n{fault}: read {time.monotonic() - published:.1f} s after its publish")
        await asyncio.sleep(0.5)  # a candle read twice would come now
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await bus.close()
    assert seen == [_START_MS, _START_MS + _MINUTE_MS]
