"""The exact account the portfolio is checked by: its rules on hand-worked cases, its rounding,
and agreement with the ledger (two independent implementations of one contract)."""

from __future__ import annotations

import random
from decimal import Decimal
from fractions import Fraction

import pytest

from qtrader.contracts.messages import Fill, Side
from qtrader.instruments import paper_exchange_info
from qtrader.portfolio.ledger import Ledger
from qtrader_tools.exact import (
    ExactPortfolio,
    cents,
    independent_portfolio,
    pct,
    replay,
    round_half_up,
    usdt,
)


def _fill(n: int, side: Side, quantity: str, price: str, fee: str = "0") -> Fill:
    return Fill(
        fill_id=f"f{n}",
        client_order_id=f"c{n}",
        symbol="BTCUSDT",
        side=side,
        quantity=Decimal(quantity),
        price=Decimal(price),
        fee=Decimal(fee),
        ts_ms=n,
    )


def test_average_cost_when_increase_then_flip_then_realizes_against_the_average() -> None:
    account = replay(
        [
            _fill(1, Side.BUY, "2", "100", "0.5"),
            _fill(2, Side.BUY, "1", "130", "0.25"),  # average (200 + 130) / 3 = 110
            _fill(3, Side.SELL, "4", "120", "1"),  # closes 3 at +10, opens 1 short at 120
        ],
        capital=Decimal(1000),
        marks={"BTCUSDT": Decimal(125)},
    )
    assert account.realized == 30
    assert account.fees == Fraction(7, 4)
    assert account.quantity["BTCUSDT"] == -1
    assert account.average["BTCUSDT"] == 120
    assert account.unrealized == -5
    assert account.equity == 1000 + 30 - Fraction(7, 4) - 5
    assert (account.counts.opens, account.counts.increases, account.counts.flips) == (1, 1, 1)


def test_unmarked_symbol_when_fills_only_then_valued_at_its_first_fill_price() -> None:
    account = ExactPortfolio(capital=Fraction(1000))
    account.apply(_fill(1, Side.BUY, "1", "100"))
    account.apply(_fill(2, Side.BUY, "1", "90"))  # the mark stays 100, the first fill's price
    assert account.marks["BTCUSDT"] == 100
    assert account.unrealized == 10  # 2 x 100 - (100 + 90)


def test_drawdown_when_equity_falls_and_recovers_then_max_keeps_the_worst() -> None:
    account = ExactPortfolio(capital=Fraction(1000))
    account.apply(_fill(1, Side.BUY, "1", "100"))
    account.mark("BTCUSDT", Decimal(300))  # equity 1200: the peak
    account.mark("BTCUSDT", Decimal(50))  # equity 950
    account.mark("BTCUSDT", Decimal(200))  # equity 1100
    assert account.peak == 1200
    assert account.max_drawdown_pct == Fraction(250, 1200) * 100
    assert account.drawdown_pct == Fraction(100, 1200) * 100
    assert account.counts.partial_closes == 0


def test_partial_and_full_close_when_counted_then_separately() -> None:
    account = replay(
        [
            _fill(1, Side.SELL, "3", "100"),
            _fill(2, Side.BUY, "1", "90"),
            _fill(3, Side.BUY, "2", "95"),
        ],
        capital=Decimal(1000),
    )
    assert account.realized == 10 + 10
    assert (account.counts.partial_closes, account.counts.full_closes) == (1, 1)
    assert account.open_positions == {}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (Fraction(5, 10**9), "0.00000001"),  # a tie goes away from zero
        (Fraction(-5, 10**9), "-0.00000001"),
        (Fraction(149, 10**10), "0.00000001"),
        (Fraction(-1, 10**10), "0E-8"),  # no negative zero
        (Fraction(1, 3), "0.33333333"),
        (Decimal("12345.678901234"), "12345.67890123"),
    ],
)
def test_usdt_when_rounded_then_half_up_to_1e_8(value: Fraction | Decimal, expected: str) -> None:
    rounded = usdt(value)
    assert rounded == Decimal(expected)
    assert rounded.as_tuple().exponent == -8
    assert not rounded.is_signed() or rounded != 0


def test_pct_and_cents_when_rounded_then_their_own_rules() -> None:
    assert pct(Fraction(2, 3)) == Decimal("0.666667")
    assert cents(Fraction(1, 200)) == Decimal("0.00")  # half to even
    assert cents(Fraction(3, 200)) == Decimal("0.02")
    assert cents(Decimal("-1.005")) == Decimal("-1.00")


def test_round_half_up_when_step_not_a_power_of_ten_then_error() -> None:
    with pytest.raises(ValueError, match="1/10"):
        round_half_up(Fraction(1), Fraction(1, 3))


def test_capital_when_not_positive_then_error() -> None:
    with pytest.raises(ValueError, match="capital"):
        ExactPortfolio(capital=Fraction(0))


def test_independent_portfolio_when_marks_given_then_values_open_positions_at_them() -> None:
    fills = [_fill(1, Side.BUY, "2", "100", "1"), _fill(2, Side.SELL, "1", "110", "1")]
    realized, fees, unrealized, positions = independent_portfolio(fills, {"BTCUSDT": Decimal(120)})
    assert (realized, fees, unrealized) == (10, 2, 20)
    assert positions == {"BTCUSDT": 1}


def test_random_fills_when_replayed_then_every_snapshot_figure_matches_the_ledger() -> None:
    exchange = paper_exchange_info()
    ledger = Ledger(initial_capital=Decimal(10_000), exchange=exchange)
    account = ExactPortfolio(capital=Fraction(10_000))
    rng = random.Random(11)
    for n in range(1_500):
        symbol = rng.choice(["BTCUSDT", "ETHUSDT"])
        instrument = exchange.instrument(symbol)
        price = (rng.randint(20_000, 40_000) * instrument.tick_size).quantize(instrument.tick_size)
        if rng.random() < 0.1:
            ledger.mark(symbol, price)
            account.mark(symbol, price)
            continue
        quantity = (rng.randint(1, 60) * instrument.step_size).quantize(instrument.step_size)
        fill = Fill(
            fill_id=f"r{n}",
            client_order_id=f"c{n}",
            symbol=symbol,
            side=rng.choice([Side.BUY, Side.SELL]),
            quantity=quantity,
            price=price,
            fee=(quantity * price * Decimal("0.0004")).quantize(Decimal("1e-8")),
            ts_ms=n,
        )
        ledger.apply_fill(fill)
        account.apply(fill)
    snapshot = ledger.snapshot(sequence=1, ts_ms=0)
    for name, expected in account.rounded().items():
        assert getattr(snapshot, name) == expected, name
    assert account.counts.flips > 5
