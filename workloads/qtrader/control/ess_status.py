"""The EmergencyStop's desired state (``EssSpec``) and recorded state (``EssStatus``).

``EssStatus`` is everything ``reconcile`` needs to decide (see ``qtrader.control.ess``); it is
persisted in the custom resource's status in camelCase (``to_dict``/``from_dict``) and round-trips
exactly, so an operator restart loses nothing. Times are RFC 3339 UTC strings ending in ``Z``,
with microseconds only when present. ``from_dict({})`` is the initial status, so a resource
that has never been reconciled needs no special case.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from qtrader.contracts.messages import TradingState

AUTOMATIC_PREFIX = "risk:"

_T = TypeVar("_T")


class EssState(enum.StrEnum):
    ARMED = "Armed"
    TRIPPED = "Tripped"
    REDUCING = "Reducing"
    COOLING_DOWN = "CoolingDown"


class EssMode(enum.StrEnum):
    """What a trip allows: nothing (Halted) or only exposure-reducing orders (Reducing)."""

    HALTED = "Halted"
    REDUCING = "Reducing"

    @property
    def state(self) -> EssState:
        """The state a trip in this mode is in (before any reset is asked for)."""
        return EssState.TRIPPED if self is EssMode.HALTED else EssState.REDUCING

    @property
    def latch(self) -> TradingState:
        return TradingState.HALTED if self is EssMode.HALTED else TradingState.REDUCING


def is_automatic(tripped_by: str) -> bool:
    """Whether a trip came from a risk alert rather than a person."""
    return tripped_by.startswith(AUTOMATIC_PREFIX)


def format_time(value: datetime) -> str:
    """RFC 3339 in UTC with ``Z``; microseconds only when present, so parsing gives it back."""
    utc = as_utc(value, "time")
    return utc.isoformat(timespec="microseconds" if utc.microsecond else "seconds")[:-6] + "Z"


def parse_time(text: str) -> datetime:
    if not isinstance(text, str) or not text.endswith("Z"):
        raise ValueError(f"time {text!r} is not RFC 3339 UTC ending in 'Z'")
    return datetime.fromisoformat(text[:-1] + "+00:00")


def as_utc(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got naive {value.isoformat()}")
    return value.astimezone(UTC)


@dataclass(frozen=True, kw_only=True)
class EssSpec:
    """The desired state, from the EmergencyStop resource's spec plus the tripped-by annotation.

    ``cooldown_seconds`` (s, >= 0): how long after a trip a reset is refused or deferred.
    ``require_manual_reset``: refuse resets inside the cooldown, never reset automatically.
    ``tripped_by``: who asked ("kubectl", "risk:drawdown"); the ``risk:`` prefix marks automatic.
    ``flatten_on_trip``: a fresh trip also asks the caller to flatten positions.
    """

    tripped: bool
    reason: str
    mode: EssMode
    cooldown_seconds: int
    require_manual_reset: bool
    tripped_by: str
    flatten_on_trip: bool

    def __post_init__(self) -> None:
        if self.cooldown_seconds < 0:
            raise ValueError(f"cooldownSeconds must be >= 0, got {self.cooldown_seconds}")

    def with_patch(self, patch: Mapping[str, bool | str]) -> EssSpec:
        """The spec after a ``Transition.spec_patch`` (keys ``tripped``, ``reason``) is applied."""
        unknown = sorted(set(patch) - {"tripped", "reason"})
        tripped = patch.get("tripped", self.tripped)
        reason = patch.get("reason", self.reason)
        if unknown or not isinstance(tripped, bool) or not isinstance(reason, str):
            raise ValueError(f"not an ESS spec patch: {dict(patch)!r}")
        return replace(self, tripped=tripped, reason=reason)


@dataclass(frozen=True, kw_only=True)
class EssStatus:
    """What the ESS recorded; persisted in the resource's status (``to_dict``/``from_dict``).

    ``tripped_at``/``tripped_by`` describe the last trip and stay after a reset; ``reason``,
    ``cooldown_until``, ``trip_mode``, ``automatic`` and ``reset_refused_until`` describe the
    halt in force and are cleared by a reset. ``latch_revision`` is the last latch revision
    the ESS decided (0: none yet). Times are timezone-aware and stored in UTC.
    """

    state: EssState = EssState.ARMED
    reason: str = ""
    tripped_at: datetime | None = None
    tripped_by: str = ""
    cooldown_until: datetime | None = None
    trip_count: int = 0
    reset_count: int = 0
    latch_revision: int = 0
    trip_mode: EssMode | None = None
    automatic: bool = False
    reset_refused_until: datetime | None = None

    def __post_init__(self) -> None:
        for name in ("tripped_at", "cooldown_until", "reset_refused_until"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, as_utc(value, name))
        for name in ("trip_count", "reset_count", "latch_revision"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.state is EssState.ARMED:
            if self.trip_mode is not None or self.cooldown_until is not None:
                raise ValueError("an Armed status has no trip mode and no cooldown")
            return
        if self.tripped_at is None or self.cooldown_until is None or self.trip_mode is None:
            raise ValueError(f"a {self.state} status needs trippedAt, cooldownUntil, tripMode")
        if self.cooldown_until < self.tripped_at:
            raise ValueError("cooldownUntil is before trippedAt")
        expected = self.trip_mode.state
        if self.state is not EssState.COOLING_DOWN and self.state is not expected:
            raise ValueError(f"state {self.state} contradicts tripMode {self.trip_mode}")

    @classmethod
    def initial(cls) -> EssStatus:
        return cls()

    @property
    def latch(self) -> TradingState:
        """What the halt latch must say in this state."""
        if self.trip_mode is None:
            return TradingState.ACTIVE
        return self.trip_mode.latch

    def to_dict(self) -> dict[str, Any]:
        """The CRD status form; absent values are ``None`` (a merge patch deletes them)."""
        return {
            "state": self.state.value,
            "reason": self.reason,
            "trippedAt": _opt_time(self.tripped_at),
            "trippedBy": self.tripped_by,
            "cooldownUntil": _opt_time(self.cooldown_until),
            "tripCount": self.trip_count,
            "resetCount": self.reset_count,
            "latchRevision": self.latch_revision,
            "tripMode": None if self.trip_mode is None else self.trip_mode.value,
            "automatic": self.automatic,
            "resetRefusedUntil": _opt_time(self.reset_refused_until),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> EssStatus:
        """Parse the CRD status form; missing keys take the initial values, so ``{}`` is initial.

        Keys this class does not own (``conditions``, ``observedGeneration``) are ignored.
        Raises ``ValueError`` naming the field when a value has the wrong type or shape.
        """
        return cls(
            state=_parse(raw, "state", convert=EssState, default=EssState.ARMED),
            reason=_parse(raw, "reason", convert=str, default=""),
            tripped_at=_parse(raw, "trippedAt", convert=parse_time, default=None),
            tripped_by=_parse(raw, "trippedBy", convert=str, default=""),
            cooldown_until=_parse(raw, "cooldownUntil", convert=parse_time, default=None),
            trip_count=_parse(raw, "tripCount", convert=_count, default=0),
            reset_count=_parse(raw, "resetCount", convert=_count, default=0),
            latch_revision=_parse(raw, "latchRevision", convert=_count, default=0),
            trip_mode=_parse(raw, "tripMode", convert=EssMode, default=None),
            automatic=_parse(raw, "automatic", convert=_flag, default=False),
            reset_refused_until=_parse(raw, "resetRefusedUntil", convert=parse_time, default=None),
        )


def _opt_time(value: datetime | None) -> str | None:
    return None if value is None else format_time(value)


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected a boolean, got {value!r}")
    return value


def _parse(raw: Mapping[str, Any], key: str, *, convert: Callable[[Any], _T], default: _T) -> _T:
    value = raw.get(key)
    if value is None:
        return default
    if convert is str and not isinstance(value, str):
        raise ValueError(f"status.{key}: expected a string, got {value!r}")
    try:
        return convert(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"status.{key}: {exc}") from exc
