"""The simulator's position arithmetic: the cost basis makes realized PnL exact."""

from __future__ import annotations

from decimal import Decimal

from qtrader_tools.simulators.binance_futures.matching import Position


def test_partial_closes_at_an_uneven_average_realize_exactly_the_round_trip() -> None:
    position = Position()
    fills = [("0.1", "100"), ("0.2", "100.1"), ("-0.1", "101"), ("-0.2", "99.7")]
    realized = [position.apply(Decimal(q), Decimal(p)) for q, p in fills]
    assert realized[2] == Decimal("0.09333333")  # 10.1 - 30.02/3 rounded to 8 places
    assert sum(realized) == sum(-Decimal(q) * Decimal(p) for q, p in fills)  # exact
    assert (position.amount, position.cost) == (0, 0)


def test_a_flip_realizes_the_old_side_and_opens_the_rest_at_the_fill_price() -> None:
    position = Position()
    position.apply(Decimal("1"), Decimal("50"))
    assert position.apply(Decimal("-3"), Decimal("55")) == Decimal(5)
    assert (position.amount, position.entry_price) == (Decimal(-2), Decimal(55))
    assert position.unrealized(Decimal(54)) == Decimal(2)
