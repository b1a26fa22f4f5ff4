"""Checkpoints: a ledger restored from one and fed the rest of the fills and account entries is
the ledger that was fed them all, every Decimal of it (compared as encoded text, so even the
exponents agree)."""

from __future__ import annotations

import json
import random
from decimal import Decimal

import pytest

from qtrader.contracts.messages import (
    AccountEntry,
    Fill,
    IncomeType,
    PortfolioCheckpoint,
    Side,
    account_entry_id,
    decode,
)
from qtrader.instruments import paper_exchange_info
from qtrader.portfolio.ledger import Ledger

EXCHANGE = paper_exchange_info()
CAPITAL = Decimal(10_000)
PRICES = {"BTCUSDT": Decimal("30000"), "ETHUSDT": Decimal("2000"), "SOLUSDT": Decimal("150")}
Event = Fill | AccountEntry | tuple[str, Decimal]
# Account entries among the fills: funding of both signs, transfers in and out (USDT and BNB),
# other income, and funding in BNB (kept unvalued).
ENTRY_KINDS = [
    (IncomeType.FUNDING_FEE, "USDT"),
    (IncomeType.FUNDING_FEE, "USDT"),
    (IncomeType.FUNDING_FEE, "BNB"),
    (IncomeType.TRANSFER, "USDT"),
    (IncomeType.TRANSFER, "BNB"),
    (IncomeType.REFERRAL_KICKBACK, "USDT"),
]


def burst(count: int, seed: int = 11) -> list[Event]:
    """Fills (opens, adds, partial closes, flips; fees in USDT, in BNB with and without a USDT
    value; prices off the paper grid) with marks and account entries in between, as the
    portfolio sees them."""
    rng = random.Random(seed)
    events: list[Event] = []
    for index in range(count):
        symbol = rng.choice(list(PRICES))
        price = PRICES[symbol] * Decimal(rng.randint(9_000, 11_000)) / 10_000
        if rng.random() < 0.3:
            events.append((symbol, price.quantize(Decimal("0.01"))))
        if rng.random() < 0.1:
            events.append(_entry(rng, index, symbol))
        quantity = Decimal(rng.randint(1, 999)) / 1_000
        fee = (price * quantity * 4 / 10_000).quantize(Decimal("1e-8"))
        asset, value = "USDT", None
        if rng.random() < 0.2:
            asset, fee = "BNB", (fee / 600).quantize(Decimal("1e-8"))
            value = None if rng.random() < 0.5 else (fee * 600).quantize(Decimal("1e-8"))
        events.append(
            Fill(
                fill_id=f"cp-{index}",
                client_order_id=f"c-{index}",
                symbol=symbol,
                side=rng.choice([Side.BUY, Side.SELL]),
                quantity=quantity,
                price=price.quantize(Decimal("0.0001")),
                fee=fee,
                fee_asset=asset,
                fee_usdt=value,
                ts_ms=index,
            )
        )
    return events


def _entry(rng: random.Random, index: int, symbol: str) -> AccountEntry:
    kind, asset = rng.choice(ENTRY_KINDS)
    return AccountEntry(
        entry_id=account_entry_id(kind, str(index)),
        income_type=kind,
        symbol=symbol if kind is IncomeType.FUNDING_FEE else None,
        asset=asset,
        amount=Decimal(rng.randint(-(10**10), 10**10)) / 10**8,
        ts_ms=index,
    )


def feed(ledger: Ledger, events: list[Event]) -> None:
    for event in events:
        if isinstance(event, Fill):
            ledger.apply_fill(event)
        elif isinstance(event, AccountEntry):
            ledger.apply_entry(event)
        else:
            ledger.mark(*event)


def exact_state(ledger: Ledger) -> bytes:
    return ledger.checkpoint(fills_through=0, ts_ms=0, source="test").encode()


