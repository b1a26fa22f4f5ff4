"""The bounded signal intake: eviction, take order, ttl, resize, ties, a reference model, floods."""

from __future__ import annotations

import copy
import random
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qtrader.contracts.messages import Direction, Signal
from qtrader.contracts.policy import SignalThrottling
from qtrader.execution.intake import (
    DecisionBudget,
    Dropped,
    DropReason,
    SignalIntake,
    policy_ttl_ms,
)

NOW = 1_700_000_000_000
TTL = 30_000


def signal(signal_id: str, confidence: float, created_at_ms: int = NOW) -> Signal:
    return Signal(
        signal_id=signal_id,
        symbol="BTCUSDT",
        direction=Direction.LONG,
        confidence=confidence,
        model_version="v1",
        candle_open_time_ms=0,
        price=Decimal(1),
        created_at_ms=created_at_ms,
    )


def ids(signals: list[Signal]) -> list[str]:
    return [s.signal_id for s in signals]


def drops(dropped: list[Dropped]) -> list[tuple[str, DropReason]]:
    return [(d.signal.signal_id, d.reason) for d in dropped]


def queue(capacity: int = 3, ttl_ms: int = TTL) -> SignalIntake:
    return SignalIntake(capacity=capacity, ttl_ms=ttl_ms)


# --- examples ---------------------------------------------------------------------------------


def test_full_queue_evicts_the_lowest_confidence() -> None:
    q = queue()
    for name, confidence in (("a", 0.5), ("b", 0.2), ("c", 0.9)):
        assert q.offer(signal(name, confidence), NOW) == []
    assert drops(q.offer(signal("d", 0.6), NOW)) == [("b", DropReason.QUEUE_FULL)]
    assert ids(q.snapshot()) == ["c", "d", "a"]
    assert len(q) == 3
    assert q.dropped[DropReason.QUEUE_FULL] == 1


def test_full_queue_drops_the_newcomer_when_it_is_the_lowest() -> None:
    q = queue()
    for name, confidence in (("a", 0.5), ("b", 0.4), ("c", 0.9)):
        q.offer(signal(name, confidence), NOW)
    newcomer = signal("d", 0.1)
    dropped = q.offer(newcomer, NOW)
    assert dropped == [Dropped(newcomer, DropReason.QUEUE_FULL)]
    assert dropped[0].signal is newcomer
    assert ids(q.snapshot()) == ["c", "a", "b"]


def test_a_newcomer_equal_in_confidence_but_newer_survives_the_older() -> None:
    q = queue(capacity=1)
    q.offer(signal("old", 0.5, NOW - 10), NOW)
    assert drops(q.offer(signal("new", 0.5, NOW), NOW)) == [("old", DropReason.QUEUE_FULL)]
    # An older newcomer of equal confidence is itself the one to go.
    assert drops(q.offer(signal("older", 0.5, NOW - 20), NOW)) == [("older", DropReason.QUEUE_FULL)]
    assert ids(q.snapshot()) == ["new"]


def test_eviction_ties_fall_to_signal_id_whatever_the_arrival_order() -> None:
    for arrival in (["x", "y", "z"], ["z", "y", "x"], ["y", "z", "x"]):
        q = queue(capacity=2)
        dropped = [d for name in arrival for d in q.offer(signal(name, 0.5), NOW)]
        assert drops(dropped) == [("x", DropReason.QUEUE_FULL)]
        assert ids(q.snapshot()) == ["y", "z"]


def test_take_returns_highest_confidence_first_and_oldest_first_on_ties() -> None:
    q = queue(capacity=10)
    q.offer(signal("low", 0.1), NOW)
    q.offer(signal("tie-new", 0.8, NOW - 1), NOW)
    q.offer(signal("tie-old", 0.8, NOW - 5), NOW)
    q.offer(signal("top", 0.95), NOW)
    q.offer(signal("tie-same-b", 0.3, NOW - 2), NOW)
    q.offer(signal("tie-same-a", 0.3, NOW - 2), NOW)
    taken, dropped = q.take(3, NOW)
    assert ids(taken) == ["top", "tie-old", "tie-new"]
    assert dropped == []
    taken, _ = q.take(10, NOW)
    assert ids(taken) == ["tie-same-a", "tie-same-b", "low"]
    assert len(q) == 0
    assert q.take(5, NOW) == ([], [])


