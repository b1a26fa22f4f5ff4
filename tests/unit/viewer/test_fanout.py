"""The viewer fan-out hub: batching window, rate cap, drop-oldest, sequence numbers, bad input.

Timing rules are checked against a controllable clock (a sleep that advances it), so they are
exact and do not depend on how busy the machine is.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
from decimal import Decimal

import pytest
from prometheus_client import REGISTRY

from qtrader.contracts.messages import RiskAlert, RiskAlertKind
from qtrader.viewer.fanout import Batch, FanoutHub, FeedClosed, TooManyClients


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        self.now += delay
        await asyncio.sleep(0)


def make_hub(clock: FakeClock, **kwargs: float) -> FanoutHub:
    return FanoutHub(clock=clock, sleep=clock.sleep, **kwargs)  # type: ignore[arg-type]


def dropped_metric() -> float:
    value = REGISTRY.get_sample_value("qtrader_viewer_dropped_total")
    assert value is not None
    return value


def ids(batch: Batch) -> list[int]:
    return [event["i"] for event in batch.as_dict()["events"]]


async def test_a_batch_waits_for_the_window_and_holds_the_whole_burst() -> None:
    clock = FakeClock()
    hub = make_hub(clock, window_s=0.010, max_batches_per_s=50)
    feed = hub.attach("test")
    hub.publish({"i": 0})
    clock.now = 0.004
    hub.publish({"i": 1})

    batch = await feed.next_batch()

    assert clock.now == pytest.approx(0.010)
    assert batch.as_dict() == {"seq": 1, "events": [{"i": 0}, {"i": 1}], "dropped": 0}


async def test_a_waiting_client_wakes_when_an_event_is_published() -> None:
    hub = FanoutHub(window_s=0.001)
    feed = hub.attach()
    waiting = asyncio.create_task(feed.next_batch())
    await asyncio.sleep(0.02)
    assert not waiting.done()

    hub.publish({"i": 7})
    batch = await asyncio.wait_for(waiting, 2.0)

    assert batch.as_dict() == {"seq": 1, "events": [{"i": 7}], "dropped": 0}


def test_the_cap_spaces_batches_and_every_event_arrives_once_in_order() -> None:
    """One event per millisecond for 2 s, taken as soon as due: 50/s caps the batches."""
    clock = FakeClock()
    hub = make_hub(clock, window_s=0.010, max_batches_per_s=50, queue_size=10_000)
    feed = hub.attach()
    taken_at: list[float] = []
    received: list[int] = []
    seqs: list[int] = []
    for step in range(2000):
        clock.now = step / 1000
        hub.publish({"i": step})
        due = feed.due_at()
        if due is not None and due <= clock.now + 1e-9:
            batch = feed.take()
            taken_at.append(clock.now)
            received += ids(batch)
            seqs.append(batch.seq)
            assert batch.dropped == 0
    clock.now = 10.0
    received += ids(feed.take())

    assert received == list(range(2000))
    assert seqs == list(range(1, len(seqs) + 1))
    gaps = [b - a for a, b in itertools.pairwise(taken_at)]
    assert min(gaps) >= 1 / 50 - 1e-9
    for start in taken_at:
        in_one_second = sum(1 for t in taken_at if start <= t < start + 1.0)
        assert in_one_second <= 50 + 1
    # The cap binds here: without it, a 10 ms window would give ~100 batches per second.
    assert len(taken_at) >= 95


async def test_next_batch_sleeps_out_the_cap_after_a_batch() -> None:
    clock = FakeClock()
    hub = make_hub(clock, window_s=0.010, max_batches_per_s=20)
    feed = hub.attach()
    hub.publish({"i": 0})
    first = await feed.next_batch()
    hub.publish({"i": 1})
    second = await feed.next_batch()

    assert (first.seq, second.seq) == (1, 2)
    assert clock.now == pytest.approx(0.010 + 1 / 20)


async def test_a_full_queue_drops_the_oldest_and_says_so_in_the_next_batch() -> None:
    clock = FakeClock()
    hub = make_hub(clock, queue_size=3)
    feed = hub.attach()
    before = dropped_metric()
    for i in range(5):
        hub.publish({"i": i})

    first = await feed.next_batch()
    hub.publish({"i": 5})
    second = await feed.next_batch()

    assert (first.seq, ids(first), first.dropped) == (1, [2, 3, 4], 2)
    assert (second.seq, ids(second), second.dropped) == (2, [5], 0)
    assert feed.dropped == 2
    assert hub.dropped_total == 2
    assert dropped_metric() - before == 2


def test_publish_never_waits_for_a_client_that_never_reads() -> None:
    hub = FanoutHub(queue_size=100)
    stuck = hub.attach("never reads")
    before = dropped_metric()

    for i in range(10_000):
        hub.publish({"i": i})

    stats = stuck.stats()
    assert (stats.queued, stats.dropped) == (100, 9_900)
    assert dropped_metric() - before == 9_900
    assert ids(stuck.take()) == list(range(9_900, 10_000))


def test_clients_are_independent_and_only_see_events_after_they_attach() -> None:
    hub = FanoutHub(queue_size=2)
    early = hub.attach()
    hub.publish({"i": 0})
    hub.publish({"i": 1})
    late = hub.attach()
    hub.publish({"i": 2})

    assert (ids(early.take()), early.dropped) == ([1, 2], 1)
    assert (ids(late.take()), late.dropped) == ([2], 0)
    assert hub.published == 3


async def test_detach_stops_delivery_frees_the_slot_and_ends_the_consumer() -> None:
    hub = FanoutHub(max_clients=1)
    feed = hub.attach()
    with pytest.raises(TooManyClients):
        hub.attach()
    waiting = asyncio.create_task(feed.next_batch())
    await asyncio.sleep(0)

    hub.detach(feed)
    hub.detach(feed)
    hub.publish({"i": 0})

    with pytest.raises(FeedClosed):
        await asyncio.wait_for(waiting, 2.0)
    assert feed.stats().queued == 0
    assert hub.clients == 0
    assert hub.attach().client_id != feed.client_id


def test_dropped_total_keeps_counting_departed_clients() -> None:
    hub = FanoutHub(queue_size=1)
    feed = hub.attach()
    for i in range(4):
        hub.publish({"i": i})
    hub.detach(feed)

    assert hub.dropped_total == 3


def test_a_wire_message_is_published_as_its_json_form() -> None:
    hub = FanoutHub()
    feed = hub.attach()
    alert = RiskAlert(
        alert_id="a1",
        alert_kind=RiskAlertKind.DRAWDOWN,
        source="risk",
        value=Decimal("0.151"),
        threshold=Decimal("0.15"),
        detail="peak 1000, trough 849",
        ts_ms=1,
    )
    hub.publish_message(alert)

    (event,) = feed.take().as_dict()["events"]
    assert event["kind"] == "risk_alert"
    assert event["value"] == "0.151"
    assert RiskAlert.model_validate(event) == alert


def test_the_batch_wire_form_is_json_with_the_events_verbatim() -> None:
    batch = Batch(seq=4, events=('{"a":1}', '{"b":[1,2]}'), dropped=3)

    assert json.loads(batch.encode()) == {
        "seq": 4,
        "events": [{"a": 1}, {"b": [1, 2]}],
        "dropped": 3,
    }
    assert json.loads(Batch(seq=1, events=(), dropped=0).encode())["events"] == []


@pytest.mark.parametrize(
    ("event", "error"),
    [
        ([1, 2], TypeError),
        ("text", TypeError),
        ({"price": Decimal("1.5")}, ValueError),
        ({"x": math.nan}, ValueError),
        ({"x": object()}, ValueError),
    ],
)
def test_bad_events_are_refused_at_the_publisher(event: object, error: type[Exception]) -> None:
    hub = FanoutHub()
    feed = hub.attach()

    with pytest.raises(error):
        hub.publish(event)  # type: ignore[arg-type]

    assert hub.published == 0
    assert feed.due_at() is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"window_s": -0.001},
        {"window_s": math.inf},
        {"max_batches_per_s": 0},
        {"max_batches_per_s": math.nan},
        {"queue_size": 0},
        {"max_clients": 0},
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    (name,) = kwargs
    with pytest.raises(ValueError, match=name):
        FanoutHub(**kwargs)  # type: ignore[arg-type]
