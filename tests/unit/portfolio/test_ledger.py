"""The ledger's accounting, checked by hand on small cases and against an independent model.

The replay test holds the ledger against the exact account (``qtrader_tools.exact``: average
cost in ``fractions.Fraction``, no code shared with the ledger) and requires both to agree on
2,000 random trades.
"""

from __future__ import annotations

import random
from decimal import Context, Decimal, localcontext
from fractions import Fraction

import pytest

from qtrader.contracts.messages import Fill, Side
from qtrader.instruments import ExchangeInfo, paper_exchange_info
from qtrader.portfolio.ledger import FillRefused, Ledger
from qtrader_tools.exact import ExactPortfolio

EXCHANGE = paper_exchange_info()
CAPITAL = Decimal(10_000)


def make_ledger(capital: Decimal = CAPITAL) -> Ledger:
    return Ledger(initial_capital=capital, exchange=EXCHANGE)


_counter = iter(range(1, 1_000_000))


def fill(
    side: Side,
    quantity: str | Decimal,
    price: str | Decimal,
    *,
    symbol: str = "BTCUSDT",
    fee: str | Decimal = "0",
    fill_id: str | None = None,
) -> Fill:
    n = next(_counter)
    return Fill(
        fill_id=fill_id or f"f-{n}",
        client_order_id=f"c-{n}",
        symbol=symbol,
        side=side,
        quantity=Decimal(quantity),
        price=Decimal(price),
        fee=Decimal(fee),
        ts_ms=n,
    )


# --- hand-checked cases -----------------------------------------------------------------------


def test_apply_fill_when_opening_long_then_position_is_the_fill() -> None:
    ledger = make_ledger()
    assert ledger.apply_fill(fill(Side.BUY, "0.010", "60000.0", fee="0.24"))
    view = ledger.position("BTCUSDT")
    assert view.quantity == Decimal("0.010")
    assert view.avg_entry_price == Decimal(60000)
    assert view.mark_price == Decimal(60000)  # the first fill price becomes the mark
    assert ledger.realized_pnl == 0
    assert ledger.unrealized_pnl == 0
    assert ledger.fees == Decimal("0.24")
    assert ledger.equity == Decimal("9999.76")


def test_apply_fill_when_increasing_then_average_is_exact_weighted_mean() -> None:
    ledger = make_ledger()
    ledger.apply_fill(fill(Side.BUY, "1", "100", symbol="SOLUSDT"))
    ledger.apply_fill(fill(Side.BUY, "2", "101", symbol="SOLUSDT"))
    view = ledger.position("SOLUSDT")
    assert view.quantity == 3
    assert abs(Fraction(view.avg_entry_price) - Fraction(302, 3)) < Fraction(1, 10**50)


def test_apply_fill_when_closing_non_terminating_average_then_realized_is_exact() -> None:
    ledger = make_ledger()
    ledger.apply_fill(fill(Side.BUY, "1", "100", symbol="SOLUSDT"))
    ledger.apply_fill(fill(Side.BUY, "2", "101", symbol="SOLUSDT"))
    ledger.apply_fill(fill(Side.SELL, "3", "102", symbol="SOLUSDT"))
    assert ledger.realized_pnl == Decimal(4)  # 3 x 102 - (100 + 202), no rounding residue
    assert ledger.position("SOLUSDT").avg_entry_price == 0
    assert ledger.positions == {}
    assert ledger.open_positions == 0


def test_apply_fill_when_partially_closing_long_then_realizes_closed_share() -> None:
    ledger = make_ledger()
    ledger.apply_fill(fill(Side.BUY, "0.020", "50000.0"))
    ledger.apply_fill(fill(Side.SELL, "0.005", "52000.0"))
    assert ledger.realized_pnl == Decimal("10.000")  # 0.005 x 2000
    view = ledger.position("BTCUSDT")
    assert view.quantity == Decimal("0.015")
    assert view.avg_entry_price == Decimal(50000)


