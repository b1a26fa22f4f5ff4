"""Klines derived from the simulator's own market: its price history and its trades.

The market is the admin-set price per symbol (``matching``). Every change of that price is
recorded here with the server-clock time it happened, and so is every fill. A kline is then a
pure function of that history and its open time:

* ``o`` the price in effect at the open (the last change before it, else the first known price),
* ``h``/``l`` the extremes of the open, of every price change inside the kline and of every fill
  price inside it (a resting LIMIT order fills at its own price, which lies between the old and
  the new market price, so it never widens the range in practice),
* ``c`` the last price in effect inside the kline,
* ``v``/``q``/``n`` volume, quote volume and count of the fills, ``V``/``Q`` their taker-buy part
  (our taker BUY fills and our maker SELL fills: the anonymous other side bought as taker),
  ``f``/``L`` the first and last trade id (-1 when there was no fill).

Because the stream and ``GET /fapi/v1/klines`` compute klines with the same function over the
same history, a backfill gets exactly the closed klines the stream pushed. Times recorded here
never go backwards (a clock moved back by the admin records at the latest time seen), so a
kline, once closed, never changes. Klines exist from the one holding the market's start on.

Intervals are Binance's, except ``1M`` (calendar months) which the simulator does not serve.
Weekly klines open on Monday 00:00 UTC, as on Binance; the others are aligned to the epoch.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from .decimals import plain

if TYPE_CHECKING:
    from .matching import Trade

_MINUTE = 60_000
INTERVAL_MS: dict[str, int] = {
    "1m": _MINUTE,
    "3m": 3 * _MINUTE,
    "5m": 5 * _MINUTE,
    "15m": 15 * _MINUTE,
    "30m": 30 * _MINUTE,
    "1h": 60 * _MINUTE,
    "2h": 120 * _MINUTE,
    "4h": 240 * _MINUTE,
    "6h": 360 * _MINUTE,
    "8h": 480 * _MINUTE,
    "12h": 720 * _MINUTE,
    "1d": 1440 * _MINUTE,
    "3d": 3 * 1440 * _MINUTE,
    "1w": 7 * 1440 * _MINUTE,
}
_WEEK_OFFSET_MS = 4 * 1440 * _MINUTE  # 1970-01-01 was a Thursday; weeks open on Mondays


def open_time(interval: str, t_ms: int) -> int:
    """The open time of the ``interval`` kline that holds ``t_ms``."""
    length = INTERVAL_MS[interval]
    offset = _WEEK_OFFSET_MS if interval == "1w" else 0
    return t_ms - (t_ms - offset) % length


@dataclass(frozen=True)
class Kline:
    symbol: str
    interval: str
    open_ms: int
    close_ms: int
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal
    quote_volume: Decimal
    count: int
    taker_buy_volume: Decimal
    taker_buy_quote: Decimal
    first_trade_id: int
    last_trade_id: int

    def payload(self, *, closed: bool) -> dict[str, Any]:
        """The ``k`` object of a kline stream event."""
        return {
            "t": self.open_ms,
            "T": self.close_ms,
            "s": self.symbol,
            "i": self.interval,
            "f": self.first_trade_id,
            "L": self.last_trade_id,
            "o": plain(self.open),
            "c": plain(self.close),
            "h": plain(self.high),
            "l": plain(self.low),
            "v": plain(self.volume),
            "n": self.count,
            "x": closed,
            "q": plain(self.quote_volume),
            "V": plain(self.taker_buy_volume),
            "Q": plain(self.taker_buy_quote),
            "B": "0",
        }

    def row(self) -> list[Any]:
        """One entry of ``GET /fapi/v1/klines``."""
        return [
            self.open_ms,
            plain(self.open),
            plain(self.high),
            plain(self.low),
            plain(self.close),
            plain(self.volume),
            self.close_ms,
            plain(self.quote_volume),
            self.count,
            plain(self.taker_buy_volume),
            plain(self.taker_buy_quote),
            "0",
        ]


@dataclass
class _Series:
    """One symbol's price changes and fills, each in time order."""

    price_times: list[int] = field(default_factory=list)
    prices: list[Decimal] = field(default_factory=list)
    trade_times: list[int] = field(default_factory=list)
    trades: list[Trade] = field(default_factory=list)


