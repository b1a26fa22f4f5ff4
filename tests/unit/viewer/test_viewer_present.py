"""What a viewer connecting now is told first, and which events are worth forwarding."""

from __future__ import annotations

from qtrader.contracts.messages import (
    DependencyState,
    EmergencyStopView,
    HealthStatus,
    TradingState,
    WorkloadHealthReport,
)
from qtrader.viewer.feed import FORGET_WORKER_S, ViewerState

T0_S = 1_770_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0_S

    def __call__(self) -> float:
        return self.now


def _view(ts_ms: int, **changes: object) -> EmergencyStopView:
    fields: dict[str, object] = {
        "name": "main",
        "state": "Armed",
        "latch": TradingState.ACTIVE,
        "latch_revision": 1,
        "require_manual_reset": True,
        "ts_ms": ts_ms,
    }
    return EmergencyStopView.model_validate(fields | changes)


def _report(worker_id: str, status: HealthStatus = HealthStatus.OK) -> WorkloadHealthReport:
    return WorkloadHealthReport(
        service="execution",
        worker_id=worker_id,
        status=status,
        version="0.1.0",
        uptime_s=3.0,
        interval_s=2.0,
        dependencies=(DependencyState(name="nats", status=status),),
        ts_ms=1,
    )


def test_a_stop_view_repeated_by_every_round_is_forwarded_only_when_it_changes() -> None:
    state = ViewerState()
    assert state.note(_view(1)) is True
    assert state.note(_view(2)) is False  # the next round, nothing new
    tripped = _view(3, state="Tripped", latch=TradingState.HALTED, latch_revision=2)
    assert state.note(tripped) is True
    assert state.present()["stops"] == [tripped.model_dump(mode="json")]


def test_every_health_report_is_forwarded_and_a_silent_worker_is_forgotten() -> None:
    clock = Clock()
    state = ViewerState(clock=clock)
    assert state.note(_report("exec-1")) is True
    assert state.note(_report("exec-1")) is True  # arrival itself is news: the worker lives
    clock.now += FORGET_WORKER_S / 2
    assert state.note(_report("exec-2", HealthStatus.CRITICAL)) is True
    assert [r["worker_id"] for r in state.present()["workloads"]] == ["exec-1", "exec-2"]
    clock.now += FORGET_WORKER_S / 2 + 1
    present = state.present()
    assert [r["worker_id"] for r in present["workloads"]] == ["exec-2"]
    assert present["workloads"][0]["status"] == "CRITICAL"
    assert present["now_ms"] == round(clock.now * 1000)