def test_apply_fill_when_short_then_profit_on_falling_price() -> None:
    ledger = make_ledger()
    ledger.apply_fill(fill(Side.SELL, "2", "3000.00", symbol="ETHUSDT"))
    ledger.mark("ETHUSDT", Decimal("2900"))
    assert ledger.quantity("ETHUSDT") == -2
    assert ledger.positions == {"ETHUSDT": Decimal(-2)}
    assert ledger.open_positions == 1
    assert ledger.unrealized_pnl == Decimal(200)
    ledger.apply_fill(fill(Side.BUY, "1", "2950.00", symbol="ETHUSDT"))
    assert ledger.realized_pnl == Decimal(50)
    assert ledger.unrealized_pnl == Decimal(100)  # the remaining -1 at 3000 marked at 2900


def test_apply_fill_when_flipping_through_zero_then_remainder_opens_at_fill_price() -> None:
    ledger = make_ledger()
    ledger.apply_fill(fill(Side.BUY, "1.000", "100.00", symbol="ETHUSDT"))
    ledger.apply_fill(fill(Side.SELL, "3.000", "110.00", symbol="ETHUSDT"))
    assert ledger.realized_pnl == Decimal(10)
    view = ledger.position("ETHUSDT")
    assert view.quantity == Decimal(-2)
    assert view.avg_entry_price == Decimal(110)
    ledger.mark("ETHUSDT", Decimal("105"))
    assert ledger.unrealized_pnl == Decimal(10)


def test_apply_fill_when_fees_paid_then_accumulate_in_total_and_per_symbol() -> None:
    ledger = make_ledger()
    ledger.apply_fill(fill(Side.BUY, "1", "100", symbol="SOLUSDT", fee="0.04"))
    ledger.apply_fill(fill(Side.SELL, "1", "100", symbol="SOLUSDT", fee="0.04"))
    ledger.apply_fill(fill(Side.BUY, "1", "2", symbol="ADAUSDT", fee="0.0008"))
    assert ledger.fees == Decimal("0.0808")
    assert ledger.position("SOLUSDT").fees == Decimal("0.08")
    assert ledger.equity == CAPITAL - Decimal("0.0808")


def test_apply_fill_when_same_fill_twice_then_counts_once() -> None:
    ledger = make_ledger()
    first = fill(Side.BUY, "1", "100", symbol="SOLUSDT", fee="0.1", fill_id="dup")
    assert ledger.apply_fill(first) is True
    assert ledger.apply_fill(first) is False
    assert ledger.quantity("SOLUSDT") == 1
    assert ledger.fees == Decimal("0.1")
    assert ledger.fills_applied == 1


@pytest.mark.parametrize(
    ("quantity", "price"),
    [("0.0015", "60000.0"), ("0.001", "60000.05")],
    ids=["quantity-off-step", "price-off-tick"],
)
def test_apply_fill_when_off_the_paper_grid_then_booked_as_the_venue_said(
    quantity: str, price: str
) -> None:
    ledger = make_ledger()
    assert ledger.apply_fill(fill(Side.BUY, quantity, price, fill_id="venue"))
    assert ledger.quantity("BTCUSDT") == Decimal(quantity)
    assert ledger.position("BTCUSDT").avg_entry_price == Decimal(price)


def test_apply_fill_when_symbol_not_on_the_paper_listing_then_booked() -> None:
    ledger = make_ledger()
    assert ledger.apply_fill(fill(Side.BUY, "1", "1", symbol="NOPEUSDT"))
    assert ledger.quantity("NOPEUSDT") == 1


def test_apply_fill_when_fee_in_bnb_with_its_value_then_kept_in_bnb_and_valued_in_usdt() -> None:
    ledger = make_ledger()
    bnb = fill(Side.BUY, "1", "100", symbol="SOLUSDT", fee="0.0001").model_copy(
        update={"fee_asset": "BNB", "fee_usdt": Decimal("0.06")}
    )
    assert ledger.apply_fill(bnb)
    assert ledger.fees_by_asset == {"BNB": Decimal("0.0001")}
    assert ledger.fees == Decimal("0.06")
    assert ledger.equity == CAPITAL - Decimal("0.06")
    assert ledger.equity_complete
    snapshot = ledger.snapshot(sequence=1, ts_ms=0)
    assert [(a.asset, a.amount) for a in snapshot.fees_by_asset] == [("BNB", Decimal("0.0001"))]
    assert snapshot.equity_complete


