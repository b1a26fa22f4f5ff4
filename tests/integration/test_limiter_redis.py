"""The shared rate limiter against a real redis-server: instances and OS processes share one
budget, a pause reaches every replica, an outage falls back to a conservative share and a restart
brings the shared budget back.

Windows are 1 s (limit 50, margin 0.9: 45 in force) so the tests see many windows quickly.
Admissions are checked soundly: each is recorded with the times just before and just after its
acquire(), and a set of admissions counts as "in one window" only if all of those intervals fit
in less than a window, so timing noise can hide a violation but never invent one.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from qtrader.exchange.limiter import LimiterConfig, LimiterMode, RateLimiter
from qtrader.exchange.limits import LimitKind, RateLimitRule, RequestCost
from qtrader.health.contract import Status
from support.redis_server import EmbeddedRedis, require_redis_server, running_redis

pytestmark = pytest.mark.integration

WEIGHT_1S = RateLimitRule(LimitKind.REQUEST_WEIGHT, "SECOND", 1, 50)
ORDERS_1S = RateLimitRule(LimitKind.ORDERS, "SECOND", 1, 50)
WEIGHT_10S = RateLimitRule(LimitKind.REQUEST_WEIGHT, "SECOND", 10, 50)
ORDERS_10S = RateLimitRule(LimitKind.ORDERS, "SECOND", 10, 50)
IN_FORCE = 45  # floor(50 x 0.9)
SHARE_OF_2 = 22  # floor(50 x 0.9 / 2)

# (before acquire, after acquire, weight, orders)
Event = tuple[float, float, int, int]


def config(url: str | None, *rules: RateLimitRule, replicas: int = 2) -> LimiterConfig:
    return LimiterConfig(
        rules=rules or (WEIGHT_1S, ORDERS_1S),
        egress_id="ip:10.0.0.1",
        account_id="acct:test",
        replicas=replicas,
        safety_margin=0.9,
        redis_url=url,
    )


def window_max(events: list[Event], window_s: float, kind: LimitKind) -> int:
    """The most weight (or orders) certainly admitted within one window."""
    column = 2 if kind is LimitKind.REQUEST_WEIGHT else 3
    ordered = sorted(events)
    best = 0
    for first in ordered:
        start = first[0]
        best = max(
            best,
            sum(e[column] for e in ordered if e[0] >= start and e[1] < start + window_s),
        )
    return best


async def hammer(
    limiter: RateLimiter, until: float, rng: random.Random, events: list[Event],
    clock: Callable[[], float] = time.time, *, impatient: bool = False,
) -> None:  # fmt: skip
    """Acquire random costs until ``until``. An impatient client gives up each wait after 30 ms
    and asks again, so the limiter is asked at many instants, not only when it said to come back
    (an early admission, e.g. from a too-short window, cannot hide behind the advised wait)."""
    while clock() < until:
        weight, orders = rng.randint(1, 3), rng.randint(0, 1)
        before = clock()
        acquiring = limiter.acquire(RequestCost(weight=weight, orders=orders))
        try:
            await (asyncio.wait_for(acquiring, 0.03) if impatient else acquiring)
        except TimeoutError:
            continue  # nothing was recorded: a cancelled acquire admits nothing
        events.append((before, clock(), weight, orders))


async def eventually(condition: Callable[[], bool], *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached after {timeout_s}s: {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    with running_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture
async def pair(redis_server: EmbeddedRedis) -> AsyncIterator[tuple[RateLimiter, RateLimiter]]:
    first = await RateLimiter.create(config(redis_server.url))
    second = await RateLimiter.create(config(redis_server.url))
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


async def test_two_instances_never_exceed_the_shared_limit(
    pair: tuple[RateLimiter, RateLimiter],
) -> None:
    rng = random.Random(1)
    events: list[Event] = []
    until = time.time() + 1.5
    await asyncio.gather(
        *(hammer(rl, until, rng, events, impatient=i == 0) for rl in pair for i in range(3))
    )
    assert all(rl.mode() is LimiterMode.SHARED for rl in pair)
    assert all(rl.health().status is Status.OK for rl in pair)
    assert sum(e[2] for e in events) > 2 * IN_FORCE  # the budget was contended
    assert window_max(events, 1.0, LimitKind.REQUEST_WEIGHT) <= IN_FORCE
    assert window_max(events, 1.0, LimitKind.ORDERS) <= IN_FORCE


async def test_the_window_check_catches_limiters_that_do_not_share() -> None:
    """The control for the test above: two unshared budgets do exceed one window."""
    rng = random.Random(2)
    events: list[Event] = []
    limiters = [await RateLimiter.create(config(None, replicas=1)) for _ in range(2)]
    until = time.time() + 0.3
    await asyncio.gather(*(hammer(rl, until, rng, events) for rl in limiters))
    assert window_max(events, 1.0, LimitKind.REQUEST_WEIGHT) > IN_FORCE
    for rl in limiters:
        await rl.close()


WORKER = """
import asyncio, json, random, sys, time
from qtrader.exchange.limiter import LimiterConfig, RateLimiter
from qtrader.exchange.limits import LimitKind, RateLimitRule, RequestCost

