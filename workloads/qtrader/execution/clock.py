"""The time the execution core reads and waits on: the machine's live, the candles' in a backtest.

Every rule of the core that depends on time (a signal's or an intent's age, a price's freshness,
the heartbeat timeout, how long an unknown order is looked up, the time an order or fill is
stamped with) reads it through one ``Clock``, and every wait of the order driver (between
look-ups) goes through ``Clock.sleep``. So the same core runs live on ``SystemClock`` and in a
backtest on a ``SimulatedClock`` that the backtest moves to each step's time: there a wait moves
simulated time on at once instead of sleeping, and nothing in the core ever really waits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Clock(Protocol):
    def wall_ms(self) -> int:
        """Epoch milliseconds: what messages are stamped with and ages are measured in."""
        ...

    def monotonic_s(self) -> float:
        """Seconds that never go back: freshness and timeouts."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Let ``seconds`` pass."""
        ...


class SystemClock:
    """The machine's clocks; ``sleep`` yields to the event loop."""

    def wall_ms(self) -> int:
        return int(time.time() * 1000)

    def monotonic_s(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK = SystemClock()


class SimulatedClock:
    """Time set by its owner (a backtest: each step's time). Monotonic time is the same time in
    seconds; ``sleep`` moves it on and returns without suspending, so a coroutine that waits
    only on this clock runs to its end in one go (``drive``)."""

    def __init__(self, now_ms: int = 0) -> None:
        self._now_ms = now_ms

    def wall_ms(self) -> int:
        return self._now_ms

    def monotonic_s(self) -> float:
        return self._now_ms / 1000

    def set(self, now_ms: int) -> None:
        """Move to ``now_ms``; never back (an age measured across the move must not shrink)."""
        if now_ms < self._now_ms:
            raise ValueError(f"the clock cannot go back from {self._now_ms} to {now_ms}")
        self._now_ms = now_ms

    async def sleep(self, seconds: float) -> None:
        self._now_ms += max(0, round(seconds * 1000))


def drive(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` to its end here and now, without an event loop.

    For the core on a ``SimulatedClock`` and a venue that answers at once (a backtest): such a
    coroutine never suspends, so driving it costs a few function calls instead of an event
    loop's round per order. One that does suspend (it waited on real I/O, or on the loop) is
    closed and raises ``RuntimeError``: a backtest must never wait on anything real.
    """
    try:
        coroutine.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    coroutine.close()
    raise RuntimeError("the execution core waited on something other than the simulated clock")
