"""Replay of Binance USD-M futures klines from the files of the public archive.

The archive (data.binance.vision, ``/data/futures/um/{monthly,daily}/klines/SYMBOL/INTERVAL/
SYMBOL-INTERVAL-YYYY-MM[-DD].zip``) holds one zipped CSV per file with Binance's 12 kline
columns (``KLINE_COLUMNS``). ``read_klines`` reads the ``.zip`` as downloaded or the extracted
``.csv`` and yields ``Candle`` messages with ``source=REPLAY``; ``merge_replays`` interleaves
several symbols' files into one market in time order.

The archive's format drifted over the years, so the reader is tolerant exactly where Binance
changed it and strict everywhere else:

* Newer files start with a header row (``open_time,open,...``), older ones do not: a first line
  whose first cell is ``open_time`` is skipped.
* Timestamps are milliseconds, but newer spot files switched to microseconds. A timestamp of 16
  or more digits is read as microseconds and divided by 1000 (a millisecond timestamp has 13
  digits until the year 2286), so one reader serves both.
* Anything else - a wrong column count, a non-number, a value outside the Candle's bounds
  (``"1e999"``), bytes that are not UTF-8, a high below the low, a candle that is not after the
  previous one - raises ``KlineFormatError`` naming the file, the line and the problem. A replay
  that skipped bad rows would backtest against a market that never existed.
* ``validate_replay_files`` reads every row of every file before a replay starts (``qtrader up
  --replay``), so a bad row at line 302 is refused before the first candle is published.

``KlineFormatError`` and ``candle_from_kline`` also serve the live feed (``live.py``), so a kline
from a file and one from the websocket pass the same checks.
"""

from __future__ import annotations

import csv
import heapq
import io
import re
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import IO, Any, Final

from pydantic import ValidationError

from qtrader.contracts.messages import Candle, CandleSource

KLINE_COLUMNS: Final = (
    "open_time",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "close_time",
    "quote_volume",
    "count",
    "taker_buy_volume",
    "taker_buy_quote_volume",
    "ignore",
)
# Columns that must be numbers although no Candle field keeps them: a non-number there means
# the row is corrupt, even if the columns the Candle uses look fine.
_EXTRA_NUMERIC_COLUMNS: Final = ("quote_volume", "taker_buy_volume", "taker_buy_quote_volume")
_SYMBOL_RE: Final = re.compile(r"[A-Z0-9]{2,20}")
_INTERVAL_RE: Final = re.compile(r"\d+[smhdw]")  # Candle's pattern: no monthly ("1M") klines
_MICROSECONDS_FROM: Final = 10**15  # the smallest 16-digit number
_SUFFIXES: Final = (".csv", ".zip")


class KlineFormatError(ValueError):
    """A kline that breaks Binance's format; the message says where it is and what is wrong."""


class _BadValue(ValueError):
    """One field's problem, before the caller adds where the field is."""


# --- file names --------------------------------------------------------------------------------


def infer_symbol_interval(path: Path) -> tuple[str, str]:
    """Symbol and interval from the archive's file name, e.g. ``BTCUSDT-1m-2024-01.zip``."""
    stem = path.name
    for suffix in _SUFFIXES:
        stem = stem.removesuffix(suffix)
    parts = stem.split("-")
    if len(parts) >= 2 and _SYMBOL_RE.fullmatch(parts[0]) and _INTERVAL_RE.fullmatch(parts[1]):
        return parts[0], parts[1]
    raise ValueError(
        f"cannot infer symbol and interval from the file name {path.name!r}: expected the "
        "archive's SYMBOL-INTERVAL-... convention, e.g. BTCUSDT-1m-2024-01.zip"
    )


# --- reading -----------------------------------------------------------------------------------


def read_klines(path: Path, *, symbol: str, interval: str) -> Iterator[Candle]:
    """The candles of one archive file (``.csv`` or ``.zip`` holding one CSV), oldest first.

    Arguments are checked now; the file is opened when iteration starts and closed when it ends
    (or when the iterator is closed). Raises ``KlineFormatError`` on the first bad row.
    """
    if not _SYMBOL_RE.fullmatch(symbol):
        raise ValueError(f"symbol must be upper-case letters and digits: {symbol!r}")
    if not _INTERVAL_RE.fullmatch(interval):
        raise ValueError(f"interval must look like 1m, 15m, 1h, 1d: {interval!r}")
    if path.suffix not in _SUFFIXES:
        raise ValueError(f"expected a .csv or .zip kline file: {path}")
    if not path.is_file():
        raise FileNotFoundError(f"no such kline file: {path}")
    if path.suffix == ".zip" and not zipfile.is_zipfile(path):
        raise KlineFormatError(f"{path}: not a zip file")
    return _read_file(path, symbol=symbol, interval=interval)


