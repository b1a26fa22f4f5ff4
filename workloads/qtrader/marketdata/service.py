"""The marketdata role: publishes closed candles from a replay, the synthetic market or Binance.

Every candle goes to ``qtrader.market.candle.<SYMBOL>`` with ``Nats-Msg-Id`` = its symbol,
interval and open time, so a restarted replay cannot put the same candle in the stream twice
within the duplicate window. While NATS is unreachable the feed waits and retries the same
candle (it never skips one); the disk outbox of #5 replaces that wait.

The health dependency ``feed`` is CRITICAL when no candle has been published for longer than the
stale threshold while the source should be producing, and DEGRADED once a replay has ended.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from prometheus_client import Counter, Gauge

from qtrader.bus.errors import BusUnavailable
from qtrader.contracts import subjects
from qtrader.contracts.messages import Candle
from qtrader.health.contract import DependencyHealth, Status
from qtrader.instruments import paper_exchange_info
from qtrader.marketdata.csv_replay import infer_symbol_interval, merge_replays, read_klines
from qtrader.marketdata.synthetic import INTERVAL_MS, Regime, SyntheticConfig, SyntheticMarket
from qtrader.runtime import Task, WorkerContext

log = logging.getLogger(__name__)

CANDLES_PUBLISHED = Counter(
    "qtrader_candles_published_total", "Closed candles published.", ["symbol"]
)
LAST_CANDLE_AGE = Gauge(
    "qtrader_market_data_last_candle_age_seconds",
    "Seconds since the last candle was published (wall clock).",
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
    stale_after_s: float = 10.0  # no candle for this long while producing: CRITICAL
    testnet: bool = False


class MarketData:
    def __init__(self, context: WorkerContext, config: MarketDataConfig) -> None:
        self._context = context
        self._config = config
        self._last_published = time.monotonic()
        self._published = 0
        self._finished = False
        LAST_CANDLE_AGE.set_function(lambda: time.monotonic() - self._last_published)
        context.monitor.add_check("feed", self.check)

    def tasks(self) -> dict[str, Task]:
        return {"feed": self._feed()}

    async def _feed(self) -> None:
        policy = await self._context.policy.wait()
        symbols = policy.spec.symbols
        log.info("market data source %s for %s", self._config.source.value, ", ".join(symbols))
        self._last_published = time.monotonic()
        async for candle in self._candles(symbols):
            await self._publish(candle)
        self._finished = True
        log.info("market data source ended after %d candles", self._published)
        await asyncio.Event().wait()  # stay up and report the end in /health

    async def _candles(self, symbols: tuple[str, ...]) -> AsyncIterator[Candle]:
        if self._config.source is Source.LIVE:
            from qtrader.marketdata.live import BinanceKlineFeed

            feed = BinanceKlineFeed(
                symbols=symbols, interval=self._config.interval, testnet=self._config.testnet
            )
            live_candles = feed.candles()
            try:
                async for candle in live_candles:
                    yield candle
            finally:
                await live_candles.aclose()
            return
        async for candle in self._paced(self._historical(symbols)):
            yield candle

    def _historical(self, symbols: tuple[str, ...]) -> Iterator[Candle]:
        if self._config.source is Source.REPLAY:
            replays = []
            for path in self._config.replay_files:
                symbol, interval = infer_symbol_interval(path)
                replays.append(read_klines(path, symbol=symbol, interval=interval))
            return merge_replays(replays)
        interval_ms = INTERVAL_MS[self._config.interval]
        market = SyntheticMarket(
            SyntheticConfig(
                symbols=symbols,
                seed=self._config.seed,
                regime=self._config.regime,
                interval=self._config.interval,
                start_ms=int(time.time() * 1000) // interval_ms * interval_ms,
                start_price=self._config.start_price,
            ),
            paper_exchange_info(),
        )
        return market.candles()

    async def _paced(self, candles: Iterator[Candle]) -> AsyncIterator[Candle]:
        """One step (a candle of every symbol with the same open time) per pacing period."""
        period = 1 / self._config.candles_per_second if self._config.candles_per_second else 0
        steps = 0
        current_open: int | None = None
        for candle in candles:
            if candle.open_time_ms != current_open:
                if current_open is not None:
                    steps += 1
                    if self._config.max_candles and steps >= self._config.max_candles:
                        return
                    await asyncio.sleep(period)
                current_open = candle.open_time_ms
            yield candle

    async def _publish(self, candle: Candle) -> None:
        subject = subjects.candle_subject(candle.symbol)
        while True:
            try:
                await self._context.bus.publish(subject, candle)
                break
            except BusUnavailable as exc:
                log.warning("candle %s not published yet: %s", candle.dedup_id, exc)
                await asyncio.sleep(0.5)
        self._published += 1
        self._last_published = time.monotonic()
        CANDLES_PUBLISHED.labels(candle.symbol).inc()

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
        status = Status.CRITICAL if age > self._config.stale_after_s else Status.OK
        return DependencyHealth(
            name="feed",
            status=status,
            detail=f"{self._config.source.value}: {self._published} candles, last {age:.1f}s ago",
        )