async def main(url, start_at, duration, seed):
    rules = (
        RateLimitRule(LimitKind.REQUEST_WEIGHT, "SECOND", 1, 50),
        RateLimitRule(LimitKind.ORDERS, "SECOND", 1, 50),
    )
    config = LimiterConfig(rules=rules, egress_id="ip:10.0.0.1", account_id="acct:test",
                           replicas=2, safety_margin=0.9, redis_url=url)
    rng = random.Random(seed)
    events = []
    async with await RateLimiter.create(config) as limiter:
        if limiter.mode() != "shared":
            sys.exit(f"limiter mode {limiter.mode()}")
        await asyncio.sleep(max(0.0, start_at - time.time()))
        async def worker(impatient):
            while time.time() < start_at + duration:
                weight, orders = rng.randint(1, 3), rng.randint(0, 1)
                before = time.time()
                acquiring = limiter.acquire(RequestCost(weight=weight, orders=orders))
                try:
                    await (asyncio.wait_for(acquiring, 0.03) if impatient else acquiring)
                except TimeoutError:
                    continue
                events.append((before, time.time(), weight, orders))
        await asyncio.gather(*(worker(i == 0) for i in range(3)))
    print(json.dumps(events))

asyncio.run(main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])))
"""


def test_two_processes_never_exceed_the_shared_limit(redis_server: EmbeddedRedis) -> None:
    start_at = time.time() + 2.0  # both processes start hammering together, after their imports
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, redis_server.url, str(start_at), "2.0", str(seed)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for seed in (10, 11)
    ]
    events: list[Event] = []
    for process in processes:
        out, err = process.communicate(timeout=30)
        assert process.returncode == 0, err.decode()
        mine = [tuple(e) for e in json.loads(out)]
        assert mine, "a worker admitted nothing"
        events += mine  # type: ignore[arg-type]
    assert sum(e[2] for e in events) > 2 * IN_FORCE
    assert window_max(events, 1.0, LimitKind.REQUEST_WEIGHT) <= IN_FORCE
    assert window_max(events, 1.0, LimitKind.ORDERS) <= IN_FORCE


async def test_a_pause_in_one_instance_pauses_the_other(
    pair: tuple[RateLimiter, RateLimiter],
) -> None:
    first, second = pair
    deadline = time.time() + 0.6
    await first.pause_until(deadline, "429")
    assert second.paused_until() is None  # nothing local: only Redis can tell it
    await second.acquire(RequestCost(weight=1))
    assert time.time() >= deadline
    await first.pause_until(time.time() + 5.0, "418")
    waiting = asyncio.create_task(second.acquire(RequestCost()))  # even a free request waits
    await eventually(lambda: second.paused_until() is not None, timeout_s=3, what="pause seen")
    assert not waiting.done()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_outage_falls_back_to_a_share_then_recovers(redis_server: EmbeddedRedis) -> None:
    limiter = await RateLimiter.create(config(redis_server.url), probe_interval_s=0.1)
    try:
        await limiter.acquire(RequestCost(weight=1))
        assert limiter.mode() is LimiterMode.SHARED
        redis_server.stop()

        events: list[Event] = []
        until = time.monotonic() + 1.5
        await asyncio.gather(
            *(
                hammer(limiter, until, random.Random(i), events, time.monotonic, impatient=i == 0)
                for i in range(3)
            )
        )
        assert limiter.mode() is LimiterMode.FALLBACK
        health = limiter.health()
        assert health.status is Status.DEGRADED
        assert "Redis unreachable" in health.detail
        assert "1/2 share" in health.detail
        assert f"REQUEST_WEIGHT:1S {SHARE_OF_2}/50" in health.detail
        assert limiter.limits() == {"REQUEST_WEIGHT:1S": SHARE_OF_2, "ORDERS:1S": SHARE_OF_2}
        assert sum(e[2] for e in events) > SHARE_OF_2  # more than one share was asked for
        assert window_max(events, 1.0, LimitKind.REQUEST_WEIGHT) <= SHARE_OF_2
        assert window_max(events, 1.0, LimitKind.ORDERS) <= SHARE_OF_2

        redis_server.start()
        await eventually(
            lambda: limiter.mode() is LimiterMode.SHARED, timeout_s=10, what="back to SHARED"
        )
        assert limiter.health().status is Status.OK
        assert limiter.limits()["REQUEST_WEIGHT:1S"] == IN_FORCE
        await limiter.acquire(RequestCost(weight=1))
    finally:
        await limiter.close()


async def test_recovery_writes_the_outage_into_the_shared_log(
    redis_server: EmbeddedRedis,
) -> None:
    """Requests and pauses made during the outage reach replicas that never saw them."""
    url = redis_server.url
    rules = (WEIGHT_10S, ORDERS_10S)
    outage = await RateLimiter.create(config(url, *rules), probe_interval_s=0.1)
    other: RateLimiter | None = None
    try:
        redis_server.stop()
        await outage.acquire(RequestCost(weight=5, orders=1))
        await outage.acquire(RequestCost(weight=5, orders=1))
        assert outage.mode() is LimiterMode.FALLBACK
        deadline = time.time() + 5.0
        await outage.pause_until(deadline, "429")

        redis_server.start()  # a restarted Redis is empty
        await eventually(
            lambda: outage.mode() is LimiterMode.SHARED, timeout_s=10, what="back to SHARED"
        )
        other = await RateLimiter.create(config(url, *rules))
        await other.observe({"X-MBX-USED-WEIGHT-10S": "0"})  # reads the shared counts
        assert other.snapshot() == {"REQUEST_WEIGHT:10S": 10, "ORDERS:10S": 2}
        waiting = asyncio.create_task(other.acquire(RequestCost(weight=1)))
        await eventually(lambda: other.paused_until() is not None, timeout_s=3, what="pause")
        paused_until = other.paused_until()
        assert paused_until is not None
        assert paused_until == pytest.approx(deadline, abs=0.5)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    finally:
        await outage.close()
        if other is not None:
            await other.close()


async def test_redis_down_at_start_begins_in_fallback(tmp_path: Path) -> None:
    server = EmbeddedRedis(work_dir=tmp_path / "redis", binary=require_redis_server())
    rules = (WEIGHT_10S, ORDERS_10S)
    limiter = await RateLimiter.create(config(server.url, *rules), probe_interval_s=0.1)
    try:
        assert limiter.mode() is LimiterMode.FALLBACK
        assert limiter.health().status is Status.DEGRADED
        await limiter.acquire(RequestCost(weight=SHARE_OF_2))  # the share, not the whole limit
        server.start()
        await eventually(lambda: limiter.mode() is LimiterMode.SHARED, timeout_s=10, what="SHARED")
        assert limiter.health().status is Status.OK
        assert limiter.snapshot()["REQUEST_WEIGHT:10S"] == SHARE_OF_2  # written into Redis
    finally:
        await limiter.close()
        server.stop()


async def test_local_with_two_replicas_is_degraded() -> None:
    limiter = await RateLimiter.create(config(None, replicas=2))
    health = limiter.health()
    assert limiter.mode() is LimiterMode.LOCAL
    assert health.status is Status.DEGRADED
    assert "not shared" in health.detail
    await limiter.close()