def _read_file(path: Path, *, symbol: str, interval: str) -> Iterator[Candle]:
    if path.suffix == ".csv":
        try:
            with path.open(encoding="utf-8-sig", newline="") as text:
                yield from _parse_lines(text, where=str(path), symbol=symbol, interval=interval)
        except UnicodeDecodeError as exc:
            with path.open("rb") as raw:
                raise _not_utf8(str(path), raw, exc) from None
        return
    with zipfile.ZipFile(path) as archive:
        member = _only_csv_member(archive, path)
        where = f"{path} ({member})"
        try:
            with archive.open(member) as raw:
                text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
                yield from _parse_lines(text, where=where, symbol=symbol, interval=interval)
        except UnicodeDecodeError as exc:
            with archive.open(member) as raw:
                raise _not_utf8(where, raw, exc) from None


def _not_utf8(where: str, raw: IO[bytes], exc: UnicodeDecodeError) -> KlineFormatError:
    """The error for bytes that are not UTF-8, at their line: the text reader decodes ahead in
    chunks, so the csv reader's line number is not where they are. Found again line by line
    (a line break is never part of a multi-byte character)."""
    for number, line in enumerate(raw, start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as bad:
            return KlineFormatError(f"{where}, line {number}: not UTF-8: {bad.reason}")
    return KlineFormatError(f"{where}: not UTF-8: {exc.reason}")


def _only_csv_member(archive: zipfile.ZipFile, path: Path) -> str:
    members = [name for name in archive.namelist() if name.lower().endswith(".csv")]
    if len(members) != 1:
        raise KlineFormatError(f"{path}: expected exactly one .csv inside the zip, found {members}")
    return members[0]


def _parse_lines(
    lines: Iterable[str], *, where: str, symbol: str, interval: str
) -> Iterator[Candle]:
    reader = csv.reader(lines)
    previous: Candle | None = None
    for row in _rows(reader, where=where):
        if _is_blank(row) or (reader.line_num == 1 and _is_header(row)):
            continue
        location = f"{where}, line {reader.line_num}"
        if len(row) != len(KLINE_COLUMNS):
            raise KlineFormatError(
                f"{location}: expected {len(KLINE_COLUMNS)} columns, got {len(row)}"
            )
        fields = dict(zip(KLINE_COLUMNS, row, strict=True))
        candle = candle_from_kline(
            fields, symbol=symbol, interval=interval, source=CandleSource.REPLAY, location=location
        )
        _check_after(previous, candle, location)
        previous = candle
        yield candle


def _rows(reader: Any, *, where: str) -> Iterator[list[str]]:
    """The reader's rows; a row the csv module cannot split (an oversized field, a stray
    quote) becomes a ``KlineFormatError`` at its line, like any other bad row."""
    while True:
        try:
            row: list[str] = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise KlineFormatError(f"{where}, line {reader.line_num + 1}: {exc}") from None
        yield row


def validate_replay_files(paths: Iterable[Path]) -> int:
    """Read every row of every kline file, as a replay will, before anything starts.

    Returns the number of candles; raises ``KlineFormatError`` (file, line, problem) or
    ``ValueError``/``OSError`` (a name that does not say the symbol, a missing file) on the
    first problem, so a bad row at line 302 is refused before candle 1 is published.
    """
    total = 0
    for path in paths:
        symbol, interval = infer_symbol_interval(path)
        try:
            total += sum(1 for _ in read_klines(path, symbol=symbol, interval=interval))
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise KlineFormatError(f"{path}: a damaged zip: {exc}") from None
    return total


def _is_blank(row: list[str]) -> bool:
    return all(not cell.strip() for cell in row)


def _is_header(row: list[str]) -> bool:
    return row[0].strip().lower() == "open_time"


def _check_after(previous: Candle | None, candle: Candle, location: str) -> None:
    if previous is None or candle.open_time_ms > previous.open_time_ms:
        return
    what = "repeats" if candle.open_time_ms == previous.open_time_ms else "goes back before"
    raise KlineFormatError(
        f"{location}: open_time {candle.open_time_ms} {what} the previous candle's "
        f"{previous.open_time_ms}; candles must be in ascending open_time"
    )


# --- one kline ---------------------------------------------------------------------------------


def candle_from_kline(
    fields: Mapping[str, object],
    *,
    symbol: str,
    interval: str,
    source: CandleSource,
    location: str,
) -> Candle:
    """A checked ``Candle`` from one kline's fields, keyed by the archive's column names.

    Needs ``open_time, open, high, low, close, volume, close_time, count``; the extra numeric
    columns are checked when present. Raises ``KlineFormatError`` prefixed with ``location``.
    """
    try:
        return _build_candle(fields, symbol=symbol, interval=interval, source=source)
    except _BadValue as exc:
        raise KlineFormatError(f"{location}: {exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise KlineFormatError(f"{location}: {field}: {first['msg']}") from None


def _build_candle(
    fields: Mapping[str, object], *, symbol: str, interval: str, source: CandleSource
) -> Candle:
    open_time = _timestamp(fields, "open_time")
    close_time = _timestamp(fields, "close_time")
    if close_time < open_time:
        raise _BadValue(f"close_time {close_time} is before open_time {open_time}")
    o, h, low, c = (
        _decimal(fields, name, positive=True) for name in ("open", "high", "low", "close")
    )
    _check_range(open_=o, high=h, low=low, close=c)
    for name in _EXTRA_NUMERIC_COLUMNS:
        if name in fields:
            _decimal(fields, name, positive=False)
    return Candle(
        symbol=symbol,
        interval=interval,
        open_time_ms=open_time,
        close_time_ms=close_time,
        open=o,
        high=h,
        low=low,
        close=c,
        volume=_decimal(fields, "volume", positive=False),
        trades=_integer(fields, "count"),
        source=source,
    )


def _check_range(*, open_: Decimal, high: Decimal, low: Decimal, close: Decimal) -> None:
    if high < low:
        raise _BadValue(f"high {high} is below low {low}")
    if high < max(open_, close):
        raise _BadValue(f"high {high} is below open {open_} or close {close}")
    if low > min(open_, close):
        raise _BadValue(f"low {low} is above open {open_} or close {close}")


def _field(fields: Mapping[str, object], name: str) -> object:
    try:
        value = fields[name]
    except KeyError:
        raise _BadValue(f"{name} is missing") from None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _BadValue(f"{name} is not a number: {value!r}")
    return value


def _integer(fields: Mapping[str, object], name: str) -> int:
    value = _field(fields, name)
    try:
        number = value if isinstance(value, int) else int(str(value))
    except ValueError:
        raise _BadValue(f"{name} is not an integer: {value!r}") from None
    if number < 0:
        raise _BadValue(f"{name} is negative: {number}")
    return number


def _timestamp(fields: Mapping[str, object], name: str) -> int:
    """Milliseconds; a 16+ digit value is microseconds (newer spot files) and is converted."""
    value = _integer(fields, name)
    return value // 1000 if value >= _MICROSECONDS_FROM else value


def _decimal(fields: Mapping[str, object], name: str, *, positive: bool) -> Decimal:
    value = _field(fields, name)
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise _BadValue(f"{name} is not a number: {value!r}") from None
    if not number.is_finite():
        raise _BadValue(f"{name} is not a finite number: {value!r}")
    if number < 0 or (positive and number == 0):
        raise _BadValue(f"{name} must be {'positive' if positive else 'non-negative'}: {value!r}")
    return number


# --- several files as one market ---------------------------------------------------------------


def merge_replays(replays: Iterable[Iterable[Candle]]) -> Iterator[Candle]:
    """Several replays (each in ascending open_time, as ``read_klines`` yields) as one stream.

    Ordered by open_time, then symbol, so candles of the same minute come in the same order
    whatever order the files were given in. Lazy: one candle per replay is held at a time.
    """
    return heapq.merge(*replays, key=_merge_key)


def _merge_key(candle: Candle) -> tuple[int, str]:
    return candle.open_time_ms, candle.symbol
