"""Rows of the venue's income history into account entries (pure), and the read cursor."""

from __future__ import annotations

from decimal import Decimal

import pytest

from qtrader.contracts.messages import AccountEntry, IncomeType
from qtrader.exchange.venue import VenueIncome
from qtrader.execution.account_entries import Cursor, Outcome, PassedOver, row_key, to_entry

T0 = 1_764_000_000_000


def row(
    income_type: str, amount: str, *, symbol: str = "", asset: str = "USDT", tran_id: str = "7"
) -> VenueIncome:
    return VenueIncome(
        tran_id=tran_id,
        income_type=income_type,
        amount=Decimal(amount),
        asset=asset,
        symbol=symbol,
        time_ms=T0,
        info="",
    )


def test_to_entry_when_funding_then_an_entry_of_the_symbol_with_the_exact_amount() -> None:
    made = to_entry(row("FUNDING_FEE", "-0.01234567", symbol="BTCUSDT", tran_id="99"))
    assert isinstance(made, AccountEntry)
    assert made.entry_id == "FUNDING_FEE:99"
    assert made.income_type is IncomeType.FUNDING_FEE
    assert (made.symbol, made.asset, made.amount) == ("BTCUSDT", "USDT", Decimal("-0.01234567"))
    assert made.ts_ms == T0


def test_to_entry_when_transfer_without_symbol_then_an_entry_of_no_symbol() -> None:
    made = to_entry(row("TRANSFER", "250", asset="BNB"))
    assert isinstance(made, AccountEntry)
    assert made.symbol is None
    assert made.asset == "BNB"


@pytest.mark.parametrize("income_type", ["REALIZED_PNL", "COMMISSION"])
def test_to_entry_when_a_trade_row_then_passed_over_the_fills_carry_it(income_type: str) -> None:
    assert to_entry(row(income_type, "-0.5", symbol="BTCUSDT")) == PassedOver(
        outcome=Outcome.FROM_FILLS
    )


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        (row("LOTTERY_WIN", "5"), "not one the ledger knows"),
        (row("FUNDING_FEE", "-1"), "names its symbol"),
        (row("FUNDING_FEE", "NaN", symbol="BTCUSDT"), "amount"),
        (row("TRANSFER", "1e999"), "amount"),
        (row("TRANSFER", "1", asset="usdt"), "asset"),
    ],
    ids=["unknown type", "funding of no symbol", "NaN", "1e999", "lower-case asset"],
)
def test_to_entry_when_the_row_cannot_be_booked_then_refused_saying_why(
    bad: VenueIncome, says: str
) -> None:
    made = to_entry(bad)
    assert isinstance(made, PassedOver)
    assert made.outcome is Outcome.REFUSED
    assert says in made.detail
    assert row_key(bad) in made.detail


def test_cursor_when_rows_handled_then_reads_from_the_newest_less_the_overlap() -> None:
    cursor = Cursor(origin_ms=T0, through_ms=T0, overlap_ms=60_000)
    assert cursor.start_ms() == T0  # never before the origin
    later = VenueIncome(
        tran_id="1", income_type="TRANSFER", amount=Decimal(1), asset="USDT", symbol="",
        time_ms=T0 + 600_000,
    )  # fmt: skip
    cursor.handled(row("TRANSFER", "1", tran_id="0"))
    cursor.handled(later)
    assert cursor.start_ms() == T0 + 540_000
    cursor.forget_old()
    assert set(cursor.seen) == {"TRANSFER:1"}  # older than the overlap: never read again
