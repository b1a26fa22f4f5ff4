"""The halt gate: the one place an execution worker asks whether it may send an order.

The gate holds the halt latch in force and the time of the control plane's last heartbeat. It
fails closed: with no latch (never read, or unreadable), with a value in the bucket that does not
decode, or with a heartbeat older than the timeout, the state is HALTED whatever the last latch
said. A value that does not decode is refused until the bucket holds a valid one again: the
worker cannot know what it said, and it may have been a halt.

Why a lock: the worker acknowledges a halt only after the new latch is in force *and* no order
is between its check and its send. Sending holds the lock from the check until the exchange
call returns; applying a latch takes the same lock. So once an acknowledgement is out, no order
that was checked under the old latch can still reach the exchange. The exposure book's
admission of the attempt and its PENDING_NEW record happen under the same lock, just before
the venue call (``orders.py``), so what was admitted is what is sent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import NamedTuple

from qtrader.contracts.messages import HaltLatch, OrderIntent, TradingState
from qtrader.execution.decisions import flatten_round


class GateVerdict(NamedTuple):
    """Whether an order may be sent now (a named tuple: one is made for every check)."""

    allowed: bool
    state: TradingState
    why: str


class HaltGate:
    def __init__(
        self, *, heartbeat_timeout_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._heartbeat_timeout_s = heartbeat_timeout_s
        self._clock = clock
        self._latch: HaltLatch | None = None
        self._last_heartbeat: float | None = None
        self._refused: str | None = None  # why the bucket's value is not trusted
        self.lock = asyncio.Lock()

    @property
    def latch(self) -> HaltLatch | None:
        return self._latch

    def heartbeat(self) -> None:
        self._last_heartbeat = self._clock()

    def heartbeat_age_s(self) -> float | None:
        return None if self._last_heartbeat is None else self._clock() - self._last_heartbeat

    def apply(self, latch: HaltLatch) -> bool:
        """Put ``latch`` in force if it is newer than the one in force; True if it changed."""
        if self._latch is not None and latch.revision <= self._latch.revision:
            return False
        self._latch = latch
        return True

    def forget(self) -> None:
        """The latch can no longer be read: fail closed until it can."""
        self._latch = None

    def refuse(self, why: str) -> None:
        """The bucket holds a value that does not decode: HALTED, with ``why``, until
        ``trust`` says a valid value was read from the bucket again. Only a value read from
        the bucket may lift it: a broadcast is not the durable latch."""
        self._refused = why

    def trust(self) -> bool:
        """A valid value was read from the bucket; True if that lifts a refusal."""
        refused, self._refused = self._refused, None
        return refused is not None

    @property
    def refused(self) -> str | None:
        """Why the bucket's value is refused, or None."""
        return self._refused

    def state(self) -> tuple[TradingState, str]:
        """The state orders obey now, and why when it is not the latch's own."""
        why = self._fail_safe()
        if why is not None or self._latch is None:
            return TradingState.HALTED, why or "no halt latch could be read"
        return self._latch.state, self._latch.reason

    def _fail_safe(self) -> str | None:
        """Why the worker halts whatever the latch says, or None when the latch is in force."""
        if self._refused is not None:
            return self._refused
        if self._latch is None:
            return "no halt latch could be read"
        last = self._last_heartbeat  # ``heartbeat_age_s`` inline: asked before every send
        if last is None:
            return "no control-plane heartbeat heard yet"
        age = self._clock() - last
        if age > self._heartbeat_timeout_s:
            return f"control-plane heartbeat missing for {age:.1f}s"
        return None

    def verdict(self, intent: OrderIntent) -> GateVerdict:
        state, why = self.state()
        allowed = (
            state is TradingState.ACTIVE
            or (state is TradingState.REDUCING and intent.reduce_only)
            or self._flattens(intent)
        )
        return GateVerdict(allowed, state, why)

    def _flattens(self, intent: OrderIntent) -> bool:
        """The reduce-only order that closes a position for the trip in force, when that trip
        asked for it; never while failing safe (no heartbeat means no order at all)."""
        latch = self._latch
        return (
            latch is not None
            and latch.flatten
            and self._fail_safe() is None
            and intent.reduce_only
            and flatten_round(intent.intent_id, latch.revision, intent.symbol) is not None
        )