def test_take_drops_every_expired_signal_first() -> None:
    q = queue(capacity=5, ttl_ms=1_000)
    q.offer(signal("fresh", 0.3), NOW - 500)
    q.offer(signal("stale-high", 0.99, NOW - 1_001), NOW - 500)
    q.offer(signal("at-ttl", 0.5, NOW - 1_000), NOW - 500)
    q.offer(signal("stale-older", 0.2, NOW - 1_500), NOW - 500)
    taken, dropped = q.take(1, NOW)
    # The expired ones go oldest first; an age of exactly the ttl is still live.
    assert drops(dropped) == [
        ("stale-older", DropReason.EXPIRED),
        ("stale-high", DropReason.EXPIRED),
    ]
    assert ids(taken) == ["at-ttl"]
    assert ids(q.snapshot()) == ["fresh"]
    assert q.dropped[DropReason.EXPIRED] == 2


def test_take_with_limit_zero_still_expires() -> None:
    q = queue(ttl_ms=10)
    q.offer(signal("a", 0.5, NOW), NOW)
    assert drops(q.take(0, NOW + 11)[1]) == [("a", DropReason.EXPIRED)]


def test_an_expired_newcomer_is_dropped_at_once() -> None:
    q = queue(capacity=1, ttl_ms=1_000)
    q.offer(signal("held", 0.1), NOW)
    late = signal("late", 0.99, NOW - 1_001)
    assert q.offer(late, NOW) == [Dropped(late, DropReason.EXPIRED)]
    assert ids(q.snapshot()) == ["held"]


def test_offer_expires_held_signals_before_evicting_a_live_one() -> None:
    q = queue(capacity=2, ttl_ms=1_000)
    q.offer(signal("expiring", 0.9, NOW), NOW)
    q.offer(signal("live", 0.1, NOW + 900), NOW + 900)
    dropped = q.offer(signal("new", 0.5, NOW + 1_001), NOW + 1_001)
    assert drops(dropped) == [("expiring", DropReason.EXPIRED)]
    assert ids(q.snapshot()) == ["new", "live"]


def test_eviction_skips_signals_that_already_left_by_another_way() -> None:
    q = queue(capacity=3, ttl_ms=100)
    q.offer(signal("expires", 0.0, NOW), NOW)
    q.offer(signal("taken", 0.1, NOW + 50), NOW + 50)
    assert ids(q.take(1, NOW + 50)[0]) == ["taken"]
    q.offer(signal("a", 0.5, NOW + 60), NOW + 60)
    q.offer(signal("b", 0.6, NOW + 60), NOW + 60)
    assert drops(q.offer(signal("c", 0.55, NOW + 101), NOW + 101)) == [
        ("expires", DropReason.EXPIRED)
    ]
    # Full: the two least confident entries in the eviction order have left already.
    assert drops(q.offer(signal("d", 0.7, NOW + 101), NOW + 101)) == [("a", DropReason.QUEUE_FULL)]
    assert ids(q.snapshot()) == ["d", "b", "c"]


def test_a_duplicate_signal_id_is_dropped_and_the_first_copy_kept() -> None:
    q = queue()
    first = signal("s", 0.2)
    q.offer(first, NOW)
    assert drops(q.offer(signal("s", 0.9), NOW)) == [("s", DropReason.DUPLICATE)]
    assert q.snapshot()[0] is first
    q.take(1, NOW)
    # Once taken the id is forgotten (bounded memory): a later copy is accepted.
    assert q.offer(signal("s", 0.9), NOW) == []


