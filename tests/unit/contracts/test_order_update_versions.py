"""Order updates carry typed decisions (``refused_by``, ``error_kind``) since version 2; a
version 1 update (strings only) still decodes, with both derived from its strings."""

from __future__ import annotations

import json

import pytest

from qtrader.contracts.messages import ErrorKind, OrderUpdate, RefusedBy, decode
from qtrader.exchange import errors


def _v1(*, exchange: str, reason: str | None, status: str = "REJECTED") -> bytes:
    return json.dumps(
        {
            "kind": "order_update",
            "schema_version": 1,
            "client_order_id": "qt-1",
            "intent_id": "i-1",
            "symbol": "BTCUSDT",
            "side": "BUY",
            "status": status,
            "quantity": "0.010",
            "filled_quantity": "0",
            "avg_price": "0",
            "exchange": exchange,
            "reason": reason,
            "worker_id": "w",
            "ts_ms": 1_700_000_000_000,
        }
    ).encode()


@pytest.mark.parametrize(
    ("exchange", "refused_by"),
    [("halt-gate", RefusedBy.HALT_GATE), ("exposure-book", RefusedBy.EXPOSURE_BOOK)],
)
def test_a_version_1_refusal_decodes_with_who_refused_it(
    exchange: str, refused_by: RefusedBy
) -> None:
    update = decode(_v1(exchange=exchange, reason="trading is HALTED"), OrderUpdate)
    assert update.refused_by is refused_by
    assert update.refused_before_venue
    assert update.error_kind is None


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        ("Rejected (-2022): ReduceOnly Order is rejected.", ErrorKind.REJECTED),
        ("exchange ban (-1003): banned until 1700000000000", ErrorKind.BANNED),
        ("OutcomeUnknown (-1007): timeout", ErrorKind.OUTCOME_UNKNOWN),
        ("FilterViolation: LOT_SIZE", ErrorKind.FILTER_VIOLATION),
        ("price left the slippage bound 30150", None),
        (None, None),
    ],
)
def test_a_version_1_exchange_error_decodes_with_its_kind(
    reason: str | None, kind: ErrorKind | None
) -> None:
    update = decode(_v1(exchange="binance", reason=reason, status="CANCELED"), OrderUpdate)
    assert update.error_kind is kind
    assert update.refused_by is None


def test_a_version_2_update_round_trips_its_typed_fields() -> None:
    raw = json.loads(_v1(exchange="binance", reason="Transient: 503"))
    raw.update(schema_version=2, error_kind="transient", refused_by=None)
    update = decode(json.dumps(raw).encode(), OrderUpdate)
    assert update.error_kind is ErrorKind.TRANSIENT
    assert decode(update.encode(), OrderUpdate) == update


def test_every_exchange_error_type_names_its_own_kind() -> None:
    """The kind on the wire is the error type's own: a new type must name one."""
    import qtrader.exchange.binance  # noqa: F401  # its private subclasses join the walk

    pending: list[type[errors.ExchangeError]] = [errors.ExchangeError]
    kinds: dict[ErrorKind, str] = {}
    while pending:
        error_type = pending.pop()
        pending.extend(error_type.__subclasses__())
        if error_type.__module__ != errors.__name__:
            continue  # an adapter's private refinement (a network failure is Transient)
        assert "kind" in vars(error_type), f"{error_type.__name__} declares no kind"
        assert error_type.kind not in kinds, (error_type.__name__, kinds[error_type.kind])
        kinds[error_type.kind] = error_type.__name__