def test_apply_fill_when_fee_in_bnb_of_unknown_value_then_equity_reported_incomplete() -> None:
    ledger = make_ledger()
    usdt = fill(Side.BUY, "1", "100", symbol="SOLUSDT", fee="0.04")
    bnb = fill(Side.SELL, "1", "101", symbol="SOLUSDT", fee="0.0001").model_copy(
        update={"fee_asset": "BNB"}
    )
    assert ledger.apply_fill(usdt)
    assert ledger.apply_fill(bnb)
    assert ledger.realized_pnl == 1  # the fill itself is applied
    assert ledger.fees == Decimal("0.04")  # no invented USDT value for the BNB
    assert ledger.fees_by_asset == {"BNB": Decimal("0.0001"), "USDT": Decimal("0.04")}
    assert ledger.unvalued_fees == {"BNB": Decimal("0.0001")}
    assert not ledger.equity_complete
    snapshot = ledger.snapshot(sequence=1, ts_ms=0)
    assert not snapshot.equity_complete
    assert [(a.asset, a.amount) for a in snapshot.unvalued_fees] == [("BNB", Decimal("0.0001"))]


def test_apply_fill_when_same_id_with_other_content_then_refused_and_nothing_changes() -> None:
    ledger = make_ledger()
    ledger.apply_fill(fill(Side.BUY, "0.01", "60000", fill_id="twice"))
    before = ledger.checkpoint(fills_through=1, ts_ms=0, source="t")
    with pytest.raises(FillRefused, match="other content") as refused:
        ledger.apply_fill(fill(Side.BUY, "0.02", "60000", fill_id="twice"))
    assert refused.value.fill_id == "twice"
    assert ledger.checkpoint(fills_through=1, ts_ms=0, source="t") == before


def test_mark_when_price_moves_then_unrealized_and_equity_follow() -> None:
    ledger = make_ledger()
    ledger.apply_fill(fill(Side.BUY, "0.100", "60000.0"))
    ledger.mark("BTCUSDT", Decimal("61000.5"))
    assert ledger.unrealized_pnl == Decimal("100.05")
    assert ledger.equity == Decimal("10100.05")
    ledger.apply_fill(fill(Side.BUY, "0.100", "62000.0"))
    assert ledger.position("BTCUSDT").mark_price == Decimal("61000.5")  # a fill keeps the mark


def test_mark_when_price_not_positive_then_raises() -> None:
    with pytest.raises(ValueError, match="positive"):
        make_ledger().mark("BTCUSDT", Decimal(0))


def test_drawdown_when_equity_rises_falls_and_recovers_then_max_is_peak_to_trough() -> None:
    ledger = make_ledger()
    ledger.apply_fill(fill(Side.BUY, "10", "100", symbol="SOLUSDT"))
    ledger.mark("SOLUSDT", Decimal(200))  # equity 11000: the peak
    ledger.mark("SOLUSDT", Decimal(90))  # equity  9900: 10% under the peak
    assert ledger.peak_equity == Decimal(11000)
    assert ledger.drawdown_pct == Decimal(10)
    ledger.mark("SOLUSDT", Decimal(150))  # equity 10500: recovering
    assert abs(Fraction(ledger.drawdown_pct) - Fraction(500 * 100, 11000)) < Fraction(1, 10**50)
    assert ledger.max_drawdown_pct == Decimal(10)
    ledger.mark("SOLUSDT", Decimal(300))  # a new peak: no current drawdown, max stays
    assert ledger.drawdown_pct == 0
    assert ledger.max_drawdown_pct == Decimal(10)


