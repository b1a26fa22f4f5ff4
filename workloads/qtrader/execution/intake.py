"""Bounded signal intake: what the execution worker holds between receiving and deciding.

Signals arrive faster than a cycle may act on them, so the worker holds at most ``capacity`` of
them and takes up to ``max_per_cycle`` per cycle. When the queue is full the *least useful*
signal goes: the lowest confidence, and among equals the oldest (smaller ``created_at_ms``, then
smaller ``signal_id``, so the outcome never depends on arrival order). That may be the newcomer
itself. A cycle takes the highest confidence first (ties: oldest first). A signal older than the
ttl is worth nothing: every operation first drops every expired signal, so an expired signal
never pushes out a live one and is never handed out. Age is ``now_ms - created_at_ms`` and a
signal is expired when its age is *greater* than the ttl, the same rule as ``decisions.decide``.

Why three heaps: eviction wants the minimum of (confidence, age order), taking wants the maximum
confidence with the *same* age tie-break, and expiry wants the minimum ``created_at_ms``. These
are three different orders, so one heap each, all O(log n). Removing a signal through one heap
leaves a stale entry in the other two (lazy deletion); each entry carries the sequence number
of its insertion, and an entry whose number is no longer live is skipped when it reaches a top.
A heap holding more stale entries than live ones is rebuilt, so no heap ever exceeds twice the
live size plus one, and the rebuild's O(n) cost is paid for by the n removals that made it due.

Duplicates: JetStream delivers at least once, so the same ``signal_id`` may arrive while its
first copy is still held. The copy is dropped as DUPLICATE (holding both would act twice on one
event). The queue does not remember signals it has already handed out or dropped: that would be
unbounded memory, and the intent id derived from the signal guards the rest of the way.
"""

from __future__ import annotations

import collections
import enum
import heapq
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeVar

from qtrader.contracts.messages import Signal
from qtrader.contracts.policy import SignalThrottling


class DropReason(enum.StrEnum):
    """Why a signal left the queue without being taken; bounded, usable as a metric label."""

    QUEUE_FULL = "queue_full"  # the queue was full and this was the least useful signal
    EXPIRED = "expired"  # older than the ttl (on arrival or while waiting)
    DUPLICATE = "duplicate"  # a signal with the same signal_id is already held
    CAPACITY_REDUCED = "capacity_reduced"  # a new policy revision shrank the queue


@dataclass(frozen=True)
class Dropped:
    signal: Signal
    reason: DropReason


def policy_ttl_ms(throttling: SignalThrottling) -> int:
    """The policy's ttl in whole milliseconds, expiring exactly what ``decide`` would deny.

    Ages are whole milliseconds, so ``age > ttl`` equals ``age > floor(ttl)``. The floor of a
    sub-millisecond ttl is raised to 1, the smallest ttl the queue accepts.
    """
    return max(1, math.floor(throttling.ttl_seconds * 1000))


# Heap entries end in the insertion sequence number, which identifies the live signal and keeps
# two entries from ever comparing equal up to a Signal (which does not order).
_EvictKey = tuple[float, int, str, int]  # (confidence, created_at_ms, signal_id, seq)
_TakeKey = tuple[float, int, str, int]  # (-confidence, created_at_ms, signal_id, seq)
_ExpiryKey = tuple[int, str, int]  # (created_at_ms, signal_id, seq)
_Entry = TypeVar("_Entry", _EvictKey, _ExpiryKey)


