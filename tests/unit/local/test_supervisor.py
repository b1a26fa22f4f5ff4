"""The supervisor's restart rule on a virtual clock (real processes: test_local_up_supervisor)."""

from __future__ import annotations

from qtrader.local.supervisor import BACKOFF_MAX_S, STABLE_AFTER_S, Supervisor, backoff_s


class _Process:
    def __init__(self) -> None:
        self.code: int | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.code = None


def test_backoff_doubles_from_half_a_second_up_to_its_cap() -> None:
    assert [backoff_s(n) for n in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert backoff_s(40) == BACKOFF_MAX_S


def test_a_dead_process_is_restarted_after_its_backoff_and_counted() -> None:
    now = [0.0]
    supervisor = Supervisor(clock=lambda: now[0])
    process = _Process()
    supervisor.add("execution", start=process.start, exit_code=lambda: process.code)
    process.code = -9
    supervisor.step()
    assert process.starts == 0
    assert supervisor.down() == ["execution"]
    now[0] = 0.5
    supervisor.step()
    assert process.starts == 1
    assert supervisor.restarts == {"execution": 1}
    assert supervisor.down() == []  # one failure, restarted: not a crash loop


def test_a_process_failing_again_after_its_restart_is_down_until_it_stays_up() -> None:
    now = [0.0]
    supervisor = Supervisor(clock=lambda: now[0])
    process = _Process()
    supervisor.add("execution", start=process.start, exit_code=lambda: process.code)
    for at in (1.0, 2.0):  # fails, restarted; fails again, restarted
        process.code = 3
        supervisor.step()
        now[0] = at + 5
        supervisor.step()
    assert process.starts == 2
    assert supervisor.down() == ["execution"]  # running this instant, but crash-looping
    now[0] += STABLE_AFTER_S
    supervisor.step()
    assert supervisor.down() == []


def test_a_held_process_is_never_restarted_and_a_stopping_stack_restarts_nothing() -> None:
    now = [0.0]
    supervisor = Supervisor(clock=lambda: now[0])
    held, other = _Process(), _Process()
    supervisor.add("marketdata", start=held.start, exit_code=lambda: held.code)
    supervisor.add("inference", start=other.start, exit_code=lambda: other.code)
    supervisor.hold("marketdata")
    held.code = other.code = 0
    supervisor.step()
    now[0] = 10.0
    supervisor.step(stopping=lambda: True)
    assert (held.starts, other.starts) == (0, 0)
    assert supervisor.down() == ["inference"]
