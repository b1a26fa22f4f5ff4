"""Account entries in the ledger: funding, transfers and other income the venue booked, checked
by hand on small cases and against the independent ``Fraction`` account of ``qtrader_tools.stress``.
"""

from __future__ import annotations

import random
from decimal import Decimal
from fractions import Fraction

import pytest

from qtrader.contracts.messages import (
    AccountEntry,
    Fill,
    IncomeType,
    Side,
    account_entry_id,
)
from qtrader.instruments import paper_exchange_info
from qtrader.portfolio.ledger import EntryRefused, Ledger
from qtrader_tools.exact import ExactPortfolio, usdt

EXCHANGE = paper_exchange_info()
CAPITAL = Decimal(10_000)
_ids = iter(range(1, 1_000_000))


def make_ledger() -> Ledger:
    return Ledger(initial_capital=CAPITAL, exchange=EXCHANGE)


def entry(
    income_type: IncomeType,
    amount: str | Decimal,
    *,
    symbol: str | None = None,
    asset: str = "USDT",
    tran_id: str | None = None,
) -> AccountEntry:
    n = next(_ids)
    return AccountEntry(
        entry_id=account_entry_id(income_type, tran_id or str(n)),
        income_type=income_type,
        symbol=symbol,
        asset=asset,
        amount=Decimal(amount),
        ts_ms=n,
    )


def buy(quantity: str, price: str, *, symbol: str = "BTCUSDT") -> Fill:
    n = next(_ids)
    return Fill(
        fill_id=f"f-{n}",
        client_order_id=f"c-{n}",
        symbol=symbol,
        side=Side.BUY,
        quantity=Decimal(quantity),
        price=Decimal(price),
        fee=Decimal(0),
        ts_ms=n,
    )


def exact_state(ledger: Ledger) -> bytes:
    return ledger.checkpoint(fills_through=0, ts_ms=0, source="test").encode()


def test_apply_entry_when_funding_of_both_signs_then_booked_per_symbol_and_in_equity() -> None:
    ledger = make_ledger()
    ledger.apply_fill(buy("0.1", "30000"))
    assert ledger.apply_entry(entry(IncomeType.FUNDING_FEE, "-0.30000000", symbol="BTCUSDT"))
    assert ledger.apply_entry(entry(IncomeType.FUNDING_FEE, "0.12345678", symbol="BTCUSDT"))
    assert ledger.apply_entry(entry(IncomeType.FUNDING_FEE, "0.5", symbol="ETHUSDT"))
    assert ledger.funding == Decimal("0.32345678")
    assert ledger.position("BTCUSDT").funding == Decimal("-0.17654322")
    assert ledger.position("ETHUSDT").funding == Decimal("0.5")
    assert ledger.position("ETHUSDT").quantity == 0  # funding alone opens nothing
    assert ledger.wallet == CAPITAL + Decimal("0.32345678")
    assert ledger.equity == ledger.wallet + ledger.unrealized_pnl
    assert ledger.entries_applied == 3
    assert ledger.fills_applied == 1


def test_apply_entry_when_transfers_and_other_income_then_in_the_wallet() -> None:
    ledger = make_ledger()
    ledger.apply_entry(entry(IncomeType.TRANSFER, "250"))
    ledger.apply_entry(entry(IncomeType.TRANSFER, "-100.5"))
    ledger.apply_entry(entry(IncomeType.COMMISSION_REBATE, "1.25", symbol="BTCUSDT"))
    ledger.apply_entry(entry(IncomeType.POSITION_LIMIT_INCREASE_FEE, "-2"))
    assert ledger.transfers == Decimal("149.5")
    assert ledger.other_income == Decimal("-0.75")
    assert ledger.funding == 0
    assert ledger.equity == CAPITAL + Decimal("149.5") - Decimal("0.75")
    assert dict(ledger.transfers_by_asset) == {"USDT": Decimal("149.5")}


def test_apply_entry_when_withdrawing_in_a_drawdown_then_the_drawdown_stays_what_it_was() -> None:
    ledger = make_ledger()
    ledger.apply_fill(buy("1", "1000"))
    ledger.mark("BTCUSDT", Decimal(2000))  # equity 11,000: the peak
    ledger.mark("BTCUSDT", Decimal(1450))  # equity 10,450: 5% below it
    assert ledger.drawdown_pct == 5
    ledger.apply_entry(entry(IncomeType.TRANSFER, "-5225"))  # half the account out
    assert ledger.equity == Decimal(5225)
    assert ledger.peak_equity == Decimal(5500)  # scaled with the equity
    assert ledger.drawdown_pct == 5
    assert ledger.max_drawdown_pct == 5
    ledger.apply_entry(entry(IncomeType.TRANSFER, "10450"))  # and a deposit: still 5%
    assert ledger.drawdown_pct == 5
    assert ledger.max_drawdown_pct == 5


def test_apply_entry_when_funding_is_paid_then_it_is_a_loss_in_the_drawdown() -> None:
    ledger = make_ledger()
    ledger.apply_fill(buy("1", "1000"))
    ledger.apply_entry(entry(IncomeType.FUNDING_FEE, "-500", symbol="BTCUSDT"))
    assert ledger.drawdown_pct == 5
    assert ledger.max_drawdown_pct == 5


