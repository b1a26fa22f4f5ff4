"""The live market data feed, as it runs: a real ``qtrader marketdata --source live`` process on
the local Binance-compatible server's kline streams (python-binance pointed at it by URL) and a
real nats-server. The server's clock is moved through its admin API, so klines close without
waiting a minute each.

The verdict is the MARKET stream against the venue's own klines (``GET /fapi/v1/klines``):
every minute from the first candle to the last, each once, each equal to the venue's, through
a websocket outage (connections cut and refused while klines close), the venue's connection
cut-off (Binance's 24 h, here 4 minutes of its clock), a SIGKILL and restart of the worker, and
a backfill that REST cannot serve (an unfilled gap: counted, DEGRADED, said). And the warm-up of
a fresh stream: the venue's last closed klines first, which fill a real inference worker's
window without making a signal, so it decides from the first live candle.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import Candle, CandleSource, Signal, TradingState
from qtrader.contracts.policy import parse_policy
from qtrader.local.control import publish_policy, write_latch
from qtrader.local.nats_server import EmbeddedNats
from qtrader_tools.simulators.binance_futures import SimAdmin, SimConfig
from support.binance_sim import KEY, SECRET, sim_in_thread
from support.streams import read_all
from support.workers import Worker, eventually, start_worker

pytestmark = pytest.mark.integration

MINUTE_MS = 60_000
SYMBOL = "BTCUSDT"


@pytest.fixture
def venue() -> Iterator[tuple[str, SimAdmin]]:
    # Binance's 24 h cut-off, at 4 minutes of the venue's clock: the tests cross it twice.
    config = SimConfig(
        api_keys={KEY: SECRET},
        kline_push_ms=20,
        prices={SYMBOL: Decimal(100)},
        ws_max_age_ms=4 * MINUTE_MS,
    )
    with sim_in_thread(config) as url, SimAdmin(url) as admin:
        now = _venue_now(url)
        admin.clock(advance_ms=MINUTE_MS - now % MINUTE_MS + 1000)  # 1 s into a minute
        yield url, admin


@pytest.fixture
async def control(nats_server: EmbeddedNats) -> AsyncIterator[Bus]:
    bus = Bus(url=nats_server.url, client_name="test-live-market")
    await bus.connect()
    await bus.ensure_topology()
    policy = {"metadata": {"name": "live-feed"}, "spec": {"symbols": [SYMBOL]}}
    document = {"apiVersion": "qtrader.dev/v1alpha1", "kind": "TradingPolicy", **policy}
    await publish_policy(bus, parse_policy(document))
    await write_latch(bus, state=TradingState.ACTIVE, reason="test", issued_by="test")
    try:
        yield bus
    finally:
        await bus.close()


def _marketdata(url: str, venue_url: str, log_dir: Path, *, warmup: int = 0) -> Worker:
    args = ("--source", "live", "--market-url", venue_url, "--interval", "1m")
    args += ("--warmup-candles", str(warmup))
    return start_worker("marketdata", nats_url=url, log_dir=log_dir, args=args)


async def _stored(url: str) -> list[Candle]:
    return await read_all(
        url,
        stream=subjects.MARKET.name,
        subject=subjects.candle_subject(SYMBOL),
        message_type=Candle,
    )


def _venue_klines(venue_url: str, start_ms: int, end_ms: int) -> dict[int, list[str]]:
    response = httpx.get(
        f"{venue_url}/fapi/v1/klines",
        params={"symbol": SYMBOL, "interval": "1m", "startTime": start_ms, "endTime": end_ms},
    )
    response.raise_for_status()
    return {int(row[0]): row for row in response.json()}


async def _minutes(admin: SimAdmin, count: int) -> None:
    """``count`` klines close on the venue's clock, each at a price of its own, a little apart
    (the feed reads each)."""
    for _ in range(count):
        minute = admin.clock(advance_ms=MINUTE_MS) // MINUTE_MS
        admin.price(SYMBOL, Decimal(100) + Decimal(minute % 17) / 10)
        await asyncio.sleep(0.3)


def _history(admin: SimAdmin, count: int) -> None:
    """``count`` klines close on the venue, each at a price of its own, before anything runs."""
    for minute in range(count):
        admin.clock(advance_ms=MINUTE_MS)
        admin.price(SYMBOL, Decimal(100) + Decimal(minute % 13) / 10)


def _venue_now(venue_url: str) -> int:
    return int(httpx.get(f"{venue_url}/fapi/v1/time").json()["serverTime"])


async def _connected(
    admin: SimAdmin, worker: Worker, what: str, *, timeout_s: float, since_ms: int = 0
) -> None:
    """A socket opened at ``since_ms`` or later (one the venue just cut may still be listed a
    moment), and subscribed: a socket gets the klines that close after the venue's first push
    to it (every 20 ms here). python-binance waits 1 to 2^n s before its n-th reconnect."""
    since = since_ms
    await eventually(
        lambda: any(c["opened_ms"] >= since for c in admin.websockets()["connections"]),
        timeout_s=timeout_s,
        what=what,
        worker=worker,
    )
    await asyncio.sleep(0.3)


async def _until_stored(url: str, count: int, worker: Worker) -> list[Candle]:
    found: list[Candle] = []

    async def enough() -> bool:
        found[:] = await _stored(url)
        return len(found) >= count

    await eventually(enough, timeout_s=30, what=f"{count} candles stored", worker=worker)
    return found


def _check_against_venue(candles: list[Candle], venue_url: str) -> None:
    opens = [c.open_time_ms for c in candles]
    assert len(opens) == len(set(opens)), "a candle stored twice"
    assert opens == list(range(opens[0], opens[-1] + MINUTE_MS, MINUTE_MS)), "a minute missing"
    klines = _venue_klines(venue_url, opens[0], opens[-1])
    for candle in candles:
        row = klines[candle.open_time_ms]
        assert (candle.open, candle.high, candle.low, candle.close, candle.volume) == tuple(
            Decimal(v) for v in row[1:6]
        ), (candle, row)


async def test_the_live_feed_fills_what_an_outage_and_a_restart_missed_each_minute_once(
    nats_server: EmbeddedNats, control: Bus, venue: tuple[str, SimAdmin], tmp_path: Path
) -> None:
    url = nats_server.url
    venue_url, admin = venue
    worker = _marketdata(url, venue_url, tmp_path)
    try:
        await _connected(admin, worker, "the socket", timeout_s=20)
        await _minutes(admin, 3)
        await _until_stored(url, 3, worker)

        # An outage: every socket cut, new ones refused, while three klines close.
        admin.drop_websockets(refuse=True)
        await _minutes(admin, 3)
        ended_ms = _venue_now(venue_url)  # nothing connects before the outage ends
        admin.drop_websockets(refuse=False)
        await _connected(admin, worker, "a new socket", timeout_s=45, since_ms=ended_ms)
        await _minutes(admin, 1)
        await _until_stored(url, 7, worker)
        assert worker.metric("qtrader_market_data_backfilled_total", symbol=SYMBOL) >= 3

        # A SIGKILL: two klines close while no worker runs; the next one starts from the stream.
        worker.stop(kill=True)
        await _minutes(admin, 2)
        restarted_ms = _venue_now(venue_url)
        worker = _marketdata(url, venue_url, tmp_path)
        await _connected(admin, worker, "the socket", timeout_s=20, since_ms=restarted_ms)
        await _minutes(admin, 1)
        await _until_stored(url, 10, worker)
        assert worker.metric("qtrader_market_data_backfilled_total", symbol=SYMBOL) == 2

        # The venue's cut-off: four klines close at once and the connection, now older than
        # the venue allows, is closed; python-binance reconnects by itself.
        cut_ms = _venue_now(venue_url)
        admin.clock(advance_ms=4 * MINUTE_MS)
        await _connected(admin, worker, "a socket after the cut-off", timeout_s=45, since_ms=cut_ms)
        await _minutes(admin, 1)
        stored = await _until_stored(url, 15, worker)
        _check_against_venue(stored, venue_url)
        assert worker.dependency("feed")["status"] == "OK", worker.health()
    finally:
        worker.stop()


async def test_a_gap_rest_cannot_fill_is_counted_said_and_the_feed_goes_on(
    nats_server: EmbeddedNats, control: Bus, venue: tuple[str, SimAdmin], tmp_path: Path
) -> None:
    url = nats_server.url
    venue_url, admin = venue
    worker = _marketdata(url, venue_url, tmp_path)
    try:
        await _connected(admin, worker, "the socket", timeout_s=20)
        await _minutes(admin, 2)
        await _until_stored(url, 2, worker)
        admin.drop_websockets(refuse=True)
        await _minutes(admin, 2)
        admin.faults([{"route": "GET /fapi/v1/klines", "kind": "unavailable_503", "next": 3}])
        ended_ms = _venue_now(venue_url)  # nothing connects before the outage ends
        admin.drop_websockets(refuse=False)
        await _connected(admin, worker, "a new socket", timeout_s=45, since_ms=ended_ms)
        await _minutes(admin, 1)
        stored = await _until_stored(url, 3, worker)
        await eventually(
            lambda: worker.metric("qtrader_market_data_unfilled_klines_total", symbol=SYMBOL) == 2,
            timeout_s=15,
            what="the two klines counted as missing",
            worker=worker,
        )
        feed = worker.dependency("feed")
        assert feed["status"] == "DEGRADED", feed
        assert "missing for good" in str(feed["detail"]), feed
        assert "503" in str(feed["detail"]), feed
        opens = [c.open_time_ms for c in stored]
        assert opens[-1] - opens[-2] == 3 * MINUTE_MS  # the gap, and nothing in it invented
        await _minutes(admin, 1)  # and the feed goes on
        await _until_stored(url, 4, worker)
    finally:
        worker.stop()


async def _signals(url: str) -> list[Signal]:
    return await read_all(
        url,
        stream=subjects.SIGNALS.name,
        subject=subjects.signal_subject(SYMBOL),
        message_type=Signal,
    )


async def test_a_fresh_stream_is_warmed_up_and_inference_decides_from_the_first_live_candle(
    nats_server: EmbeddedNats, control: Bus, venue: tuple[str, SimAdmin], tmp_path: Path
) -> None:
    url = nats_server.url
    venue_url, admin = venue
    _history(admin, 40)
    forming_ms = _venue_now(venue_url) // MINUTE_MS * MINUTE_MS
    inference = start_worker("inference", nats_url=url, log_dir=tmp_path)
    worker = _marketdata(url, venue_url, tmp_path, warmup=32)
    try:
        await _connected(admin, worker, "the socket", timeout_s=20)
        warm = await _until_stored(url, 32, worker)
        # The last 32 closed klines, before any closes live, each once and equal to the venue's.
        assert warm[-1].open_time_ms == forming_ms - MINUTE_MS
        assert len(warm) == 32
        assert {c.source for c in warm} == {CandleSource.WARMUP}
        _check_against_venue(warm, venue_url)

        await _minutes(admin, 1)
        stored = await _until_stored(url, 33, worker)
        assert stored[-1].source is CandleSource.LIVE
        _check_against_venue(stored, venue_url)
        found: list[Signal] = []

        async def signalled() -> bool:
            found[:] = await _signals(url)
            return bool(found)

        await eventually(signalled, timeout_s=30, what="a signal", worker=inference)
        await asyncio.sleep(1.0)  # a signal of a warm-up candle would be here by now
        # Only the live candle: the window was full at once, and no old candle was traded on.
        assert [s.candle_open_time_ms for s in await _signals(url)] == [stored[-1].open_time_ms]
    finally:
        worker.stop()
        inference.stop()


async def test_klines_that_come_late_make_signals_as_old_as_they_are_and_none_is_traded(
    nats_server: EmbeddedNats, control: Bus, tmp_path: Path
) -> None:
    # The venue's clock 45 minutes behind ours: by our clock, every kline closed minutes ago
    # when it arrives, the three the feed fetches over REST after an outage and the live one
    # that made it fetch them. Their signals must say so (stamped at the kline's close), and
    # execution must refuse each as expired (the policy's 30 s signal TTL), not trade minutes-old
    # prices as news. (Before: stamped when inference made them, so they looked fresh.)
    url = nats_server.url
    config = SimConfig(
        api_keys={KEY: SECRET},
        kline_push_ms=20,
        prices={SYMBOL: Decimal(100)},
        start_skew_ms=-45 * MINUTE_MS,
    )
    with sim_in_thread(config) as venue_url, SimAdmin(venue_url) as admin:
        admin.clock(advance_ms=MINUTE_MS - _venue_now(venue_url) % MINUTE_MS + 1000)
        _history(admin, 34)
        execution = start_worker("execution", nats_url=url, log_dir=tmp_path)
        inference = start_worker("inference", nats_url=url, log_dir=tmp_path)
        worker = _marketdata(url, venue_url, tmp_path, warmup=32)
        try:
            await _connected(admin, worker, "the socket", timeout_s=20)
            await _until_stored(url, 32, worker)
            admin.drop_websockets(refuse=True)
            await _minutes(admin, 3)
            ended_ms = _venue_now(venue_url)
            admin.drop_websockets(refuse=False)
            await _connected(admin, worker, "a new socket", timeout_s=45, since_ms=ended_ms)
            await _minutes(admin, 1)
            stored = await _until_stored(url, 36, worker)
            late = {c.open_time_ms: c for c in stored[32:]}
            assert {c.source for c in late.values()} == {CandleSource.LIVE}
            assert worker.metric("qtrader_market_data_backfilled_total", symbol=SYMBOL) == 3

            found: list[Signal] = []

            async def signalled() -> bool:
                found[:] = await _signals(url)
                return len(found) == 4

            await eventually(signalled, timeout_s=30, what="4 signals", worker=inference)
            now_ms = int(time.time() * 1000)
            for signal in found:
                candle = late[signal.candle_open_time_ms]
                assert signal.created_at_ms == candle.close_time_ms + 1, (signal, candle)
                assert now_ms - signal.created_at_ms > 5 * MINUTE_MS

            def refused() -> float:
                return execution.metric(
                    "qtrader_signals_dropped_total", reason="expired"
                ) + execution.metric("qtrader_signals_denied_total", reason="signal_expired")

            await eventually(
                lambda: refused() == 4, timeout_s=30, what="4 expired", worker=execution
            )
            await asyncio.sleep(1.0)  # an intent would be out by now
            assert execution.metric("qtrader_order_intents_total", side="BUY") == 0
            assert execution.metric("qtrader_order_intents_total", side="SELL") == 0
            assert refused() == 4
        finally:
            for process in (worker, inference, execution):
                process.stop()
