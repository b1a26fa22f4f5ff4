"""Binance's rate limits and what each request costs: the one table the limiter and the local
Binance-compatible server both read.

Facts (USD-M futures, checked against Binance's documentation; see ../shared/reference/binance.md):

* limits come from ``exchangeInfo.rateLimits``: REQUEST_WEIGHT per IP (2,400 per minute) and
  ORDERS per account (1,200 per minute and 300 per 10 s);
* a new order costs 0 IP weight and 1 on every ORDERS counter; most reads cost 1, some more;
* every response carries ``X-MBX-USED-WEIGHT-<n><unit>`` and order responses
  ``X-MBX-ORDER-COUNT-<n><unit>``, the server's count for the window named by the suffix.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_INTERVAL_MS = {"SECOND": 1_000, "MINUTE": 60_000, "HOUR": 3_600_000, "DAY": 86_400_000}
_INTERVAL_LETTER = {"SECOND": "S", "MINUTE": "M", "HOUR": "H", "DAY": "D"}


class LimitKind(enum.StrEnum):
    REQUEST_WEIGHT = "REQUEST_WEIGHT"  # counted per egress IP
    ORDERS = "ORDERS"  # counted per account (API key)


@dataclass(frozen=True)
class RateLimitRule:
    """One entry of ``exchangeInfo.rateLimits``: at most ``limit`` per ``interval_num`` units."""

    kind: LimitKind
    interval: str  # SECOND, MINUTE, HOUR, DAY
    interval_num: int
    limit: int

    def __post_init__(self) -> None:
        if self.interval not in _INTERVAL_MS:
            raise ValueError(f"unknown rate limit interval {self.interval!r}")
        if self.interval_num < 1 or self.limit < 1:
            raise ValueError(f"rate limit must be positive: {self}")

    @property
    def window_ms(self) -> int:
        return self.interval_num * _INTERVAL_MS[self.interval]

    @property
    def suffix(self) -> str:
        """The window as Binance names it in headers: ``1M``, ``10S``."""
        return f"{self.interval_num}{_INTERVAL_LETTER[self.interval]}"

    @property
    def header(self) -> str:
        """The response header that carries the server's count for this window."""
        prefix = (
            "X-MBX-USED-WEIGHT-" if self.kind is LimitKind.REQUEST_WEIGHT else "X-MBX-ORDER-COUNT-"
        )
        return prefix + self.suffix

    @property
    def key(self) -> str:
        """A stable name for this window, e.g. ``REQUEST_WEIGHT:1M``."""
        return f"{self.kind.value}:{self.suffix}"

    def as_binance(self) -> dict[str, Any]:
        return {
            "rateLimitType": self.kind.value,
            "interval": self.interval,
            "intervalNum": self.interval_num,
            "limit": self.limit,
        }


def rules_from_exchange_info(document: Mapping[str, Any]) -> tuple[RateLimitRule, ...]:
    """The REQUEST_WEIGHT and ORDERS rules of an exchangeInfo document.

    Raises ``ValueError`` when the document has none of either kind: running without a known
    limit would mean running unlimited.
    """
    rules = []
    for raw in document.get("rateLimits", ()):
        kind = raw.get("rateLimitType")
        if kind not in LimitKind.__members__:
            continue  # e.g. RAW_REQUESTS on spot: not a futures limit
        rules.append(
            RateLimitRule(
                kind=LimitKind(kind),
                interval=str(raw["interval"]),
                interval_num=int(raw["intervalNum"]),
                limit=int(raw["limit"]),
            )
        )
    kinds = {rule.kind for rule in rules}
    if kinds != set(LimitKind):
        missing = ", ".join(sorted(k.value for k in set(LimitKind) - kinds))
        raise ValueError(f"exchangeInfo.rateLimits has no {missing} limit")
    return tuple(rules)


@dataclass(frozen=True)
class RequestCost:
    """What one request counts against the limits: IP weight and orders."""

    weight: int = 0
    orders: int = 0

    def against(self, rule: RateLimitRule) -> int:
        return self.weight if rule.kind is LimitKind.REQUEST_WEIGHT else self.orders


# (method, path) -> cost, for the endpoints whose cost does not depend on parameters.
_FIXED_COSTS: dict[tuple[str, str], RequestCost] = {
    ("GET", "/fapi/v1/ping"): RequestCost(weight=1),
    ("GET", "/fapi/v1/time"): RequestCost(weight=1),
    ("GET", "/fapi/v1/exchangeInfo"): RequestCost(weight=1),
    ("POST", "/fapi/v1/order"): RequestCost(weight=0, orders=1),
    ("GET", "/fapi/v1/order"): RequestCost(weight=1),
    ("DELETE", "/fapi/v1/order"): RequestCost(weight=1),
    ("DELETE", "/fapi/v1/allOpenOrders"): RequestCost(weight=1),
    ("POST", "/fapi/v1/countdownCancelAll"): RequestCost(weight=10),
    ("GET", "/fapi/v1/userTrades"): RequestCost(weight=5),
    ("GET", "/fapi/v2/account"): RequestCost(weight=5),
    ("GET", "/fapi/v2/positionRisk"): RequestCost(weight=5),
    ("GET", "/fapi/v1/ticker/price"): RequestCost(weight=1),
    ("GET", "/fapi/v2/ticker/price"): RequestCost(weight=1),
    ("POST", "/fapi/v1/listenKey"): RequestCost(weight=1),
    ("PUT", "/fapi/v1/listenKey"): RequestCost(weight=1),
    ("DELETE", "/fapi/v1/listenKey"): RequestCost(weight=1),
    ("GET", "/fapi/v1/income"): RequestCost(weight=30),
    ("GET", "/fapi/v2/balance"): RequestCost(weight=5),
    ("GET", "/fapi/v3/balance"): RequestCost(weight=5),
    ("GET", "/fapi/v3/positionRisk"): RequestCost(weight=5),
    ("GET", "/fapi/v1/feeBurn"): RequestCost(weight=30),
    ("POST", "/fapi/v1/feeBurn"): RequestCost(weight=1),
}


def request_cost(method: str, path: str, params: Mapping[str, Any]) -> RequestCost:
    """The documented cost of one request; unknown endpoints raise ``KeyError``.

    An unknown endpoint is an error rather than a guess: the limiter must never under-count.
    """
    method = method.upper()
    if (method, path) == ("GET", "/fapi/v1/openOrders"):
        return RequestCost(weight=1 if params.get("symbol") else 40)
    if (method, path) == ("GET", "/fapi/v1/depth"):
        return RequestCost(weight=_depth_weight(int(params.get("limit", 500))))
    if (method, path) in (("GET", "/fapi/v1/ticker/price"), ("GET", "/fapi/v2/ticker/price")):
        return RequestCost(weight=1 if params.get("symbol") else 2)
    if (method, path) == ("GET", "/fapi/v1/premiumIndex"):
        return RequestCost(weight=1 if params.get("symbol") else 10)
    if (method, path) == ("GET", "/fapi/v1/klines"):
        return RequestCost(weight=_klines_weight(int(params.get("limit", 500))))
    return _FIXED_COSTS[(method, path)]


def _depth_weight(limit: int) -> int:
    if limit <= 50:
        return 2
    if limit <= 100:
        return 5
    if limit <= 500:
        return 10
    return 20


def _klines_weight(limit: int) -> int:
    if limit < 100:
        return 1
    if limit < 500:
        return 2
    if limit <= 1000:
        return 5
    return 10
