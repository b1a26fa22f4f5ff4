"""The rate limiter every exchange request passes through: never send what Binance would refuse.

Binance counts REQUEST_WEIGHT per egress IP and ORDERS per account, so replicas that share an IP
or an account share one budget. Three modes:

* SHARED: the budget lives in Redis (``limiter_redis``) and one Lua script admits requests for
  every replica, atomically and exactly (a sliding log, safe whether Binance's windows are fixed
  or rolling).
* LOCAL: no Redis configured. An in-process sliding log; with several replicas each keeps to its
  ``1/replicas`` share, since nothing else stops them adding up to more than the limit.
* FALLBACK: Redis configured but unreachable. The same in-process share, seeded with the last
  shared count this process saw, while a background probe waits for Redis; when it answers, the
  admissions made meanwhile are written into the shared log and the limiter is SHARED again.

Limits in force are ``floor(limit * safety_margin)`` shared, ``floor(limit * safety_margin /
replicas)`` in-process: never unlimited.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import math
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from types import TracebackType

from prometheus_client import Counter, Gauge, Histogram

from qtrader.exchange.limiter_redis import REDIS_DOWN, MergeEntry, RedisBudget
from qtrader.exchange.limits import RateLimitRule, RequestCost
from qtrader.health.contract import DependencyHealth, Status

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

# Waiters wake at least this often, so a mode change (Redis back, Redis gone) is noticed.
_MAX_SLEEP_S = 1.0
_HEADER_VALUE = re.compile(r"\s*(\d+)\s*", re.ASCII)


class CostNeverFits(ValueError):
    """A request whose cost is larger than a limit itself: no wait admits it (the venue's limits
    are lower than that request's weight)."""


class LimiterMode(enum.StrEnum):
    SHARED = "shared"
    LOCAL = "local"
    FALLBACK = "fallback"


_MODE_VALUE = {LimiterMode.SHARED: 0, LimiterMode.LOCAL: 1, LimiterMode.FALLBACK: 2}

ACQUISITIONS = Counter(
    "qtrader_ratelimit_acquisitions",
    "Requests admitted by the rate limiter, by the mode that admitted them.",
    ["mode"],
)
WAIT_SECONDS = Histogram(
    "qtrader_ratelimit_wait_seconds",
    "How long acquire() waited before admitting a request (limits full or paused).",
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
)
USED_SHARE = Gauge(
    "qtrader_ratelimit_used_share",
    "Share of the limit in force used in the current window, as this process last saw it.",
    ["rule"],
)
PAUSES = Counter(
    "qtrader_ratelimit_pauses",
    "Pauses of all requests ordered by the exchange (429, -1003, -1015, 418), by reason.",
    ["reason"],
)
MODE = Gauge(
    "qtrader_ratelimit_mode",
    "The rate limiter's mode: 0 shared (Redis), 1 local, 2 fallback (Redis unreachable).",
)


def account_id_for(api_key: str) -> str:
    """A budget key for an account that does not reveal the API key (it lands in Redis keys)."""
    return "acct:" + hashlib.sha256(api_key.encode()).hexdigest()[:16]


@dataclass(frozen=True, kw_only=True)
class LimiterConfig:
    rules: tuple[RateLimitRule, ...]
    egress_id: str  # key for REQUEST_WEIGHT budgets (the egress IP), e.g. "ip:1.2.3.4"
    account_id: str  # key for ORDERS budgets: a hash of the API key, never the key itself
    replicas: int = 1  # execution replicas sharing the budget
    safety_margin: float = 0.9  # use at most this share of each published limit
    redis_url: str | None = None
    namespace: str = "qtrader:ratelimit"

    def __post_init__(self) -> None:
        if not self.rules:
            raise ValueError("a rate limiter needs at least one rule: none would mean unlimited")
        keys = [rule.key for rule in self.rules]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate rate limit rules: {keys}")
        for name in ("egress_id", "account_id", "namespace"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if not 0 < self.safety_margin <= 1:
            raise ValueError(f"safety_margin must be in (0, 1], got {self.safety_margin}")
        for rule in self.rules:
            if self.share_limit(rule) < 1:
                raise ValueError(
                    f"{rule.key}: limit {rule.limit} x {self.safety_margin} / {self.replicas} "
                    "replicas leaves less than 1 per replica"
                )

    def shared_limit(self, rule: RateLimitRule) -> int:
        """What all replicas together may use of ``rule``: floor(limit x safety_margin)."""
        return math.floor(Fraction(rule.limit) * Fraction(str(self.safety_margin)))

    def share_limit(self, rule: RateLimitRule) -> int:
        """What one replica may use on its own: floor(limit x safety_margin / replicas)."""
        return math.floor(Fraction(rule.limit) * Fraction(str(self.safety_margin)) / self.replicas)


@dataclass
class _Entry:
    at: float  # clock time of the admission
    weight: int
    admitted: bool  # False for counts taken from elsewhere (server headers, the shared log)
    merged: bool = False  # written into Redis after an outage


class SlidingLog:
    """Exact sliding logs, one per rule, over the window ``(now - window, now]``.

    ``try_acquire`` is synchronous, so under asyncio a check-and-record is atomic without a lock.
    The clock is injectable so tests can drive time.
    """

    def __init__(
        self,
        limits: Mapping[RateLimitRule, int],
        *,
        clock: Clock = time.monotonic,
        seed: Mapping[RateLimitRule, tuple[float, int]] | None = None,
    ) -> None:
        self.limits = dict(limits)
        self._clock = clock
        self._entries: dict[RateLimitRule, deque[_Entry]] = {rule: deque() for rule in limits}
        self._used = dict.fromkeys(limits, 0)
        for rule, (at, weight) in (seed or {}).items():
            if weight > 0:
                self._entries[rule].append(_Entry(at=at, weight=weight, admitted=False))
                self._used[rule] += weight

    def try_acquire(self, cost: RequestCost) -> float:
        """Record ``cost`` and return 0.0 if every rule has room; else record nothing and
        return the seconds until the oldest entries will have freed enough room."""
        wait = self.wait_for(cost)
        if wait == 0:
            self.record(cost)
        return wait

    def wait_for(self, cost: RequestCost) -> float:
        """Seconds until ``cost`` fits every rule (0.0: it fits now); records nothing."""
        now = self._clock()
        wait = 0.0
        for rule, limit in self.limits.items():
            units = cost.against(rule)
            if units == 0:
                continue  # a cost of 0 on a rule never waits for it
            if units > limit:
                raise CostNeverFits(
                    f"a cost of {units} on {rule.key} can never fit its limit {limit}"
                )
            self._trim(rule, now)
            need = self._used[rule] + units - limit
            if need > 0:
                wait = max(wait, self._time_to_free(rule, need, now))
        return wait

    def record(self, cost: RequestCost) -> None:
        now = self._clock()
        for rule in self.limits:
            units = cost.against(rule)
            if units > 0:
                self._entries[rule].append(_Entry(at=now, weight=units, admitted=True))
                self._used[rule] += units

    def observe(self, rule: RateLimitRule, seen: int) -> None:
        """Raise the count to at least ``seen`` (the server's), as an entry made now."""
        if rule not in self.limits:
            return
        now = self._clock()
        self._trim(rule, now)
        if seen > self._used[rule]:
            self._entries[rule].append(
                _Entry(at=now, weight=seen - self._used[rule], admitted=False)
            )
            self._used[rule] = seen

    def used(self, rule: RateLimitRule) -> int:
        self._trim(rule, self._clock())
        return self._used[rule]

    def unmerged(self) -> list[tuple[RateLimitRule, _Entry]]:
        """This process's own admissions still in their window and not yet written to Redis."""
        now = self._clock()
        pending: list[tuple[RateLimitRule, _Entry]] = []
        for rule, entries in self._entries.items():
            self._trim(rule, now)
            pending += [(rule, e) for e in entries if e.admitted and not e.merged]
        return pending

    def _trim(self, rule: RateLimitRule, now: float) -> None:
        window = rule.window_ms / 1000
        entries = self._entries[rule]
        while entries and entries[0].at + window <= now:
            self._used[rule] -= entries.popleft().weight

    def _time_to_free(self, rule: RateLimitRule, need: int, now: float) -> float:
        window = rule.window_ms / 1000
        freed = 0
        for entry in self._entries[rule]:
            freed += entry.weight
            if freed >= need:
                return entry.at + window - now
        return window  # unreachable while every cost fits its limit


class _InProcess:
    """The in-process budget of LOCAL and FALLBACK: two sliding logs that must both admit.

    * ``own``: this replica's admissions against its ``1/replicas`` share, so replicas that cannot
      coordinate still add up to at most the limit;
    * ``view``: the budget as the server counts it (our admissions raised by the ``X-MBX-*``
      headers, which count every replica's requests) against the whole limit in force.

    Raising ``own`` with the headers instead would make each replica wait for the others' share.
    Both start from the shared count last seen in Redis (if any): the requests still in the window
    count against the new share too.
    """

    def __init__(
        self,
        config: LimiterConfig,
        clock: Clock,
        seed: Mapping[RateLimitRule, tuple[float, int]] | None = None,
    ) -> None:
        own_limits = {rule: config.share_limit(rule) for rule in config.rules}
        view_limits = {rule: config.shared_limit(rule) for rule in config.rules}
        self.own = SlidingLog(own_limits, clock=clock, seed=seed)
        self.view = SlidingLog(view_limits, clock=clock, seed=seed)

    def try_acquire(self, cost: RequestCost) -> float:
        wait = max(self.own.wait_for(cost), self.view.wait_for(cost))
        if wait == 0:
            self.own.record(cost)
            self.view.record(cost)
        return wait

    def observe(self, rule: RateLimitRule, seen: int) -> None:
        self.view.observe(rule, seen)

    def used(self, rule: RateLimitRule) -> int:
        """The budget's use as far as this process knows (its own requests and the headers)."""
        return self.view.used(rule)

    def fill(self, rule: RateLimitRule) -> float:
        """How full the tighter of the two logs is, 0..1."""
        return max(
            self.own.used(rule) / self.own.limits[rule],
            self.view.used(rule) / self.view.limits[rule],
        )

    def unmerged(self) -> list[tuple[RateLimitRule, _Entry]]:
        return self.own.unmerged()


class RateLimiter:
    """Admits requests against every rule; build it with ``await RateLimiter.create(config)``."""

    def __init__(
        self,
        config: LimiterConfig,
        *,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
        probe_interval_s: float = 1.0,
    ) -> None:
        self.config = config
        self._clock = clock
        self._wall = wall_clock
        self._sleep = sleep
        self._probe_interval_s = probe_interval_s
        self._shared_limits = {rule: config.shared_limit(rule) for rule in config.rules}
        self._share_limits = {rule: config.share_limit(rule) for rule in config.rules}
        self._local = _InProcess(config, clock)
        self._redis: RedisBudget | None = None
        self._mode = LimiterMode.LOCAL
        self._seen = dict.fromkeys(config.rules, 0)  # the shared counts, as last answered
        self._seen_at: float | None = None
        self._paused_epoch = 0.0
        self._unshared_pause = 0.0  # a pause ordered while Redis was away, to write on return
        self._redis_error = ""
        self._probe: asyncio.Task[None] | None = None

    @classmethod
    async def create(
        cls,
        config: LimiterConfig,
        *,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
        probe_interval_s: float = 1.0,
    ) -> RateLimiter:
        """Connect to Redis when configured; if it does not answer, start in FALLBACK."""
        limiter = cls(
            config,
            clock=clock,
            wall_clock=wall_clock,
            sleep=sleep,
            probe_interval_s=probe_interval_s,
        )
        if config.redis_url is None:
            limiter._set_mode(LimiterMode.LOCAL)
            return limiter
        limiter._redis = RedisBudget.connect(
            config.redis_url,
            limits=limiter._shared_limits,
            egress_id=config.egress_id,
            account_id=config.account_id,
            namespace=config.namespace,
        )
        try:
            await limiter._redis.ping()
        except REDIS_DOWN as exc:
            limiter._enter_fallback(exc)
        else:
            limiter._set_mode(LimiterMode.SHARED)
        return limiter

    async def __aenter__(self) -> RateLimiter:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def acquire(self, cost: RequestCost) -> None:
        """Wait until every rule admits ``cost`` (and no pause is in force), then record it."""
        if cost.weight < 0 or cost.orders < 0:
            raise ValueError(f"a request cost cannot be negative: {cost}")
        for rule, limit in self._shared_limits.items():
            if cost.against(rule) > limit:
                raise CostNeverFits(
                    f"a cost of {cost.against(rule)} on {rule.key} can never fit its limit {limit}"
                )
        started = self._clock()
        while (wait := await self._attempt(cost)) > 0:
            await self._sleep(min(wait, _MAX_SLEEP_S))
        WAIT_SECONDS.observe(max(0.0, self._clock() - started))

    async def observe(self, headers: Mapping[str, str]) -> None:
        """Raise each rule's count to at least the server's, from the response headers."""
        seen = used_from_headers(self.config.rules, headers)
        if not seen:
            return
        if self._mode is LimiterMode.SHARED and self._redis is not None:
            try:
                self._remember(await self._redis.observe(seen))
                return
            except REDIS_DOWN as exc:
                self._enter_fallback(exc)
        for rule, value in seen.items():
            self._local.observe(rule, value)
        self._publish_local()

    async def pause_until(self, epoch_s: float, reason: str) -> None:
        """Admit nothing until ``epoch_s`` (Unix time), in every replica sharing the budget."""
        if not math.isfinite(epoch_s):
            raise ValueError(f"pause deadline must be a finite Unix time, got {epoch_s}")
        PAUSES.labels(reason).inc()
        remaining = epoch_s - self._wall()
        log.warning("rate limiter paused for %.1fs: %s", max(0.0, remaining), reason)
        self._paused_epoch = max(self._paused_epoch, epoch_s)
        if remaining <= 0 or self._redis is None:
            return
        if self._mode is LimiterMode.SHARED:
            try:
                result = await self._redis.pause(remaining)
                self._remember(result.used)
                return
            except REDIS_DOWN as exc:
                self._enter_fallback(exc)
        self._unshared_pause = max(self._unshared_pause, epoch_s)

    def paused_until(self) -> float | None:
        """The Unix time before which nothing is admitted, or None when not paused."""
        return self._paused_epoch if self._paused_epoch > self._wall() else None

    def mode(self) -> LimiterMode:
        return self._mode

    def limits(self) -> dict[str, int]:
        """rule.key -> what this process may use per window in its current mode: the shared
        limit (SHARED) or its 1/replicas share (LOCAL, FALLBACK)."""
        return {rule.key: limit for rule, limit in self._limits_in_force().items()}

    def health(self) -> DependencyHealth:
        name = "rate-limiter"
        replicas = self.config.replicas
        shares = ", ".join(
            f"{rule.key} {limit}/{rule.limit}" for rule, limit in self._share_limits.items()
        )
        if self._mode is LimiterMode.SHARED:
            detail = f"limits shared through Redis by {replicas} replica(s)"
            return DependencyHealth(name=name, status=Status.OK, detail=detail)
        if self._mode is LimiterMode.FALLBACK:
            detail = (
                f"Redis unreachable ({self._redis_error}): the budget is not shared; using an "
                f"in-process 1/{replicas} share of each limit ({shares}) until Redis answers"
            )
            return DependencyHealth(name=name, status=Status.DEGRADED, detail=detail)
        if replicas == 1:
            detail = f"in-process limits for a single replica ({shares})"
            return DependencyHealth(name=name, status=Status.OK, detail=detail)
        detail = (
            f"no Redis configured: the budget is not shared between the {replicas} replicas; "
            f"each keeps to a 1/{replicas} share of each limit ({shares})"
        )
        return DependencyHealth(name=name, status=Status.DEGRADED, detail=detail)

    def snapshot(self) -> dict[str, int]:
        """rule.key -> used in the current window, as this process last saw it."""
        if self._mode is LimiterMode.SHARED:
            return {rule.key: used for rule, used in self._seen.items()}
        return {rule.key: self._local.used(rule) for rule in self.config.rules}

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
            self._probe = None
        if self._redis is not None:
            await self._redis.close()

    async def _attempt(self, cost: RequestCost) -> float:
        """One try: 0.0 when admitted (and recorded), else the seconds worth waiting."""
        paused = self._paused_epoch - self._wall()
        if paused > 0:
            return paused
        if self._mode is LimiterMode.SHARED and self._redis is not None:
            try:
                result = await self._redis.acquire(cost)
            except REDIS_DOWN as exc:
                self._enter_fallback(exc)
            else:
                self._remember(result.used)
                if result.paused_s > 0:
                    self._paused_epoch = max(self._paused_epoch, self._wall() + result.paused_s)
                    return result.paused_s
                if result.admitted:
                    ACQUISITIONS.labels(LimiterMode.SHARED.value).inc()
                return result.wait_s
        for rule, limit in self._share_limits.items():
            if cost.against(rule) > limit:
                raise ValueError(
                    f"a cost of {cost.against(rule)} on {rule.key} does not fit this replica's "
                    f"in-process share {limit} ({self._mode} mode)"
                )
        wait = self._local.try_acquire(cost)
        if wait == 0:
            ACQUISITIONS.labels(self._mode.value).inc()
            self._publish_local()
        return wait

    def _limits_in_force(self) -> dict[RateLimitRule, int]:
        return self._shared_limits if self._mode is LimiterMode.SHARED else self._share_limits

    def _remember(self, used: Mapping[RateLimitRule, int]) -> None:
        self._seen = dict(used)
        self._seen_at = self._clock()
        for rule, value in used.items():
            USED_SHARE.labels(rule.key).set(value / self._shared_limits[rule])

    def _publish_local(self) -> None:
        for rule in self.config.rules:
            USED_SHARE.labels(rule.key).set(self._local.fill(rule))

    def _set_mode(self, mode: LimiterMode) -> None:
        self._mode = mode
        MODE.set(_MODE_VALUE[mode])

    def _enter_fallback(self, exc: BaseException) -> None:
        """Redis did not answer: switch at once to a conservative in-process share."""
        self._redis_error = f"{type(exc).__name__}: {exc}"
        if self._mode is LimiterMode.FALLBACK:
            return
        log.warning(
            "Redis unreachable (%s): rate limits fall back to an in-process 1/%d share",
            self._redis_error,
            self.config.replicas,
        )
        # Start from the shared count last seen (all replicas' requests, dated when seen).
        seed: dict[RateLimitRule, tuple[float, int]] = {}
        if self._seen_at is not None:
            seed = {rule: (self._seen_at, used) for rule, used in self._seen.items()}
        self._local = _InProcess(self.config, self._clock, seed)
        self._set_mode(LimiterMode.FALLBACK)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._probe_until_shared(), name="ratelimit-probe")

    async def _probe_until_shared(self) -> None:
        redis = self._redis
        assert redis is not None
        while self._mode is LimiterMode.FALLBACK:
            await self._sleep(self._probe_interval_s)
            try:
                await redis.ping()
                await self._reconcile(redis)
            except REDIS_DOWN as exc:
                self._redis_error = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # a bug must not end the probe: FALLBACK would last forever
                self._redis_error = f"{type(exc).__name__}: {exc}"
                log.exception("rate limiter: returning to shared limits failed")
        log.warning("Redis answers again: rate limits are shared again")

    async def _reconcile(self, redis: RedisBudget) -> None:
        """Write what happened during the outage into Redis, then switch to SHARED.

        The last check that nothing is left to write and the switch happen with no ``await``
        between them, so no admission made in FALLBACK can be left out of the shared log.
        """
        while True:
            if self._unshared_pause > self._wall():
                pause = self._unshared_pause
                self._remember((await redis.pause(pause - self._wall())).used)
                if self._unshared_pause == pause:
                    self._unshared_pause = 0.0
                continue
            pending = self._local.unmerged()
            if not pending:
                break
            now = self._clock()
            entries = [MergeEntry(rule, now - e.at, e.weight) for rule, e in pending]
            self._remember(await redis.merge(entries))
            for _, entry in pending:
                entry.merged = True
        self._set_mode(LimiterMode.SHARED)


def used_from_headers(
    rules: tuple[RateLimitRule, ...], headers: Mapping[str, str]
) -> dict[RateLimitRule, int]:
    """Each rule's count from its ``X-MBX-...`` header (any case); missing or garbled: skipped."""
    lowered = {str(name).lower(): value for name, value in headers.items()}
    seen: dict[RateLimitRule, int] = {}
    for rule in rules:
        value = lowered.get(rule.header.lower())
        match = _HEADER_VALUE.fullmatch(value) if isinstance(value, str) else None
        if match is not None:
            seen[rule] = int(match.group(1))
    return seen
