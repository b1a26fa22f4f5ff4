"""Parsing Binance USD-M futures kline stream messages into candles (no network)."""

from __future__ import annotations

import copy
from decimal import Decimal
from typing import Any

import pytest

from qtrader.contracts.messages import Candle, CandleSource
from qtrader.marketdata.csv_replay import KlineFormatError
from qtrader.marketdata.live import BinanceKlineFeed, candle_from_kline_event

T0 = 1_704_067_200_000


def _payload(*, closed: bool = True) -> dict[str, Any]:
    """A kline payload as Binance's futures stream sends it (all prices are strings)."""
    return {
        "e": "kline",
        "E": T0 + 60_000,
        "s": "BTCUSDT",
        "k": {
            "t": T0,
            "T": T0 + 59_999,
            "s": "BTCUSDT",
            "i": "1m",
            "f": 100,
            "L": 200,
            "o": "42000.10",
            "c": "42050.20",
            "h": "42100.00",
            "l": "41900.50",
            "v": "12.345",
            "n": 321,
            "x": closed,
            "q": "518900.1234",
            "V": "6.100",
            "Q": "256400.0000",
            "B": "0",
        },
    }


def _combined(payload: dict[str, Any]) -> dict[str, Any]:
    return {"stream": "btcusdt@kline_1m", "data": payload}


EXPECTED = Candle(
    symbol="BTCUSDT",
    interval="1m",
    open_time_ms=T0,
    close_time_ms=T0 + 59_999,
    open=Decimal("42000.10"),
    high=Decimal("42100.00"),
    low=Decimal("41900.50"),
    close=Decimal("42050.20"),
    volume=Decimal("12.345"),
    trades=321,
    source=CandleSource.LIVE,
)


def test_candle_from_kline_event_when_combined_stream_kline_is_closed_then_returns_candle() -> None:
    assert candle_from_kline_event(_combined(_payload())) == EXPECTED


def test_candle_from_kline_event_when_bare_payload_is_closed_then_returns_same_candle() -> None:
    assert candle_from_kline_event(_payload()) == EXPECTED


@pytest.mark.parametrize("wrap", [_combined, lambda payload: payload])
def test_candle_from_kline_event_when_kline_is_still_open_then_returns_none(wrap: Any) -> None:
    assert candle_from_kline_event(wrap(_payload(closed=False))) is None


def _broken(change: str) -> dict[str, Any]:
    """A closed combined-stream event with one thing wrong, named by ``change``."""
    event = _combined(copy.deepcopy(_payload()))
    data, kline = event["data"], event["data"]["k"]
    match change:
        case "data-not-object":
            event["data"] = ["kline"]
        case "wrong-event-type":
            data["e"] = "aggTrade"
        case "no-k":
            del data["k"]
        case "x-not-bool":
            kline["x"] = "true"
        case "no-symbol":
            del kline["s"]
        case "symbol-mismatch":
            data["s"] = "ETHUSDT"
        case "no-close":
            del kline["c"]
        case "price-not-number":
            kline["h"] = "high"
        case "price-is-bool":
            kline["o"] = True
        case "high-below-low":
            kline["h"], kline["l"] = "41000", "41500"
        case "lowercase-symbol":
            kline["s"] = data["s"] = "btcusdt"
        case "bad-interval":
            kline["i"] = "1 minute"
    return event


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ("data-not-object", "'data' is not an object"),
        ("wrong-event-type", "not a kline event (e='aggTrade')"),
        ("no-k", "'k' is missing"),
        ("x-not-bool", "'k.x' (closed) is missing or not a boolean"),
        ("no-symbol", "'k.s' is missing"),
        ("symbol-mismatch", "symbol 'ETHUSDT' differs from k.s 'BTCUSDT'"),
        ("no-close", "close is missing"),
        ("price-not-number", "high is not a number: 'high'"),
        ("price-is-bool", "open is not a number: True"),
        ("high-below-low", "high 41000 is below low 41500"),
        ("lowercase-symbol", "symbol: String should match pattern"),
        ("bad-interval", "interval: String should match pattern"),
    ],
)
def test_candle_from_kline_event_when_event_is_malformed_then_raises_naming_stream_and_problem(
    change: str, problem: str
) -> None:
    with pytest.raises(KlineFormatError) as raised:
        candle_from_kline_event(_broken(change))

    assert str(raised.value).startswith("kline event on btcusdt@kline_1m: ")
    assert problem in str(raised.value)


def test_candle_from_kline_event_when_bare_payload_is_malformed_then_raises() -> None:
    payload = _payload()
    del payload["k"]["t"]

    with pytest.raises(KlineFormatError, match=r"^kline event: open_time is missing"):
        candle_from_kline_event(payload)


def test_binance_kline_feed_when_created_then_subscribes_lowercase_kline_streams() -> None:
    feed = BinanceKlineFeed(symbols=["BTCUSDT", "ETHUSDT"], interval="5m", testnet=True)

    assert feed.streams == ["btcusdt@kline_5m", "ethusdt@kline_5m"]


@pytest.mark.parametrize(
    ("symbols", "interval"), [([], "1m"), (["btcusdt"], "1m"), (["BTCUSDT"], "1M")]
)
def test_binance_kline_feed_when_arguments_are_invalid_then_raises_before_connecting(
    symbols: list[str], interval: str
) -> None:
    with pytest.raises(ValueError, match=r"symbol|interval"):
        BinanceKlineFeed(symbols=symbols, interval=interval, testnet=True)
