"""Candles as column arrays in chunks, for the streamed backtest (``backtest.streamed``).

A ``Bars`` holds consecutive candles of one symbol as numpy columns (what the features and the
labels need) and keeps each candle's exact text or ``Candle`` on the side, so a ``Decimal``
close or a whole ``Candle`` is built only for the few candles that need one (a mark, an order).
Building a pydantic ``Candle`` per row would cost more than the whole rest of a backtest.

``csv_bars`` reads a Binance kline file a chunk of rows at a time. The rows are split and
checked with vectorised numpy operations for what the strict reader (``csv_replay``) refuses:
column count, numbers, signs, bounds, decimal places, the high/low range, ascending open time.
The fast check is deliberately stricter than needed: on any doubt (a quote, an exponent, a row
it cannot split, bytes that are not UTF-8) the strict reader takes the file over from the row
reached and has the last word, so its messages (file, line, problem) and its verdicts stand.
``candle_bars`` puts ``Candle`` objects (the synthetic market, tests) into the same chunks.
"""

from __future__ import annotations

import io
import itertools
import re
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TextIO

import numpy as np
from numpy.typing import NDArray

from qtrader.contracts.messages import MAX_MILLIS, Candle, CandleSource, trusted
from qtrader.contracts.numbers import MAX_PRICE, MAX_VOLUME, QUOTED_PLACES
from qtrader.marketdata.csv_replay import KLINE_COLUMNS, KlineFormatError, read_klines

DEFAULT_CHUNK_ROWS = 8192
_MICROSECONDS_FROM = 10**15
_PRICE_COLUMNS = (1, 2, 3, 4)  # open, high, low, close in KLINE_COLUMNS
_NON_NEGATIVE_COLUMNS = (5, 7, 9, 10)  # volume and the extra numeric columns
_VOLUME, _OPEN_TIME, _CLOSE_TIME, _COUNT = 5, 0, 6, 8

_Int64s = NDArray[np.int64]
_Float64s = NDArray[np.float64]


@dataclass(frozen=True, kw_only=True)
class _Texts:
    """The exact text of each row's open, high, low, close, volume and count."""

    columns: tuple[Sequence[str], ...]

    def __len__(self) -> int:
        return len(self.columns[0])


@dataclass(frozen=True, kw_only=True)
class Bars:
    """Consecutive candles of one symbol: float64 prices, int64 times, exact values on demand."""

    symbol: str
    interval: str
    open_time_ms: _Int64s
    close_time_ms: _Int64s
    open: _Float64s
    high: _Float64s
    low: _Float64s
    close: _Float64s
    volume: _Float64s
    exact: _Texts | Sequence[Candle]

    def __len__(self) -> int:
        return int(self.open_time_ms.shape[0])

    def close_decimal(self, row: int) -> Decimal:
        if isinstance(self.exact, _Texts):
            return Decimal(self.exact.columns[3][row])
        return self.exact[row].close

    def close_decimals(self) -> list[Decimal]:
        """Every row's ``close_decimal``, made in one pass: one ``Decimal`` per distinct text,
        so rows with the same close text share one object (a close often repeats the last)."""
        if isinstance(self.exact, _Texts):
            texts = self.exact.columns[3]
            made = {text: Decimal(text) for text in set(texts)}
            return list(map(made.__getitem__, texts))
        return [candle.close for candle in self.exact]

    def candle(self, row: int) -> Candle:
        """The row as the ``Candle`` the live path would have received."""
        if not isinstance(self.exact, _Texts):
            return self.exact[row]
        o, h, low, c, v, count = [column[row] for column in self.exact.columns]
        # The texts passed the reader's checks (plain decimals within the bounds and places).
        return trusted(
            Candle,
            symbol=self.symbol,
            interval=self.interval,
            open_time_ms=int(self.open_time_ms[row]),
            close_time_ms=int(self.close_time_ms[row]),
            open=Decimal(o),
            high=Decimal(h),
            low=Decimal(low),
            close=Decimal(c),
            volume=Decimal(v),
            trades=int(count),
            source=CandleSource.REPLAY,
        )

    def take(self, start: int, stop: int) -> Bars:
        exact: _Texts | Sequence[Candle]
        if isinstance(self.exact, _Texts):
            exact = _Texts(columns=tuple(column[start:stop] for column in self.exact.columns))
        else:
            exact = self.exact[start:stop]
        return Bars(
            symbol=self.symbol,
            interval=self.interval,
            open_time_ms=self.open_time_ms[start:stop],
            close_time_ms=self.close_time_ms[start:stop],
            open=self.open[start:stop],
            high=self.high[start:stop],
            low=self.low[start:stop],
            close=self.close[start:stop],
            volume=self.volume[start:stop],
            exact=exact,
        )

    def then(self, later: Bars) -> Bars:
        """These candles followed by ``later``'s (the same symbol, already checked ascending)."""
        if len(self) == 0:
            return later
        exact: _Texts | Sequence[Candle]
        if isinstance(self.exact, _Texts) and isinstance(later.exact, _Texts):
            exact = _Texts(
                columns=tuple(
                    [*a, *b] for a, b in zip(self.exact.columns, later.exact.columns, strict=True)
                )
            )
        else:
            exact = [*self._candles(), *later._candles()]
        return Bars(
            symbol=self.symbol,
            interval=self.interval,
            open_time_ms=np.concatenate([self.open_time_ms, later.open_time_ms]),
            close_time_ms=np.concatenate([self.close_time_ms, later.close_time_ms]),
            open=np.concatenate([self.open, later.open]),
            high=np.concatenate([self.high, later.high]),
            low=np.concatenate([self.low, later.low]),
            close=np.concatenate([self.close, later.close]),
            volume=np.concatenate([self.volume, later.volume]),
            exact=exact,
        )

    def _candles(self) -> list[Candle]:
        return [self.candle(row) for row in range(len(self))]