def test_resize_shrink_expires_then_evicts_the_lowest_confidence() -> None:
    q = queue(capacity=5, ttl_ms=10_000)
    for name, confidence, age in (
        ("a", 0.9, 0),
        ("b", 0.1, 0),
        ("c", 0.5, 6_000),
        ("d", 0.3, 0),
        ("e", 0.7, 0),
    ):
        q.offer(signal(name, confidence, NOW - age), NOW)
    dropped = q.resize(2, 5_000, NOW)
    assert drops(dropped) == [
        ("c", DropReason.EXPIRED),
        ("b", DropReason.CAPACITY_REDUCED),
        ("d", DropReason.CAPACITY_REDUCED),
    ]
    assert ids(q.snapshot()) == ["a", "e"]
    assert (q.capacity, q.ttl_ms, len(q)) == (2, 5_000, 2)
    assert q.high_water == 5


def test_resize_grow_keeps_everything_and_admits_more() -> None:
    q = queue(capacity=1)
    q.offer(signal("a", 0.5), NOW)
    assert q.resize(3, TTL, NOW) == []
    assert q.offer(signal("b", 0.1), NOW) == []
    assert len(q) == 2


def test_counts_start_at_zero_for_every_reason_and_are_read_only() -> None:
    q = queue()
    assert dict(q.dropped) == dict.fromkeys(DropReason, 0)
    with pytest.raises(TypeError):
        q.dropped[DropReason.EXPIRED] = 5  # type: ignore[index]


