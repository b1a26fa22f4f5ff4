"""The ledger against the independent ``Fraction`` account (``qtrader_tools.exact.ExactPortfolio``),
every figure, after every event of random tapes: fills off every grid (prices and quantities to
1e-12), opens, increases, partial closes of any share, full closes and flips, commissions in
USDT and in BNB (valued or not), funding, transfers and other income in USDT and BNB, marks.

What must be equal exactly: quantities, fees (per asset, valued or not), account entries, the
equity (a partial close moves its rounded share of the cost from the position to the realized
PnL, and the sum of the two stays exact) and, with no transfer, the peak and the drawdowns as
the exact quotient rounded half-even to 1e-80. Realized and unrealized PnL each may differ by
that rounding: at most 1e-80 per partial close. What a snapshot publishes is equal, every field.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from decimal import Context, Decimal
from fractions import Fraction

import pytest

from qtrader.contracts.messages import (
    AccountEntry,
    Fill,
    IncomeType,
    PortfolioCheckpoint,
    Side,
    account_entry_id,
)
from qtrader.instruments import paper_exchange_info
from qtrader.portfolio.ledger import FillRefused, Ledger
from qtrader_tools.exact import ExactPortfolio, usdt

EXCHANGE = paper_exchange_info()
CAPITAL = Decimal(100_000)
SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
START = {"BTCUSDT": 30_000, "ETHUSDT": 2_000, "SOLUSDT": 100}
_ids = itertools.count()
Event = Fill | AccountEntry | tuple[str, Decimal]
Check = Callable[[Ledger, ExactPortfolio, "Kept"], None]


def fine(value: Fraction, places: int = 12) -> Decimal:
    """``value`` cut to ``places`` decimals, exactly as a Decimal."""
    units = round(value * 10**places)
    return Decimal(units).scaleb(-places, Context(prec=100))


def to_80_places(value: Fraction) -> Fraction:
    return Fraction(round(value * 10**80), 10**80)  # Fraction rounds half to even


class Tape:
    """Random events; positions are tracked so that closes and flips come often."""

    def __init__(self, seed: int, *, transfers: bool) -> None:
        self.rng = random.Random(seed)
        self.transfers = transfers
        self.held = dict.fromkeys(SYMBOLS, Fraction(0))
        self.price = {s: Fraction(p) for s, p in START.items()}

    def event(self) -> Event:
        rng, symbol = self.rng, self.rng.choice(SYMBOLS)
        # Off the tick grid: a random walk in 1e-12 steps.
        self.price[symbol] *= 1 + Fraction(rng.randint(-2_000, 2_000), 10**6)
        price = fine(self.price[symbol])
        roll = rng.random()
        if roll < 0.2:
            return symbol, price
        if roll < 0.3:
            return self.entry(symbol)
        return self.fill(symbol, price)

    def fill(self, symbol: str, price: Decimal) -> Fill:
        rng, held = self.rng, self.held[symbol]
        against = -1 if held > 0 else 1
        choice = rng.random()
        if held and choice < 0.3:  # a partial close of any share (a third, a seventh...)
            signed = against * abs(held) * Fraction(1, rng.choice((2, 3, 7, 9)))
        elif held and choice < 0.45:  # a full close
            signed = -held
        else:  # from flat, an increase, or against it: a partial close or a flip
            signed = rng.choice((1, -1)) * Fraction(rng.randint(1, 3_000_000), 10**6)
        quantity = max(fine(abs(signed)), Decimal("1e-12"))  # off the step grid
        self.held[symbol] += Fraction(quantity) if signed > 0 else -Fraction(quantity)
        n = next(_ids)
        fee_asset, fee_usdt = "USDT", None
        fee = fine(Fraction(quantity) * Fraction(price) * Fraction(rng.choice((2, 4)), 10_000), 20)
        if rng.random() < 0.3:  # paid in BNB: valued at a price with many places, or not at all
            fee_asset = "BNB"
            fee_usdt = fee if rng.random() < 0.6 else None
            fee = fine(Fraction(fee) / Fraction(60_012_345, 100_000), 30)
        return Fill(
            fill_id=f"x-{n}",
            client_order_id=f"c-{n // 2}",
            symbol=symbol,
            side=Side.BUY if signed > 0 else Side.SELL,
            quantity=quantity,
            price=price,
            fee=fee,
            fee_asset=fee_asset,
            fee_usdt=fee_usdt,
            ts_ms=n,
        )

    def entry(self, symbol: str) -> AccountEntry:
        rng, n = self.rng, next(_ids)
        kinds = [IncomeType.FUNDING_FEE, IncomeType.API_REBATE]
        kind = rng.choice([*kinds, IncomeType.TRANSFER] if self.transfers else kinds)
        amount = fine(Fraction(rng.randint(-(10**30), 10**30), 10**28), 25)
        return AccountEntry(
            entry_id=account_entry_id(kind, str(n)),
            income_type=kind,
            symbol=symbol if kind is IncomeType.FUNDING_FEE else None,
            asset=rng.choice(("USDT", "USDT", "BNB")),
            amount=amount,
            ts_ms=n,
        )


class Kept:
    """What the Fraction account leaves out: amounts kept in their own asset."""

    def __init__(self) -> None:
        self.fees: dict[str, Fraction] = {}
        self.unvalued: dict[str, Fraction] = {}
        self.transfers: dict[str, Fraction] = {}
        self.income: dict[str, Fraction] = {}

    def fill(self, fill: Fill) -> None:
        add(self.fees, fill.fee_asset, fill.fee)
        if fill.fee_value_usdt is None:
            add(self.unvalued, fill.fee_asset, fill.fee)

    def entry(self, entry: AccountEntry) -> None:
        if entry.income_type is IncomeType.TRANSFER:
            add(self.transfers, entry.asset, entry.amount)
        elif entry.asset != "USDT":
            add(self.income, entry.asset, entry.amount)


def add(into: dict[str, Fraction], asset: str, amount: Decimal) -> None:
    into[asset] = into.get(asset, Fraction(0)) + Fraction(amount)


def replay(
    seed: int, count: int, *, transfers: bool, check: Check
) -> tuple[Ledger, ExactPortfolio]:
    """``count`` random events into a ledger and the Fraction account, ``check`` after each."""
    tape = Tape(seed, transfers=transfers)
    ledger = Ledger(initial_capital=CAPITAL, exchange=EXCHANGE)
    account, kept = ExactPortfolio(capital=Fraction(CAPITAL)), Kept()
    for _ in range(count):
        event = tape.event()
        if isinstance(event, Fill):
            assert ledger.apply_fill(event)
            account.apply(event)
            kept.fill(event)
        elif isinstance(event, AccountEntry):
            assert ledger.apply_entry(event)
            account.apply_entry(event)
            kept.entry(event)
        else:
            ledger.mark(*event)
            account.mark(*event)
        check(ledger, account, kept)
    return ledger, account


def exact_figures(ledger: Ledger, account: ExactPortfolio, kept: Kept) -> None:
    assert {s: Fraction(q) for s, q in ledger.positions.items()} == account.open_positions
    assert ledger.fees == account.fees
    assert ledger.fees_by_asset == kept.fees
    assert ledger.unvalued_fees == kept.unvalued
    assert ledger.transfers_by_asset == kept.transfers
    assert ledger.unvalued_income == kept.income
    assert ledger.equity_complete is (not kept.unvalued and not kept.income)
    assert (ledger.funding, ledger.transfers) == (account.funding, account.transfers)
    assert ledger.other_income == account.other_income
    assert ledger.equity == account.equity
    assert ledger.equity_float == float(account.equity)  # one float, correctly rounded
    for symbol in SYMBOLS:
        assert ledger.holds(symbol) is (account.open_positions.get(symbol, 0) != 0)
    for symbol, funding in account.funding_by_symbol.items():
        assert ledger.position(symbol).funding == funding
    # Each partial close rounds the share of the cost it takes, half-even to 1e-80.
    bound = Fraction(account.counts.partial_closes, 10**80)
    assert abs(Fraction(ledger.realized_pnl) - account.realized) <= bound
    assert abs(Fraction(ledger.unrealized_pnl) - account.unrealized) <= bound
    assert abs(Fraction(ledger.wallet) - account.wallet) <= bound


def figures_and_drawdowns(ledger: Ledger, account: ExactPortfolio, kept: Kept) -> None:
    exact_figures(ledger, account, kept)
    assert ledger.peak_equity == account.peak
    assert ledger.drawdown_pct == to_80_places(account.drawdown_pct)
    assert ledger.max_drawdown_pct == to_80_places(account.max_drawdown_pct)


def test_replay_when_random_fills_entries_and_marks_then_every_figure_is_the_fraction_account() -> (
    None
):
    _, account = replay(17, 3_000, transfers=False, check=figures_and_drawdowns)
    counts = account.counts
    assert min(counts.opens, counts.increases, counts.full_closes) > 20
    assert min(counts.partial_closes, counts.flips) > 20
    assert account.max_drawdown_pct > 0
    assert account.funding != 0


def test_replay_when_transfers_too_then_published_figures_equal_the_fraction_account() -> None:
    """A transfer scales the peak by a quotient (rounded to 1e-80): the peak and drawdowns are
    compared as published; everything else as above."""

    def check(ledger: Ledger, account: ExactPortfolio, kept: Kept) -> None:
        exact_figures(ledger, account, kept)
        snapshot = ledger.snapshot(sequence=1, ts_ms=0)
        for name, expected in account.rounded().items():
            assert getattr(snapshot, name) == expected, name
        for view in snapshot.positions:
            assert view.funding == usdt(account.funding_by_symbol.get(view.symbol, Fraction(0)))

    ledger, account = replay(29, 1_500, transfers=True, check=check)
    assert account.transfers != 0
    assert abs(Fraction(ledger.peak_equity) - account.peak) < Fraction(1, 10**70)


def test_restore_when_checkpoint_holds_60_digit_decimals_then_every_value_is_kept_exactly() -> None:
    """A checkpoint of the ledger before it counted in integers: a third of a cost basis at 60
    significant digits restores exactly and is written back the same."""
    ledger = Ledger(initial_capital=CAPITAL, exchange=EXCHANGE)
    ledger.apply_fill(
        Fill(
            fill_id="a",
            client_order_id="a",
            symbol="SOLUSDT",
            side=Side.BUY,
            quantity=Decimal(3),
            price=Decimal("100.01"),
            fee=Decimal(0),
            ts_ms=1,
        )
    )
    written = ledger.checkpoint(fills_through=1, ts_ms=1, source="t")
    sixty = Context(prec=60)
    cost = sixty.divide(Decimal("300.03") * 2, 3)  # what a partial close of a third left
    realized = sixty.divide(Decimal(-1), 7)
    (position,) = written.positions
    update = {"quantity": Decimal(2), "cost": cost, "realized": realized}
    old = PortfolioCheckpoint.model_validate(
        written.model_copy(
            update={"positions": (position.model_copy(update=update),), "realized_pnl": realized}
        ).model_dump()
    )
    again = Ledger.restore(old, exchange=EXCHANGE).checkpoint(fills_through=1, ts_ms=1, source="t")
    assert (again.positions, again.realized_pnl) == (old.positions, old.realized_pnl)


def test_apply_fill_when_price_finer_than_1e_12_then_refused_and_nothing_changes() -> None:
    """Only a fill built without validation can carry it: refused, never rounded."""
    ledger = Ledger(initial_capital=CAPITAL, exchange=EXCHANGE)
    before = ledger.checkpoint(fills_through=0, ts_ms=0, source="t")
    fill = Fill.model_construct(
        fill_id="fine",
        client_order_id="fine",
        symbol="SOLUSDT",
        side=Side.BUY,
        quantity=Decimal(1),
        price=Decimal("100.0000000000001"),
        fee=Decimal(0),
        fee_asset="USDT",
        fee_usdt=None,
        ts_ms=1,
    )
    with pytest.raises(FillRefused, match="finer than"):
        ledger.apply_fill(fill)
    assert ledger.checkpoint(fills_through=0, ts_ms=0, source="t") == before
