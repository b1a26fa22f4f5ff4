"""Signal flood: 50 signals a second into a real execution worker with a small intake.

What it does: a real ``qtrader execution`` worker in paper mode (``--cycle 0.25``), with a real
portfolio for its equity, an ACTIVE latch and heartbeats, runs a policy whose intake holds 50
signals and decides at most 5 per cycle: at most 20 decisions a second against 50 arriving.
Candles for both symbols are published every half second so prices stay fresh, and warm-up
signals (confidence 0.5, not "high") are sent until one becomes an intent (the worker trades
before anything is timed).
Then signals arrive at 50 a second, LONG/SHORT/FLAT on BTCUSDT and ETHUSDT, with confidences
from a fixed seed: one in ten is *high* (0.6-1.0), the rest *low* (0.0-0.5).

Why that mix: the high signals arrive at 5 a second, a quarter of what the worker decides, and
a cycle takes the highest first, so they never pile up; the queue is full of low signals all
the time. A queue that drops the lowest confidence therefore never drops a high signal and
decides every one of them, while a queue that drops the newest or the oldest (FIFO) drops
about 60% of them. That makes "drops by lowest confidence" a check with an exact answer that
does not depend on timing: high signals dropped == 0 and high signals decided == high signals
published. Within the low ones the worker's ordering shows as a lower mean confidence of what
it dropped than of what it decided.

What is measured, all from the worker's ``/metrics`` and the SIGNALS stream, never from the
scenario's own counts: the intake's high-water mark and depth gauges; the new histograms
``qtrader_signal_intake_confidence{outcome}`` (decided, or the drop reason) and
``qtrader_signal_decision_latency_seconds`` (signal creation -> decision), differenced against
a scrape taken just before the flood so the warm-up does not count; and the signals stored in
the SIGNALS stream (the published count and each one's confidence).

Criteria: max queue depth (high-water) <= queueSize (50); high-confidence signals dropped as
queue_full == 0; high-confidence signals decided == high-confidence signals in the stream;
queue_full drops > 0 (otherwise the flood did not flood); mean confidence decided > mean
confidence dropped as queue_full; every signal accounted for: decided + dropped + still queued
== signals in the stream (difference 0); p99 decision latency <= 2.5 s. The p99 and p50 are
bounded from the histogram's buckets (the upper edge of the bucket holding that rank), so they
are upper bounds.

Why the policy's ttl is 2 s: in a queue that takes the highest confidence first, a low signal
can wait as long as higher ones keep arriving; what bounds its wait is the ttl (an expired
signal is dropped, never decided). With the default 30 s ttl the p99 of decided signals is
some 10-25 s in a 60 s flood. The flood sets it to 2 s, under the 2.5 s the queue takes to
turn over (50 signals at 20 decisions a second), so p99 <= 2.5 s checks that expiry and the
decision loop keep up under the flood: nothing decided later than the ttl plus some slack.

Scale: full length 60 s of flood (3,000 signals); scaled 60 s x scale, at least 6 s (300
signals at the default 0.1, some 12 s in all). A full-length run on a shared 2-core machine:
1,201 decided, 639 dropped as queue_full and 1,161 expired, all 311 high signals decided, high
water 50, p50 <= 0.25 s and p99 <= 2 s.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from decimal import Decimal

from qtrader.contracts import subjects
from qtrader.contracts.messages import Direction, Signal
from qtrader_tools.metrics import Histogram, Sample, histogram, total
from qtrader_tools.processes import Child
from qtrader_tools.stress.flow_support import candle, now_ms
from qtrader_tools.stress.harness import Rig, ScenarioFailure, policy_document
from qtrader_tools.stress.result import ScenarioResult
from qtrader_tools.stress.scenario import StressOptions

RATE_HZ = 50.0
FULL_S = 60.0
MIN_S = 6.0
QUEUE_SIZE = 50
MAX_PER_CYCLE = 5
CYCLE_S = 0.25
HIGH_SHARE = 0.1
HIGH_RANGE = (0.6, 1.0)
LOW_RANGE = (0.0, 0.5)
HIGH_EDGE = 0.5  # a bucket edge of qtrader_signal_intake_confidence: above it is "high"
# Not "high": a warm-up signal may expire while the worker is still starting.
WARMUP_CONFIDENCE = HIGH_EDGE
TTL_S = 2.0
P99_LIMIT_S = 2.5  # a bucket edge of the latency histogram
CANDLE_EVERY_S = 0.5
DRAIN_TIMEOUT_S = 60.0
SEED = 50
PRICES = {"BTCUSDT": Decimal(30_000), "ETHUSDT": Decimal(2_000)}
CONFIDENCE = "qtrader_signal_intake_confidence"
LATENCY = "qtrader_signal_decision_latency_seconds"


def run(options: StressOptions, result: ScenarioResult) -> None:
    asyncio.run(_run(options, result))


async def _run(options: StressOptions, result: ScenarioResult) -> None:
    duration_s = options.scaled(FULL_S, minimum=MIN_S)
    result.figures["flood_s"] = duration_s
    async with Rig(options.work_dir) as rig:
        execution = await _start(rig)
        options.say("signal-flood: workers up; warming up")
        feed = _Feed(rig)
        rig.spawn_task(feed.candles_forever(), "candles")
        await _warm_up(rig, execution, feed)
        before = await rig.scrape(execution)
        options.say(f"signal-flood: flooding at {RATE_HZ:g}/s for {duration_s:g} s")
        sent, elapsed_s = await feed.flood(duration_s)
        result.figures["flood_signals_sent"] = sent
        result.figures["flood_rate_achieved_hz"] = round(sent / elapsed_s, 1)
        stored = await rig.read_stream(
            subjects.SIGNALS, subjects.all_of(subjects.SIGNAL_PREFIX), Signal
        )
        after = await _drained(rig, execution, len(stored))
        _judge(result, stored, before, after)
        await rig.judge_exposure(result)


async def _start(rig: Rig) -> Child:
    policy = policy_document(
        "stress-signal-flood",
        symbols=sorted(PRICES),
        risk={"minConfidence": 0.0, "maxSlippageBps": 100},
        signals={"queueSize": QUEUE_SIZE, "maxPerCycle": MAX_PER_CYCLE, "ttlSeconds": TTL_S},
    )
    await rig.publish_policy(policy)
    await rig.arm_without_control_plane()
    portfolio = rig.workload("portfolio")
    execution = rig.workload("execution", "execution", "--cycle", str(CYCLE_S))
    await rig.wait_healthy([portfolio, execution])
    return execution


async def _warm_up(rig: Rig, execution: Child, feed: _Feed) -> None:
    """A LONG signal every half second until one became an intent: equity, prices and the
    venue are there (a signal sent earlier may expire while the worker is still starting)."""

    async def trading() -> bool:
        samples = await rig.scrape(execution)
        if total(samples, "qtrader_order_intents_total") >= 1:
            return True
        await feed.signal(confidence=WARMUP_CONFIDENCE, direction=Direction.LONG)
        return False

    await rig.until(
        trading, timeout_s=60.0, what="the execution worker's first intent", interval_s=0.5
    )


@dataclass
class _Feed:
    """The market and the model, stand-ins: candles on a clock, signals on demand."""

    rig: Rig

    def __post_init__(self) -> None:
        self._rng = random.Random(SEED)
        self._index = 0

    async def candles_forever(self) -> None:
        index = 0
        while True:
            for symbol, price in PRICES.items():
                await self.rig.bus.publish(
                    subjects.candle_subject(symbol), candle(symbol, price, index)
                )
            index += 1
            await asyncio.sleep(CANDLE_EVERY_S)

    async def signal(self, *, confidence: float, direction: Direction | None = None) -> None:
        symbol = self._rng.choice(sorted(PRICES))
        created = now_ms()
        signal = Signal(
            signal_id=f"flood-{self._index}",
            symbol=symbol,
            direction=direction or self._rng.choice(list(Direction)),
            confidence=confidence,
            model_version="stress-flood",
            candle_open_time_ms=created - created % 60_000,
            price=PRICES[symbol],
            created_at_ms=created,
        )
        self._index += 1
        await self.rig.bus.publish(subjects.signal_subject(symbol), signal)

    async def flood(self, duration_s: float) -> tuple[int, float]:
        """Signals at ``RATE_HZ`` on an absolute schedule for ``duration_s``; how many were
        sent and in how many seconds (a slow publisher shows as a lower rate)."""
        count = round(duration_s * RATE_HZ)
        started = time.monotonic()
        for number in range(count):
            high = self._rng.random() < HIGH_SHARE
            low_end, high_end = HIGH_RANGE if high else LOW_RANGE
            confidence = round(self._rng.uniform(low_end, high_end), 4)
            if not high:
                confidence = min(confidence, 0.4999)  # "low" stays at or below the edge
            await self.signal(confidence=confidence)
            self.rig.check()
            delay = started + (number + 1) / RATE_HZ - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        return count, time.monotonic() - started


async def _drained(rig: Rig, execution: Child, published: int) -> list[Sample]:
    """The worker's metrics once every stored signal is decided or dropped (queue empty)."""
    found: list[list[Sample]] = []

    async def accounted() -> bool:
        samples = await rig.scrape(execution)
        found.append(samples)
        done = _decided(samples) + _dropped(samples)
        return done >= published and total(samples, "qtrader_signal_queue_depth") == 0

    try:
        await rig.until(
            accounted, timeout_s=DRAIN_TIMEOUT_S, what="every signal decided or dropped"
        )
    except ScenarioFailure:
        if not found:
            raise  # nothing scraped at all: no figure to judge
    return found[-1]  # on a timeout the criteria show what is missing


