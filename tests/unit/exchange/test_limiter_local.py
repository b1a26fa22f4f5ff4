"""The in-process rate limiter against a reference model, on a clock the test drives.

Times are multiples of 1/1024 s and windows whole seconds, so every sum is exact in floating point
and "admitted at exactly the right instant" can be asserted with ``==``.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from qtrader.exchange.backoff import full_jitter
from qtrader.exchange.limiter import (
    LimiterConfig,
    LimiterMode,
    RateLimiter,
    SlidingLog,
    account_id_for,
    used_from_headers,
)
from qtrader.exchange.limits import LimitKind, RateLimitRule, RequestCost
from qtrader.health.contract import Status

TICK = 1 / 1024
WEIGHT_1S = RateLimitRule(LimitKind.REQUEST_WEIGHT, "SECOND", 1, 10)
ORDERS_10S = RateLimitRule(LimitKind.ORDERS, "SECOND", 10, 5)


class FakeTime:
    """Both clocks (monotonic and wall) and the sleep of a limiter under test."""

    def __init__(self, start: float = 1024.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        assert seconds > 0, "acquire() must never spin with a zero sleep"
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def config(*rules: RateLimitRule, replicas: int = 1, margin: float = 1.0) -> LimiterConfig:
    return LimiterConfig(
        rules=rules or (WEIGHT_1S, ORDERS_10S),
        egress_id="ip:127.0.0.1",
        account_id=account_id_for("test-key"),
        replicas=replicas,
        safety_margin=margin,
    )


async def limiter(cfg: LimiterConfig, fake: FakeTime) -> RateLimiter:
    return await RateLimiter.create(cfg, clock=fake, wall_clock=fake, sleep=fake.sleep)


# --- the sliding log against a reference model ------------------------------------------------

rule_strategy = st.builds(
    RateLimitRule,
    kind=st.sampled_from(list(LimitKind)),
    interval=st.just("SECOND"),
    interval_num=st.integers(1, 3),
    limit=st.integers(5, 20),
)
step_strategy = st.tuples(
    st.integers(0, 1500),  # ticks to advance before the request
    st.integers(0, 5),  # weight
    st.integers(0, 5),  # orders
)


def used_at(admitted: list[tuple[float, RequestCost]], rule: RateLimitRule, t: float) -> int:
    """The reference count: everything admitted in (t - window, t]."""
    window = rule.window_ms / 1000
    return sum(c.against(rule) for at, c in admitted if t - window < at <= t)


def fits(admitted: list[tuple[float, RequestCost]], limits: dict[RateLimitRule, int], t: float,
         cost: RequestCost) -> bool:  # fmt: skip
    return all(
        cost.against(rule) == 0 or used_at(admitted, rule, t) + cost.against(rule) <= limit
        for rule, limit in limits.items()
    )


@settings(max_examples=200, deadline=None)
@given(
    rules=st.lists(rule_strategy, min_size=1, max_size=3, unique_by=lambda r: r.key),
    steps=st.lists(step_strategy, max_size=80),
)
def test_sliding_log_admits_exactly_what_fits_and_waits_exactly_long_enough(
    rules: list[RateLimitRule], steps: list[tuple[int, int, int]]
) -> None:
    fake = FakeTime()
    limits = {rule: rule.limit for rule in rules}
    log = SlidingLog(limits, clock=fake)
    admitted: list[tuple[float, RequestCost]] = []
    for ticks, weight, orders in steps:
        fake.now += ticks * TICK
        cost = RequestCost(weight=weight, orders=orders)
        expected = fits(admitted, limits, fake.now, cost)
        wait = log.try_acquire(cost)
        assert (wait == 0) == expected, (fake.now, cost, admitted)
        if wait == 0:
            admitted.append((fake.now, cost))
            continue
        # The wait is exactly the first instant at which the request fits.
        assert fits(admitted, limits, fake.now + wait, cost)
        assert not fits(admitted, limits, fake.now + wait - TICK / 4, cost)
    # Never more than the limit in any window (checked at every admission instant).
    for rule, limit in limits.items():
        for at, _ in admitted:
            assert used_at(admitted, rule, at) <= limit
            assert log.used(rule) == used_at(admitted, rule, fake.now)


def test_sliding_log_rejects_a_cost_that_can_never_fit() -> None:
    log = SlidingLog({WEIGHT_1S: 10})
    with pytest.raises(ValueError, match="can never fit"):
        log.try_acquire(RequestCost(weight=11))


# --- the limiter: waits, zero costs, pauses, headers ------------------------------------------


async def test_acquire_waits_until_the_oldest_entries_free_enough_room() -> None:
    fake = FakeTime()
    start = fake.now
    rl = await limiter(config(), fake)
    await rl.acquire(RequestCost(weight=6))
    fake.now += 0.25
    await rl.acquire(RequestCost(weight=4))
    fake.now += 0.25
    assert fake.sleeps == []
    await rl.acquire(RequestCost(weight=5))  # needs the first request (6) out of the window
    assert fake.now == start + 1.0
    assert rl.snapshot()["REQUEST_WEIGHT:1S"] == 9


async def test_acquire_sleeps_in_bounded_steps_for_a_long_window() -> None:
    fake = FakeTime()
    start = fake.now
    rl = await limiter(config(), fake)
    for _ in range(5):
        await rl.acquire(RequestCost(orders=1))
    await rl.acquire(RequestCost(orders=1))
    assert fake.now == start + 10.0
    assert max(fake.sleeps) <= 1.0  # wakes at least each second to notice a mode change


async def test_a_zero_cost_never_waits_for_a_full_rule() -> None:
    fake = FakeTime()
    rl = await limiter(config(), fake)
    for _ in range(5):
        await rl.acquire(RequestCost(orders=1))
    await rl.acquire(RequestCost(weight=1, orders=0))
    await rl.acquire(RequestCost())
    assert fake.sleeps == []
    assert rl.snapshot() == {"REQUEST_WEIGHT:1S": 1, "ORDERS:10S": 5}


async def test_pause_until_blocks_every_request_and_is_never_shortened() -> None:
    fake = FakeTime()
    rl = await limiter(config(), fake)
    deadline = fake.now + 5.5
    await rl.pause_until(deadline, "429")
    await rl.pause_until(fake.now + 2.0, "429")  # an earlier deadline does not shorten it
    assert rl.paused_until() == deadline
    await rl.acquire(RequestCost())  # even a request that costs nothing waits
    assert fake.now == deadline
    assert rl.paused_until() is None


async def test_pause_until_rejects_a_deadline_that_is_not_a_time() -> None:
    rl = await limiter(config(), FakeTime())
    with pytest.raises(ValueError, match="finite"):
        await rl.pause_until(float("nan"), "429")


async def test_observe_raises_the_count_to_the_servers() -> None:
    fake = FakeTime()
    start = fake.now
    rl = await limiter(config(), fake)
    await rl.acquire(RequestCost(weight=2))
    await rl.observe({"x-mbx-used-weight-1s": "8", "X-MBX-ORDER-COUNT-10S": "3"})
    assert rl.snapshot() == {"REQUEST_WEIGHT:1S": 8, "ORDERS:10S": 3}
    await rl.observe({"X-MBX-USED-WEIGHT-1S": "4"})  # lower than ours: no change
    assert rl.snapshot()["REQUEST_WEIGHT:1S"] == 8
    await rl.acquire(RequestCost(weight=3))  # 8 + 3 > 10: waits until the window has passed
    assert fake.now == start + 1.0


@pytest.mark.parametrize("value", ["", "abc", "-3", "1.5", "1e3", "٣"])
async def test_observe_ignores_garbled_headers(value: str) -> None:
    rl = await limiter(config(), FakeTime())
    await rl.observe({"X-MBX-USED-WEIGHT-1S": value, "Content-Type": "application/json"})
    await rl.observe({})
    assert rl.snapshot() == {"REQUEST_WEIGHT:1S": 0, "ORDERS:10S": 0}


def test_used_from_headers_reads_each_rules_header_in_any_case() -> None:
    headers = {"X-Mbx-Used-Weight-1s": " 7 ", "x-mbx-order-count-10s": "2", "X-MBX-X": "9"}
    assert used_from_headers((WEIGHT_1S, ORDERS_10S), headers) == {WEIGHT_1S: 7, ORDERS_10S: 2}


async def test_acquire_rejects_costs_that_can_never_be_admitted() -> None:
    rl = await limiter(config(), FakeTime())
    with pytest.raises(ValueError, match="negative"):
        await rl.acquire(RequestCost(weight=-1))
    with pytest.raises(ValueError, match="can never fit"):
        await rl.acquire(RequestCost(orders=6))


# --- local mode and replicas --------------------------------------------------------------------


async def test_local_single_replica_is_healthy_and_uses_the_margin() -> None:
    rl = await limiter(config(margin=0.9), FakeTime())
    assert rl.mode() is LimiterMode.LOCAL
    assert rl.health().status is Status.OK
    assert rl.limits() == {"REQUEST_WEIGHT:1S": 9, "ORDERS:10S": 4}


async def test_local_with_replicas_is_degraded_and_keeps_to_its_share() -> None:
    fake = FakeTime()
    start = fake.now
    rl = await limiter(config(replicas=2, margin=0.9), fake)
    health = rl.health()
    assert health.status is Status.DEGRADED
    assert "not shared" in health.detail
    assert "REQUEST_WEIGHT:1S 4/10" in health.detail
    assert rl.limits() == {"REQUEST_WEIGHT:1S": 4, "ORDERS:10S": 2}
    for _ in range(4):
        await rl.acquire(RequestCost(weight=1))
    assert fake.now == start
    await rl.acquire(RequestCost(weight=1))
    assert fake.now == start + 1.0
    with pytest.raises(ValueError, match="share"):
        await rl.acquire(RequestCost(weight=5))  # fits the shared limit, never this share


async def test_with_replicas_headers_count_against_the_whole_limit_not_the_share() -> None:
    """The headers count every replica's requests: they fill the limit (9), not our share (4)."""
    fake = FakeTime()
    start = fake.now
    rl = await limiter(config(replicas=2, margin=0.9), fake)
    await rl.observe({"X-MBX-USED-WEIGHT-1S": "7"})  # the other replica sent 7
    await rl.acquire(RequestCost(weight=2))  # 7 + 2 <= 9, and 2 <= our share of 4
    assert fake.now == start
    assert rl.snapshot()["REQUEST_WEIGHT:1S"] == 9
    await rl.acquire(RequestCost(weight=1))  # the server's window is full: wait it out
    assert fake.now == start + 1.0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rules": ()}, "at least one rule"),
        ({"rules": (WEIGHT_1S, WEIGHT_1S)}, "duplicate"),
        ({"replicas": 0}, "replicas"),
        ({"safety_margin": 0.0}, "safety_margin"),
        ({"safety_margin": 1.5}, "safety_margin"),
        ({"egress_id": ""}, "egress_id"),
        ({"account_id": ""}, "account_id"),
        ({"replicas": 3, "rules": (ORDERS_10S,), "safety_margin": 0.5}, "less than 1"),
    ],
)
def test_config_rejects_settings_that_would_leave_no_limit(
    changes: dict[str, object], message: str
) -> None:
    base: dict[str, object] = {
        "rules": (WEIGHT_1S,),
        "egress_id": "ip:1.2.3.4",
        "account_id": "acct:x",
    }
    with pytest.raises(ValueError, match=message):
        LimiterConfig(**(base | changes))  # type: ignore[arg-type]