def test_apply_entry_when_in_another_asset_then_kept_in_it_and_never_valued() -> None:
    ledger = make_ledger()
    ledger.apply_entry(entry(IncomeType.TRANSFER, "2.5", asset="BNB"))
    assert ledger.equity == CAPITAL
    assert dict(ledger.transfers_by_asset) == {"BNB": Decimal("2.5")}
    assert ledger.equity_complete  # holding BNB is no USDT figure left out
    ledger.apply_entry(entry(IncomeType.FEE_RETURN, "0.01", asset="BNB"))
    ledger.apply_entry(entry(IncomeType.FUNDING_FEE, "-0.002", symbol="BTCUSDT", asset="BNB"))
    assert ledger.equity == CAPITAL
    assert ledger.funding == 0
    assert ledger.position("BTCUSDT").funding == 0
    assert dict(ledger.unvalued_income) == {"BNB": Decimal("0.008")}
    assert not ledger.equity_complete  # an income of unknown USDT value is left out
    snapshot = ledger.snapshot(sequence=1, ts_ms=0)
    assert [(a.asset, a.amount) for a in snapshot.unvalued_income] == [("BNB", Decimal("0.008"))]
    assert not snapshot.equity_complete


def test_apply_entry_when_same_entry_again_then_counts_once() -> None:
    ledger = make_ledger()
    once = entry(IncomeType.FUNDING_FEE, "-1", symbol="BTCUSDT")
    assert ledger.apply_entry(once)
    before = exact_state(ledger)
    assert ledger.apply_entry(once.model_copy(update={"ts_ms": 5, "info": "read again"})) is False
    assert exact_state(ledger) == before


def test_apply_entry_when_same_id_with_other_content_then_refused_and_nothing_changes() -> None:
    ledger = make_ledger()
    ledger.apply_entry(entry(IncomeType.FUNDING_FEE, "-1", symbol="BTCUSDT", tran_id="77"))
    before = exact_state(ledger)
    conflicting = entry(IncomeType.FUNDING_FEE, "-2", symbol="BTCUSDT", tran_id="77")
    with pytest.raises(EntryRefused, match="other content") as refused:
        ledger.apply_entry(conflicting)
    assert refused.value.entry_id == "FUNDING_FEE:77"
    assert exact_state(ledger) == before


def test_entry_ids_when_same_tran_id_in_two_income_types_then_both_booked() -> None:
    """Binance's ``tranId`` is unique only within one income type."""
    ledger = make_ledger()
    assert ledger.apply_entry(entry(IncomeType.TRANSFER, "10", tran_id="5"))
    assert ledger.apply_entry(entry(IncomeType.FUNDING_FEE, "-1", symbol="BTCUSDT", tran_id="5"))
    assert ledger.entries_applied == 2


def test_snapshot_when_entries_applied_then_shows_them_rounded() -> None:
    ledger = make_ledger()
    ledger.apply_fill(buy("0.1", "30000"))
    ledger.apply_entry(entry(IncomeType.FUNDING_FEE, "-0.123456789", symbol="BTCUSDT"))
    ledger.apply_entry(entry(IncomeType.TRANSFER, "100"))
    snapshot = ledger.snapshot(sequence=1, ts_ms=0)
    assert snapshot.schema_version == 3
    assert snapshot.entries_applied == 2
    assert snapshot.funding == Decimal("-0.12345679")
    assert snapshot.positions[0].funding == Decimal("-0.12345679")
    assert snapshot.transfers == Decimal(100)
    assert snapshot.wallet == Decimal("10099.87654321")


def test_replay_when_fills_entries_and_marks_interleave_then_equals_the_fraction_account() -> None:
    rng = random.Random(5)
    ledger, account = make_ledger(), ExactPortfolio(capital=Fraction(CAPITAL))
    for _ in range(2_000):
        event = _random_event(rng)
        if isinstance(event, Fill):
            ledger.apply_fill(event)
            account.apply(event)
        elif isinstance(event, AccountEntry):
            ledger.apply_entry(event)
            account.apply_entry(event)
        else:
            ledger.mark(*event)
            account.mark(*event)
    snapshot = ledger.snapshot(sequence=1, ts_ms=0)
    for name, expected in account.rounded().items():
        assert getattr(snapshot, name) == expected, name
    for view in snapshot.positions:
        assert view.funding == usdt(account.funding_by_symbol.get(view.symbol, Fraction(0)))
    assert account.transfers != 0
    assert account.funding != 0
    assert account.other_income != 0
    assert snapshot.entries_applied == account.entries


def _random_event(rng: random.Random) -> Fill | AccountEntry | tuple[str, Decimal]:
    symbol = rng.choice(["BTCUSDT", "ETHUSDT"])
    price = Decimal(rng.randint(900, 1100)) * (30 if symbol == "BTCUSDT" else 2)
    roll = rng.random()
    if roll < 0.3:
        return symbol, price
    if roll < 0.45:
        amount = Decimal(rng.randint(-99_999_999, 99_999_999)) / 10**8
        return entry(IncomeType.FUNDING_FEE, amount, symbol=symbol)
    if roll < 0.5:
        kind = rng.choice([IncomeType.TRANSFER, IncomeType.API_REBATE, IncomeType.AUTO_EXCHANGE])
        asset = rng.choice(["USDT", "USDT", "BNB"])
        return entry(kind, Decimal(rng.randint(-50_000, 50_000)) / 100, asset=asset)
    n = next(_ids)
    return Fill(
        fill_id=f"r-{n}",
        client_order_id=f"c-{n}",
        symbol=symbol,
        side=rng.choice([Side.BUY, Side.SELL]),
        quantity=Decimal(rng.randint(1, 500)) / 1000,
        price=price,
        fee=Decimal(rng.randint(0, 10**6)) / 10**8,
        ts_ms=n,
    )
