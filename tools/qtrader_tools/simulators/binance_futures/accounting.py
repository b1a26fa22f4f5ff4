"""Rate-limit windows, 429 back-offs and 418 bans, and the audit of what was admitted.

Rules (the strict reading of Binance's general-info page):

* REQUEST_WEIGHT is counted per client IP, ORDERS per API key, each in every window the config
  lists; a request is admitted only if it fits every window, then it is charged to all of them at
  once (the event loop runs this without an ``await``, so concurrent requests cannot interleave).
  A rejected request is charged nothing.
* Over a limit: 429, code -1003 (weight) or -1015 (orders), and ``Retry-After``: the seconds until
  the window has room again. That starts a back-off: until then, any request from that IP (after a
  weight 429), or any order of that API key (after an orders 429), is a failure to back off. It
  gets 418 and bans the IP that sent it: ``ban_base_s``, doubling with each new ban of that IP,
  capped at ``ban_cap_s`` (3 days). While banned, every request from the IP gets 418 with
  ``Retry-After`` and "IP banned until <ms>".
* Fixed windows are aligned to epoch multiples of their length (a 1-minute window starts on the
  minute); sliding windows are the trailing ``window_ms`` ending now.

The audit answers "did the server ever admit more than a limit in one window?" twice: by the
configured window mode (the counts the server itself enforced) and by a sliding window over the
request log, which is the stricter question a fixed-window exchange does not ask.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from qtrader.exchange.limits import LimitKind, RateLimitRule, RequestCost

from .config import SimConfig, WindowMode
from .errors import ApiError


@dataclass
class LogEntry:
    """One request as the server saw it; ``weight`` and ``orders`` are what was charged."""

    t_ms: int
    ip: str
    api_key: str | None
    method: str
    path: str
    weight: int = 0
    orders: int = 0
    admitted: bool = False
    status: int | None = None  # None: the connection was closed without an answer
    code: int | None = None  # Binance error code of the answer, if any
    fault: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "t_ms": self.t_ms,
            "ip": self.ip,
            "api_key": self.api_key,
            "method": self.method,
            "path": self.path,
            "weight": self.weight,
            "orders": self.orders,
            "admitted": self.admitted,
            "status": self.status,
            "code": self.code,
            "fault": self.fault,
        }


class _Counter:
    """One subject's (IP's or API key's) count in one rule's windows."""

    def __init__(self, window_ms: int, mode: WindowMode) -> None:
        self._window_ms = window_ms
        self._mode = mode
        self._events: deque[tuple[int, int]] = deque()  # sliding: (t_ms, amount)
        self._total = 0
        self._start = -1  # fixed: the current window's start
        self.max_admitted = 0

    def used(self, now_ms: int) -> int:
        if self._mode is WindowMode.FIXED:
            return self._total if self._window_start(now_ms) == self._start else 0
        while self._events and self._events[0][0] <= now_ms - self._window_ms:
            self._total -= self._events.popleft()[1]
        return self._total

    def add(self, now_ms: int, amount: int) -> None:
        if amount == 0:
            return
        if self._mode is WindowMode.FIXED:
            start = self._window_start(now_ms)
            if start != self._start:
                self._start, self._total = start, 0
            self._total += amount
        else:
            self.used(now_ms)
            self._events.append((now_ms, amount))
            self._total += amount
        self.max_admitted = max(self.max_admitted, self._total)

    def frees_at(self, now_ms: int, amount: int, limit: int) -> int:
        """The earliest time ``amount`` more fits under ``limit``."""
        if self._mode is WindowMode.FIXED:
            return self._window_start(now_ms) + self._window_ms
        remaining = self.used(now_ms)
        for t_ms, charged in self._events:
            remaining -= charged
            if remaining + amount <= limit:
                return t_ms + self._window_ms
        return now_ms + self._window_ms

    def _window_start(self, now_ms: int) -> int:
        return now_ms - now_ms % self._window_ms


@dataclass
class _IpState:
    backoff_until_ms: int = 0
    ban_until_ms: int = 0
    bans: int = 0


@dataclass
class Accounting:
    """All counters, back-offs and bans of one server; reset by rebuilding."""

    config: SimConfig
    _counters: dict[tuple[str, str], _Counter] = field(default_factory=dict)
    _ips: dict[str, _IpState] = field(default_factory=dict)
    _order_backoff_ms: dict[str, int] = field(default_factory=dict)

    def admit(self, now_ms: int, ip: str, api_key: str | None, cost: RequestCost) -> None:
        """Charge ``cost`` or raise the 429/418 ``ApiError`` that refuses it."""
        self._refuse_if_banned(now_ms, ip)
        state = self._ips.setdefault(ip, _IpState())
        in_backoff = now_ms < state.backoff_until_ms or (
            cost.orders > 0
            and api_key is not None
            and now_ms < self._order_backoff_ms.get(api_key, 0)
        )
        if in_backoff:
            self._ban(now_ms, ip)
        over = [
            rule for rule in self.config.rate_limits if self._over(rule, now_ms, ip, api_key, cost)
        ]
        if over:
            raise self._too_many(now_ms, ip, api_key, cost, over)
        for rule in self.config.rate_limits:
            subject = self._subject(rule, ip, api_key)
            if subject is not None:
                self._counter(rule, subject).add(now_ms, cost.against(rule))

    def impose_backoff(self, now_ms: int, ip: str, seconds: int) -> None:
        """An injected 429: the IP must now back off like after a real one."""
        self._ips.setdefault(ip, _IpState()).backoff_until_ms = now_ms + seconds * 1000

    def impose_ban(self, now_ms: int, ip: str, seconds: int) -> None:
        """An injected 418: a ban of exactly ``seconds`` (does not escalate later bans)."""
        self._ips.setdefault(ip, _IpState()).ban_until_ms = now_ms + seconds * 1000

    def headers(self, now_ms: int, ip: str, api_key: str | None, *, orders: bool) -> dict[str, str]:
        """``X-MBX-USED-WEIGHT-*`` for every weight window, and the order counts if asked."""
        headers = {}
        for rule in self.config.rate_limits:
            if rule.kind is LimitKind.ORDERS and not orders:
                continue
            subject = self._subject(rule, ip, api_key)
            if subject is not None:
                headers[rule.header] = str(self._counter(rule, subject).used(now_ms))
        return headers

    def bans(self) -> dict[str, dict[str, int]]:
        return {
            ip: {
                "ban_until_ms": s.ban_until_ms,
                "bans": s.bans,
                "backoff_until_ms": s.backoff_until_ms,
            }
            for ip, s in self._ips.items()
        }

    def audit(self, log: Iterable[LogEntry]) -> dict[str, Any]:
        """Per rule and subject: the most ever admitted in one window, by both measures."""
        admitted = [entry for entry in log if entry.admitted]
        rules = []
        for rule in self.config.rate_limits:
            sliding = _sliding_maxima(rule, admitted)
            configured = {
                subject: counter.max_admitted
                for (key, subject), counter in self._counters.items()
                if key == rule.key
            }
            subjects = sorted(set(sliding) | set(configured))
            rules.append(
                {
                    **rule.as_binance(),
                    "key": rule.key,
                    "window_ms": rule.window_ms,
                    "subjects": {
                        s: {"configured": configured.get(s, 0), "sliding": sliding.get(s, 0)}
                        for s in subjects
                    },
                    "max_configured": max(configured.values(), default=0),
                    "max_sliding": max(sliding.values(), default=0),
                }
            )
        return {"window_mode": self.config.window_mode.value, "rules": rules}

    def _refuse_if_banned(self, now_ms: int, ip: str) -> None:
        state = self._ips.get(ip)
        if state is not None and now_ms < state.ban_until_ms:
            raise _banned(now_ms, state.ban_until_ms)

    def _ban(self, now_ms: int, ip: str) -> None:
        state = self._ips[ip]
        seconds = min(self.config.ban_base_s * 2**state.bans, self.config.ban_cap_s)
        state.bans += 1
        state.ban_until_ms = now_ms + math.ceil(seconds * 1000)
        state.backoff_until_ms = 0
        raise _banned(now_ms, state.ban_until_ms)

    def _over(
        self, rule: RateLimitRule, now_ms: int, ip: str, api_key: str | None, cost: RequestCost
    ) -> bool:
        amount = cost.against(rule)
        subject = self._subject(rule, ip, api_key)
        if amount == 0 or subject is None:
            return False
        return self._counter(rule, subject).used(now_ms) + amount > rule.limit

    def _too_many(
        self,
        now_ms: int,
        ip: str,
        api_key: str | None,
        cost: RequestCost,
        over: list[RateLimitRule],
    ) -> ApiError:
        frees_at = {
            rule: self._counter(rule, self._subject(rule, ip, api_key) or "").frees_at(
                now_ms, cost.against(rule), rule.limit
            )
            for rule in over
        }
        until = max(frees_at.values())
        retry_after_s = max(1, math.ceil((until - now_ms) / 1000))
        weight_rules = [rule for rule in over if rule.kind is LimitKind.REQUEST_WEIGHT]
        if weight_rules:
            self._ips[ip].backoff_until_ms = until
            rule = weight_rules[0]
            return ApiError(
                429,
                -1003,
                f"Too many requests; current limit of IP({ip}) request weight is {rule.limit} "
                f"per {rule.interval_num} {rule.interval}. Please use WebSocket Streams for live "
                "updates to avoid polling the API.",
                retry_after_s=retry_after_s,
            )
        assert api_key is not None  # an ORDERS rule is only ever over for a known key
        self._order_backoff_ms[api_key] = until
        rule = over[0]
        return ApiError(
            429,
            -1015,
            f"Too many new orders; current limit is {rule.limit} orders per "
            f"{rule.interval_num} {rule.interval}.",
            retry_after_s=retry_after_s,
        )

    def _counter(self, rule: RateLimitRule, subject: str) -> _Counter:
        key = (rule.key, subject)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = _Counter(rule.window_ms, self.config.window_mode)
        return counter

    @staticmethod
    def _subject(rule: RateLimitRule, ip: str, api_key: str | None) -> str | None:
        return ip if rule.kind is LimitKind.REQUEST_WEIGHT else api_key


def _banned(now_ms: int, until_ms: int) -> ApiError:
    return ApiError(
        418,
        -1003,
        f"Way too many requests; IP banned until {until_ms}. Please use the websocket for live "
        "updates to avoid bans.",
        retry_after_s=max(1, math.ceil((until_ms - now_ms) / 1000)),
    )


def _sliding_maxima(rule: RateLimitRule, admitted: list[LogEntry]) -> dict[str, int]:
    """For each subject, the largest sum admitted in any interval ``[t, t + window)``."""
    by_subject: dict[str, list[tuple[int, int]]] = {}
    for entry in admitted:
        subject = entry.ip if rule.kind is LimitKind.REQUEST_WEIGHT else entry.api_key
        amount = entry.weight if rule.kind is LimitKind.REQUEST_WEIGHT else entry.orders
        if subject is not None and amount > 0:
            by_subject.setdefault(subject, []).append((entry.t_ms, amount))
    maxima = {}
    for subject, events in by_subject.items():
        events.sort()
        best = total = start = 0
        for t_ms, amount in events:
            total += amount
            while events[start][0] <= t_ms - rule.window_ms:
                total -= events[start][1]
                start += 1
            best = max(best, total)
        maxima[subject] = best
    return maxima