def test_max_drawdown_when_marks_and_fills_wander_then_equals_the_drawdown_of_every_event() -> None:
    """The maximum skips the arithmetic above the trough; it equals the worst drawdown of
    every mark and fill computed in full, Decimal for Decimal."""
    rng = random.Random(11)
    ledger = make_ledger()
    peak, worst = CAPITAL, Decimal(0)
    price = Decimal(10_000)
    for _ in range(3_000):  # a random walk: new troughs only just below the last one
        price += Decimal(rng.randint(-300, 300)) / 100
        if rng.random() < 0.05:
            side = Side.BUY if rng.random() < 0.5 else Side.SELL
            ledger.apply_fill(fill(side, "0.37", price, fee="0.11"))
        else:
            ledger.mark("BTCUSDT", price)
        peak = max(peak, ledger.equity)
        worst = max(worst, to_80_places(Fraction(peak - ledger.equity) / Fraction(peak) * 100))
        assert (ledger.peak_equity, ledger.max_drawdown_pct) == (peak, worst)
    assert worst > 0


def to_80_places(value: Fraction) -> Decimal:
    """``value`` rounded half-even to 1e-80, as the ledger rounds its quotients."""
    units = round(value * 10**80)  # Fraction rounds half to even
    return Decimal(units).scaleb(-80, Context(prec=200))


def test_snapshot_when_values_have_many_digits_then_rounds_only_the_output() -> None:
    ledger = make_ledger()
    ledger.apply_fill(fill(Side.BUY, "1", "1", symbol="SOLUSDT"))
    ledger.apply_fill(fill(Side.BUY, "2", "2", symbol="SOLUSDT"))
    ledger.mark("SOLUSDT", Decimal("1.6"))  # avg 5/3: unrealized 4.8 - 5 = -0.2
    ledger.apply_fill(fill(Side.BUY, "1", "1", symbol="TRXUSDT", fee="0.000000005"))
    snapshot = ledger.snapshot(sequence=7, ts_ms=123)
    assert snapshot.sequence == 7
    assert snapshot.fills_applied == 3
    assert snapshot.fees == Decimal("0.00000001")  # half up
    assert ledger.fees == Decimal("0.000000005")  # the exact figure is kept
    sol = next(p for p in snapshot.positions if p.symbol == "SOLUSDT")
    assert sol.avg_entry_price == Decimal("1.66666667")
    assert snapshot.unrealized_pnl == Decimal("-0.20000000")
    assert snapshot.drawdown_pct == Decimal("0.002000")  # 0.200000005 of 10000, in percent
    assert snapshot.open_positions == 2


def test_snapshot_when_position_closed_then_still_listed_with_its_realized_pnl() -> None:
    ledger = make_ledger()
    ledger.apply_fill(fill(Side.BUY, "1", "100", symbol="SOLUSDT"))
    ledger.apply_fill(fill(Side.SELL, "1", "101", symbol="SOLUSDT"))
    (view,) = ledger.snapshot(sequence=1, ts_ms=1).positions
    assert view.quantity == 0
    assert view.realized_pnl == Decimal("1.00000000")
    assert view.unrealized_pnl == 0
    assert not str(view.unrealized_pnl).startswith("-")


# --- the replay against an independent exact model --------------------------------------------


def _random_walk_start(rng: random.Random, exchange: ExchangeInfo) -> dict[str, int]:
    """A starting price per symbol, in ticks, at a magnitude where ticks matter."""
    return {symbol: rng.randint(2_000, 200_000) for symbol in exchange.instruments}


def _cents(value: Fraction) -> Fraction:
    return Fraction(round(value * 100), 100)


