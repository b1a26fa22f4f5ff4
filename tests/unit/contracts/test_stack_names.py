"""Each TradingPolicy's stack has names of its own: no two stacks (nor local mode) share one."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qtrader.contracts import subjects

LABEL = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,10}[a-z0-9])?\Z")


def names(stack: str | None) -> set[str]:
    every = {
        subjects.scoped_subject(stack, s) for spec in subjects.ALL_STREAMS for s in spec.subjects
    }
    every |= {subjects.scoped_stream(stack, s).name for s in subjects.ALL_STREAMS}
    every |= {subjects.scoped_consumer(stack, c).durable for c in subjects.ALL_CONSUMERS}
    every |= {subjects.scoped_key(stack, key) for key in (subjects.HALT_KEY, subjects.POLICY_KEY)}
    every |= {subjects.scoped_subject(stack, subjects.CONTROL_HALT)}
    return every


def test_a_stack_names_every_subject_stream_consumer_and_key_after_its_policy() -> None:
    stack = subjects.stack_id("trading", "alpha")
    assert (
        subjects.scoped_subject(stack, subjects.candle_subject("BTCUSDT"))
        == "qtrader.trading.alpha.market.candle.BTCUSDT"
    )
    market = subjects.scoped_stream(stack, subjects.MARKET)
    assert market.name == "QT_MARKET_trading_alpha"
    assert market.subjects == ("qtrader.trading.alpha.market.candle.*",)
    consumer = subjects.scoped_consumer(stack, subjects.EXECUTION_INTENTS)
    assert consumer.durable == "trading_alpha_execution-intents"
    assert consumer.stream.name == "QT_ORDERS_trading_alpha"
    assert consumer.filter_subject == "qtrader.trading.alpha.order.intent.*"
    assert subjects.scoped_key(stack, subjects.HALT_KEY) == "trading.alpha.latch"


def test_without_a_stack_the_names_are_the_logical_ones() -> None:
    assert subjects.scoped_stream(None, subjects.FILLS) is subjects.FILLS
    assert subjects.scoped_subject(None, subjects.CONTROL_HALT) == subjects.CONTROL_HALT
    assert subjects.scoped_key(None, subjects.POLICY_KEY) == subjects.POLICY_KEY


@given(a=st.tuples(LABEL, LABEL), b=st.tuples(LABEL, LABEL))
def test_two_stacks_never_share_a_name(a: tuple[str, str], b: tuple[str, str]) -> None:
    if a == b:
        return
    assert names(subjects.stack_id(*a)).isdisjoint(names(subjects.stack_id(*b)))
    assert names(subjects.stack_id(*a)).isdisjoint(names(None))


def test_a_stack_subject_reads_back_as_the_logical_one() -> None:
    stack = subjects.stack_id("ns", "p")
    scoped = subjects.scoped_subject(stack, subjects.fill_subject("ETHUSDT"))
    assert subjects.unscoped_subject(stack, scoped) == subjects.fill_subject("ETHUSDT")


@pytest.mark.parametrize("bad", ["trading", "Trading.alpha", "a.b.c", "a_b.c", "-a.b", "a.", ""])
def test_a_stack_id_must_be_two_dns_labels(bad: str) -> None:
    with pytest.raises(subjects.InvalidStack):
        subjects.check_stack(bad)


def test_a_foreign_subject_is_refused() -> None:
    with pytest.raises(ValueError, match="not one of the system's subjects"):
        subjects.scoped_subject("a.b", "other.market.candle.X")
