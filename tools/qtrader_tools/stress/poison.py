"""The poison catalogue: one valid message of every wire type, and the bytes to spoil it with.

``sample_messages`` is a valid instance of each message type (Decimals and optional fields
filled in); ``poison_for`` turns one into payloads no consumer of its subject may act on: deeply
nested JSON, bytes that are not UTF-8, a payload over the size cap, NaN, the wrong kind, the
wrong schema version, and the valid body with one Decimal replaced by ``"1e999"``, ``"NaN"``,
``"Infinity"`` or ``"1e-999"`` and its timestamps pushed past year 9999. ``subject_of`` says
where each kind travels. The poison test (tests/integration/test_poison_messages.py) and the
``poison`` stress scenario both publish this catalogue, so it lives here, once.

``pack_poison_for`` is the same for the subjects where a kind travels in packs (candles and
signals of a step): each spoiled message alone and as a pack's one item, and packs that are no
packs of that kind.

``bad_values`` are the same spoilings for a KV value (policy, halt latch): what is stored under
a key any workload reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    MAX_PACK_ITEMS,
    AccountEntry,
    Candle,
    CandleSource,
    ControlHeartbeat,
    DependencyState,
    Direction,
    EmergencyStopView,
    Fill,
    HaltAck,
    HaltLatch,
    HealthStatus,
    IncomeType,
    Message,
    OrderIntent,
    OrderStatus,
    OrderUpdate,
    PolicyRevision,
    PortfolioSnapshot,
    PositionView,
    RiskAlert,
    RiskAlertKind,
    Side,
    Signal,
    TradingState,
    WorkloadHealthReport,
)
from qtrader.contracts.policy import TradingPolicySpec
from qtrader.control.ess_resource import EmergencyStopSpec
from qtrader.local.control_plane import EssRecord

T0 = 1_764_000_000_000


def sample_messages() -> list[Message]:
    """A valid instance of each message type, its Decimals and optional fields filled in."""
    position = PositionView(
        symbol="BTCUSDT",
        quantity=Decimal("-0.002"),
        avg_entry_price=Decimal("50000.123456789012345678901234"),
        mark_price=Decimal("50010.1"),
        unrealized_pnl=Decimal("-0.02"),
        realized_pnl=Decimal("1.5"),
        fees=Decimal("0.04"),
    )
    return [
        Candle(
            symbol="BTCUSDT",
            interval="1m",
            open_time_ms=T0,
            close_time_ms=T0 + 59_999,
            open=Decimal("50000.1"),
            high=Decimal("50010.5"),
            low=Decimal("49990"),
            close=Decimal("50005.2"),
            volume=Decimal("12.345"),
            trades=42,
            source=CandleSource.SYNTHETIC,
        ),
        Signal(
            signal_id="s-1",
            symbol="BTCUSDT",
            direction=Direction.LONG,
            confidence=0.8,
            model_version="m1",
            candle_open_time_ms=T0,
            price=Decimal("50005.2"),
            created_at_ms=T0,
        ),
        OrderIntent(
            intent_id="i-1",
            client_order_id="qt-i-1",
            symbol="BTCUSDT",
            side=Side.BUY,
            quantity=Decimal("0.002"),
            limit_price=Decimal("50100"),
            reference_price=Decimal("50005.2"),
            signal_id="s-1",
            policy_revision=1,
            created_at_ms=T0,
        ),
        OrderUpdate(
            client_order_id="qt-i-1",
            intent_id="i-1",
            symbol="BTCUSDT",
            side=Side.BUY,
            status=OrderStatus.FILLED,
            quantity=Decimal("0.002"),
            filled_quantity=Decimal("0.002"),
            avg_price=Decimal("50005.25"),
            exchange="paper",
            ts_ms=T0,
        ),
        Fill(
            fill_id="f-1",
            client_order_id="qt-i-1",
            symbol="BTCUSDT",
            side=Side.BUY,
            quantity=Decimal("0.002"),
            price=Decimal("50005.2"),
            fee=Decimal("0.04"),
            ts_ms=T0,
        ),
        AccountEntry(
            entry_id="FUNDING_FEE:1",
            income_type=IncomeType.FUNDING_FEE,
            symbol="BTCUSDT",
            asset="USDT",
            amount=Decimal("-0.0125"),
            ts_ms=T0,
        ),
        PortfolioSnapshot(
            sequence=1,
            ts_ms=T0,
            fills_applied=1,
            initial_capital=Decimal(10_000),
            realized_pnl=Decimal("1.5"),
            unrealized_pnl=Decimal("-0.02"),
            fees=Decimal("0.04"),
            equity=Decimal("10001.44"),
            peak_equity=Decimal("10002"),
            drawdown_pct=Decimal("0.005599"),
            max_drawdown_pct=Decimal("0.01"),
            positions=(position,),
        ),
        RiskAlert(
            alert_id="a-1",
            alert_kind=RiskAlertKind.FLASH_CRASH,
            source="test",
            symbol="BTCUSDT",
            value=Decimal("-16.5"),
            threshold=Decimal("15"),
            detail="a test alert",
            ts_ms=T0,
        ),
        HaltLatch(state=TradingState.ACTIVE, revision=1, issued_at_ms=T0),
        HaltAck(worker_id="w-1", revision=1, state=TradingState.ACTIVE, ts_ms=T0),
        ControlHeartbeat(issued_by="test", latch_revision=1, ts_ms=T0),
        PolicyRevision(
            name="p",
            revision=1,
            published_at_ms=T0,
            spec=TradingPolicySpec(symbols=("BTCUSDT",)),
        ),
        EssRecord(name="main", generation=1, spec=EmergencyStopSpec()),
        EmergencyStopView(
            name="main",
            state="Tripped",
            latch=TradingState.HALTED,
            latch_revision=2,
            reason="drill",
            tripped_by="cli:alice",
            tripped_at_ms=T0,
            cooldown_until_ms=T0 + 300_000,
            require_manual_reset=True,
            trip_count=1,
            pending_workers=("w-1",),
            held_by=("main",),
            ts_ms=T0,
        ),
        WorkloadHealthReport(
            service="portfolio",
            worker_id="w-1",
            status=HealthStatus.DEGRADED,
            version="0.1.0",
            uptime_s=12.5,
            interval_s=2.0,
            dependencies=(
                DependencyState(name="nats", status=HealthStatus.OK, latency_ms=0.4),
                DependencyState(name="policy", status=HealthStatus.DEGRADED, detail="stale"),
            ),
            ts_ms=T0,
        ),
    ]


HOSTILE_DECIMALS = ["1e999", "-1e999", "NaN", "Infinity", "-Infinity", "1e-999"]
# Kinds stored as KV values, not published on a subject.
KV_KINDS = frozenset({"policy_revision", "emergency_stop"})
SAMPLE_SYMBOL = "BTCUSDT"  # every sample message is for this symbol


def subject_of(message: Message, symbol: str = SAMPLE_SYMBOL) -> str:
    """Where each kind of message travels."""
    by_kind = {
        "candle": subjects.candle_subject(symbol),
        "signal": subjects.signal_subject(symbol),
        "order_intent": subjects.order_intent_subject(symbol),
        "order_update": subjects.order_update_subject(symbol),
        "fill": subjects.fill_subject(symbol),
        "account_entry": subjects.ACCOUNT_ENTRY,
        "portfolio_snapshot": subjects.PORTFOLIO_SNAPSHOT,
        "risk_alert": subjects.risk_alert_subject(RiskAlertKind.FLASH_CRASH.value),
        "halt_latch": subjects.CONTROL_HALT,
        "halt_ack": subjects.CONTROL_HALT_ACK,
        "control_heartbeat": subjects.CONTROL_HEARTBEAT,
        "emergency_stop_view": subjects.CONTROL_ESS_STATUS,
        "workload_health": subjects.health_report_subject("portfolio"),
    }
    return by_kind[message.KIND]


def _leaves(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _leaves(child, (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _leaves(child, (*path, index))
    else:
        yield path, value


def _with(document: Any, path: tuple[Any, ...], value: object) -> bytes:
    copy = json.loads(json.dumps(document))
    target = copy
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return json.dumps(copy).encode()


def _is_decimal(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        Decimal(value)
    except ArithmeticError:
        return False
    return True


def poison_for(message: Message, other: Message) -> list[bytes]:
    """Bytes no consumer of ``message``'s subject may act on; ``other`` is of another kind."""
    document = json.loads(message.encode())
    payloads = [
        b"[" * 10_000 + b"]" * 10_000,
        b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
        b'{"kind": "' + message.KIND.encode() + b'", "symbol": "\xff\xfe\xfd"}',
        json.dumps({**document, "padding": "x" * 300_000}).encode(),  # over the 256 KiB cap
        json.dumps({**document, "schema_version": float("nan")}).encode(),  # a NaN literal
        other.encode(),  # the wrong kind
        b"",
        os.urandom(64),
        json.dumps({**document, "schema_version": [1]}).encode(),
        json.dumps({**document, "schema_version": 999}).encode(),  # a version nobody reads
    ]
    for path, value in _leaves(document):
        if _is_decimal(value):
            payloads += [_with(document, path, bad) for bad in HOSTILE_DECIMALS]
        elif path[-1] in {"ts_ms", "created_at_ms", "open_time_ms", "issued_at_ms"}:
            payloads.append(_with(document, path, 10**16))
    return payloads


