"""The audits of the order-flow scenarios, on hand-made records: each catches what it must."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from qtrader.contracts.messages import OrderIntent, OrderStatus, OrderUpdate, Side
from qtrader_tools.metrics import EMPTY, Sample, histogram, parse, total
from qtrader_tools.stress.scenarios.exchange_instability import (
    audit_book,
    audit_intents,
    audit_pauses,
    retry_after_s,
)

METRICS = """\
# HELP lat Latency.
# TYPE lat histogram
lat_bucket{le="0.5"} 6.0
lat_bucket{le="1.0"} 9.0
lat_bucket{le="2.0"} 10.0
lat_bucket{le="+Inf"} 10.0
lat_count 10.0
lat_sum 5.0
# HELP conf Confidence.
# TYPE conf histogram
conf_bucket{outcome="decided",le="0.5"} 1.0
conf_bucket{outcome="decided",le="1.0"} 4.0
conf_bucket{outcome="decided",le="+Inf"} 4.0
conf_count{outcome="decided"} 4.0
conf_sum{outcome="decided"} 3.0
# HELP depth Depth.
# TYPE depth gauge
depth 3.0
"""


def _samples(text: str = METRICS) -> list[Sample]:
    return parse(text)


def test_histogram_when_parsed_then_quantiles_are_bucket_upper_bounds() -> None:
    latency = histogram(_samples(), "lat")
    assert latency.count == 10
    assert latency.quantile(0.5) == 0.5  # the 5th observation is in the first bucket
    assert latency.quantile(0.9) == 1.0
    assert latency.quantile(0.99) == 2.0
    assert latency.mean == 0.5
    assert latency.above(0.5) == 4


def test_histogram_when_minus_an_earlier_scrape_then_only_what_came_after() -> None:
    earlier_text = """\
# HELP lat Latency.
# TYPE lat histogram
lat_bucket{le="0.5"} 6.0
lat_bucket{le="1.0"} 6.0
lat_bucket{le="2.0"} 6.0
lat_bucket{le="+Inf"} 6.0
lat_count 6.0
lat_sum 1.0
"""
    after = histogram(_samples(), "lat").minus(histogram(_samples(earlier_text), "lat"))
    assert (after.count, after.total) == (4, 4.0)
    assert after.quantile(0.25) == 1.0
    assert after.quantile(1.0) == 2.0


def test_histogram_when_labels_then_filtered_and_absent_is_empty() -> None:
    decided = histogram(_samples(), "conf", outcome="decided")
    assert (decided.count, decided.above(0.5)) == (4, 3)
    assert histogram(_samples(), "conf", outcome="queue_full") == EMPTY
    assert EMPTY.quantile(0.99) is None
    assert total(_samples(), "depth") == 3


def test_histogram_when_edge_unknown_or_q_invalid_then_error() -> None:
    latency = histogram(_samples(), "lat")
    with pytest.raises(ValueError, match="bucket edge"):
        latency.above(0.7)
    with pytest.raises(ValueError, match="q must be"):
        latency.quantile(0)


def _entry(t_ms: int, status: int | None = 200, **extra: Any) -> dict[str, Any]:
    return {"t_ms": t_ms, "method": "POST", "path": "/fapi/v1/order", "status": status, **extra}


def test_retry_after_when_injected_or_window_then_as_the_simulator_computes_it() -> None:
    assert retry_after_s(_entry(1_000, 429, fault="http_429"), injected_s=2, window_ms=1_000) == 2
    assert retry_after_s(_entry(5_300, 429, code=-1015), injected_s=2, window_ms=1_000) == 1
    assert retry_after_s(_entry(5_300, 429, code=-1003), injected_s=2, window_ms=60_000) == 55


def test_pauses_when_a_request_comes_before_retry_after_then_counted() -> None:
    log = [
        _entry(1_000, 429, code=-1003, fault="http_429"),  # pause until 3,000
        _entry(2_999),  # too early
        _entry(3_000),
        _entry(5_300, 429, code=-1015),  # pause until 6,300
        _entry(6_299),  # too early
        _entry(6_300),
    ]
    audit = audit_pauses(log, injected_s=2, window_ms=1_000)
    assert audit.rate_limited == 2
    assert audit.by_code == {"-1003": 1, "-1015": 1}
    assert audit.during_pauses == 2
    assert (
        "2999" in audit.examples[0] or "2,999" in audit.examples[0] or "2999" in audit.examples[0]
    )


def test_pauses_when_every_request_waits_then_none() -> None:
    log = [_entry(1_000, 429, code=-1003, fault="http_429"), _entry(3_000), _entry(3_100)]
    assert audit_pauses(log, injected_s=2, window_ms=1_000).during_pauses == 0


def test_book_when_an_attempt_id_is_booked_twice_then_a_duplicate() -> None:
    stem = "qt-" + "a" * 29
    orders = [
        {"clientOrderId": stem + "bcd", "status": "FILLED"},
        {"clientOrderId": stem + "bcd", "status": "FILLED"},  # the same attempt again
        {"clientOrderId": stem + "-r1", "status": "EXPIRED"},
        {"clientOrderId": stem + "-r2", "status": "EXPIRED"},
        {"clientOrderId": stem + "-r3", "status": "EXPIRED"},  # a fourth attempt
        {"clientOrderId": "qt-" + "b" * 32, "status": "FILLED"},
    ]
    audit = audit_book(orders, max_attempts=3)
    assert audit.duplicate_bookings == 1
    assert (audit.intents, audit.most_attempts, audit.over_max_attempts) == (2, 4, 1)
    assert audit.filled == 3


def _intent(intent_id: str) -> OrderIntent:
    return OrderIntent(
        intent_id=intent_id,
        client_order_id=f"qt-{intent_id}",
        symbol="BTCUSDT",
        side=Side.BUY,
        quantity=Decimal(1),
        reference_price=Decimal(100),
        policy_revision=1,
        created_at_ms=0,
    )


def _update(intent_id: str, status: OrderStatus) -> OrderUpdate:
    return OrderUpdate(
        client_order_id=f"qt-{intent_id}",
        intent_id=intent_id,
        symbol="BTCUSDT",
        side=Side.BUY,
        status=status,
        quantity=Decimal(1),
        filled_quantity=Decimal(0),
        avg_price=Decimal(0),
        exchange="binance",
        ts_ms=0,
    )


def test_intents_when_unknown_left_or_no_update_then_not_final() -> None:
    intents = [_intent(i) for i in ("a", "b", "c", "d")]
    updates = [
        _update("a", OrderStatus.PENDING_NEW),
        _update("a", OrderStatus.UNKNOWN),
        _update("a", OrderStatus.FILLED),  # resolved
        _update("b", OrderStatus.PENDING_NEW),
        _update("b", OrderStatus.UNKNOWN),  # left unknown
        _update("c", OrderStatus.REJECTED),
    ]  # d: never sent
    audit = audit_intents(intents, updates)
    assert (audit.intents, audit.final, audit.not_final) == (4, 2, 2)
    assert (audit.unknown_left, audit.unknown_resolved) == (1, 1)
    assert audit.by_status == {"FILLED": 1, "UNKNOWN": 1, "REJECTED": 1}