class SignalIntake:
    """A bounded priority queue of signals with ttl expiry; pure, the caller passes the clock."""

    def __init__(self, *, capacity: int, ttl_ms: int) -> None:
        _validate(capacity, ttl_ms)
        self._capacity = capacity
        self._ttl_ms = ttl_ms
        self._live: dict[int, Signal] = {}  # seq -> signal
        self._seq_of: dict[str, int] = {}  # signal_id -> seq, for duplicates
        self._next_seq = 0
        self._evict_heap: list[_EvictKey] = []
        self._take_heap: list[_TakeKey] = []
        self._expiry_heap: list[_ExpiryKey] = []
        self._high_water = 0
        self._dropped: dict[DropReason, int] = dict.fromkeys(DropReason, 0)

    @classmethod
    def from_policy(cls, throttling: SignalThrottling) -> SignalIntake:
        return cls(capacity=throttling.queue_size, ttl_ms=policy_ttl_ms(throttling))

    # --- the public operations ----------------------------------------------------------------

    def offer(self, signal: Signal, now_ms: int) -> list[Dropped]:
        """Add ``signal``; return what was dropped (expired ones first, then at most one more)."""
        drops = self._expire(now_ms)
        if self._is_expired(signal, now_ms):
            drops.append(self._count(signal, DropReason.EXPIRED))
        elif signal.signal_id in self._seq_of:
            drops.append(self._count(signal, DropReason.DUPLICATE))
        elif len(self._live) < self._capacity:
            self._push(signal)
        elif _evict_key(signal, -1) < self._least_useful():
            # Sequence -1 never decides: signal ids are distinct among held signals.
            drops.append(self._count(signal, DropReason.QUEUE_FULL))
        else:
            drops.append(self._count(self._pop_evict(), DropReason.QUEUE_FULL))
            self._push(signal)
        self._high_water = max(self._high_water, len(self._live))
        self._compact()
        return drops

    def take(self, limit: int, now_ms: int) -> tuple[list[Signal], list[Dropped]]:
        """Up to ``limit`` signals, highest confidence first, after dropping the expired ones."""
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        drops = self._expire(now_ms)
        taken: list[Signal] = []
        while len(taken) < limit and self._live:
            _, _, _, seq = heapq.heappop(self._take_heap)
            if seq in self._live:
                taken.append(self._forget(seq))
        self._compact()
        return taken, drops

    def resize(self, capacity: int, ttl_ms: int, now_ms: int) -> list[Dropped]:
        """Apply a new policy revision: the new ttl expires first, then shrinking evicts."""
        _validate(capacity, ttl_ms)
        self._capacity = capacity
        self._ttl_ms = ttl_ms
        drops = self._expire(now_ms)
        while len(self._live) > capacity:
            drops.append(self._count(self._pop_evict(), DropReason.CAPACITY_REDUCED))
        self._compact()
        return drops

    def snapshot(self) -> list[Signal]:
        """The held signals in take order, without changing anything (O(n log n))."""
        return [self._live[key[3]] for key in sorted(self._take_heap) if key[3] in self._live]

    def __len__(self) -> int:
        return len(self._live)

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def ttl_ms(self) -> int:
        return self._ttl_ms

    @property
    def high_water(self) -> int:
        """The most signals ever held at once."""
        return self._high_water

    @property
    def dropped(self) -> Mapping[DropReason, int]:
        """Running drop counts by reason (every reason present); a read-only live view."""
        return MappingProxyType(self._dropped)

    @property
    def footprint(self) -> Mapping[str, int]:
        """Entries in each internal structure, stale heap entries included: bounded memory."""
        return {
            "live": len(self._live),
            "ids": len(self._seq_of),
            "evict_heap": len(self._evict_heap),
            "take_heap": len(self._take_heap),
            "expiry_heap": len(self._expiry_heap),
        }

    # --- internals ----------------------------------------------------------------------------

    def _is_expired(self, signal: Signal, now_ms: int) -> bool:
        return now_ms - signal.created_at_ms > self._ttl_ms

    def _expire(self, now_ms: int) -> list[Dropped]:
        """Drop every expired signal, oldest first."""
        drops: list[Dropped] = []
        heap = self._expiry_heap
        while heap and now_ms - heap[0][0] > self._ttl_ms:
            _, _, seq = heapq.heappop(heap)
            if seq in self._live:
                drops.append(self._count(self._forget(seq), DropReason.EXPIRED))
        return drops

    def _push(self, signal: Signal) -> None:
        seq = self._next_seq
        self._next_seq += 1
        self._live[seq] = signal
        self._seq_of[signal.signal_id] = seq
        heapq.heappush(self._evict_heap, _evict_key(signal, seq))
        heapq.heappush(
            self._take_heap, (-signal.confidence, signal.created_at_ms, signal.signal_id, seq)
        )
        heapq.heappush(self._expiry_heap, (signal.created_at_ms, signal.signal_id, seq))

    def _least_useful(self) -> _EvictKey:
        """The eviction key of the least useful live signal; the caller knows one is held."""
        heap = self._evict_heap
        while heap[0][3] not in self._live:
            heapq.heappop(heap)  # a stale entry: its signal was taken, expired or evicted
        return heap[0]

    def _pop_evict(self) -> Signal:
        """Remove and return the least useful live signal; the caller knows one is held."""
        seq = self._least_useful()[3]
        heapq.heappop(self._evict_heap)
        return self._forget(seq)

    def _forget(self, seq: int) -> Signal:
        signal = self._live.pop(seq)
        del self._seq_of[signal.signal_id]
        return signal

    def _count(self, signal: Signal, reason: DropReason) -> Dropped:
        self._dropped[reason] += 1
        return Dropped(signal, reason)

    def _compact(self) -> None:
        """Rebuild any heap holding more stale entries than live ones (checked here: it is
        asked after every offer and take, and seldom has anything to do)."""
        bound = 2 * len(self._live)
        if len(self._evict_heap) > bound:
            _drop_stale(self._evict_heap, self._live)
        if len(self._take_heap) > bound:
            _drop_stale(self._take_heap, self._live)
        if len(self._expiry_heap) > bound:
            _drop_stale(self._expiry_heap, self._live)


def _drop_stale(heap: list[_Entry], live: Mapping[int, Signal]) -> None:
    """Rebuild ``heap`` in place without its stale entries."""
    heap[:] = [entry for entry in heap if entry[-1] in live]
    heapq.heapify(heap)


def _evict_key(signal: Signal, seq: int) -> _EvictKey:
    return (signal.confidence, signal.created_at_ms, signal.signal_id, seq)


def _validate(capacity: int, ttl_ms: int) -> None:
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    if ttl_ms < 1:
        raise ValueError(f"ttl_ms must be >= 1, got {ttl_ms}")


class DecisionBudget:
    """At most ``most`` decisions in any ``window_s``: the decisions of the last ``window_s``,
    as (when, how many) per cycle. Stricter than ``most`` per fixed tick (which lets up to twice
    that through around a tick), and a cycle need not wait for a tick while room is left."""

    def __init__(self, window_s: float) -> None:
        self._window_s = window_s
        self._spent: collections.deque[tuple[float, int]] = collections.deque()
        self._total = 0

    def left(self, most: int, now: float) -> int:
        self._forget_ended(now)
        return max(0, most - self._total)

    def spend(self, count: int, now: float) -> None:
        if count:
            self._spent.append((now, count))
            self._total += count

    def wait_s(self, most: int, now: float) -> float:
        """How long until the budget has room again (0: it has)."""
        if self.left(most, now) > 0:
            return 0.0
        freed = 0
        for when, count in self._spent:  # the oldest first
            freed += count
            if self._total - freed < most:
                return when + self._window_s - now
        return 0.0

    def _forget_ended(self, now: float) -> None:
        # ``when + window <= now``, the very sum ``wait_s`` counts down to (``now - window``
        # may round the other way and leave a cycle in the window that ``wait_s`` says left).
        while self._spent and self._spent[0][0] + self._window_s <= now:
            self._total -= self._spent.popleft()[1]