# Where the packs of each packable kind travel.
PACK_SUBJECTS = {"candle": subjects.CANDLE_STEP, "signal": subjects.SIGNAL_STEP}


def pack_poison_for(message: Message, other: Message) -> list[bytes]:
    """Bytes no reader of ``message``'s pack subject may act on, each refused exactly once:
    ``poison_for``'s payloads as they are and, where they are JSON objects, as the one item of
    a pack (the item refused on its own); then packs refused whole (another kind of items, a
    version nobody reads, an unknown field, no items, too many, items that are no list)."""
    document = json.loads(message.encode())
    spoiled = poison_for(message, other)
    as_items = []
    for payload in spoiled:
        try:
            item = json.loads(payload)
        except (ValueError, RecursionError):  # not JSON: sent as it is only
            continue
        if isinstance(item, dict):
            as_items.append(_pack([item], of=message.KIND))
    return [
        *spoiled,
        *as_items,
        _pack([json.loads(other.encode())], of=other.KIND),
        _pack([document], of=message.KIND, schema_version=2),
        _pack([document], of=message.KIND, padding="x"),
        _pack([], of=message.KIND),
        _pack([document] * (MAX_PACK_ITEMS + 1), of=message.KIND),
        json.dumps(
            {"kind": "pack", "schema_version": 1, "of": message.KIND, "items": document}
        ).encode(),
    ]


