"""A worker that stops answering stays pending until it acknowledges or its lease lapses."""

from __future__ import annotations

from qtrader.contracts.messages import HaltAck, TradingState
from qtrader.control.halt_channel import ACK_LEASE_S, AckCollector, ack_lease_s


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _ack(worker: str, revision: int) -> HaltAck:
    return HaltAck(worker_id=worker, revision=revision, state=TradingState.ACTIVE, ts_ms=1)


async def test_a_silent_worker_when_past_presence_then_still_pending_until_the_lease() -> None:
    clock = Clock()
    acks = AckCollector(presence_timeout_s=5.0, clock=clock)
    await acks.on_ack(_ack("frozen", 1))
    await acks.on_ack(_ack("answering", 1))
    clock.now += 30  # frozen says nothing more; the other acknowledges revision 2
    await acks.on_ack(_ack("answering", 2))
    assert set(acks.live()) == {"answering"}
    assert acks.pending(2) == ("frozen",)
    clock.now += ACK_LEASE_S - 30 + 0.001  # the lease, counted from its last answer, lapses
    assert acks.pending(2) == ()
    assert set(acks.known()) == {"answering"}


async def test_a_silent_worker_when_it_answers_again_then_no_longer_pending() -> None:
    clock = Clock()
    acks = AckCollector(clock=clock)
    await acks.on_ack(_ack("frozen", 1))
    clock.now += 20
    assert acks.pending(2) == ("frozen",)
    await acks.on_ack(_ack("frozen", 2))
    assert acks.pending(2) == ()


def test_ack_lease_when_the_timeout_is_long_then_twice_it() -> None:
    assert ack_lease_s(5) == ACK_LEASE_S
    assert ack_lease_s(300) == 600
