"""Seeded, reproducible synthetic candles in three regimes: trend, mean reversion and crash.

The same seed, symbols and regime always give the same candles, byte for byte, so tests, the
training set and the local demo are reproducible. Each symbol draws from its own generator,
seeded from the run's seed and a stable hash of the symbol, so adding a symbol does not change
the others' paths.

Prices are snapped to the instrument's tick size, like the candles an exchange publishes.

A market can be started past its beginning (``candles(first_step=n)``: the paths are advanced
through the first ``n`` steps without building candles), which is how a restarted marketdata
rebuilds the very path it was on (``marketdata.resume``); or started from given closes
(``start_closes``) when that path cannot be rebuilt, so it continues from the last stored price.
"""

from __future__ import annotations

import enum
import math
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal

import numpy as np

from qtrader.contracts.messages import Candle, CandleSource
from qtrader.instruments import ExchangeInfo

# "1s" has no Binance futures kline; it exists so a synthetic crash can fall within seconds
# (the flash-crash stress scenario: a 60 s trigger window then holds 60 closes).
INTERVAL_MS = {"1s": 1_000, "1m": 60_000, "5m": 300_000, "15m": 900_000, "1h": 3_600_000}


class Regime(enum.StrEnum):
    TREND = "trend"
    MEAN_REVERSION = "mean-reversion"
    CRASH = "crash"
    # Switches between the three every few hundred candles: what the model is trained on.
    MIXED = "mixed"


@dataclass(frozen=True, kw_only=True)
class SyntheticConfig:
    """How the synthetic market behaves; every field has a unit in its name or comment."""

    symbols: tuple[str, ...]
    seed: int = 7
    regime: Regime = Regime.MIXED
    interval: str = "1m"
    start_ms: int = 1_700_000_000_000
    start_price: Decimal = Decimal(100)
    volatility_per_candle: float = 0.004  # standard deviation of one candle's log return
    trend_drift_per_candle: float = 0.0008  # mean log return in the trend regime
    reversion_speed: float = 0.05  # fraction of the gap to the anchor closed per candle
    crash_after_candles: int = 120  # candles of calm before the crash starts
    crash_drop_pct: float = 18.0  # total fall of the crash, peak to trough
    crash_candles: int = 5  # candles over which the crash happens
    regime_length_candles: int = 300  # for MIXED: candles before the regime changes


class SyntheticMarket:
    """An endless, interleaved stream of candles for every configured symbol."""

    def __init__(
        self,
        config: SyntheticConfig,
        exchange: ExchangeInfo,
        *,
        start_closes: Mapping[str, Decimal] | None = None,
    ) -> None:
        """``start_closes``: symbols whose first candle opens at this price exactly, instead of
        at a level drawn from the seed (a market continued from stored candles)."""
        if config.interval not in INTERVAL_MS:
            raise ValueError(f"interval must be one of {sorted(INTERVAL_MS)}: {config.interval}")
        starts = start_closes or {}
        self._config = config
        self._instruments = [exchange.instrument(symbol) for symbol in config.symbols]
        self._paths = [_SymbolPath(config, s, start=starts.get(s)) for s in config.symbols]

    def candles(self, *, first_step: int = 0) -> Iterator[Candle]:
        """One candle per symbol per interval, in time order, from step ``first_step`` (its
        open time is ``start_ms + first_step * interval``); never ends. The steps before it
        are drawn but not built, so the candles are those of a market iterated from step 0."""
        interval_ms = INTERVAL_MS[self._config.interval]
        for skipped in range(first_step):
            for path in self._paths:
                path.next_candle(skipped)
        step = first_step
        while True:
            open_time = self._config.start_ms + step * interval_ms
            for instrument, path in zip(self._instruments, self._paths, strict=True):
                o, h, low, c, volume = path.next_candle(step)
                tick = instrument.tick_size
                yield Candle(
                    symbol=instrument.symbol,
                    interval=self._config.interval,
                    open_time_ms=open_time,
                    close_time_ms=open_time + interval_ms - 1,
                    open=_snap(o, tick),
                    high=_snap(h, tick),
                    low=_snap(low, tick),
                    close=_snap(c, tick),
                    volume=Decimal(f"{volume:.3f}"),
                    trades=int(volume * 7) + 1,
                    source=CandleSource.SYNTHETIC,
                )
            step += 1


def _snap(price: float, tick: Decimal) -> Decimal:
    units = max(1, round(Decimal(repr(price)) / tick))
    return (units * tick).quantize(tick)


class _SymbolPath:
    """The log-price random process of one symbol."""

    def __init__(self, config: SyntheticConfig, symbol: str, *, start: Decimal | None) -> None:
        self._config = config
        self._rng = np.random.default_rng([config.seed, zlib.crc32(symbol.encode())])
        # Different symbols start at different price levels so that ticks matter. The level is
        # drawn even when ``start`` is given, so the draws after it are the same either way.
        level = float(config.start_price) * math.exp(self._rng.uniform(-1.5, 1.5))
        self._log_price = math.log(level if start is None else float(start))
        self._anchor = self._log_price
        self._trend_sign = 1.0 if self._rng.random() < 0.5 else -1.0
        self._regime: Regime | None = None

    def _regime_at(self, step: int) -> Regime:
        if self._config.regime is not Regime.MIXED:
            return self._config.regime
        cycle = (Regime.TREND, Regime.MEAN_REVERSION, Regime.CRASH)
        return cycle[(step // self._config.regime_length_candles) % len(cycle)]

    def _drift(self, step: int, regime: Regime) -> float:
        cfg = self._config
        if regime is Regime.TREND:
            return self._trend_sign * cfg.trend_drift_per_candle
        if regime is Regime.MEAN_REVERSION:
            return cfg.reversion_speed * (self._anchor - self._log_price)
        # Crash: calm, then a fall of crash_drop_pct spread over crash_candles, then calm.
        phase = step % cfg.regime_length_candles if cfg.regime is Regime.MIXED else step
        if cfg.crash_after_candles <= phase < cfg.crash_after_candles + cfg.crash_candles:
            total = math.log(1 - cfg.crash_drop_pct / 100)
            return total / cfg.crash_candles
        return 0.0

    def _enter(self, regime: Regime) -> None:
        """Start a regime from where the price is now, so no regime undoes the previous one."""
        self._regime = regime
        self._anchor = self._log_price
        if regime is Regime.TREND:
            self._trend_sign = 1.0 if self._rng.random() < 0.5 else -1.0

    def next_candle(self, step: int) -> tuple[float, float, float, float, float]:
        regime = self._regime_at(step)
        if regime is not self._regime:
            self._enter(regime)
        sigma = self._config.volatility_per_candle
        if regime is Regime.CRASH:
            sigma *= 0.5  # the calm before and after makes the fall stand out
        log_return = self._drift(step, regime) + sigma * float(self._rng.standard_normal())
        open_price = math.exp(self._log_price)
        self._log_price += log_return
        close_price = math.exp(self._log_price)
        wick_up, wick_down = np.abs(self._rng.standard_normal(2)) * sigma * 0.5
        high = max(open_price, close_price) * math.exp(float(wick_up))
        low = min(open_price, close_price) * math.exp(-float(wick_down))
        volume = float(self._rng.lognormal(mean=3.0, sigma=0.4)) * (1 + 40 * abs(log_return))
        if regime is Regime.MEAN_REVERSION and step % 200 == 199:
            self._anchor = self._log_price
        return open_price, high, low, close_price, volume