def _pack(items: list[Any], *, of: str, schema_version: int = 1, **extra: object) -> bytes:
    pack = {"kind": "pack", "schema_version": schema_version, "of": of, "items": items, **extra}
    return json.dumps(pack).encode()


def bad_values(message: Message, other: Message) -> list[bytes]:
    """Values no reader of ``message``'s KV key may take: the kinds of ``poison_for`` without
    the one for each Decimal (a handful per kind is enough for a key read whole), plus the
    wrong schema version."""
    document = json.loads(message.encode())
    return [
        b"not json at all",
        b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
        json.dumps({**document, "padding": "x" * 300_000}).encode(),
        json.dumps({**document, "schema_version": 999}).encode(),
        other.encode(),
        *(_with(document, path, "1e999") for path, v in _leaves(document) if _is_decimal(v)),
    ]


def published_poison() -> list[tuple[str, bytes]]:
    """The whole catalogue for the subjects: (subject, payload) for every kind published."""
    samples = sample_messages()
    lone = [
        (subject_of(message), payload)
        for index, message in enumerate(samples)
        if message.KIND not in KV_KINDS
        for payload in poison_for(message, samples[(index + 1) % len(samples)])
    ]
    packed = [
        (PACK_SUBJECTS[message.KIND], payload)
        for index, message in enumerate(samples)
        if message.PACKABLE
        for payload in pack_poison_for(message, samples[(index + 1) % len(samples)])
    ]
    return lone + packed
