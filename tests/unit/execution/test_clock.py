"""The clocks the execution core reads: the simulated one a backtest moves, and ``drive``."""

from __future__ import annotations

import pytest

from qtrader.execution.clock import SimulatedClock, SystemClock, drive


def test_simulated_clock_when_set_then_wall_and_monotonic_time_are_the_same_time() -> None:
    clock = SimulatedClock()
    clock.set(1_700_000_060_001)
    assert clock.wall_ms() == 1_700_000_060_001
    assert clock.monotonic_s() == 1_700_000_060.001


def test_simulated_clock_when_set_back_then_refused_and_unchanged() -> None:
    clock = SimulatedClock(5_000)
    with pytest.raises(ValueError, match="cannot go back"):
        clock.set(4_999)
    assert clock.wall_ms() == 5_000


def test_drive_when_the_coroutine_only_sleeps_on_the_simulated_clock_then_it_ends_at_once() -> None:
    clock = SimulatedClock(1_000)

    async def look_up_four_times() -> int:
        for _ in range(4):
            await clock.sleep(0.25)
        return clock.wall_ms()

    assert drive(look_up_four_times()) == 2_000


def test_drive_when_the_coroutine_waits_on_the_event_loop_then_runtime_error() -> None:
    """A backtest must never wait on anything real: a coroutine that suspends (here on the
    machine's clock) is closed, not left half run."""
    finished = False

    async def sleeps_for_real() -> None:
        nonlocal finished
        await SystemClock().sleep(0)
        finished = True

    with pytest.raises(RuntimeError, match="other than the simulated clock"):
        drive(sleeps_for_real())
    assert not finished
