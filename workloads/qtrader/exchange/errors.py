"""What can go wrong talking to the exchange, as types the caller can act on.

Every failure of a request ends as exactly one of these, chosen by ``classify`` from the HTTP
status, Binance's error code and message, or the network exception. The caller's rule is the
type: ``Rejected`` is never retried, ``RateLimited`` pauses all traffic, ``Banned`` stops order
flow, ``Transient`` may be retried when the request is safe to repeat, ``OutcomeUnknown`` must be
looked up by its client order id before anything is re-sent, ``ClockSkew`` resyncs the clock.
``NotSent`` is the one raised without asking the exchange: an order whose deadline passed while
it waited for the rate limiter or a back-off is not sent at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from qtrader.contracts.messages import ErrorKind

# Business errors: the request was understood and refused; sending it again changes nothing.
REJECTION_CODES = frozenset(
    {
        -1013,  # filter failure
        -1022,  # invalid signature
        -1100,  # illegal characters in a parameter
        -1102,  # mandatory parameter missing
        -1111,  # precision over the maximum
        -1116,  # invalid order type
        -1121,  # invalid symbol
        -2010,  # new order rejected
        -2011,  # cancel rejected (unknown order)
        -2013,  # order does not exist
        -2014,  # API key format invalid
        -2015,  # invalid API key, IP or permissions
        -2019,  # margin is insufficient
        -2022,  # reduce-only rejected
        -4003,  # quantity less than or equal to zero
        -4004,  # quantity less than the minimum
        -4005,  # quantity greater than the maximum
        -4014,  # price not a multiple of the tick size
        -4015,  # client order id invalid
        -4023,  # quantity not a multiple of the step size
        -4116,  # client order id is duplicated
        -4164,  # notional below the minimum
        -5021,  # FOK order rejected
    }
)
UNKNOWN_OUTCOME_CODES = frozenset({-1006, -1007})  # "execution status unknown"
RATE_LIMIT_CODES = frozenset({-1003, -1015})
_UNKNOWN_503 = "unknown error"  # Binance: the request reached the matching engine, no answer


class ExchangeError(Exception):
    """A failed exchange request; ``code`` is Binance's error code when one was returned."""

    kind: ClassVar[ErrorKind] = ErrorKind.OTHER

    def __init__(self, message: str, *, status: int | None = None, code: int | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.headers: dict[str, str] = {}  # the answer's headers, for the limiter's count


class Rejected(ExchangeError):
    """Refused for a business reason (filters, margin, reduce-only, ...): never retried."""

    kind: ClassVar[ErrorKind] = ErrorKind.REJECTED


class FilterViolation(Rejected):
    """Refused locally, before sending: the order breaks a symbol filter after rounding."""

    kind: ClassVar[ErrorKind] = ErrorKind.FILTER_VIOLATION


class RateLimited(ExchangeError):
    """429 / -1003 / -1015: no request at all until ``retry_at`` (epoch seconds)."""

    kind: ClassVar[ErrorKind] = ErrorKind.RATE_LIMITED

    def __init__(self, message: str, *, retry_at: float, status: int | None, code: int | None):
        super().__init__(message, status=status, code=code)
        self.retry_at = retry_at


class Banned(RateLimited):
    """418: the IP is banned until ``retry_at``; order flow stops and a risk alert is raised."""

    kind: ClassVar[ErrorKind] = ErrorKind.BANNED


class Transient(ExchangeError):
    """The request did not take effect (503 unavailable, internal error, 408, 502, network
    failure before sending): safe to send again, with backoff."""

    kind: ClassVar[ErrorKind] = ErrorKind.TRANSIENT


class OutcomeUnknown(ExchangeError):
    """The request may have taken effect (timeout, 503 "Unknown error", -1006/-1007, reset after
    sending): an order must be looked up by its client order id, never blindly re-sent."""

    kind: ClassVar[ErrorKind] = ErrorKind.OUTCOME_UNKNOWN


class NotSent(ExchangeError):
    """The order never left: its ``not_after_ms`` passed while it waited to be sent (rate
    limiter, back-off after a 429 or a transient failure). Nothing reached the exchange."""

    kind: ClassVar[ErrorKind] = ErrorKind.NOT_SENT


class ClockSkew(ExchangeError):
    """-1021: the timestamp is outside the receive window; resync the clock and retry once."""

    kind: ClassVar[ErrorKind] = ErrorKind.CLOCK_SKEW


def classify(
    status: int, code: int | None, message: str, headers: Mapping[str, str], *, now: float
) -> ExchangeError:
    """The error type for an HTTP error answer from the exchange."""
    text = message or f"HTTP {status}"
    if status == 418:
        return Banned(
            text, retry_at=_retry_at(headers, now, default_s=120.0), status=status, code=code
        )
    if status == 429 or code in RATE_LIMIT_CODES:
        return RateLimited(
            text, retry_at=_retry_at(headers, now, default_s=None), status=status, code=code
        )
    if code == -1021:
        return ClockSkew(text, status=status, code=code)
    if code in UNKNOWN_OUTCOME_CODES:
        return OutcomeUnknown(text, status=status, code=code)
    if status == 503 and _UNKNOWN_503 in text.lower():
        return OutcomeUnknown(text, status=status, code=code)
    if code in REJECTION_CODES or (400 <= status < 500 and status != 408 and code is not None):
        return Rejected(text, status=status, code=code)
    if status >= 500 or status == 408 or code == -1001:
        return Transient(text, status=status, code=code)
    return Rejected(text, status=status, code=code)


def _retry_at(headers: Mapping[str, str], now: float, *, default_s: float | None) -> float:
    """When to try again: ``Retry-After`` seconds, else the end of the current minute window
    (Binance's weight window) or ``default_s``."""
    for name, value in headers.items():
        if name.lower() == "retry-after":
            try:
                return now + max(0.0, float(value))
            except ValueError:
                break
    if default_s is not None:
        return now + default_s
    return (int(now // 60) + 1) * 60.0
