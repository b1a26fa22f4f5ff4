"""Exchange instability: bursts of 429/-1003/-1015/5xx/timeouts while a testnet worker trades.

What it does: the local Binance-compatible server runs as its own process (``python -m
qtrader_tools.simulators.binance_futures``), a real redis-server backs the rate limiter, and a real
``qtrader execution`` worker in testnet mode (``--exchange-url`` to the simulator, API keys from
the environment, ``--exchange-timeout 1``, ``--unknown-grace 1``) trades BTCUSDT, with a real
portfolio for its equity, an ACTIVE latch and heartbeats. A feed moves the simulator's price,
publishes the matching candle and a LONG or SHORT signal twice a second, so every decision
flips the position and sends an order. Once orders fill, bursts are injected every few seconds,
in turn:

* *injected*: the next requests fail one after the other: a 429 -1003 with ``Retry-After`` (on
  any route), then on new orders a 503 -1001 (internal error), a 503 -1008 (unavailable), a 502
  HTML page, a 503 "Unknown error" after booking, a hang before booking and a hang after
  booking (both longer than the worker's timeout); and the next two orders fill only half, so
  their remainders go out as further attempts;
* *orders -1015*: an ORDERS limit of 1 per second is switched on for a moment: the worker's own
  limiter does not know it, so the exchange answers the second order of a second with a real
  429 -1015 and ``Retry-After``;
* *weight -1003*: a REQUEST_WEIGHT limit of 6 per second, likewise, gives real 429 -1003.

Then the feed runs on for a tail, stops, and every intent is waited for until it is final.

Criteria, all from the simulator's own request log and order book, the ORDERS and FILLS streams
and the worker's ``/health``:

* 418 answers == 0 (the simulator bans an IP that sends during a back-off, so this is also the
  exchange's verdict on the worker's back-off);
* requests during a pause == 0: after each 429 at time t with ``Retry-After`` R (R as the
  simulator computes it: the injected fault's, or the rest of the 1-second window of a real
  limit), no request logged before t + R;
* injected faults served >= the number planted, and real 429s with -1015 >= 1 and with -1003
  >= 1 (the bursts happened);
* duplicate bookings == 0 (never two orders with one client order id: an order of unknown
  outcome is looked up, not re-sent blindly) and intents with more than 3 attempts == 0;
* fills after the last burst > 0 (trading resumed), exchange trades missing from the FILLS
  stream == 0;
* intents not final at the end (including any left UNKNOWN) == 0;
* the worker's ``/health`` not CRITICAL at the end (OK, or DEGRADED while a last error is
  remembered);
* the exposure invariant (``stress.invariants``) over the exchange's trades: positions beyond
  ``maxPositionUsd`` at their trade price by more than one step == 0, reduce-only orders
  rejected (-2022) == 0; the worst position / limit is a figure.

Scale: full length 60 s of bursts, one every 4 s (15 bursts, the three kinds five times each);
scaled 60 s x scale, at least 8 s (three bursts, one of each kind, at the default 0.1). A burst
starts only once the previous one is over (its faults fired, its back-offs ended), so a slow
machine stretches the run rather than overlapping bursts; once the exchange bans the worker no
further burst is started (the run has failed, and would only wait). At 0.1 the whole scenario
takes some 15-20 s; at full length some 65-70 s, with 35 injected faults served, about 5 real
-1015 and 9 real -1003 answers, some 130 orders and 3 attempts for the partially filled intents.

What it found: the execution worker's dead-man refresh (every 15 s) regularly meets a weight
burst at full length. The exchange client admits a request through the limiter and then queues
it on its one HTTP thread; when the request ahead of it gets a 429, the queued one is still
sent, during the pause, and the exchange bans the IP (418). The fix belongs in
``BinanceFutures._request``: hold a lock from the limiter's admission to the answer (and the
pause it may start), so no request is admitted while another one's answer is pending.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    Direction,
    Fill,
    OrderIntent,
    OrderStatus,
    OrderUpdate,
    Signal,
)
from qtrader.exchange.binance import binance_fill_id
from qtrader.exchange.credentials import KEY_VARIABLE, SECRET_VARIABLE
from qtrader.execution.orders import DriverSettings
from qtrader.instruments import paper_exchange_info
from qtrader_tools.processes import Child
from qtrader_tools.redis_server import running_redis
from qtrader_tools.simulators.binance_futures import SimAdmin
from qtrader_tools.simulators.binance_futures.config import DEFAULT_RULES
from qtrader_tools.simulators.binance_futures.process import sim_process
from qtrader_tools.stress.flow_support import candle, now_ms, overall_status
from qtrader_tools.stress.harness import Rig, ScenarioFailure, policy_document
from qtrader_tools.stress.invariants import (
    ExposureLimits,
    check_exposure,
    from_sim_records,
    judge_exposure,
)
from qtrader_tools.stress.result import ScenarioResult
from qtrader_tools.stress.scenario import StressOptions
from qtrader_tools.stress.stream_audit import fills_out_of_venue_order

SYMBOL = "BTCUSDT"
START_PRICE = Decimal(30_000)
MAX_POSITION_USD = Decimal(1000)
MAX_OPEN_POSITIONS = 3  # the policy's default
KEY, SECRET = "stress-key", "stress-secret"
FULL_S = 60.0
MIN_S = 8.0
BURST_EVERY_S = 4.0
FEED_HZ = 2.0
TAIL_S = 3.0
INJECTED_RETRY_AFTER_S = 2
HANG_S = 2.0  # longer than the worker's timeout
WORKER_TIMEOUT_S = 1.0
UNKNOWN_GRACE_S = 1.0
TIGHT_WINDOW_MS = 1_000  # the 1-second limits switched on by the rate-limit bursts
LIMIT_HOLD_S = 1.5
FAULTS_TIMEOUT_S = 30.0
SETTLE_TIMEOUT_S = 45.0
MAX_ATTEMPTS = DriverSettings().max_attempts
FINAL = {s for s in OrderStatus if s.is_final}
ORDER_ROUTE = "POST /fapi/v1/order"
INJECTED: tuple[dict[str, Any], ...] = (
    {"route": "*", "kind": "http_429", "retry_after_s": INJECTED_RETRY_AFTER_S},
    {"route": ORDER_ROUTE, "kind": "internal_503"},
    {"route": ORDER_ROUTE, "kind": "unavailable_503"},
    {"route": ORDER_ROUTE, "kind": "html_502"},
    {"route": ORDER_ROUTE, "kind": "booked_then_503_unknown"},
    {"route": ORDER_ROUTE, "kind": "hang_before_booking", "hang_s": HANG_S},
    {"route": ORDER_ROUTE, "kind": "booked_then_hang", "hang_s": HANG_S},
)
ORDERS_PER_SECOND = {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 1, "limit": 1}
WEIGHT_PER_SECOND = {
    "rateLimitType": "REQUEST_WEIGHT",
    "interval": "SECOND",
    "intervalNum": 1,
    "limit": 6,  # two filled orders in one second (5 each for their trades) are too many
}
PARTIAL_RATIO, PARTIAL_ORDERS = "0.5", 2
BURSTS = ("injected", "orders -1015", "weight -1003")


def run(options: StressOptions, result: ScenarioResult) -> None:
    with _exchange(options.work_dir) as (sim_url, redis_url, admin):
        asyncio.run(_run(options, result, sim_url, redis_url, admin))


@contextmanager
def _exchange(work_dir: Path) -> Iterator[tuple[str, str, SimAdmin]]:
    """redis-server and the simulator process (a missing redis-server raises, with the hint)."""
    config = {"prices": {SYMBOL: str(START_PRICE)}, "api_keys": {KEY: SECRET}}
    with ExitStack() as stack:
        redis = stack.enter_context(running_redis(work_dir / "redis"))
        sim_url = stack.enter_context(sim_process(config, work_dir / "sim"))
        admin = stack.enter_context(SimAdmin(sim_url))
        yield sim_url, redis.url, admin


async def _run(
    options: StressOptions, result: ScenarioResult, sim_url: str, redis_url: str, admin: SimAdmin
) -> None:
    duration_s = options.scaled(FULL_S, minimum=MIN_S)
    bursts = max(len(BURSTS), round(duration_s / BURST_EVERY_S))
    result.figures.update({"bursts_planned": bursts, "burst_window_s": duration_s})
    async with Rig(options.work_dir) as rig:
        execution = await _start(rig, sim_url, redis_url)
        feed = rig.spawn_task(_feed(rig, sim_url), "feed")
        await _until_filled(rig, admin)
        options.say(f"exchange-instability: trading; {bursts} bursts over {duration_s:g} s")
        chaos = _Chaos(rig, admin, options)
        planted = await chaos.run(bursts, duration_s)
        result.figures.update(chaos.figures())
        await asyncio.sleep(TAIL_S)
        feed.cancel()
        await asyncio.gather(feed, return_exceptions=True)
        options.say("exchange-instability: bursts over; waiting for every intent to settle")
        intents, updates = await _settled(rig, execution)
        status = await _health_after(rig, execution)
        fills = await rig.read_stream(subjects.FILLS, subjects.all_of(subjects.FILL_PREFIX), Fill)
        log = await asyncio.to_thread(admin.log)
        orders = await asyncio.to_thread(admin.orders)
        trades = await asyncio.to_thread(admin.trades)
        _judge(
            result,
            _Evidence(log, orders, trades, intents, updates, fills, status, chaos.ended_ms),
            planted=planted,
        )


async def _start(rig: Rig, sim_url: str, redis_url: str) -> Child:
    policy = policy_document(
        "stress-exchange-instability",
        mode="testnet",
        symbols=[SYMBOL],
        risk={
            "minConfidence": 0.0,
            "maxPositionUsd": str(MAX_POSITION_USD),
            "maxSlippageBps": 100,
        },
    )
    await rig.publish_policy(policy)
    await rig.arm_without_control_plane()
    portfolio = rig.workload("portfolio")
    execution = rig.workload(
        "execution",
        "execution",
        *("--worker-id", "stress-exchange", "--exchange-url", sim_url, "--redis-url", redis_url),
        *("--exchange-timeout", str(WORKER_TIMEOUT_S), "--unknown-grace", str(UNKNOWN_GRACE_S)),
        # Every filled order's trades read over REST (weight 5), as the bursts were sized for:
        # with the user-data stream the weight limit of 6/s would never be met.
        "--no-user-stream",
        env={KEY_VARIABLE: KEY, SECRET_VARIABLE: SECRET},
    )
    await rig.wait_healthy([portfolio, execution])
    return execution


def _price(index: int) -> Decimal:
    """A small deterministic wander around the start price (well inside the slippage bound)."""
    return START_PRICE + Decimal(5) * ((index * 7) % 11)


async def _feed(rig: Rig, sim_url: str) -> None:
    """Move the exchange's price, publish the matching candle and a LONG/SHORT signal."""
    with SimAdmin(sim_url) as admin:  # its own client: the scenario's calls run meanwhile
        index = 0
        while True:
            price = _price(index)
            await asyncio.to_thread(admin.price, SYMBOL, price)
            await rig.bus.publish(subjects.candle_subject(SYMBOL), candle(SYMBOL, price, index))
            created = now_ms()
            signal = Signal(
                signal_id=f"instability-{index}",
                symbol=SYMBOL,
                direction=Direction.LONG if index % 2 == 0 else Direction.SHORT,
                confidence=0.9,
                model_version="stress-instability",
                candle_open_time_ms=created - created % 60_000,
                price=price,
                created_at_ms=created,
            )
            await rig.bus.publish(subjects.signal_subject(SYMBOL), signal)
            index += 1
            await asyncio.sleep(1 / FEED_HZ)


