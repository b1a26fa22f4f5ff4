"""``messages.trusted`` gives the very message validation gives, without validating."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from qtrader.contracts.messages import (
    Candle,
    CandleSource,
    Direction,
    Fill,
    Message,
    OrderIntent,
    OrderStatus,
    OrderType,
    OrderUpdate,
    Side,
    Signal,
    replaced,
    trusted,
)

CASES: list[tuple[type[Message], dict[str, Any]]] = [
    (
        Signal,
        {
            "signal_id": "m1:BTCUSDT:1700000000000",
            "symbol": "BTCUSDT",
            "direction": Direction.LONG,
            "confidence": 0.61,
            "model_version": "m1",
            "candle_open_time_ms": 1_700_000_000_000,
            "price": Decimal("60000.10"),
            "created_at_ms": 1_700_000_060_000,
        },
    ),
    (
        Candle,
        {
            "symbol": "ETHUSDT",
            "interval": "1m",
            "open_time_ms": 1_700_000_000_000,
            "close_time_ms": 1_700_000_059_999,
            "open": Decimal("2000.5"),
            "high": Decimal("2001"),
            "low": Decimal("1999.25"),
            "close": Decimal("2000.75"),
            "volume": Decimal("12.345"),
            "trades": 7,
            "source": CandleSource.REPLAY,
        },
    ),
    (
        Fill,
        {
            "fill_id": "paper-qt-1-1",
            "client_order_id": "qt-1",
            "symbol": "BTCUSDT",
            "side": Side.SELL,
            "quantity": Decimal("0.010"),
            "price": Decimal("59988.0"),
            "fee": Decimal("0.23995200"),
            "reduce_only": True,
            "ts_ms": 1_700_000_060_000,
        },
    ),
    (
        OrderIntent,
        {
            "intent_id": "sig-1",
            "client_order_id": "qt-1",
            "symbol": "BTCUSDT",
            "side": Side.BUY,
            "quantity": Decimal("0.010"),
            "order_type": OrderType.MARKET,
            "reference_price": Decimal("60000.10"),
            "signal_id": "1",
            "policy_revision": 3,
            "created_at_ms": 1_700_000_060_000,
        },
    ),
    (
        OrderUpdate,
        {
            "client_order_id": "qt-1",
            "intent_id": "sig-1",
            "symbol": "BTCUSDT",
            "side": Side.BUY,
            "status": OrderStatus.EXPIRED,
            "quantity": Decimal("0.010"),
            "filled_quantity": Decimal(0),
            "avg_price": Decimal(0),
            "exchange": "paper",
            "reason": "price beyond the limit",
            "ts_ms": 1_700_000_060_000,
        },
    ),
]


@pytest.mark.parametrize(("message_type", "fields"), CASES, ids=lambda c: getattr(c, "KIND", ""))
def test_trusted_when_values_valid_then_the_message_validation_gives(
    message_type: type[Message], fields: dict[str, Any]
) -> None:
    validated = message_type(**fields)
    built = trusted(message_type, **fields)
    assert type(built) is message_type
    assert built == validated
    assert list(built.__dict__.items()) == list(validated.__dict__.items())
    assert built.model_fields_set == validated.model_fields_set
    assert built.encode() == validated.encode()
    assert hash(built) == hash(validated)
    assert built.model_copy(update={"symbol": "SOLUSDT"}) == validated.model_copy(
        update={"symbol": "SOLUSDT"}
    )


def test_trusted_when_frozen_then_refuses_assignment_like_a_validated_message() -> None:
    built = trusted(Signal, **CASES[0][1])
    with pytest.raises(ValueError, match="frozen"):
        built.confidence = 0.9  # type: ignore[misc]


def test_trusted_when_a_field_is_missing_or_unknown_then_type_error() -> None:
    fields = dict(CASES[0][1])
    del fields["price"]
    with pytest.raises(TypeError, match=r"missing \[.price.\]"):
        trusted(Signal, **fields)
    with pytest.raises(TypeError, match=r"unknown \[.colour.\]"):
        trusted(Signal, **CASES[0][1], colour="red")


# What the order driver changes of an intent for an attempt, and of an update.
UPDATES: dict[type[Message], dict[str, Any]] = {
    OrderIntent: {
        "client_order_id": "qt-1-r1",
        "quantity": Decimal("0.004"),
        "order_type": OrderType.LIMIT,
        "limit_price": Decimal("60030.15"),
    },
    OrderUpdate: {"status": OrderStatus.NEW, "filled_quantity": Decimal(0), "reason": None},
}


@pytest.mark.parametrize(("message_type", "fields"), CASES, ids=lambda c: getattr(c, "KIND", ""))
def test_replaced_when_fields_change_then_the_message_model_copy_gives(
    message_type: type[Message], fields: dict[str, Any]
) -> None:
    original = message_type(**fields)
    update = UPDATES.get(message_type, {"symbol": "SOLUSDT"})
    copied = original.model_copy(update=update)
    built = replaced(original, **update)
    assert type(built) is message_type
    assert built == copied
    assert list(built.__dict__.items()) == list(copied.__dict__.items())
    assert built.model_fields_set == copied.model_fields_set
    assert built.encode() == copied.encode()
    assert original == message_type(**fields)  # the original is untouched


def test_replaced_when_a_field_is_unknown_then_type_error() -> None:
    with pytest.raises(TypeError, match=r"unknown \[.colour.\]"):
        replaced(Signal(**CASES[0][1]), colour="red")
