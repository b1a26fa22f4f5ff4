"""The halt gate's verdicts: what each latch lets through, the flatten orders of a trip included."""

from __future__ import annotations

import time
from decimal import Decimal

import pytest

from qtrader.contracts.messages import HaltLatch, OrderIntent, Side, TradingState
from qtrader.execution.decisions import (
    FLATTEN_ROUNDS,
    client_order_id_for,
    flatten_intent_id,
)
from qtrader.execution.halt import HaltGate


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _gate(
    state: TradingState, *, flatten: bool = False, revision: int = 2
) -> tuple[HaltGate, Clock]:
    clock = Clock()
    gate = HaltGate(heartbeat_timeout_s=10, clock=clock)
    gate.apply(
        HaltLatch(
            state=state,
            revision=revision,
            issued_at_ms=int(time.time() * 1000),
            flatten=flatten,
        )
    )
    gate.heartbeat()
    return gate, clock


def _intent(intent_id: str, *, reduce_only: bool, symbol: str = "BTCUSDT") -> OrderIntent:
    return OrderIntent(
        intent_id=intent_id,
        client_order_id=client_order_id_for(intent_id),
        symbol=symbol,
        side=Side.SELL,
        quantity=Decimal("0.01"),
        reduce_only=reduce_only,
        reference_price=Decimal(30_000),
        policy_revision=1,
        created_at_ms=1,
    )


FLATTEN = flatten_intent_id(2, "BTCUSDT")


@pytest.mark.parametrize(
    ("state", "flatten", "intent_id", "reduce_only", "allowed"),
    [
        (TradingState.ACTIVE, False, "sig-1", False, True),
        (TradingState.REDUCING, False, "sig-1", False, False),
        (TradingState.REDUCING, False, "sig-1", True, True),
        (TradingState.HALTED, False, "sig-1", True, False),
        (TradingState.HALTED, False, FLATTEN, True, False),  # the stop does not flatten
        (TradingState.HALTED, True, FLATTEN, True, True),
        (TradingState.HALTED, True, FLATTEN, False, False),  # must be reduce-only
        (TradingState.HALTED, True, flatten_intent_id(1, "BTCUSDT"), True, False),  # old trip
        # Each later round closes what the one before left, up to the last round.
        (TradingState.HALTED, True, flatten_intent_id(2, "BTCUSDT", 1), True, True),
        (
            TradingState.HALTED,
            True,
            flatten_intent_id(2, "BTCUSDT", FLATTEN_ROUNDS - 1),
            True,
            True,
        ),
        (TradingState.HALTED, True, flatten_intent_id(2, "BTCUSDT", FLATTEN_ROUNDS), True, False),
        (TradingState.HALTED, True, flatten_intent_id(1, "BTCUSDT", 1), True, False),  # old trip
        (TradingState.HALTED, True, f"{FLATTEN}:01", True, False),  # one spelling per round
        (TradingState.HALTED, True, f"{FLATTEN}:0", True, False),
        (TradingState.HALTED, True, f"{FLATTEN}:-1", True, False),
        (TradingState.HALTED, True, f"{FLATTEN}:²", True, False),
        (TradingState.HALTED, True, f"{FLATTEN}:1:1", True, False),
        (TradingState.HALTED, True, f"{FLATTEN}x", True, False),
        (TradingState.HALTED, True, "sig-1", True, False),  # any other reducing order
    ],
)
def test_what_each_latch_lets_through(
    state: TradingState, flatten: bool, intent_id: str, reduce_only: bool, allowed: bool
) -> None:
    gate, _ = _gate(state, flatten=flatten)
    assert gate.verdict(_intent(intent_id, reduce_only=reduce_only)).allowed is allowed


def test_a_flatten_order_of_another_symbol_is_not_let_through() -> None:
    gate, _ = _gate(TradingState.HALTED, flatten=True)
    intent = _intent(FLATTEN, reduce_only=True, symbol="ETHUSDT")
    assert not gate.verdict(intent).allowed


def test_without_heartbeat_not_even_the_flatten_order_goes_out() -> None:
    gate, clock = _gate(TradingState.HALTED, flatten=True)
    clock.now += 11
    verdict = gate.verdict(_intent(FLATTEN, reduce_only=True))
    assert not verdict.allowed
    assert "heartbeat missing" in verdict.why


def test_refuse_when_bucket_value_does_not_decode_then_halts_whatever_the_latch() -> None:
    gate, _ = _gate(TradingState.ACTIVE)
    gate.refuse("halt latch revision 9 in the bucket does not decode: malformed: not JSON")
    verdict = gate.verdict(_intent("sig-1", reduce_only=False))
    assert not verdict.allowed
    assert verdict.state is TradingState.HALTED
    assert "revision 9" in verdict.why


def test_refuse_when_a_newer_latch_arrives_by_broadcast_then_still_halted() -> None:
    gate, _ = _gate(TradingState.ACTIVE)
    gate.refuse("bad value")
    gate.apply(HaltLatch(state=TradingState.ACTIVE, revision=3, issued_at_ms=1))
    assert gate.state() == (TradingState.HALTED, "bad value")
    assert not gate.verdict(_intent(FLATTEN, reduce_only=True)).allowed


def test_trust_when_a_valid_value_is_read_again_then_the_latch_rules() -> None:
    gate, _ = _gate(TradingState.ACTIVE)
    gate.refuse("bad value")
    assert gate.trust() is True
    assert gate.refused is None
    assert gate.verdict(_intent("sig-1", reduce_only=False)).allowed
    assert gate.trust() is False  # nothing left to lift