def test_limits_are_floored_exactly() -> None:
    rule = RateLimitRule(LimitKind.REQUEST_WEIGHT, "MINUTE", 1, 2400)
    cfg = LimiterConfig(rules=(rule,), egress_id="ip:x", account_id="acct:y", replicas=7)
    assert cfg.shared_limit(rule) == 2160
    assert cfg.share_limit(rule) == 308  # 2160 / 7 = 308.57
    odd = RateLimitRule(LimitKind.ORDERS, "SECOND", 10, 100)
    assert LimiterConfig(rules=(odd,), egress_id="i", account_id="a", safety_margin=0.29)\
        .shared_limit(odd) == 29  # fmt: skip


def test_account_id_does_not_contain_the_key() -> None:
    key = "vmPUZE6mv9SD5VNHk4HlWFsOr6aKE2zvsw0MuIgwCIPy6utIco14y7Ju91duEh8A"
    account = account_id_for(key)
    assert key not in account
    assert account == account_id_for(key)
    assert account != account_id_for(key + "x")


async def test_metrics_count_admissions_pauses_and_mode() -> None:
    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    fake = FakeTime()
    rl = await limiter(config(), fake)
    admitted = sample("qtrader_ratelimit_acquisitions_total", mode="local")
    pauses = sample("qtrader_ratelimit_pauses_total", reason="unit-test")
    waits = sample("qtrader_ratelimit_wait_seconds_count")
    await rl.acquire(RequestCost(weight=5))
    await rl.pause_until(fake.now + 1, "unit-test")
    await rl.acquire(RequestCost(weight=5))
    assert sample("qtrader_ratelimit_acquisitions_total", mode="local") == admitted + 2
    assert sample("qtrader_ratelimit_pauses_total", reason="unit-test") == pauses + 1
    assert sample("qtrader_ratelimit_wait_seconds_count") == waits + 2
    assert sample("qtrader_ratelimit_mode") == 1
    assert sample("qtrader_ratelimit_used_share", rule="REQUEST_WEIGHT:1S") == 0.5


# --- backoff ------------------------------------------------------------------------------------


@given(
    attempt=st.integers(0, 3000),
    base=st.floats(0, 100, allow_nan=False),
    cap=st.floats(0, 1000, allow_nan=False),
    seed=st.integers(0, 2**32),
)
def test_full_jitter_stays_within_its_bounds(
    attempt: int, base: float, cap: float, seed: int
) -> None:
    delay = full_jitter(attempt, base_s=base, cap_s=cap, rng=random.Random(seed))
    assert 0 <= delay <= min(cap, base * 2.0 ** min(attempt, 1000))


def test_full_jitter_spreads_over_the_whole_range() -> None:
    rng = random.Random(7)
    delays = [full_jitter(3, rng=rng) for _ in range(500)]  # U(0, 1.6)
    assert min(delays) < 0.1
    assert max(delays) > 1.5
    assert max(full_jitter(30, rng=rng) for _ in range(500)) <= 10.0  # capped


def test_full_jitter_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="attempt"):
        full_jitter(-1)
    with pytest.raises(ValueError, match="finite"):
        full_jitter(1, base_s=float("inf"))
