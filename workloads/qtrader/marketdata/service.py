"""The marketdata role: publishes closed candles from a replay, the synthetic market or Binance.

A replayed or synthetic step (every symbol's candle of one open time) goes to
``qtrader.market.candle.step`` as one ``Pack`` (its ``Nats-Msg-Id`` made of the candles' ids), so
the broker and every reader handle one message per step, not one per symbol; a live kline goes
alone, as it comes, to ``qtrader.market.candle.<SYMBOL>`` with ``Nats-Msg-Id`` = its symbol,
interval and open time. While NATS is unreachable the feed waits and retries the candles not
taken (it never skips one); with the disk outbox (#5) the candles wait there instead.

A restart continues the market the stream holds (``resume``): once the outbox has sent what a
previous run left in it, the last stored candle of each symbol is read, and the feed starts
right after it. A replay goes on at the next row of its files; the synthetic market rebuilds its
seeded path and continues it, so a restart changes no candle; the live feed drops klines already
stored. So no stored candle is published again. A publish that the stream still answers as a
duplicate (its ``Nats-Msg-Id`` was stored already) is not counted as published and is logged;
``qtrader_candles_duplicate_total`` counts those. Consumers that take prices follow the stream,
not the subject, so they see only what the stream stored.

The health dependency ``feed`` is CRITICAL when no candle has been published for longer than the
stale threshold while the source should be producing, and DEGRADED once a replay has ended.
Before the first candle it is DEGRADED while an earlier run's candles wait in the outbox, and
CRITICAL while the stored candles cannot be read (nothing is published before they are).
``max_candles`` counts the steps of this run, not of the market.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge

from qtrader.bus.errors import BusUnavailable
from qtrader.bus.outbox_publisher import StreamAck
from qtrader.contracts import subjects
from qtrader.contracts.messages import MAX_PACK_ITEMS, Candle, Pack
from qtrader.health.contract import DependencyHealth, Status
from qtrader.instruments import paper_exchange_info
from qtrader.marketdata.csv_replay import infer_symbol_interval, merge_replays, read_klines
from qtrader.marketdata.resume import (
    StoredSpan,
    after_stored,
    is_after_stored,
    read_stored,
    synthetic_continuation,
)
from qtrader.marketdata.synthetic import INTERVAL_MS, Regime, SyntheticConfig
from qtrader.runtime import Task, WorkerContext

if TYPE_CHECKING:  # imported when the live source runs: it loads python-binance
    from qtrader.marketdata.live import BinanceKlineFeed

log = logging.getLogger(__name__)

CANDLES_PUBLISHED = Counter(
    "qtrader_candles_published_total",
    "Closed candles published: stored by the stream, or held in the outbox for it.",
    ["symbol"],
)
CANDLES_DUPLICATE = Counter(
    "qtrader_candles_duplicate_total",
    "Candles the stream answered as duplicates (stored before): nothing new was stored.",
    ["symbol"],
)
KLINES_BACKFILLED = Counter(
    "qtrader_market_data_backfilled_total",
    "Live klines the stream missed (a disconnect, the 24 h cut-off, a restart), fetched over REST.",
    ["symbol"],
)
KLINES_UNFILLED = Counter(
    "qtrader_market_data_unfilled_klines_total",
    "Live klines missing for good: neither the stream nor REST gave them.",
    ["symbol"],
)
GAP_DEGRADES_S = 3600.0  # an unfilled gap keeps the feed DEGRADED this long
LAST_CANDLE_AGE = Gauge(
    "qtrader_market_data_last_candle_age_seconds",
    "Seconds since the last candle of the symbol was published (absent until the feed starts).",
    ["symbol"],
)


class Source(enum.StrEnum):
    SYNTHETIC = "synthetic"
    REPLAY = "replay"
    LIVE = "live"


@dataclass(frozen=True, kw_only=True)
class MarketDataConfig:
    source: Source = Source.SYNTHETIC
    replay_files: tuple[Path, ...] = ()
    regime: Regime = Regime.MIXED
    seed: int = 7
    interval: str = "1m"
    start_price: Decimal = Decimal(100)
    candles_per_second: float = 5.0  # pacing of replay/synthetic steps; 0 means unpaced
    max_candles: int = 0  # stop producing after this many steps per symbol; 0 means never
    stale_after_s: float = 10.0  # no candle for this long past when one is due: CRITICAL
    testnet: bool = False
    # Live: another venue with Binance's API (the local simulator); None: Binance, by testnet.
    rest_url: str | None = None
    stream_url: str | None = None
    # Live: closed klines fetched for a symbol the stream holds none of, before its first live
    # candle (0: none); inference makes no signal of them (CandleSource.WARMUP).
    warmup_candles: int = 0

    @property
    def stale_limit_s(self) -> float:
        """How long without a candle means the feed is stale. A live kline closes once per
        interval, so a live feed is quiet for an interval between candles by design (a 1 m
        feed judged on 10 s alone would be CRITICAL, and unready, most of every minute)."""
        if self.source is Source.LIVE:
            return INTERVAL_MS[self.interval] / 1000 + self.stale_after_s
        return self.stale_after_s


class MarketData:
    def __init__(self, context: WorkerContext, config: MarketDataConfig) -> None:
        self._context = context
        self._config = config
        self._last_published = time.monotonic()
        self._symbol_published: dict[str, float] = {}
        self._published = 0
        self._duplicates = 0
        self._finished = False
        # Why the feed has not started from its resume point yet, and how bad that is.
        self._resume_wait: DependencyHealth | None = None
        self._live: BinanceKlineFeed | None = None
        context.monitor.add_check("feed", self.check)

    def tasks(self) -> dict[str, Task]:
        return {"feed": self._feed()}

    async def _feed(self) -> None:
        policy = await self._context.policy.wait()
        symbols = policy.spec.symbols
        log.info("market data source %s for %s", self._config.source.value, ", ".join(symbols))
        spans = await self._stored(symbols)
        self._last_published = time.monotonic()
        for symbol in symbols:
            self._mark_published(symbol)
        async for step in self._steps(symbols, spans):
            await self._publish(step)
        self._finished = True
        log.info("market data source ended after %d candles", self._published)
        await asyncio.Event().wait()  # stay up and report the end in /health

    async def _stored(self, symbols: tuple[str, ...]) -> dict[str, StoredSpan]:
        """What the stream stores of each symbol, read once the outbox is empty (what a previous
        run left there is part of the market already made)."""
        while True:
            depth = self._context.bus.outbox_depth()
            try:
                if not depth:
                    spans = await read_stored(self._context.bus, symbols)
                    break
                self._waiting(Status.DEGRADED, f"{depth} candles of an earlier run in the outbox")
            except BusUnavailable as exc:
                self._waiting(Status.CRITICAL, f"cannot tell where to resume: {exc}")
            await asyncio.sleep(0.5)
        self._resume_wait = None
        for symbol, span in spans.items():
            log.info(
                "resuming %s after its stored candle of %d (close %s)",
                symbol,
                span.last.open_time_ms,
                span.last.close,
            )
        return spans

    def _waiting(self, status: Status, why: str) -> None:
        if self._resume_wait is None or self._resume_wait.status is not status:
            log.warning("not resuming yet: %s", why)
        self._resume_wait = DependencyHealth(name="feed", status=status, detail=why)

    async def _steps(
        self, symbols: tuple[str, ...], spans: dict[str, StoredSpan]
    ) -> AsyncIterator[list[Candle]]:
        """The candles to publish, in groups published together: a replayed or synthetic step
        (every symbol's candle of one open time), or a live kline as it comes."""
        if self._config.source is Source.LIVE:
            async for candle in self._live_candles(symbols, spans):
                yield [candle]
            return
        historical = after_stored(await self._historical(symbols, spans), spans)
        async for step in self._paced(historical):
            yield step

    async def _live_candles(
        self, symbols: tuple[str, ...], spans: dict[str, StoredSpan]
    ) -> AsyncIterator[Candle]:
        """The venue's closed klines, each after the last stored one of its symbol: what the
        stream missed since (this run's start included) is fetched over REST first."""
        from qtrader.marketdata.live import BinanceKlineFeed

        feed = self._live = BinanceKlineFeed(
            symbols=symbols,
            interval=self._config.interval,
            testnet=self._config.testnet,
            last_open_ms={symbol: span.last.open_time_ms for symbol, span in spans.items()},
            warmup_klines=self._config.warmup_candles,
            rest_url=self._config.rest_url,
            stream_url=self._config.stream_url,
        )
        counted = (0, 0)
        live_candles = feed.candles()
        try:
            async for candle in live_candles:
                counted = _count_feed(feed, counted, candle.symbol)
                if is_after_stored(candle, spans):
                    yield candle
        finally:
            await live_candles.aclose()

    async def _historical(
        self, symbols: tuple[str, ...], spans: dict[str, StoredSpan]
    ) -> Iterator[Candle]:
        if self._config.source is Source.REPLAY:
            replays = []
            for path in self._config.replay_files:
                symbol, interval = infer_symbol_interval(path)
                replays.append(read_klines(path, symbol=symbol, interval=interval))
            return merge_replays(replays)
        interval_ms = INTERVAL_MS[self._config.interval]
        config = SyntheticConfig(
            symbols=symbols,
            seed=self._config.seed,
            regime=self._config.regime,
            interval=self._config.interval,
            start_ms=int(time.time() * 1000) // interval_ms * interval_ms,  # when nothing stored
            start_price=self._config.start_price,
        )
        # Rebuilding the stored path draws every step since the run began: not on the loop.
        return await asyncio.to_thread(synthetic_continuation, config, paper_exchange_info(), spans)

    async def _paced(self, candles: Iterator[Candle]) -> AsyncIterator[list[Candle]]:
        """One step (a candle of every symbol with the same open time) per pacing period."""
        period = 1 / self._config.candles_per_second if self._config.candles_per_second else 0
        by_open_time = itertools.groupby(candles, key=lambda candle: candle.open_time_ms)
        for steps, (_, step) in enumerate(by_open_time, start=1):
            if steps > 1:
                await asyncio.sleep(period)
            yield list(step)
            if self._config.max_candles and steps >= self._config.max_candles:
                return

    async def _publish(self, candles: list[Candle]) -> None:
        """Publish a step as packs (a live kline alone); retry what the stream did not take, in
        its order."""
        parts = _wire_parts(candles)
        while parts:
            results = await self._context.bus.publish_many(parts)
            left: list[tuple[str, Candle | Pack[Candle]]] = []
            failure: BusUnavailable | None = None
            for part, result in zip(parts, results, strict=True):
                if isinstance(result, BusUnavailable):
                    left.append(part)
                    failure = failure or result
                    continue
                for candle in _carried(part[1]):
                    self._count(candle, result)
            if failure is not None:
                log.warning("candle %s not published yet: %s", left[0][1].dedup_id, failure)
                await asyncio.sleep(0.5)
            parts = left

    def _count(self, candle: Candle, ack: StreamAck | None) -> None:
        """A candle the stream took (None: kept in the outbox for it)."""
        if ack is not None and ack.duplicate:
            # Stored before: by another replica, or a resume that missed it. Not a new candle.
            self._duplicates += 1
            CANDLES_DUPLICATE.labels(candle.symbol).inc()
            log.warning("the stream already stores %s: not counted as published", candle.dedup_id)
            return
        self._published += 1
        self._last_published = time.monotonic()
        self._mark_published(candle.symbol)
        CANDLES_PUBLISHED.labels(candle.symbol).inc()

    def _recent_gaps(self) -> str:
        """The live klines missing for good found in the last hour, said; empty if none."""
        feed = self._live
        if feed is None:
            return ""
        since = time.monotonic() - GAP_DEGRADES_S
        recent = [g for g in feed.unfilled_gaps if g.seen_at >= since]
        return "; ".join(
            f"{g.symbol} klines {g.first_open_ms}..{g.last_open_ms} missing for good ({g.reason})"
            for g in recent[-3:]
        )

    def _mark_published(self, symbol: str) -> None:
        """Restart the symbol's age; the gauge reads it at scrape time, so one symbol's feed
        stalling shows even while the others still publish."""
        if symbol not in self._symbol_published:
            LAST_CANDLE_AGE.labels(symbol).set_function(
                lambda: time.monotonic() - self._symbol_published[symbol]
            )
        self._symbol_published[symbol] = time.monotonic()

    async def check(self) -> DependencyHealth:
        age = time.monotonic() - self._last_published
        if self._finished:
            return DependencyHealth(
                name="feed",
                status=Status.DEGRADED,
                detail=f"{self._config.source.value} ended after {self._published} candles",
            )
        if self._context.policy.current is None:
            return DependencyHealth(
                name="feed", status=Status.DEGRADED, detail="waiting for policy"
            )
        if self._resume_wait is not None:
            return self._resume_wait
        status = Status.CRITICAL if age > self._config.stale_limit_s else Status.OK
        gaps = self._recent_gaps()
        if gaps and status is Status.OK:
            return DependencyHealth(name="feed", status=Status.DEGRADED, detail=gaps)
        duplicates = f", {self._duplicates} duplicates not counted" if self._duplicates else ""
        return DependencyHealth(
            name="feed",
            status=status,
            detail=f"{self._config.source.value}: {self._published} candles{duplicates}, "
            f"last {age:.1f}s ago",
        )


def _count_feed(feed: BinanceKlineFeed, counted: tuple[int, int], symbol: str) -> tuple[int, int]:
    """Add what the feed backfilled and found missing since ``counted`` to the metrics."""
    backfilled, gaps = counted
    if feed.backfilled > backfilled:
        KLINES_BACKFILLED.labels(symbol).inc(feed.backfilled - backfilled)
    for gap in feed.unfilled_gaps[gaps:]:
        KLINES_UNFILLED.labels(gap.symbol).inc(gap.klines)
    return feed.backfilled, len(feed.unfilled_gaps)


def _wire_parts(candles: list[Candle]) -> list[tuple[str, Candle | Pack[Candle]]]:
    """How a step travels: packs of at most ``MAX_PACK_ITEMS`` candles on the step subject, a
    lone candle (a live kline) on its symbol's subject."""
    if len(candles) == 1:
        return [(subjects.candle_subject(candles[0].symbol), candles[0])]
    return [
        (subjects.CANDLE_STEP, Pack(tuple(candles[start : start + MAX_PACK_ITEMS])))
        for start in range(0, len(candles), MAX_PACK_ITEMS)
    ]


def _carried(sent: Candle | Pack[Candle]) -> tuple[Candle, ...]:
    return sent.items if isinstance(sent, Pack) else (sent,)