@pytest.mark.parametrize(
    ("capacity", "ttl_ms", "message"),
    [(0, 1, "capacity must be >= 1, got 0"), (1, 0, "ttl_ms must be >= 1, got 0")],
)
def test_bad_arguments_are_refused_clearly(capacity: int, ttl_ms: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SignalIntake(capacity=capacity, ttl_ms=ttl_ms)
    q = queue()
    with pytest.raises(ValueError, match=message):
        q.resize(capacity, ttl_ms, NOW)
    assert (q.capacity, q.ttl_ms) == (3, TTL)  # a refused resize changes nothing
    with pytest.raises(ValueError, match="limit must be >= 0, got -1"):
        q.take(-1, NOW)


def test_from_policy_matches_the_decision_rule_for_the_ttl() -> None:
    q = SignalIntake.from_policy(SignalThrottling(queue_size=7, ttl_seconds=1.5))
    assert (q.capacity, q.ttl_ms) == (7, 1_500)
    assert policy_ttl_ms(SignalThrottling(ttl_seconds=0.0015)) == 1
    assert policy_ttl_ms(SignalThrottling(ttl_seconds=0.0001)) == 1
    assert policy_ttl_ms(SignalThrottling(ttl_seconds=2.0009)) == 2_000


# --- a reference model ------------------------------------------------------------------------


@dataclass
class Model:
    """The same rules as a plain list, O(n) per step, written for obviousness."""

    capacity: int
    ttl_ms: int
    held: list[Signal] = field(default_factory=list)

    def expire(self, now_ms: int) -> list[Dropped]:
        gone = [s for s in self.held if now_ms - s.created_at_ms > self.ttl_ms]
        self.held = [s for s in self.held if s not in gone]
        gone.sort(key=lambda s: (s.created_at_ms, s.signal_id))
        return [Dropped(s, DropReason.EXPIRED) for s in gone]

    def evict(self, reason: DropReason) -> Dropped:
        victim = min(self.held, key=lambda s: (s.confidence, s.created_at_ms, s.signal_id))
        self.held = [s for s in self.held if s is not victim]
        return Dropped(victim, reason)

    def offer(self, sig: Signal, now_ms: int) -> list[Dropped]:
        out = self.expire(now_ms)
        if now_ms - sig.created_at_ms > self.ttl_ms:
            return [*out, Dropped(sig, DropReason.EXPIRED)]
        if any(s.signal_id == sig.signal_id for s in self.held):
            return [*out, Dropped(sig, DropReason.DUPLICATE)]
        self.held.append(sig)
        if len(self.held) > self.capacity:
            out.append(self.evict(DropReason.QUEUE_FULL))
        return out

    def take(self, limit: int, now_ms: int) -> tuple[list[Signal], list[Dropped]]:
        out = self.expire(now_ms)
        ordered = sorted(self.held, key=lambda s: (-s.confidence, s.created_at_ms, s.signal_id))
        taken = ordered[:limit]
        self.held = [s for s in self.held if all(s is not t for t in taken)]
        return taken, out

    def resize(self, capacity: int, ttl_ms: int, now_ms: int) -> list[Dropped]:
        self.capacity, self.ttl_ms = capacity, ttl_ms
        out = self.expire(now_ms)
        while len(self.held) > capacity:
            out.append(self.evict(DropReason.CAPACITY_REDUCED))
        return out


def identities(dropped: list[Dropped]) -> list[tuple[int, DropReason]]:
    return [(id(d.signal), d.reason) for d in dropped]


# Few distinct confidences, times and ids, so ties and duplicates happen often.
confidences = st.sampled_from([0.0, 0.25, 0.5, 0.5000001, 1.0])
clocks = st.integers(min_value=0, max_value=120)
offers = st.tuples(st.just("offer"), st.sampled_from("abcdefgh"), confidences, clocks, clocks)
takes = st.tuples(st.just("take"), st.integers(min_value=0, max_value=4), clocks)
resizes = st.tuples(
    st.just("resize"),
    st.integers(min_value=1, max_value=6),
    st.integers(min_value=1, max_value=60),
    clocks,
)
operations = st.lists(st.one_of(offers, offers, takes, resizes), max_size=80)


@settings(max_examples=500, database=None, deadline=None)
@given(
    capacity=st.integers(min_value=1, max_value=6),
    ttl_ms=st.integers(min_value=1, max_value=60),
    ops=operations,
)
def test_the_queue_behaves_like_the_reference_model(
    capacity: int, ttl_ms: int, ops: list[tuple[object, ...]]
) -> None:
    q = SignalIntake(capacity=capacity, ttl_ms=ttl_ms)
    model = Model(capacity, ttl_ms)
    offered: list[Signal] = []  # kept alive so that id() stays unique
    returned: list[Signal] = []
    dropped: list[Dropped] = []
    deepest = 0
    for op in ops:
        match op:
            case ("offer", str(name), float(confidence), int(created), int(now)):
                sig = signal(name, confidence, created)
                offered.append(sig)
                out = q.offer(sig, now)
                assert identities(out) == identities(model.offer(sig, now))
            case ("take", int(limit), int(now)):
                taken, out = q.take(limit, now)
                expected_taken, expected_out = model.take(limit, now)
                assert [id(s) for s in taken] == [id(s) for s in expected_taken]
                assert identities(out) == identities(expected_out)
                assert len(taken) <= limit
                returned.extend(taken)
            case ("resize", int(new_capacity), int(new_ttl), int(now)):
                out = q.resize(new_capacity, new_ttl, now)
                assert identities(out) == identities(model.resize(new_capacity, new_ttl, now))
            case _:
                raise AssertionError(f"unknown operation {op!r}")
        dropped.extend(out)
        deepest = max(deepest, len(q))
        assert len(q) == len(model.held) <= q.capacity
        assert q.high_water == deepest
        sizes = q.footprint
        assert sizes["live"] == sizes["ids"] == len(q)
        for heap in ("evict_heap", "take_heap", "expiry_heap"):
            assert len(q) <= sizes[heap] <= 2 * len(q)

    held = q.snapshot()
    assert sorted(id(s) for s in held) == sorted(id(s) for s in model.held)
    assert dict(q.dropped) == {
        reason: Counter(d.reason for d in dropped)[reason] for reason in DropReason
    }
    # Every signal offered is in exactly one place: returned, dropped or still held.
    accounted = [id(s) for s in returned] + [id(d.signal) for d in dropped] + [id(s) for s in held]
    assert len(set(accounted)) == len(accounted)  # none both returned and dropped, say
    assert sorted(accounted) == sorted(id(s) for s in offered)


# --- floods -----------------------------------------------------------------------------------


def test_a_flood_of_100000_offers_keeps_memory_bounded() -> None:
    rng = random.Random(7)
    q = SignalIntake(capacity=100, ttl_ms=10**12)
    taken = 0
    for n in range(100_000):
        q.offer(signal(f"s{n}", rng.random(), NOW + n), NOW + n)
        if n % 997 == 0:
            # A worker cycle now and then leaves room and stale entries in two heaps.
            taken += len(q.take(10, NOW + n)[0])
        sizes = q.footprint
        assert sizes["live"] <= 100
        assert max(sizes.values()) <= 2 * 100
    assert q.high_water == 100
    assert q.dropped[DropReason.QUEUE_FULL] == 100_000 - taken - len(q)
    assert len(q) == 100
    # What stays is the most confident of the flood: nothing held is beaten by anything evicted.
    confidences_held = [s.confidence for s in q.snapshot()]
    assert confidences_held == sorted(confidences_held, reverse=True)


def test_a_flood_of_expiring_signals_keeps_memory_bounded() -> None:
    rng = random.Random(11)
    q = SignalIntake(capacity=100, ttl_ms=50)
    expired = 0
    for n in range(100_000):
        # Four arrivals per ms, each up to 40 ms old: more live signals than room, so the queue
        # is full while old ones expire under it and leave stale entries in every heap.
        now = NOW + n // 4
        out = q.offer(signal(f"s{n}", rng.random(), now - rng.randrange(0, 40)), now)
        expired += sum(d.reason is DropReason.EXPIRED for d in out)
        sizes = q.footprint
        assert sizes["live"] <= 100
        assert max(sizes.values()) <= 2 * 100
    assert expired == q.dropped[DropReason.EXPIRED] > 0
    assert q.dropped[DropReason.QUEUE_FULL] > 0
    assert q.high_water == 100
    assert q.dropped[DropReason.EXPIRED] + q.dropped[DropReason.QUEUE_FULL] + len(q) == 100_000


# --- the decision budget ------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@example(most=1, steps=[(244, 1), (100, 0)])  # 0.344 - 0.1 < 0.244 in floats: kept, no wait
@given(
    most=st.integers(min_value=1, max_value=5),
    steps=st.lists(
        st.tuples(st.integers(min_value=0, max_value=300), st.integers(min_value=0, max_value=7)),
        min_size=1,
        max_size=60,
    ),
)
def test_decision_budget_never_lets_more_than_most_through_in_any_window(
    most: int, steps: list[tuple[int, int]]
) -> None:
    """Cycles at arbitrary moments (ms apart) asking for arbitrary numbers: what the budget
    grants never exceeds ``most`` in any window of its length, and when it has no room,
    ``wait_s`` says exactly when it will."""
    window_ms = 100
    budget = DecisionBudget(window_ms / 1000)
    granted: list[tuple[int, int]] = []
    now_ms = 0
    for gap_ms, asked in steps:
        now_ms += gap_ms
        now = now_ms / 1000
        left = budget.left(most, now)
        wait = budget.wait_s(most, now)
        assert (wait > 0) == (left == 0)
        if wait > 0:  # probed on copies: reading the budget at a later time forgets the past
            assert copy.deepcopy(budget).left(most, now + wait - 1e-6) == 0
            assert copy.deepcopy(budget).left(most, now + wait + 1e-9) > 0
        take = min(asked, left)
        budget.spend(take, now)
        if take:
            granted.append((now_ms, take))
    for start_ms, _ in granted:
        in_window = sum(n for t, n in granted if start_ms <= t < start_ms + window_ms)
        assert in_window <= most
    # With room left, everything asked within the bound is granted at once.
    assert sum(n for _, n in granted) >= min(most, steps[0][1])
