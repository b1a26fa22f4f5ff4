"""``qtrader bench pnl``: its exactness check and its error figures say what is true.

The benchmark replays a seeded fill tape through the real exact ledger and a float copy of its
accounting. Checked here, at a small size: the ledger agrees with an independent Fraction
account (exactly when no partial close divides inexactly; at the published 1e-8 and within
1e-79 when one does), the float error fields are the actual differences, the tape holds every
kind of fill, and the same seed gives the same tape. Speed is never asserted.
"""

from __future__ import annotations

import io
import json
from decimal import Context, Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

from qtrader_tools.benchmarks.pnl import (
    ACTIONS,
    CAPITAL,
    FillTape,
    check_ledger,
    decimal_text,
    float_residues,
    fraction_account,
    run,
    wire_fields,
)

WIDE = Context(prec=200)


def fill(
    number: int, symbol: str, side: str, quantity: str, price: str, fee: str
) -> dict[str, Any]:
    return {
        "fill_id": f"t{number}",
        "client_order_id": f"c{number}",
        "symbol": symbol,
        "side": side,
        "quantity": quantity,
        "price": price,
        "fee": fee,
        "ts_ms": 1_700_000_000_000 + number,
    }


def test_decimal_text_when_scaled_then_plain_exact_decimal() -> None:
    assert decimal_text(5, 4) == "0.0005"
    assert decimal_text(123456, 2) == "1234.56"
    assert decimal_text(123, 0) == "123"
    assert Decimal(decimal_text(300_001, 1)) == Decimal("30000.1")


def test_fill_tape_when_same_seed_then_same_fills_and_other_seed_other_fills() -> None:
    first = [wire_fields(raw) for raw in FillTape(3).take(500)]
    again = [wire_fields(raw) for raw in FillTape(3).take(500)]
    other = [wire_fields(raw) for raw in FillTape(4).take(500)]
    assert first == again
    assert first != other


def test_check_ledger_when_no_inexact_division_then_exactly_equal_to_fractions() -> None:
    fills = [
        fill(1, "BTCUSDT", "BUY", "0.004", "30000.1", "0.04800016"),  # open
        fill(2, "BTCUSDT", "BUY", "0.002", "30010.0", "0.02400800"),  # increase
        fill(3, "BTCUSDT", "SELL", "0.003", "30100.5", "0.0361206"),  # close half: exact
        fill(4, "BTCUSDT", "SELL", "0.005", "29990.0", "0.059980"),  # flip through zero
        fill(5, "ETHUSDT", "SELL", "0.100", "2000.00", "0.080000"),  # open short
        fill(6, "ETHUSDT", "BUY", "0.100", "1990.55", "0.0796220"),  # close
    ]

    check = check_ledger(fills)

    assert check.exactly_equal
    assert check.max_abs_diff == 0
    assert check.equal_published


def test_check_ledger_when_a_third_is_closed_then_off_by_rounding_only() -> None:
    # Closing 1 of 3 units takes a third of the cost basis, not a terminating decimal: the
    # realized and the unrealized PnL each carry its rounding (a full close would cancel it).
    fills = [
        fill(1, "SOLUSDT", "BUY", "1", "100.00", "0.0400000"),
        fill(2, "SOLUSDT", "BUY", "2", "100.01", "0.0800080"),  # cost basis 300.02
        fill(3, "SOLUSDT", "SELL", "1", "101.00", "0.0404000"),  # takes 300.02 / 3
    ]

    check = check_ledger(fills)

    assert not check.exactly_equal
    assert 0 < check.max_abs_diff < Decimal("1e-79")  # half-even to 1e-80
    assert check.equal_published


def test_fraction_account_when_round_trip_then_realized_is_price_move() -> None:
    fills = [
        fill(1, "BTCUSDT", "BUY", "0.002", "30000.0", "0.024"),
        fill(2, "BTCUSDT", "SELL", "0.002", "30100.0", "0.02408"),
    ]

    exact = fraction_account(fills, Fraction(CAPITAL))

    assert exact.realized == Fraction("0.2")  # 0.002 x 100
    assert exact.fees == Fraction("0.04808")
    assert exact.unrealized == 0
    assert exact.equity == CAPITAL + Fraction("0.2") - Fraction("0.04808")


def test_float_residues_when_tenths_do_not_cancel_then_counted() -> None:
    # 0.1 + 0.2 - 0.3 is 5.55e-17 in binary floats, exactly 0 in decimal.
    fills = [
        fill(1, "XRPUSDT", "BUY", "0.1", "0.5000", "0.00000200"),
        fill(2, "XRPUSDT", "BUY", "0.2", "0.5000", "0.00000400"),
        fill(3, "XRPUSDT", "SELL", "0.3", "0.5000", "0.00000600"),
    ]

    residues = float_residues(fills)

    assert (residues.flat, residues.missed) == (1, 1)
    assert residues.largest == abs(0.1 + 0.2 - 0.3)


def test_run_when_small_then_exact_check_holds_and_float_errors_are_the_differences(
    tmp_path: Path,
) -> None:
    output = tmp_path / "pnl.json"
    out = io.StringIO()

    code = run(fills=3000, check=3000, seed=5, json_path=output, out=out)

    assert code == 0
    lines = out.getvalue().strip().splitlines()
    result = json.loads(lines[-1])
    assert json.loads(output.read_text()) == result
    assert (result["benchmark"], result["fills"], result["seed"]) == ("pnl", 3000, 5)
    assert result["decimal_fills_applied"] == result["float_fills_applied"] == 3000
    assert sum(result[f"tape_{action}"] for action in ACTIONS) == 3000
    assert all(result[f"tape_{action}"] > 0 for action in ACTIONS)
    assert result["fraction_fills"] == 3000
    assert result["fraction_equal_at_1e-8"] is True
    assert result["fraction_max_abs_diff"] < 1e-40
    for key in ("error_realized", "error_fees", "error_equity", "error_max_drawdown_pct"):
        row = result[key]
        exact = Decimal(row["decimal"])
        diff = abs(WIDE.subtract(Decimal(row["float"]), exact))
        assert row["abs"] == float(diff), key
        assert row["rel"] == float(WIDE.divide(diff, abs(exact))), key
    for key in ("decimal_per_s", "decimal_apply_per_s", "float_per_s", "float_apply_per_s"):
        assert result[key] > 0, key
    assert "float: parse + apply" in out.getvalue()  # the table precedes the JSON
