"""Live candles from Binance USD-M futures kline streams, over python-binance.

This is the only market-data module that imports ``binance``: the library is untyped, needs the
network and drags in aiohttp and websockets, so everything else (and every test) stays free of
it. The parsing of a stream message, ``candle_from_kline_event``, is a pure function that the
tests exercise; ``BinanceKlineFeed`` is the thin, untestable-here part that talks to Binance.

Only closed klines (``"x": true``) become candles. Binance pushes the forming kline every ~250
ms; a model fed those would see candles that change after it acted on them.

Things about python-binance (1.0.37) that matter here:

* ``AsyncClient.create()`` always calls Spot ``GET /api/v3/ping`` and ``/api/v3/time`` (on the
  Spot testnet with ``testnet=True``) before returning, although only futures websockets are
  used. A network that allows the futures hosts but blocks Spot REST fails at start, inside
  ``create()``, not at the websocket. The public kline streams need no API key.
* ``futures_multiplex_socket`` opens one combined stream, ``<fstream host>/market/stream?
  streams=a/b``, whose messages are wrapped as ``{"stream": ..., "data": ...}``.
* The socket reconnects by itself (up to 5 times in a row) and reports connection problems as
  ``{"e": "error", "type": ..., "m": ...}`` messages in the same queue as the data. When it gives
  up (or its queue overflows: ``BinanceWebsocketQueueOverflow``), this feed opens a new socket
  after a back-off (1, 2, 5, then every 10 s) instead of ending.
* Klines that close while no socket is connected never come over the stream (nor do they after
  Binance's 24 h cut-off, until the reconnect). So the feed remembers the last open time of each
  symbol (from the stream's stored candles at start) and, when a closed kline arrives beyond the
  next one expected, first fetches the missing ones over REST (``GET /fapi/v1/klines``, weight
  5 per 1,500), in order; a kline at or before the last one is dropped (no duplicates). What
  REST cannot give (the venue has no such kline, or keeps failing after 3 tries) is an unfilled
  gap: logged, counted, kept in ``unfilled_gaps`` (the worker's health is DEGRADED for an hour
  and an alert fires), and the feed goes on.
* Warm-up: a symbol the stream holds no candle of starts with its last ``warmup_klines`` closed
  klines, fetched over REST (``GET /fapi/v1/klines`` with ``endTime``) once the socket is open,
  published in order as ``CandleSource.WARMUP``: a model's window is then full from the first
  live candle on. They are old when published, so inference makes no signal of them. A warm-up
  REST cannot serve is logged and tried again at the next socket; the window then fills from
  live candles, as without a warm-up.
* ``rest_url`` and ``stream_url`` point the client at another venue with Binance's API
  (``qtrader.exchange.async_binance``); None: Binance, by ``testnet``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import warnings
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import aiohttp

with warnings.catch_warnings():
    # python-binance 1.0.37 imports websockets' legacy client, which websockets >= 14 deprecates
    # at import time; not ours to fix, and the test suite turns warnings into errors.
    warnings.filterwarnings("ignore", r"websockets\..* is deprecated", DeprecationWarning)
    from binance.exceptions import BinanceAPIException, BinanceRequestException

from qtrader.contracts.messages import Candle, CandleSource
from qtrader.exchange.async_binance import create_client, socket_manager
from qtrader.marketdata.csv_replay import KLINE_COLUMNS, KlineFormatError, candle_from_kline
from qtrader.marketdata.synthetic import INTERVAL_MS

_log = logging.getLogger(__name__)

# Kline payload key -> the archive's column name that candle_from_kline understands.
_KLINE_KEYS: Final = {
    "t": "open_time",
    "T": "close_time",
    "o": "open",
    "h": "high",
    "l": "low",
    "c": "close",
    "v": "volume",
    "n": "count",
    "q": "quote_volume",
    "V": "taker_buy_volume",
    "Q": "taker_buy_quote_volume",
}
# Error types after which python-binance's socket reconnects by itself; any other error type
# means its read loop has stopped and no more data will come.
_RECOVERABLE_ERRORS: Final = frozenset(
    {
        "IncompleteReadError",
        "gaierror",
        "ConnectionClosedError",
        "ConnectionClosedOK",
        "BinanceWebsocketClosed",
    }
)
_SYMBOL_RE: Final = re.compile(r"[A-Z0-9]{2,20}")
RECONNECT_S: Final = (1.0, 2.0, 5.0, 10.0)  # before opening a new socket, by failures in a row
BACKFILL_LIMIT: Final = 1500  # klines per REST request, Binance's maximum
BACKFILL_TRIES: Final = 3
_BACKFILL_ERRORS: Final = (
    BinanceAPIException,
    BinanceRequestException,
    aiohttp.ClientError,
    OSError,
    TimeoutError,
)


class LiveFeedError(RuntimeError):
    """The websocket stopped for good (reconnects exhausted, queue overflow, ...)."""


def candle_from_kline_event(event: Mapping[str, Any]) -> Candle | None:
    """The closed candle in a futures kline message, or None while the kline is still forming.

    Accepts the combined-stream shape ``{"stream": ..., "data": {...}}`` and the bare payload
    ``{"e": "kline", "s": ..., "k": {...}}``. Raises ``KlineFormatError`` for anything else.
    """
    where = _where(event)
    data = _payload(event, where)
    kline = data.get("k")
    if not isinstance(kline, Mapping):
        raise KlineFormatError(f"{where}: 'k' is missing or not an object")
    closed = kline.get("x")
    if not isinstance(closed, bool):
        raise KlineFormatError(f"{where}: 'k.x' (closed) is missing or not a boolean")
    if not closed:
        return None
    symbol, interval = _text(kline, "s", where), _text(kline, "i", where)
    if "s" in data and data["s"] != symbol:
        raise KlineFormatError(f"{where}: symbol {data['s']!r} differs from k.s {symbol!r}")
    fields = {column: kline[key] for key, column in _KLINE_KEYS.items() if key in kline}
    return candle_from_kline(
        fields, symbol=symbol, interval=interval, source=CandleSource.LIVE, location=where
    )


def _where(event: Mapping[str, Any]) -> str:
    stream = event.get("stream")
    return f"kline event on {stream}" if isinstance(stream, str) else "kline event"


def _payload(event: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    data = event.get("data", event)
    if not isinstance(data, Mapping):
        raise KlineFormatError(f"{where}: 'data' is not an object")
    if data.get("e") != "kline":
        raise KlineFormatError(f"{where}: not a kline event (e={data.get('e')!r})")
    return data


def _text(kline: Mapping[str, Any], key: str, where: str) -> str:
    value = kline.get(key)
    if not isinstance(value, str) or not value:
        raise KlineFormatError(f"{where}: 'k.{key}' is missing or not a string")
    return value


@dataclass(frozen=True)
class Gap:
    """Klines of ``symbol`` from ``first_open_ms`` to ``last_open_ms`` that neither the stream
    nor REST gave: they are missing from the market for good."""

    symbol: str
    first_open_ms: int
    last_open_ms: int
    klines: int
    reason: str
    seen_at: float  # time.monotonic() when it was found


class BinanceKlineFeed:
    """Closed candles of several symbols from one combined USD-M futures kline stream, with the
    klines the stream missed fetched over REST (see the module's doc).

    Iterate ``candles()`` inside ``contextlib.aclosing`` (or ``aclose()`` it) so the HTTP
    session is closed as soon as the consumer stops, not whenever the generator is collected.
    A malformed message is logged, counted in ``malformed_events`` and skipped: one bad message
    must not stop the market data of every symbol.
    """

    def __init__(
        self,
        *,
        symbols: Sequence[str],
        interval: str,
        testnet: bool,
        last_open_ms: Mapping[str, int] | None = None,
        warmup_klines: int = 0,
        rest_url: str | None = None,
        stream_url: str | None = None,
        max_queue_size: int = 1000,
    ) -> None:
        if not symbols:
            raise ValueError("at least one symbol is needed")
        bad = [s for s in symbols if not _SYMBOL_RE.fullmatch(s)]
        if bad:
            raise ValueError(f"symbols must be upper-case letters and digits: {bad}")
        if interval not in INTERVAL_MS:
            raise ValueError(f"interval must be one of {sorted(INTERVAL_MS)}: {interval!r}")
        if not 0 <= warmup_klines <= BACKFILL_LIMIT:
            raise ValueError(f"warmup_klines must be 0 to {BACKFILL_LIMIT}: {warmup_klines}")
        self._symbols = tuple(symbols)
        self._streams = [f"{symbol.lower()}@kline_{interval}" for symbol in symbols]
        self._interval = interval
        self._interval_ms = INTERVAL_MS[interval]
        self._testnet = testnet
        self._rest_url = rest_url
        self._stream_url = stream_url
        self._max_queue_size = max_queue_size
        self._last_open = dict(last_open_ms or {})
        self._warmup_klines = warmup_klines
        self.warmed_up = 0
        self.malformed_events = 0
        self.backfilled = 0
        self.unfilled_gaps: list[Gap] = []
        self.connected = False

    @property
    def streams(self) -> list[str]:
        """The stream names subscribed to, e.g. ``btcusdt@kline_1m``."""
        return list(self._streams)

    async def candles(self) -> AsyncGenerator[Candle, None]:
        """Closed candles in order, each once; never ends (a failed socket is opened again)."""
        client = await create_client(rest_url=self._rest_url, testnet=self._testnet)
        failures = 0
        try:
            while True:
                try:
                    async for candle in self._session(client):
                        failures = 0
                        yield candle
                except LiveFeedError as exc:
                    self.connected = False
                    wait = RECONNECT_S[min(failures, len(RECONNECT_S) - 1)]
                    failures += 1
                    _log.warning("%s; a new socket in %.0f s", exc, wait)
                    await asyncio.sleep(wait)
        finally:
            self.connected = False
            await client.close_connection()

    async def _session(self, client: Any) -> AsyncGenerator[Candle, None]:
        """One socket's candles, each preceded by the klines the stream missed before it."""
        manager = socket_manager(
            client,
            rest_url=self._rest_url,
            stream_url=self._stream_url,
            max_queue_size=self._max_queue_size,
        )
        async with manager.futures_multiplex_socket(self._streams) as socket:
            self.connected = True
            for missed in await self._catch_up(client):
                yield missed
            while True:
                candle = self._handle(await socket.recv())
                if candle is None:
                    continue
                for missed in await self._missed_before(client, candle.symbol, candle.open_time_ms):
                    yield missed
                if self._is_new(candle):
                    yield candle

    async def _catch_up(self, client: Any) -> list[Candle]:
        """Once the socket is open (what closes from now on, it brings): the klines closed
        since each symbol's last candle, from REST, without waiting for the next close; for a
        symbol without one, its warm-up."""
        cold = [s for s in self._symbols if s not in self._last_open and self._warmup_klines]
        if not self._last_open and not cold:
            return []
        try:
            now_ms = int((await client.futures_time())["serverTime"])
        except _BACKFILL_ERRORS as exc:  # the next closed kline fills the gap instead
            _log.warning("no catch-up now, the venue's time is unknown: %r", exc)
            return []
        forming = now_ms // self._interval_ms * self._interval_ms
        missed: list[Candle] = []
        for symbol in cold:
            missed += await self._warm_up(client, symbol, forming)
        for symbol in list(self._last_open):
            # Nothing is a gap yet: what REST lacks now, the next closed kline asks for again.
            missed += await self._missed_before(client, symbol, forming, final=False)
        return missed

    async def _warm_up(self, client: Any, symbol: str, forming_ms: int) -> list[Candle]:
        """The symbol's last ``warmup_klines`` klines closed before ``forming_ms``, in order;
        they become its last candles, so the stream goes on right after them."""
        rows, reason = await self._page(
            client, symbol, None, forming_ms - 1, limit=self._warmup_klines
        )
        if reason is not None:
            _log.warning("%s: no warm-up now, the next socket tries again: %s", symbol, reason)
            return []
        page = [self._candle_from_row(symbol, row, CandleSource.WARMUP) for row in rows]
        closed = sorted(
            (c for c in page if c is not None and c.open_time_ms < forming_ms),
            key=lambda c: c.open_time_ms,
        )
        taken = [c for c in closed if self._is_new(c)]
        self.warmed_up += len(taken)
        _log.info("%s: warmed up with %d closed klines over REST", symbol, len(taken))
        return taken

    def _is_new(self, candle: Candle) -> bool:
        """After the symbol's last candle (then it is the last); else already given."""
        last = self._last_open.get(candle.symbol)
        if last is not None and candle.open_time_ms <= last:
            return False
        self._last_open[candle.symbol] = candle.open_time_ms
        return True

    async def _missed_before(
        self, client: Any, symbol: str, open_ms: int, *, final: bool = True
    ) -> list[Candle]:
        """The klines between the symbol's last candle and the one opening at ``open_ms``,
        from REST, in order up to the first one it lacks; with ``final`` what REST cannot give
        is recorded as a gap (the kline at ``open_ms`` is here: none will come after)."""
        last = self._last_open.get(symbol)
        first = None if last is None else last + self._interval_ms
        if first is None or open_ms <= first:
            return []
        expected = range(first, open_ms, self._interval_ms)
        fetched, reason = await self._fetch(client, symbol, first, open_ms - 1)
        got = {c.open_time_ms: c for c in fetched if c.open_time_ms in expected}
        missing = [t for t in expected if t not in got]
        if missing and not final:
            expected = range(first, missing[0], self._interval_ms)  # in order: stop before it
        elif missing:
            self._record_gap(symbol, missing, reason or "the venue has no such klines")
        taken = [got[t] for t in expected if t in got and self._is_new(got[t])]
        self.backfilled += len(taken)
        if taken:
            _log.warning("%s: %d klines the stream missed, fetched over REST", symbol, len(taken))
        return taken

    async def _fetch(
        self, client: Any, symbol: str, start_ms: int, end_ms: int
    ) -> tuple[list[Candle], str | None]:
        """Closed klines of ``symbol`` opening in [start_ms, end_ms], page by page; the reason
        when REST failed for good (what was fetched until then is kept)."""
        candles: list[Candle] = []
        while start_ms <= end_ms:
            rows, reason = await self._page(client, symbol, start_ms, end_ms)
            if reason is not None:
                return candles, reason
            page = [self._candle_from_row(symbol, row) for row in rows]
            candles += [c for c in page if c is not None]
            if len(rows) < BACKFILL_LIMIT:
                break
            start_ms = int(rows[-1][0]) + self._interval_ms
        return candles, None

    async def _page(
        self,
        client: Any,
        symbol: str,
        start_ms: int | None,
        end_ms: int,
        *,
        limit: int = BACKFILL_LIMIT,
    ) -> tuple[list[list[Any]], str | None]:
        """One request's rows: from ``start_ms`` on, or without it the last ``limit`` up to
        ``end_ms`` (Binance's selection); the reason when it failed every try."""
        reason = "not tried"
        for attempt in range(BACKFILL_TRIES):
            try:
                rows = await client.futures_klines(
                    symbol=symbol,
                    interval=self._interval,
                    startTime=start_ms,  # python-binance leaves a None out
                    endTime=end_ms,
                    limit=limit,
                )
                return list(rows), None
            except _BACKFILL_ERRORS as exc:
                _log.warning("%s: kline backfill failed (try %d): %r", symbol, attempt + 1, exc)
                reason = f"REST failed: {exc!r:.200}"
                await asyncio.sleep(1.0)
        return [], reason

    def _candle_from_row(
        self, symbol: str, row: Any, source: CandleSource = CandleSource.LIVE
    ) -> Candle | None:
        """A REST kline row (the archive's columns) as a candle; a malformed one is counted."""
        try:
            if not isinstance(row, list) or len(row) != len(KLINE_COLUMNS):
                raise KlineFormatError(f"not a kline row: {row!r:.200}")
            fields = dict(zip(KLINE_COLUMNS, row, strict=True))
            return candle_from_kline(
                fields,
                symbol=symbol,
                interval=self._interval,
                source=source,
                location=f"{symbol} REST kline",
            )
        except KlineFormatError as exc:
            self.malformed_events += 1
            _log.error("skipping malformed REST kline: %s", exc)
            return None

    def _record_gap(self, symbol: str, missing: list[int], reason: str) -> None:
        gap = Gap(symbol, missing[0], missing[-1], len(missing), reason, time.monotonic())
        self.unfilled_gaps.append(gap)
        _log.error(
            "%s: %d klines from %d to %d are missing for good: %s",
            symbol,
            len(missing),
            gap.first_open_ms,
            gap.last_open_ms,
            reason,
        )

    def _handle(self, message: Any) -> Candle | None:
        """The candle in one socket message; None for a forming kline, an error or a bad message."""
        if isinstance(message, Mapping) and message.get("e") == "error":
            _raise_unless_recoverable(message)
            return None
        try:
            if not isinstance(message, Mapping):
                raise KlineFormatError(f"not an object: {message!r:.200}")
            return candle_from_kline_event(message)
        except KlineFormatError as exc:
            self.malformed_events += 1
            _log.error("skipping malformed kline message: %s", exc)
            return None


def _raise_unless_recoverable(error: Mapping[str, Any]) -> None:
    kind, detail = error.get("type"), error.get("m")
    if kind in _RECOVERABLE_ERRORS:
        _log.warning("kline websocket %s (%s); python-binance reconnects", kind, detail)
        return
    raise LiveFeedError(f"kline websocket stopped: {kind}: {detail}")
