"""Injected faults: what the exchange does wrong, on which route, and when.

A fault is set through ``POST /_sim/faults`` (a list that replaces the previous one) as
``{"route": "POST /fapi/v1/order", "kind": "...", <one trigger>, <kind parameters>}``. ``route``
is ``"METHOD /path"`` or ``"*"`` for every exchange route. The trigger is exactly one of
``next: N`` (the next N matching requests), ``every: N`` (every Nth matching request, counted from
when the fault was set) or ``probability: p`` with an optional ``seed`` (default 0), so a run is
reproducible.

Kinds. "Booked" means the request was fully processed (the order exists, a cancel happened)
before the client is failed; "not booked" means nothing happened:

* ``http_429`` 429 -1003 with ``Retry-After: retry_after_s`` (default 1); starts a real back-off
  for the IP, so carrying on gets the 418 ban. Not booked.
* ``http_418`` 418 -1003 "IP banned until"; bans the IP for ``retry_after_s`` (default 2).
* ``booked_then_503_unknown`` booked, then 503 -1000 "Unknown error, please check your request
  or try again later." (execution status unknown).
* ``unavailable_503`` not booked, 503 -1008 "Service Unavailable." (a failure).
* ``internal_503`` not booked, 503 -1001 "Internal error; unable to process your request. Please
  try again." (a failure, safe to resend).
* ``booked_then_1006`` / ``booked_then_1007`` booked, then 500 with -1006/-1007 (status unknown).
* ``booked_then_hang`` booked, then no answer for ``hang_s`` (default 30) and the connection is
  closed; ``booked_then_reset`` booked, then the TCP connection is aborted (RST).
* ``hang_before_booking`` no answer for ``hang_s``, then the connection is closed; not booked,
  unless ``book_after: true``: the request is then processed late, after the hang, with the
  timestamp checked at that moment (a hang longer than recvWindow ends in -1021, as on Binance).
* ``http_408`` 408, not booked; ``html_502`` 502 with an HTML page, not booked.
* ``error_code`` answer ``status`` (default 400) with ``code``/``msg``; booked first only if
  ``book: true``.
* Modifiers, which combine with one of the above: ``latency_ms`` (delay the answer by
  ``latency_ms`` ms), ``no_weight_headers`` (omit ``X-MBX-USED-WEIGHT-*``) and
  ``wrong_weight_headers`` (report ``value``, default 0, instead of the true count).

Faults are consulted only for requests the rate limiter admitted (and charged): a banned or
rate-limited request never reaches a fault and does not consume its trigger. When several faults
match a request, every triggered modifier applies and the first triggered
outcome (in list order) decides the answer; later outcome faults are not evaluated, so their
counters are not consumed.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class FaultError(ValueError):
    """A fault specification that cannot be applied."""


class FaultKind(enum.StrEnum):
    HTTP_429 = "http_429"
    HTTP_418 = "http_418"
    BOOKED_THEN_503_UNKNOWN = "booked_then_503_unknown"
    UNAVAILABLE_503 = "unavailable_503"
    INTERNAL_503 = "internal_503"
    BOOKED_THEN_HANG = "booked_then_hang"
    BOOKED_THEN_RESET = "booked_then_reset"
    HANG_BEFORE_BOOKING = "hang_before_booking"
    HTTP_408 = "http_408"
    HTML_502 = "html_502"
    BOOKED_THEN_1006 = "booked_then_1006"
    BOOKED_THEN_1007 = "booked_then_1007"
    ERROR_CODE = "error_code"
    LATENCY_MS = "latency_ms"
    NO_WEIGHT_HEADERS = "no_weight_headers"
    WRONG_WEIGHT_HEADERS = "wrong_weight_headers"

    @property
    def is_modifier(self) -> bool:
        return self in _MODIFIERS

    @property
    def books(self) -> bool:
        """Whether the request is processed before the fault's answer."""
        return self.value.startswith("booked_then_")


_MODIFIERS = {FaultKind.LATENCY_MS, FaultKind.NO_WEIGHT_HEADERS, FaultKind.WRONG_WEIGHT_HEADERS}
_TRIGGERS = ("next", "every", "probability")
_PARAMETERS: dict[str, type] = {
    "hang_s": float,
    "latency_ms": int,
    "retry_after_s": int,
    "status": int,
    "code": int,
    "msg": str,
    "book": bool,
    "book_after": bool,
    "value": int,
    "seed": int,
}