def _decided(samples: list[Sample]) -> float:
    return histogram(samples, CONFIDENCE, outcome="decided").count


def _drop_histograms(samples: list[Sample]) -> dict[str, Histogram]:
    """The confidence histogram of each drop reason the worker has observed."""
    reasons = {
        s.labels["outcome"]
        for s in samples
        if s.name == f"{CONFIDENCE}_count" and s.labels.get("outcome") != "decided"
    }
    return {reason: histogram(samples, CONFIDENCE, outcome=reason) for reason in sorted(reasons)}


def _dropped(samples: list[Sample]) -> float:
    return sum(
        s.value
        for s in samples
        if s.name == f"{CONFIDENCE}_count" and s.labels.get("outcome") != "decided"
    )


def _judge(
    result: ScenarioResult, stored: list[Signal], before: list[Sample], after: list[Sample]
) -> None:
    figures = result.figures
    published = len(stored)
    high_published = sum(1 for s in stored if s.confidence > HIGH_EDGE)
    decided = histogram(after, CONFIDENCE, outcome="decided")
    queue_full = histogram(after, CONFIDENCE, outcome="queue_full")
    dropped = _dropped(after)
    queued = total(after, "qtrader_signal_queue_depth")
    high_water = total(after, "qtrader_signal_queue_high_water")
    latency = histogram(after, LATENCY).minus(histogram(before, LATENCY))
    p50, p99 = latency.quantile(0.5), latency.quantile(0.99)
    figures.update(
        {
            "signals_in_stream": published,
            "high_confidence_in_stream": high_published,
            "decided": decided.count,
            "dropped_queue_full": queue_full.count,
            "dropped_expired": histogram(after, CONFIDENCE, outcome="expired").count,
            "dropped_total": dropped,
            "still_queued": queued,
            "queue_high_water": high_water,
            "queue_capacity": total(after, "qtrader_signal_queue_capacity"),
            "mean_confidence_decided": _rounded(decided.mean),
            "mean_confidence_dropped_queue_full": _rounded(queue_full.mean),
            "decision_latency_flood_decisions": latency.count,
            "decision_latency_p50_s_at_most": p50,
            "decision_latency_p99_s_at_most": p99,
            "decision_latency_mean_s": _rounded(latency.mean),
        }
    )
    result.check("max queue depth (high-water)", high_water, "<=", QUEUE_SIZE)
    result.check("signals dropped as queue_full", queue_full.count, ">", 0)
    figures["high_confidence_dropped_by_reason"] = {
        reason: h.above(HIGH_EDGE) for reason, h in _drop_histograms(after).items()
    }
    high_full = queue_full.above(HIGH_EDGE) if queue_full.count else 0.0
    result.check("high-confidence signals dropped as queue_full", high_full, "==", 0)
    high_decided = decided.above(HIGH_EDGE) if decided.count else 0.0
    result.check("high-confidence decided minus published", high_decided - high_published, "==", 0)
    gap = None
    if decided.mean is not None and queue_full.mean is not None:
        gap = decided.mean - queue_full.mean
    result.check("mean confidence decided minus dropped", gap, ">", 0)
    unaccounted = published - (decided.count + dropped + queued)
    result.check("signals unaccounted (stream - decided - dropped - queued)", unaccounted, "==", 0)
    result.check("p99 decision latency (upper bound)", p99, "<=", P99_LIMIT_S, "s")


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
