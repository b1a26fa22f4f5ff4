"""Every Decimal of every message is finite, in its range and of bounded precision: the values
that broke the portfolio and execution (``"1e999"``) and their kin are refused at decode."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from qtrader.contracts.messages import Message, MessageRejected, RejectReason, decode
from support.messages import sample_messages

# Beyond every bound of contracts.numbers (the largest is 1e18, the finest 80 decimal places).
NEVER_VALID = [
    "1e999",
    "-1e999",
    "NaN",
    "nan",
    "-NaN",
    "sNaN",
    "Infinity",
    "-Infinity",
    "inf",
    "1e-999",
    "1e19",
    "-1e19",
    "0." + "1" * 90,
]


def _decimal_paths(value: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    """The paths of the leaves that hold a Decimal (a numeric JSON string) in an encoded message."""
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _decimal_paths(child, (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _decimal_paths(child, (*path, index))
    elif isinstance(value, str):
        try:
            Decimal(value)
        except ArithmeticError:
            return
        yield path


def _replaced(document: Any, path: tuple[str | int, ...], value: object) -> Any:
    copy = json.loads(json.dumps(document))
    target = copy
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return copy


def _cases() -> Iterator[tuple[str, Message, tuple[str | int, ...]]]:
    for message in sample_messages():
        document = json.loads(message.encode())
        for path in _decimal_paths(document):
            yield f"{message.KIND}.{'.'.join(map(str, path))}", message, path


CASES = list(_cases())


def test_every_message_type_has_its_decimals_covered() -> None:
    kinds_with_decimals = {name.split(".")[0] for name, _, _ in CASES}
    assert {
        "candle",
        "signal",
        "order_intent",
        "order_update",
        "fill",
        "portfolio_snapshot",
        "risk_alert",
        "policy_revision",
    } <= kinds_with_decimals


@pytest.mark.parametrize(("name", "message", "path"), CASES, ids=[c[0] for c in CASES])
def test_decode_when_a_decimal_is_out_of_bounds_then_rejects_invalid_fields(
    name: str, message: Message, path: tuple[str | int, ...]
) -> None:
    document = json.loads(message.encode())
    for bad in NEVER_VALID:
        data = json.dumps(_replaced(document, path, bad)).encode()
        with pytest.raises(MessageRejected) as rejected:
            decode(data, type(message))
        assert rejected.value.reason is RejectReason.INVALID_FIELDS, (name, bad)


@pytest.mark.parametrize("field", ["open", "high", "low", "close"])
def test_decode_when_a_price_is_negative_zero_then_rejects(field: str) -> None:
    candle = sample_messages()[0]
    data = json.dumps({**json.loads(candle.encode()), field: "-0"}).encode()
    with pytest.raises(MessageRejected):
        decode(data, type(candle))


def test_decode_when_a_timestamp_is_past_year_9999_then_rejects() -> None:
    candle = sample_messages()[0]
    data = json.dumps({**json.loads(candle.encode()), "close_time_ms": 10**16}).encode()
    with pytest.raises(MessageRejected) as rejected:
        decode(data, type(candle))
    assert rejected.value.reason is RejectReason.INVALID_FIELDS


def test_decode_when_confidence_is_the_string_nan_then_rejects() -> None:
    signal = sample_messages()[1]
    data = json.dumps({**json.loads(signal.encode()), "confidence": "nan"}).encode()
    with pytest.raises(MessageRejected):
        decode(data, type(signal))
