"""The admission check that refuses an EmergencyStop reset inside its cooldown."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from qtrader.control.ess import EssMode, EssSpec, EssStatus, reconcile
from qtrader_operator.admission import early_reset_refusal

TRIPPED_AT = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def _tripped_stop() -> dict[str, Any]:
    spec = EssSpec(
        tripped=True,
        reason="test",
        mode=EssMode.HALTED,
        cooldown_seconds=300,
        require_manual_reset=True,
        tripped_by="kubectl",
        flatten_on_trip=False,
    )
    status = reconcile(spec=spec, status=EssStatus.initial(), now=TRIPPED_AT).status
    return {"spec": {"tripped": True, "reason": "test"}, "status": status.to_dict()}


def _reset(stop: dict[str, Any]) -> dict[str, Any]:
    return {**stop, "spec": {"tripped": False, "reason": ""}}


def test_early_reset_when_inside_cooldown_then_refused_with_the_end_time() -> None:
    stop = _tripped_stop()
    reason = early_reset_refusal(old=stop, new=_reset(stop), now=TRIPPED_AT + timedelta(seconds=10))
    assert reason is not None
    assert "2026-01-01T12:05:00Z" in reason


def test_early_reset_when_cooldown_over_then_admitted() -> None:
    stop = _tripped_stop()
    later = TRIPPED_AT + timedelta(seconds=301)
    assert early_reset_refusal(old=stop, new=_reset(stop), now=later) is None


def test_update_when_not_a_reset_then_admitted() -> None:
    stop = _tripped_stop()
    renamed = {**stop, "spec": {"tripped": True, "reason": "new words"}}
    assert early_reset_refusal(old=stop, new=renamed, now=TRIPPED_AT) is None
