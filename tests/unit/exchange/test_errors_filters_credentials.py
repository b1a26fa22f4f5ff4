"""Pure rules of the exchange layer: error classification, local filters, credentials."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from qtrader.contracts.messages import OrderIntent, OrderType, Side
from qtrader.exchange.credentials import Credentials, CredentialsError, load_credentials
from qtrader.exchange.errors import (
    Banned,
    ClockSkew,
    FilterViolation,
    OutcomeUnknown,
    RateLimited,
    Rejected,
    Transient,
    classify,
)
from qtrader.exchange.filters import prepare_order
from qtrader.execution.decisions import attempt_client_order_id, client_order_id_for
from qtrader.execution.orders import slippage_bound
from qtrader.instruments import paper_exchange_info

NOW = 1_700_000_000.0
BTC = paper_exchange_info().instrument("BTCUSDT")  # tick 0.10, step 0.001, min notional 100


@pytest.mark.parametrize(
    ("status", "code", "message", "kind"),
    [
        (418, -1003, "Way too many requests; IP banned until 1700000120000.", Banned),
        (429, -1003, "Too many requests.", RateLimited),
        (429, -1015, "Too many new orders.", RateLimited),
        (400, -1021, "Timestamp for this request is outside of the recvWindow.", ClockSkew),
        (
            503,
            -1000,
            "Unknown error, please check your request or try again later.",
            OutcomeUnknown,
        ),
        (500, -1006, "An unexpected response was received from the message bus.", OutcomeUnknown),
        (500, -1007, "Timeout waiting for response from backend server.", OutcomeUnknown),
        (503, -1008, "Service Unavailable.", Transient),
        (
            503,
            -1001,
            "Internal error; unable to process your request. Please try again.",
            Transient,
        ),
        (408, None, "", Transient),
        (502, None, "<html>Bad Gateway</html>", Transient),
        (400, -1111, "Precision is over the maximum defined for this asset.", Rejected),
        (400, -2019, "Margin is insufficient.", Rejected),
        (400, -2022, "ReduceOnly Order is rejected.", Rejected),
        (400, -4014, "Price not increased by tick size.", Rejected),
        (400, -4023, "Quantity not increased by step size.", Rejected),
        (400, -4164, "Order's notional must be no smaller than 100.", Rejected),
    ],
)
def test_classify_maps_each_answer_to_the_action_it_needs(
    status: int, code: int | None, message: str, kind: type[Exception]
) -> None:
    error = classify(status, code, message, {}, now=NOW)
    assert type(error) is kind
    assert (error.status, error.code) == (status, code)


def test_retry_after_header_sets_when_to_try_again() -> None:
    limited = classify(429, -1003, "", {"retry-after": "7"}, now=NOW)
    assert isinstance(limited, RateLimited)
    assert limited.retry_at == NOW + 7
    no_header = classify(429, -1003, "", {}, now=NOW + 15)
    assert isinstance(no_header, RateLimited)
    assert no_header.retry_at == NOW + 60 - (NOW % 60)  # the end of the minute window


def order(quantity: str, *, limit: str | None = None, side: Side = Side.BUY) -> OrderIntent:
    return OrderIntent(
        intent_id="sig-x",
        client_order_id=client_order_id_for("sig-x"),
        symbol="BTCUSDT",
        side=side,
        quantity=Decimal(quantity),
        order_type=OrderType.LIMIT if limit else OrderType.MARKET,
        limit_price=Decimal(limit) if limit else None,
        reference_price=Decimal(50_000),
        policy_revision=1,
        created_at_ms=1,
    )


def test_prepare_rounds_quantity_down_and_the_limit_inside_the_bound() -> None:
    buy = prepare_order(order("0.01099", limit="50050.07"), BTC)
    assert (buy.quantity, buy.limit_price) == (Decimal("0.010"), Decimal("50050.0"))
    sell = prepare_order(order("0.0109", limit="49949.93", side=Side.SELL), BTC)
    assert (sell.quantity, sell.limit_price) == (Decimal("0.010"), Decimal("49950.0"))


@pytest.mark.parametrize(
    ("quantity", "match"),
    [("0.0009", "below the minimum 0.001"), ("0.0019", "notional 50.000 below the minimum 100")],
)
def test_prepare_refuses_what_breaks_a_filter_after_rounding(quantity: str, match: str) -> None:
    with pytest.raises(FilterViolation, match=match):
        prepare_order(order(quantity), BTC)


def test_reduce_only_is_exempt_from_min_notional_like_on_binance() -> None:
    reduce = order("0.001").model_copy(update={"reduce_only": True})
    assert prepare_order(reduce, BTC).quantity == Decimal("0.001")


def test_slippage_bound_is_above_for_buys_below_for_sells() -> None:
    assert slippage_bound(Decimal(50_000), Side.BUY, 20) == Decimal("50100")
    assert slippage_bound(Decimal(50_000), Side.SELL, 20) == Decimal("49900")


def test_attempt_ids_are_deterministic_valid_and_distinct() -> None:
    first = client_order_id_for("sig-abc")
    ids = [attempt_client_order_id(first, n) for n in range(4)]
    assert ids[0] == first
    assert len(set(ids)) == 4
    assert all(len(i) <= 36 and i.startswith(first[:32]) for i in ids)


def test_credentials_from_env_or_mounted_files_never_in_repr(tmp_path: Path) -> None:
    env = {"QTRADER_BINANCE_API_KEY": "k" * 64, "QTRADER_BINANCE_API_SECRET": "s" * 64}
    from_env = load_credentials(env)
    assert "k" * 8 not in repr(from_env)
    assert "s" * 8 not in repr(from_env)
    (tmp_path / "api-key").write_text("file-key\n")
    (tmp_path / "api-secret").write_text("file-secret\n")
    from_files = load_credentials({"QTRADER_BINANCE_SECRET_DIR": str(tmp_path), **env})
    assert from_files == Credentials(api_key="file-key", api_secret="file-secret")
    assert from_files.account_id != from_env.account_id


def test_missing_credentials_say_where_they_are_looked_for(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="QTRADER_BINANCE_SECRET_DIR"):
        load_credentials({})
    with pytest.raises(CredentialsError, match="cannot read"):
        load_credentials({"QTRADER_BINANCE_SECRET_DIR": str(tmp_path)})
