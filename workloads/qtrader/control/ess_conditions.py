"""The EmergencyStop's status conditions, shaped like ``metav1.Condition``, for kubectl and alerts.

Six conditions, always all present so a missing one never has to be interpreted:

* ``Ready``: True when Armed (trading allowed).
* ``Halted``: True while the latch says HALTED (Tripped, or CoolingDown after a Halted trip).
* ``Reducing``: True while the latch says REDUCING (Reducing, or CoolingDown after one).
* ``ResetRefused``: True while ``reset_refused_until`` is in the future: a reset was refused
  (reason ``ResetRefused``) or deferred to the cooldown end (reason ``ResetDeferred``).

* ``AckTimeout``: True while workers the control plane knows have not acknowledged the latch in
  force within ``ackTimeoutSeconds`` (the message names them); a frozen worker stays here until
  it answers or its lease lapses (``qtrader.control.halt_channel``).
* ``PositionsOpen``: True while the portfolio of a stack the stop covers holds a position (the
  message names each, with its quantity); reason ``Flattening`` in the first 60 s of a trip
  that flattens, ``FlattenUnfinished`` after them (what the flatten could not close), ``Open``
  otherwise; False (``Flat``) when none is open; Unknown (``NoSnapshot``) while a covered
  stack's portfolio has published no snapshot (``qtrader.control.open_positions``).

``lastTransitionTime`` moves only when a condition's status flips (``conditions``).
``reconcile``'s ``requeue_after`` covers the moment ``ResetRefused`` turns False by itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from qtrader.contracts.messages import TradingState
from qtrader.control.conditions import Condition, Evaluated, build_conditions
from qtrader.control.ess_status import EssState, EssStatus, as_utc, format_time
from qtrader.control.open_positions import PositionsSeen
from qtrader.execution.flattening import FLATTEN_WITHIN_S


def status_conditions(
    status: EssStatus,
    *,
    generation: int,
    now: datetime,
    previous: Sequence[Mapping[str, Any]],
    overdue_workers: Sequence[str] = (),
    positions: PositionsSeen | None = None,
    flattens: bool = False,
) -> list[Condition]:
    """The ``status.conditions`` list for ``status`` at ``now``, observed at ``generation``;
    ``overdue_workers``: those that did not acknowledge the latch in force in time;
    ``positions``: those of the stacks the stop covers; ``flattens``: its trips flatten."""
    now = as_utc(now, "now")
    evaluated = [
        *_evaluate(status, now=now),
        _ack_timeout(status, overdue_workers),
        _positions_open(status, positions, flattens=flattens, now=now),
    ]
    return build_conditions(
        evaluated, generation=generation, now=format_time(now), previous=previous
    )


def _ack_timeout(status: EssStatus, overdue: Sequence[str]) -> Evaluated:
    if not overdue:
        return ("AckTimeout", False, "Acknowledged", "no known worker is overdue")
    message = (
        f"{', '.join(sorted(overdue))} did not acknowledge latch revision"
        f" {status.latch_revision} in time"
    )
    return ("AckTimeout", True, "AckTimeout", message)


def _positions_open(
    status: EssStatus, seen: PositionsSeen | None, *, flattens: bool, now: datetime
) -> Evaluated:
    """No time and no price in the message: it changes only when a position does, so the
    status is not rewritten at every snapshot. ``seen`` None: positions are not followed."""
    if seen is None:
        return ("PositionsOpen", None, "NotFollowed", "positions are not followed here")
    missing = ", ".join(s or "the portfolio" for s in seen.missing)
    if not seen.open_count:
        if missing:
            return ("PositionsOpen", None, "NoSnapshot", f"no snapshot yet of {missing}")
        return ("PositionsOpen", False, "Flat", "no open position")
    reason = "Open"
    if flattens and status.latch is not TradingState.ACTIVE and status.tripped_at is not None:
        within = (now - status.tripped_at).total_seconds() < FLATTEN_WITHIN_S
        reason = "Flattening" if within else "FlattenUnfinished"
    held = "; ".join(
        f"{stack.stack + ' ' if stack.stack else ''}{symbol} {quantity}"
        for stack in seen.known
        for symbol, quantity in stack.positions
    )
    if missing:
        held += f"; no snapshot yet of {missing}"
    return ("PositionsOpen", True, reason, held[:1024])


def _evaluate(status: EssStatus, *, now: datetime) -> list[Evaluated]:
    state = status.state.value
    latch = status.latch
    summary = _halt_summary(status)
    refused_until = status.reset_refused_until
    if refused_until is None or refused_until <= now:
        refusal = (False, "NoResetPending", "no reset is refused or deferred")
    elif status.state is EssState.COOLING_DOWN:
        until = format_time(refused_until)
        refusal = (True, "ResetDeferred", f"reset deferred: it completes at {until}")
    else:
        until = format_time(refused_until)
        refusal = (True, "ResetRefused", f"reset refused until {until}; reset again after it")
    return [
        ("Ready", latch is TradingState.ACTIVE, state, summary or "trading allowed"),
        ("Halted", latch is TradingState.HALTED, state, summary or "not halted"),
        ("Reducing", latch is TradingState.REDUCING, state, summary or "not reducing"),
        ("ResetRefused", *refusal),
    ]


def _halt_summary(status: EssStatus) -> str:
    """What the halt in force is, or "" when Armed."""
    if status.tripped_at is None or status.cooldown_until is None or status.trip_mode is None:
        return ""
    since, until = format_time(status.tripped_at), format_time(status.cooldown_until)
    reason = status.reason or "no reason given"
    return (
        f"{status.trip_mode} since {since} by {status.tripped_by}: {reason}; cooldown until {until}"
    )