def through_the_wire(ledger: Ledger) -> Ledger:
    written = ledger.checkpoint(fills_through=7, ts_ms=1, source="test").encode()
    return Ledger.restore(decode(written, PortfolioCheckpoint), exchange=EXCHANGE)


@pytest.mark.parametrize("cut", [0, 1, 333, 1_000, 1_999, 2_000])
def test_restore_then_tail_when_cut_anywhere_then_equals_a_full_replay_exactly(cut: int) -> None:
    events = burst(2_000)
    full = Ledger(initial_capital=CAPITAL, exchange=EXCHANGE)
    feed(full, events)
    head = Ledger(initial_capital=CAPITAL, exchange=EXCHANGE)
    feed(head, events[:cut])
    restored = through_the_wire(head)
    feed(restored, events[cut:])
    assert exact_state(restored) == exact_state(full)
    figures = ("equity", "unrealized_pnl", "drawdown_pct", "fees", "realized_pnl", "funding")
    for figure in (*figures, "transfers", "other_income", "wallet", "peak_equity"):
        assert str(getattr(restored, figure)) == str(getattr(full, figure)), figure
    assert restored.snapshot(sequence=1, ts_ms=0) == full.snapshot(sequence=1, ts_ms=0)
    assert full.entries_applied > 100
    assert dict(full.unvalued_income).keys() == {"BNB"}


def test_restore_when_a_recent_entry_comes_again_then_it_counts_once() -> None:
    entries = [e for e in burst(200) if isinstance(e, AccountEntry)]
    head = Ledger(initial_capital=CAPITAL, exchange=EXCHANGE)
    for one in entries:
        head.apply_entry(one)
    restored = through_the_wire(head)
    assert restored.apply_entry(entries[-1]) is False
    assert exact_state(restored) == exact_state(head)


def test_restore_when_checkpoint_of_version_1_then_restores_with_no_entries() -> None:
    """A checkpoint written before account entries existed (version 1) still restores."""
    head = Ledger(initial_capital=CAPITAL, exchange=EXCHANGE)
    feed(head, [e for e in burst(100) if not isinstance(e, AccountEntry)])
    document = head.checkpoint(fills_through=9, ts_ms=1, source="old").model_dump(mode="json")
    new_fields = set(PortfolioCheckpoint.model_fields) - set(_V1_CHECKPOINT_FIELDS)
    old = {k: v for k, v in document.items() if k not in new_fields}
    old["schema_version"] = 1
    for position in old["positions"]:
        del position["funding"]
    restored = Ledger.restore(
        decode(json.dumps(old).encode(), PortfolioCheckpoint), exchange=EXCHANGE
    )
    assert exact_state(restored) == exact_state(head)
    assert restored.entries_applied == 0


_V1_CHECKPOINT_FIELDS = (
    *("schema_version", "kind", "source", "ts_ms", "fills_through", "fills_applied"),
    *("initial_capital", "realized_pnl", "fees_usdt", "fees_by_asset", "unvalued_fees"),
    *("peak_equity", "max_drawdown_pct", "positions", "marks", "recent_fills", "skipped"),
)


def test_restore_when_a_recent_fill_comes_again_then_it_counts_once() -> None:
    fills = [e for e in burst(50) if isinstance(e, Fill)]
    head = Ledger(initial_capital=CAPITAL, exchange=EXCHANGE)
    for one in fills:
        head.apply_fill(one)
    restored = through_the_wire(head)
    assert restored.apply_fill(fills[-1]) is False
    assert exact_state(restored) == exact_state(head)


def test_restore_when_checkpoint_holds_a_position_without_a_mark_then_refused() -> None:
    head = Ledger(initial_capital=CAPITAL, exchange=EXCHANGE)
    feed(head, burst(10))
    broken = head.checkpoint(fills_through=1, ts_ms=0, source="t").model_copy(update={"marks": ()})
    with pytest.raises(ValueError, match="no mark"):
        Ledger.restore(broken, exchange=EXCHANGE)
