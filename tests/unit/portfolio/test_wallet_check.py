"""The wallet reconciliation's rule on a real ledger: what it compares (the USDT wallet without
BNB fees, the unrealized PnL at the venue's marks) and when a difference becomes an alert."""

from __future__ import annotations

from decimal import Decimal

from qtrader.contracts.messages import (
    Fill,
    RiskAlertKind,
    Side,
    VenueAccount,
    VenueAccountPosition,
)
from qtrader.health.contract import Status
from qtrader.instruments import paper_exchange_info
from qtrader.portfolio.ledger import Ledger
from qtrader.portfolio.wallet_check import WalletCheck, compare

CAPITAL = Decimal(10_000)


def _buy(quantity: str, price: str, *, fee: str, n: int) -> Fill:
    return Fill(
        fill_id=f"f-{n}",
        client_order_id=f"c-{n}",
        symbol="BTCUSDT",
        side=Side.BUY,
        quantity=Decimal(quantity),
        price=Decimal(price),
        fee=Decimal(fee),
        ts_ms=n,
    )


def _ledger_with_a_bnb_fee() -> Ledger:
    """Long 0.1 BTC at 30,000 (USDT fee 1.2), then 0.1 more at 31,000 paying 0.002 BNB."""
    ledger = Ledger(initial_capital=CAPITAL, exchange=paper_exchange_info())
    ledger.apply_fill(_buy("0.1", "30000", fee="1.2", n=1))
    bnb = _buy("0.1", "31000", fee="0.002", n=2).model_copy(
        update={"fee_asset": "BNB", "fee_usdt": Decimal("1.2")}
    )
    ledger.apply_fill(bnb)
    return ledger


def _read(
    wallet: str, *, ts_ms: int = 0, unrealized: str = "200", quantity: str = "0.2"
) -> VenueAccount:
    position = VenueAccountPosition(
        symbol="BTCUSDT",
        quantity=Decimal(quantity),
        mark_price=Decimal(31_500),
        unrealized_pnl=Decimal(unrealized),
    )
    return VenueAccount(
        source="test", ts_ms=ts_ms, fills_through=7, wallet=Decimal(wallet), positions=(position,)
    )


def test_compare_when_a_fee_was_paid_in_bnb_then_the_usdt_wallet_leaves_it_out() -> None:
    ledger = _ledger_with_a_bnb_fee()
    comparison = compare(_read("9998.8"), ledger)
    assert comparison.ledger_wallet == Decimal("9998.8")  # 10,000 - the USDT fee only
    assert ledger.wallet == Decimal("9997.6")  # the equity's wallet counts the BNB fee too
    # 0.2 x 31,500 - (3,000 + 3,100): the cost basis at the venue's mark.
    assert comparison.ledger_unrealized == Decimal(200)
    assert not comparison.differs


def test_compare_when_positions_differ_then_the_unrealized_pnl_is_not_compared() -> None:
    comparison = compare(
        _read("9998.8", quantity="0.3", unrealized="999"), _ledger_with_a_bnb_fee()
    )
    assert comparison.ledger_unrealized is None
    assert not comparison.differs  # the positions' reconciliation has that difference


def test_wallet_check_when_a_difference_lasts_the_grace_then_one_alert_and_agreeing_ends_it() -> (
    None
):
    ledger, check = _ledger_with_a_bnb_fee(), WalletCheck(grace_s=60, source="portfolio/t")
    assert check.offer(_read("9998.8", ts_ms=0), ledger, 7) is None
    assert check.health().status is Status.OK
    assert check.offer(_read("9990", ts_ms=30_000), ledger, 7) is None  # first differing read
    assert check.offer(_read("9990", ts_ms=60_000), ledger, 7) is None  # 30 s: within grace
    alert = check.offer(_read("9990", ts_ms=90_000), ledger, 7)
    assert alert is not None
    assert alert.alert_kind is RiskAlertKind.WALLET_RECONCILIATION
    assert (alert.value, alert.threshold) == (Decimal(9990), Decimal("9998.8"))
    assert check.health().status is Status.DEGRADED
    assert check.offer(_read("9990", ts_ms=120_000), ledger, 7) is None  # one per episode
    assert check.offer(_read("9998.8", ts_ms=150_000), ledger, 7) is None
    assert check.health().status is Status.OK


def test_wallet_check_when_the_ledger_is_past_the_read_then_not_compared() -> None:
    ledger, check = _ledger_with_a_bnb_fee(), WalletCheck(grace_s=0, source="portfolio/t")
    assert check.offer(_read("1", ts_ms=0), ledger, 8) is None  # the ledger holds more
    assert check.offer(_read("1", ts_ms=1), ledger, 8) is None
    assert check.health().detail == "nothing compared yet"
    check.offer(_read("1", ts_ms=2), ledger, 6)  # held until the ledger is at 7
    assert check.reached(ledger, 7) is None  # the first differing read
    check.offer(_read("1", ts_ms=3), ledger, 6)
    assert check.reached(ledger, 7) is not None