def candle_bars(
    candles: Iterable[Candle], *, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> Iterator[Bars]:
    """``Candle`` objects of one symbol, in ascending open time, as chunks of ``chunk_rows``."""
    iterator = iter(candles)
    while chunk := list(itertools.islice(iterator, chunk_rows)):
        yield _bars_of_candles(chunk)


def _bars_of_candles(candles: Sequence[Candle]) -> Bars:
    def floats(name: str) -> _Float64s:
        return np.fromiter((float(getattr(c, name)) for c in candles), np.float64, len(candles))

    return Bars(
        symbol=candles[0].symbol,
        interval=candles[0].interval,
        open_time_ms=np.fromiter((c.open_time_ms for c in candles), np.int64, len(candles)),
        close_time_ms=np.fromiter((c.close_time_ms for c in candles), np.int64, len(candles)),
        open=floats("open"),
        high=floats("high"),
        low=floats("low"),
        close=floats("close"),
        volume=floats("volume"),
        exact=list(candles),
    )


# --- kline files -------------------------------------------------------------------------------


def csv_bars(
    path: Path,
    *,
    symbol: str,
    interval: str,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    first_chunk_rows: int | None = None,
) -> Iterator[Bars]:
    """The candles of one kline file (``.csv``, or a ``.zip`` holding one) in chunks of
    ``chunk_rows``; if ``first_chunk_rows`` is given, the first chunks grow from it to
    ``chunk_rows`` by doubling (a reader that others wait for hands out candles sooner).

    Raises ``KlineFormatError`` (file, line, problem) where the strict reader would; the rows
    before a bad one have been yielded by then.
    """
    # The strict reader checks the arguments, the suffix and that the file exists, eagerly.
    read_klines(path, symbol=symbol, interval=interval)
    first = min(first_chunk_rows or chunk_rows, chunk_rows)
    return _csv_chunks(path, symbol=symbol, interval=interval, chunk_rows=(first, chunk_rows))


def _csv_chunks(
    path: Path, *, symbol: str, interval: str, chunk_rows: tuple[int, int]
) -> Iterator[Bars]:
    """Chunks growing from ``chunk_rows[0]`` rows to ``chunk_rows[1]`` by doubling."""
    yielded, last_open = 0, -1
    rows, most = chunk_rows
    try:
        with _open_text(path) as text:
            lines = iter(text)
            first = True
            while chunk := list(itertools.islice(lines, rows)):
                rows = min(2 * rows, most)
                columns = _split(chunk, skip_header=first)
                first = False
                if columns == []:
                    continue  # blank lines (or the header) only
                bars = _checked_bars(columns, symbol=symbol, interval=interval, after=last_open)
                if bars is None:
                    break
                yield bars
                yielded += len(bars)
                last_open = int(bars.open_time_ms[-1])
            else:
                return
    except UnicodeDecodeError:
        pass
    # A doubt: the strict reader goes over the file and raises where it is wrong, or, if the
    # doubt was groundless, gives the candles from the row reached.
    strict = read_klines(path, symbol=symbol, interval=interval)
    yield from candle_bars(itertools.islice(strict, yielded, None), chunk_rows=chunk_rows[1])


def _open_text(path: Path) -> TextIO:
    if path.suffix == ".csv":
        return path.open(encoding="utf-8-sig", newline="")
    archive = zipfile.ZipFile(path)
    members = [name for name in archive.namelist() if name.lower().endswith(".csv")]
    if len(members) != 1:
        raise KlineFormatError(f"{path}: expected exactly one .csv inside the zip, found {members}")
    return io.TextIOWrapper(archive.open(members[0]), encoding="utf-8-sig", newline="")


# Plain decimal numbers only: no exponent, nan, inf, quotes or underscores (the strict reader's
# Decimal rules decide those), and at most QUOTED_PLACES decimal places.
_PLAIN = re.compile(r"[0-9.,\-\s]*")
_TOO_PRECISE = re.compile(rf"\.\d{{{QUOTED_PLACES + 1}}}")


def _split(lines: list[str], *, skip_header: bool) -> list[list[str]] | None:
    """The rows' cells by column (none: blank lines only), or None when a row needs the strict
    reader."""
    if skip_header and lines and lines[0].split(",", 1)[0].strip().lower() == "open_time":
        lines = lines[1:]
    text = "".join(lines)
    if not _PLAIN.fullmatch(text) or _TOO_PRECISE.search(text):
        return None
    rows = text.split()
    if not rows:
        return []
    width = len(KLINE_COLUMNS)
    # Every row with exactly ``width`` cells (counted without splitting each row), then all
    # rows split at once and cut into columns: C loops instead of a Python call per row.
    if set(map(str.count, rows, itertools.repeat(",", len(rows)))) != {width - 1}:
        return None
    cells = ",".join(rows).split(",")
    return [cells[column::width] for column in range(width)]


def _checked_bars(
    columns: list[list[str]] | None, *, symbol: str, interval: str, after: int
) -> Bars | None:
    """The columns as ``Bars``, or None when any check fails (the strict reader then decides)."""
    if columns is None:
        return None
    try:
        # numpy parses the texts itself (as ``int`` and ``float`` do, correctly rounded), about
        # twice as fast as a Python call per cell; a text it cannot parse raises.
        times = np.array([columns[i] for i in (_OPEN_TIME, _CLOSE_TIME, _COUNT)], dtype=np.int64)
        numbers = np.array(
            [columns[i] for i in (*_PRICE_COLUMNS, *_NON_NEGATIVE_COLUMNS)], dtype=np.float64
        )
    except (ValueError, OverflowError):
        return None
    if np.any(times < 0):
        return None
    times[:2][times[:2] >= _MICROSECONDS_FROM] //= 1000
    if not _numbers_ok(numbers) or not _times_ok(times, after=after):
        return None
    o, h, low, c = numbers[:4]
    return Bars(
        symbol=symbol,
        interval=interval,
        open_time_ms=times[0],
        close_time_ms=times[1],
        open=o,
        high=h,
        low=low,
        close=c,
        volume=numbers[4],
        exact=_Texts(columns=tuple(columns[i] for i in (1, 2, 3, 4, _VOLUME, _COUNT))),
    )


def _numbers_ok(numbers: _Float64s) -> bool:
    prices, others = numbers[:4], numbers[4:]
    o, h, low, c = prices
    # Strictly below the bounds: a text that reads as a bound in float64 may be above it as a
    # Decimal (the strict reader decides those). What passes makes valid messages unvalidated.
    return bool(
        np.all(prices > 0)
        and np.all(prices < float(MAX_PRICE))
        and np.all(others >= 0)
        and np.all(numbers[4] < float(MAX_VOLUME))
        and np.all(h >= low)
        and np.all(h >= np.maximum(o, c))
        and np.all(low <= np.minimum(o, c))
    )


def _times_ok(times: _Int64s, *, after: int) -> bool:
    opens, closes = times[0], times[1]
    ascending = bool(np.all(np.diff(opens) > 0)) and int(opens[0]) > after
    return ascending and bool(np.all(closes >= opens)) and int(closes.max()) <= MAX_MILLIS
