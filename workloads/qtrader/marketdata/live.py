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
  ``{"e": "error", "type": ..., "m": ...}`` messages in the same queue as the data. Klines that
  close while it is disconnected are lost: there is no REST backfill here.
* Its queue holds ``max_queue_size`` messages; when a slow consumer lets it fill, the library
  stops reading and reports ``BinanceWebsocketQueueOverflow``, which this feed raises as fatal.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any, Final

with warnings.catch_warnings():
    # python-binance 1.0.37 imports websockets' legacy client, which websockets >= 14 deprecates
    # at import time; not ours to fix, and the test suite turns warnings into errors.
    warnings.filterwarnings("ignore", r"websockets\..* is deprecated", DeprecationWarning)
    from binance import AsyncClient, BinanceSocketManager

from qtrader.contracts.messages import Candle, CandleSource
from qtrader.marketdata.csv_replay import KlineFormatError, candle_from_kline

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
_INTERVAL_RE: Final = re.compile(r"\d+[smhdw]")


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


class BinanceKlineFeed:
    """Closed candles of several symbols from one combined USD-M futures kline stream.

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
        max_queue_size: int = 1000,
    ) -> None:
        if not symbols:
            raise ValueError("at least one symbol is needed")
        bad = [s for s in symbols if not _SYMBOL_RE.fullmatch(s)]
        if bad:
            raise ValueError(f"symbols must be upper-case letters and digits: {bad}")
        if not _INTERVAL_RE.fullmatch(interval):
            raise ValueError(f"interval must look like 1m, 15m, 1h, 1d: {interval!r}")
        self._streams = [f"{symbol.lower()}@kline_{interval}" for symbol in symbols]
        self._testnet = testnet
        self._max_queue_size = max_queue_size
        self.malformed_events = 0

    @property
    def streams(self) -> list[str]:
        """The stream names subscribed to, e.g. ``btcusdt@kline_1m``."""
        return list(self._streams)

    async def candles(self) -> AsyncGenerator[Candle, None]:
        """Closed candles as Binance publishes them; never ends unless the socket fails."""
        client = await AsyncClient.create(testnet=self._testnet)  # pings Spot REST, see above
        try:
            manager = BinanceSocketManager(client, max_queue_size=self._max_queue_size)
            async with manager.futures_multiplex_socket(self._streams) as socket:
                while True:
                    candle = self._handle(await socket.recv())
                    if candle is not None:
                        yield candle
        finally:
            await client.close_connection()

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