def test_replay_when_2000_random_trades_then_matches_independent_fraction_model() -> None:
    rng = random.Random(20240611)
    ledger = make_ledger()
    reference = ExactPortfolio(capital=Fraction(CAPITAL))
    price_ticks = _random_walk_start(rng, EXCHANGE)
    symbols = sorted(EXCHANGE.instruments)
    for n in range(2_000):
        symbol = rng.choice(symbols)
        instrument = EXCHANGE.instrument(symbol)
        price_ticks[symbol] = max(1, price_ticks[symbol] + rng.randint(-400, 400))
        price = (price_ticks[symbol] * instrument.tick_size).quantize(instrument.tick_size)
        if rng.random() < 0.25:
            ledger.mark(symbol, price)
            reference.mark(symbol, Fraction(price))
            continue
        side = rng.choice([Side.BUY, Side.SELL])
        quantity = (rng.randint(1, 60) * instrument.step_size).quantize(instrument.step_size)
        fee = (quantity * price * Decimal("0.0004")).quantize(Decimal("1e-8"))
        applied = ledger.apply_fill(
            Fill(
                fill_id=f"r-{n}",
                client_order_id=f"c-{n}",
                symbol=symbol,
                side=side,
                quantity=quantity,
                price=price,
                fee=fee,
                ts_ms=n,
            )
        )
        assert applied
        reference.trade(symbol, side.sign * Fraction(quantity), Fraction(price), Fraction(fee))

    assert reference.counts.flips > 50
    assert reference.counts.partial_closes > 50
    pairs = {
        "realized": (ledger.realized_pnl, reference.realized),
        "fees": (ledger.fees, reference.fees),
        "unrealized": (ledger.unrealized_pnl, reference.unrealized),
        "equity": (ledger.equity, reference.equity),
        "max_drawdown_pct": (ledger.max_drawdown_pct, reference.max_drawdown_pct),
    }
    for name, (ours, exact) in pairs.items():
        assert _cents(Fraction(ours)) == _cents(exact), name
        assert abs(Fraction(ours) - exact) < Fraction(1, 10**12), name
    assert reference.max_drawdown_pct > 0


def test_replay_when_same_fills_in_two_ledgers_then_snapshots_are_identical() -> None:
    rng = random.Random(5)
    fills = [
        fill(
            rng.choice([Side.BUY, Side.SELL]),
            Decimal(rng.randint(1, 30)),
            Decimal(rng.randint(10_000, 20_000)) / 100,
            symbol="SOLUSDT",
            fee=Decimal(rng.randint(0, 999)) / 10**6,
        )
        for _ in range(300)
    ]
    snapshots = []
    for _ in range(2):
        ledger = make_ledger()
        for f in fills:
            ledger.apply_fill(f)
        snapshots.append(ledger.snapshot(sequence=1, ts_ms=1).encode())
    assert snapshots[0] == snapshots[1]


def test_replay_when_fill_ids_are_not_kept_then_the_same_figures_and_no_checkpoint() -> None:
    """A backtest's ledger (each fill comes once) remembers no fill id: the same figures, and
    it refuses a checkpoint, which must say which fills it holds."""
    rng = random.Random(9)
    fills = [
        fill(
            rng.choice([Side.BUY, Side.SELL]),
            Decimal(rng.randint(1, 30)),
            Decimal(rng.randint(10_000, 20_000)) / 100,
            symbol="SOLUSDT",
            fee=Decimal(rng.randint(0, 999)) / 10**6,
        )
        for _ in range(300)
    ]
    keeping = make_ledger()
    forgetting = Ledger(initial_capital=CAPITAL, exchange=EXCHANGE, keep_fill_ids=False)
    for f in fills:
        assert keeping.apply_fill(f) is forgetting.apply_fill(f) is True
    assert forgetting.snapshot(sequence=1, ts_ms=1) == keeping.snapshot(sequence=1, ts_ms=1)
    with pytest.raises(ValueError, match="keeps no fill ids"):
        forgetting.checkpoint(fills_through=300, ts_ms=1, source="backtest")


def test_replay_when_caller_lowers_global_decimal_precision_then_figures_do_not_change() -> None:
    fills = [
        fill(Side.BUY, "1", "100", symbol="SOLUSDT"),
        fill(Side.BUY, "2", "101", symbol="SOLUSDT"),
        fill(Side.SELL, "1", "103.33", symbol="SOLUSDT", fee="0.0413"),
    ]
    snapshots = []
    for precision in (28, 4):
        with localcontext() as ctx:
            ctx.prec = precision
            ledger = make_ledger()
            for f in fills:
                ledger.apply_fill(f)
            ledger.mark("SOLUSDT", Decimal("99.99"))
            snapshots.append(ledger.snapshot(sequence=1, ts_ms=1))
    assert snapshots[0] == snapshots[1]