@dataclass
class MarketHistory:
    """Every price change and fill since ``start_ms``, per symbol; the source of all klines."""

    start_ms: int
    _series: dict[str, _Series] = field(default_factory=dict)
    _latest_ms: int = 0

    def __post_init__(self) -> None:
        self._latest_ms = self.start_ms

    def stamp(self, t_ms: int) -> int:
        """``t_ms``, or the latest time already recorded if that is later (never backwards)."""
        self._latest_ms = max(self._latest_ms, t_ms)
        return self._latest_ms

    def latest(self, now_ms: int) -> int:
        """The market's time: ``now_ms``, unless something was recorded later."""
        return max(now_ms, self._latest_ms)

    def record_price(self, symbol: str, price: Decimal, t_ms: int) -> None:
        series = self._series.setdefault(symbol, _Series())
        if series.prices and series.prices[-1] == price:
            return
        series.price_times.append(self.stamp(t_ms))
        series.prices.append(price)

    def record_trade(self, trade: Trade) -> None:
        series = self._series.setdefault(trade.symbol, _Series())
        series.trade_times.append(self.stamp(trade.time_ms))
        series.trades.append(trade)

    def last_price(self, symbol: str) -> Decimal | None:
        series = self._series.get(symbol)
        return series.prices[-1] if series and series.prices else None

    def kline(self, symbol: str, interval: str, open_ms: int) -> Kline:
        close_ms = open_ms + INTERVAL_MS[interval] - 1
        series = self._series[symbol]
        first = bisect.bisect_right(series.price_times, open_ms)
        end = bisect.bisect_right(series.price_times, close_ms)
        opening = series.prices[max(first - 1, 0)]
        inside = series.prices[first:end]
        t_lo = bisect.bisect_left(series.trade_times, open_ms)
        t_hi = bisect.bisect_right(series.trade_times, close_ms)
        trades = series.trades[t_lo:t_hi]
        extremes = [opening, *inside, *(t.price for t in trades)]
        taker_buys = [t for t in trades if (t.side == "BUY") != t.maker]
        return Kline(
            symbol=symbol,
            interval=interval,
            open_ms=open_ms,
            close_ms=close_ms,
            open=opening,
            high=max(extremes),
            low=min(extremes),
            close=inside[-1] if inside else opening,
            volume=sum((t.qty for t in trades), Decimal(0)),
            quote_volume=sum((t.qty * t.price for t in trades), Decimal(0)),
            count=len(trades),
            taker_buy_volume=sum((t.qty for t in taker_buys), Decimal(0)),
            taker_buy_quote=sum((t.qty * t.price for t in taker_buys), Decimal(0)),
            first_trade_id=trades[0].trade_id if trades else -1,
            last_trade_id=trades[-1].trade_id if trades else -1,
        )

    def klines(
        self,
        symbol: str,
        interval: str,
        *,
        now_ms: int,
        start_ms: int | None,
        end_ms: int | None,
        limit: int,
    ) -> list[Kline]:
        """Binance's selection: from ``start_ms`` on (the first ``limit``), else the last
        ``limit`` up to ``end_ms`` (or now); the forming kline included."""
        length = INTERVAL_MS[interval]
        first = open_time(interval, self.start_ms)
        now_ms = max(now_ms, self._latest_ms)
        last = open_time(interval, now_ms if end_ms is None else min(now_ms, end_ms))
        if start_ms is not None:
            first = max(first, open_time(interval, start_ms))
            if first < start_ms:
                first += length
            last = min(last, first + (limit - 1) * length)
        else:
            first = max(first, last - (limit - 1) * length)
        return [self.kline(symbol, interval, t) for t in range(first, last + 1, length)]