@dataclass
class Fault:
    route: str
    kind: FaultKind
    next: int | None = None
    every: int | None = None
    probability: float | None = None
    seed: int = 0
    hang_s: float = 30.0
    latency_ms: int = 0
    retry_after_s: int | None = None
    status: int = 400
    code: int = -1000
    msg: str = "Injected error."
    book: bool = False
    book_after: bool = False
    value: int = 0
    seen: int = 0
    fired: int = 0
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def __post_init__(self) -> None:
        self._rng.seed(self.seed)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Fault:
        if not isinstance(raw, Mapping):
            raise FaultError("a fault must be a JSON object")
        known = {"route", "kind", *_TRIGGERS, *_PARAMETERS}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise FaultError(f"unknown fault field(s) {unknown}; known: {sorted(known)}")
        route = raw.get("route")
        if not isinstance(route, str) or not (route == "*" or _is_route_key(route)):
            raise FaultError(f"fault route must be '*' or 'METHOD /path', got {route!r}")
        try:
            kind = FaultKind(str(raw.get("kind")))
        except ValueError:
            raise FaultError(
                f"unknown fault kind {raw.get('kind')!r}; known: {[k.value for k in FaultKind]}"
            ) from None
        triggers = [name for name in _TRIGGERS if name in raw]
        if len(triggers) != 1:
            raise FaultError(
                f"a fault needs exactly one trigger of {list(_TRIGGERS)}, got {triggers}"
            )
        params = {name: _typed(name, raw[name]) for name in _PARAMETERS if name in raw}
        fault = cls(route=route, kind=kind, **_trigger(triggers[0], raw[triggers[0]]), **params)
        fault._validate()
        return fault

    def matches(self, route_key: str) -> bool:
        return self.route in ("*", route_key)

    def trigger(self) -> bool:
        """Count one matching request; whether the fault fires on it."""
        self.seen += 1
        if self.next is not None:
            fires = self.fired < self.next
        elif self.every is not None:
            fires = self.seen % self.every == 0
        else:
            assert self.probability is not None
            fires = self._rng.random() < self.probability
        self.fired += fires
        return fires

    def as_dict(self) -> dict[str, Any]:
        trigger = {
            name: getattr(self, name) for name in _TRIGGERS if getattr(self, name) is not None
        }
        return {
            "route": self.route,
            "kind": self.kind.value,
            **trigger,
            "seen": self.seen,
            "fired": self.fired,
        }

    def _validate(self) -> None:
        if self.hang_s < 0 or self.latency_ms < 0:
            raise FaultError("hang_s and latency_ms must not be negative")
        if self.retry_after_s is not None and self.retry_after_s < 1:
            raise FaultError("retry_after_s must be at least 1")
        if not 100 <= self.status <= 599:
            raise FaultError(f"status must be an HTTP status, got {self.status}")


@dataclass(frozen=True)
class Chosen:
    """The faults that apply to one request."""

    outcome: Fault | None = None
    latency_ms: int = 0
    no_weight_headers: bool = False
    wrong_weight_headers: int | None = None

    @property
    def name(self) -> str | None:
        return self.outcome.kind.value if self.outcome is not None else None


def choose(faults: list[Fault], route_key: str) -> Chosen:
    outcome: Fault | None = None
    latency, no_headers, wrong = 0, False, None
    for fault in faults:
        if not fault.matches(route_key) or (outcome is not None and not fault.kind.is_modifier):
            continue
        if not fault.trigger():
            continue
        if fault.kind is FaultKind.LATENCY_MS:
            latency += fault.latency_ms
        elif fault.kind is FaultKind.NO_WEIGHT_HEADERS:
            no_headers = True
        elif fault.kind is FaultKind.WRONG_WEIGHT_HEADERS:
            wrong = fault.value
        else:
            outcome = fault
    return Chosen(outcome, latency, no_headers, wrong)


def parse_faults(raw: Any) -> list[Fault]:
    if not isinstance(raw, list):
        raise FaultError("faults must be a JSON list")
    return [Fault.from_dict(item) for item in raw]


def _is_route_key(route: str) -> bool:
    method, _, path = route.partition(" ")
    return method in ("GET", "POST", "PUT", "DELETE") and path.startswith("/")


def _typed(name: str, value: Any) -> Any:
    expected = _PARAMETERS[name]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
        raise FaultError(f"fault field {name} must be of type {expected.__name__}")
    return value


def _trigger(name: str, value: Any) -> dict[str, Any]:
    if name == "probability":
        ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1
        if not ok:
            raise FaultError("probability must be a number in [0, 1]")
        return {name: float(value)}
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise FaultError(f"{name} must be a positive integer")
    return {name: value}