async def _until_filled(rig: Rig, admin: SimAdmin) -> None:
    async def filled() -> bool:
        orders = await asyncio.to_thread(admin.orders)
        return any(o["status"] == "FILLED" for o in orders)

    await rig.until(filled, timeout_s=60.0, what="a first order filled at the exchange")


class _Chaos:
    """Runs the bursts in turn, each once the previous one is over; remembers what it did."""

    def __init__(self, rig: Rig, admin: SimAdmin, options: StressOptions) -> None:
        self._rig = rig
        self._admin = admin
        self._options = options
        self._done: Counter[str] = Counter()
        self._fired: Counter[str] = Counter()
        self.ended_ms = 0

    async def run(self, bursts: int, duration_s: float) -> int:
        """Run ``bursts`` bursts over about ``duration_s``; the injected faults planted."""
        started = time.monotonic()
        planted = 0
        for number in range(bursts):
            await _sleep_until(started + number * duration_s / bursts)
            if await self._banned():
                self._options.say("exchange-instability: the worker is banned; no more bursts")
                break
            kind = BURSTS[number % len(BURSTS)]
            self._options.say(f"exchange-instability: burst {number + 1}/{bursts}: {kind}")
            if kind == "injected":
                planted += await self._injected()
            else:
                rule = ORDERS_PER_SECOND if kind == "orders -1015" else WEIGHT_PER_SECOND
                await self._tight_limit(rule)
            self._done[kind] += 1
            self._rig.check()
        self.ended_ms = now_ms()
        return planted

    async def _injected(self) -> int:
        faults = [{**fault, "next": 1} for fault in INJECTED]
        # Partial fills too: an intent's remainder goes out as further attempts (own ids), which
        # is what the attempts-per-intent check is about.
        await asyncio.to_thread(self._admin.partial, SYMBOL, PARTIAL_RATIO, PARTIAL_ORDERS)
        await asyncio.to_thread(self._admin.faults, faults)

        async def all_fired() -> bool:
            listed = await asyncio.to_thread(self._admin.get_faults)
            return all(f["fired"] >= f["next"] for f in listed) or await self._banned()

        try:
            await self._rig.until(all_fired, timeout_s=FAULTS_TIMEOUT_S, what="the faults fired")
        except ScenarioFailure:
            self._options.say("exchange-instability: not every fault fired; going on")
        for fault in await asyncio.to_thread(self._admin.get_faults):
            self._fired[fault["kind"]] += fault["fired"]
        await asyncio.to_thread(self._admin.faults, [])
        await self._after_backoffs()
        return len(faults)

    async def _tight_limit(self, rule: Mapping[str, Any]) -> None:
        """Switch a 1-second limit on for a moment; off again once every back-off is over
        (changing the limits resets the exchange's counters and back-offs)."""
        rules = [r.as_binance() for r in DEFAULT_RULES]
        since = len(await asyncio.to_thread(self._admin.log))
        await asyncio.to_thread(lambda: self._admin.config(rate_limits=[*rules, dict(rule)]))
        await asyncio.sleep(LIMIT_HOLD_S)
        await self._quiet_moment(since)
        await asyncio.to_thread(lambda: self._admin.config(rate_limits=rules))

    async def _quiet_moment(self, since: int) -> None:
        """Until the window of the latest 429 since log entry ``since`` is over: the exchange's
        back-off has ended, and the worker's (Retry-After from its own receipt) has not, so no
        new 429 can come. Switching the limit off (which resets the exchange's back-offs) then
        cuts no back-off short."""

        async def quiet() -> bool:
            entries = await asyncio.to_thread(self._admin.log, since)
            last = max((int(e["t_ms"]) for e in entries if e.get("status") == 429), default=0)
            return now_ms() > (last // TIGHT_WINDOW_MS + 1) * TIGHT_WINDOW_MS + 20

        try:
            await self._rig.until(
                quiet, timeout_s=10.0, what="a moment without back-off", interval_s=0.05
            )
        except ScenarioFailure:
            self._options.say("exchange-instability: no quiet moment; switching the limit off")

    async def _after_backoffs(self) -> None:
        """Until the exchange has no back-off in force for any IP."""

        async def clear() -> bool:
            windows = await asyncio.to_thread(self._admin.windows)
            now = now_ms()
            return all(ip["backoff_until_ms"] <= now for ip in windows["ips"].values())

        await self._rig.until(clear, timeout_s=FAULTS_TIMEOUT_S, what="the back-offs to end")

    async def _banned(self) -> bool:
        """Whether the exchange bans an IP now (the run has failed; bursts would only wait)."""
        windows = await asyncio.to_thread(self._admin.windows)
        now = now_ms()
        return any(ip["ban_until_ms"] > now for ip in windows["ips"].values())

    def figures(self) -> dict[str, Any]:
        return {
            "bursts_run": dict(self._done),
            "injected_faults_fired_by_kind": dict(self._fired),
        }


async def _sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def _settled(rig: Rig, execution: Child) -> tuple[list[OrderIntent], list[OrderUpdate]]:
    """The ORDERS stream once the worker has no signal left to decide and every intent's
    latest update is final, twice in a row with no new intent (or after the timeout). Signals
    queued when the feed stopped are still decided, and their orders sent: judged before
    they are, the exchange's trades would show orders the streams read back do not."""
    found: list[tuple[list[OrderIntent], list[OrderUpdate]]] = []

    async def settled() -> bool:
        queued = await rig.metric(execution, "qtrader_signal_queue_depth")
        intents = await rig.read_stream(
            subjects.ORDERS, subjects.all_of(subjects.ORDER_INTENT_PREFIX), OrderIntent
        )
        updates = await rig.read_stream(
            subjects.ORDERS, subjects.all_of(subjects.ORDER_UPDATE_PREFIX), OrderUpdate
        )
        same = bool(found) and len(found[-1][0]) == len(intents)
        found.append((intents, updates))
        return queued == 0 and same and audit_intents(intents, updates).not_final == 0

    try:
        await rig.until(
            settled, timeout_s=SETTLE_TIMEOUT_S, what="every intent final", interval_s=1
        )
    except ScenarioFailure:
        if not found:
            raise
    return found[-1]


async def _health_after(rig: Rig, execution: Child) -> str:
    """The worker's /health status once it is not CRITICAL (or the last one seen)."""
    seen: list[str] = []

    async def recovered() -> bool:
        seen.append(overall_status(await rig.health(execution)))
        return seen[-1] != "CRITICAL"

    try:
        await rig.until(recovered, timeout_s=15.0, what="/health not CRITICAL", interval_s=0.5)
    except ScenarioFailure:
        if not seen:
            raise
    return seen[-1]


# --- the audits: pure functions of what the servers recorded --------------------------------


@dataclass(frozen=True)
class PauseAudit:
    rate_limited: int  # 429 answers
    by_code: dict[str, int]
    during_pauses: int  # requests logged before a 429's Retry-After had passed
    examples: tuple[str, ...]


def retry_after_s(entry: Mapping[str, Any], *, injected_s: int, window_ms: int) -> int:
    """The ``Retry-After`` the simulator sent with a 429: the injected fault's, or the rest of
    the (fixed, epoch-aligned) window of the limit that refused the request."""
    if entry.get("fault") == "http_429":
        return injected_s
    t_ms = int(entry["t_ms"])
    window_end = (t_ms // window_ms + 1) * window_ms
    return max(1, math.ceil((window_end - t_ms) / 1000))


def audit_pauses(
    log: Sequence[Mapping[str, Any]], *, injected_s: int, window_ms: int
) -> PauseAudit:
    """Every request the simulator logged after a 429 and before its Retry-After ran out."""
    limited = [(i, e) for i, e in enumerate(log) if e.get("status") == 429]
    codes = Counter(str(e.get("code")) for _, e in limited)
    violations: list[str] = []
    for index, entry in limited:
        until = int(entry["t_ms"]) + 1000 * retry_after_s(
            entry, injected_s=injected_s, window_ms=window_ms
        )
        for later in log[index + 1 :]:
            if int(later["t_ms"]) >= until:
                break
            violations.append(
                f"{later['method']} {later['path']} at {later['t_ms']}, "
                f"{until - int(later['t_ms'])} ms before the pause after the 429 to "
                f"{entry['method']} {entry['path']} at {entry['t_ms']} ended"
            )
    return PauseAudit(len(limited), dict(codes), len(violations), tuple(violations[:5]))


@dataclass(frozen=True)
class BookAudit:
    orders: int
    filled: int
    duplicate_bookings: int  # orders booked under a client order id already booked
    intents: int  # distinct intents (client order id stems) at the exchange
    most_attempts: int
    over_max_attempts: int


def audit_book(orders: Sequence[Mapping[str, Any]], *, max_attempts: int) -> BookAudit:
    """Orders per client order id and per intent (the first 32 characters every attempt's id
    shares, see ``decisions.attempt_client_order_id``)."""
    per_id = Counter(str(o["clientOrderId"]) for o in orders)
    attempts: dict[str, set[str]] = {}
    for client_id in per_id:
        attempts.setdefault(client_id[:32], set()).add(client_id)
    most = max((len(ids) for ids in attempts.values()), default=0)
    return BookAudit(
        orders=len(orders),
        filled=sum(1 for o in orders if o["status"] == "FILLED"),
        duplicate_bookings=sum(n - 1 for n in per_id.values()),
        intents=len(attempts),
        most_attempts=most,
        over_max_attempts=sum(1 for ids in attempts.values() if len(ids) > max_attempts),
    )


@dataclass(frozen=True)
class IntentAudit:
    intents: int
    final: int
    not_final: int  # latest update not final, or none at all (UNKNOWN left included)
    unknown_left: int
    unknown_resolved: int  # went through UNKNOWN, ended final
    by_status: dict[str, int]


def audit_intents(intents: Sequence[OrderIntent], updates: Sequence[OrderUpdate]) -> IntentAudit:
    """Each intent's latest update (stream order) and whether it passed through UNKNOWN."""
    latest: dict[str, OrderStatus] = {}
    went_unknown: set[str] = set()
    for update in updates:
        latest[update.intent_id] = update.status
        if update.status is OrderStatus.UNKNOWN:
            went_unknown.add(update.intent_id)
    ids = {intent.intent_id for intent in intents}
    final = {i for i in ids if latest.get(i) in FINAL}
    unknown_left = {i for i in ids if latest.get(i) is OrderStatus.UNKNOWN}
    return IntentAudit(
        intents=len(ids),
        final=len(final),
        not_final=len(ids - final),
        unknown_left=len(unknown_left),
        unknown_resolved=len(went_unknown & final),
        by_status=dict(Counter(latest[i].value for i in ids if i in latest)),
    )


@dataclass(frozen=True)
class _Evidence:
    log: list[dict[str, Any]]
    orders: list[dict[str, Any]]
    trades: list[dict[str, Any]]
    intents: list[OrderIntent]
    updates: list[OrderUpdate]
    fills: list[Fill]
    health: str
    bursts_ended_ms: int


def _judge(result: ScenarioResult, evidence: _Evidence, *, planted: int) -> None:
    log = evidence.log
    pauses = audit_pauses(log, injected_s=INJECTED_RETRY_AFTER_S, window_ms=TIGHT_WINDOW_MS)
    book = audit_book(evidence.orders, max_attempts=MAX_ATTEMPTS)
    intents = audit_intents(evidence.intents, evidence.updates)
    served = Counter(str(e["fault"]) for e in log if e.get("fault"))
    bans = sum(1 for e in log if e.get("status") == 418)
    venue_ids = {binance_fill_id(t["symbol"], t["id"]): int(t["id"]) for t in evidence.trades}
    missing_ids = venue_ids.keys() - {f.fill_id for f in evidence.fills}
    missing = len(missing_ids)
    result.figures["trades_missing_from_fills"] = [
        t for t in evidence.trades if binance_fill_id(t["symbol"], t["id"]) in missing_ids
    ]
    after = sum(1 for t in evidence.trades if int(t["time"]) > evidence.bursts_ended_ms)
    result.figures.update(
        {
            "requests": len(log),
            "answers_by_status": dict(Counter(str(e.get("status")) for e in log)),
            "error_answers": dict(
                Counter(
                    f"{e['method']} {e['path']} {e.get('status')} {e.get('code')}"
                    for e in log
                    if e.get("status") != 200
                )
            ),
            "injected_faults_served": dict(served),
            "rate_limited_by_code": pauses.by_code,
            "requests_during_pauses_examples": list(pauses.examples),
            "orders_booked": book.orders,
            "orders_filled": book.filled,
            "intents_at_exchange": book.intents,
            "most_attempts_of_one_intent": book.most_attempts,
            "intents": intents.intents,
            "intents_by_final_status": intents.by_status,
            "unknown_resolved": intents.unknown_resolved,
            "unknown_left": intents.unknown_left,
            "trades": len(evidence.trades),
            "fills_in_stream": len(evidence.fills),
            "trades_after_bursts": after,
            "health_at_end": evidence.health,
        }
    )
    result.check("418 answers (bans)", bans, "==", 0)
    result.check("requests during a Retry-After pause", pauses.during_pauses, "==", 0)
    result.check("injected faults served", sum(served.values()), ">=", planted)
    result.check("real 429 -1015 answers", pauses.by_code.get("-1015", 0), ">=", 1)
    real_1003 = sum(
        1 for e in log if e.get("status") == 429 and e.get("code") == -1003 and not e.get("fault")
    )
    result.figures["real_429_1003"] = real_1003
    result.check("real 429 -1003 answers", real_1003, ">=", 1)
    result.check("duplicate bookings of one client order id", book.duplicate_bookings, "==", 0)
    result.check(f"intents with more than {MAX_ATTEMPTS} attempts", book.over_max_attempts, "==", 0)
    result.check("fills after the last burst", after, ">", 0)
    result.check("exchange trades missing from FILLS", missing, "==", 0)
    late = fills_out_of_venue_order(evidence.fills, evidence.updates, venue_ids)
    result.check("fills on FILLS after a later fill of their worker at the venue", late, "==", 0)
    result.check("intents not final (UNKNOWN left included)", intents.not_final, "==", 0)
    result.check("/health CRITICAL at the end", int(evidence.health == "CRITICAL"), "==", 0)
    _judge_exposure(result, evidence)


def _judge_exposure(result: ScenarioResult, evidence: _Evidence) -> None:
    """Safety invariant 1, replayed from the exchange's own trades (``stress.invariants``)."""
    trades, rejections = from_sim_records(
        trades=evidence.trades, orders=evidence.orders, log=evidence.log
    )
    limits = ExposureLimits(
        max_position_usd=MAX_POSITION_USD,
        max_open_positions=MAX_OPEN_POSITIONS,
        step_sizes={SYMBOL: paper_exchange_info().instrument(SYMBOL).step_size},
    )
    judge_exposure(result, check_exposure(trades=trades, rejections=rejections, limits=limits))
