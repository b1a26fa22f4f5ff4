"""Whether the wallet is being compared: a stack never quiet at its income rounds is never
compared, and its /health must say so rather than pass for one that agrees."""

from __future__ import annotations

from qtrader.execution.venue_account import UNSETTLED_ROUNDS, UNSETTLED_S, SettledReads
from qtrader.health.contract import Status


class Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def test_busy_rounds_are_ok_until_many_and_long_then_degraded_naming_the_reason() -> None:
    clock = Clock()
    reads = SettledReads(now_s=clock)
    reads.settled()
    assert reads.health().status is Status.OK
    step_s = UNSETTLED_S / (UNSETTLED_ROUNDS - 1)
    for _ in range(UNSETTLED_ROUNDS - 1):
        clock.now_s += step_s
        reads.unsettled("orders in flight")
    health = reads.health()
    assert health.status is Status.OK, health  # long enough, but not yet that many rounds
    assert "9 rounds unsettled" in health.detail
    clock.now_s += step_s
    reads.unsettled("orders in flight")
    health = reads.health()
    assert health.status is Status.DEGRADED, health
    assert "not being compared" in health.detail
    assert "orders in flight" in health.detail
    reads.settled()
    assert reads.health().status is Status.OK  # one settled read ends it


def test_many_quick_rounds_are_not_yet_degraded() -> None:
    clock = Clock()
    reads = SettledReads(now_s=clock)
    for _ in range(UNSETTLED_ROUNDS * 3):
        clock.now_s += 1.0
        reads.unsettled("messages waiting in the outbox")
    assert reads.health().status is Status.OK


def test_never_settled_since_the_start_counts_from_the_start() -> None:
    clock = Clock()
    reads = SettledReads(now_s=clock)
    for _ in range(UNSETTLED_ROUNDS):
        clock.now_s += UNSETTLED_S
        reads.unsettled("the account moved during the read")
    health = reads.health()
    assert health.status is Status.DEGRADED, health
    assert "no settled read" in health.detail
