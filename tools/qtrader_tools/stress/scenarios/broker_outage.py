"""Broker outage: NATS goes down while the whole pipeline trades; nothing is lost, nothing doubled.

Three scenarios share this run, each with its own fault (``BrokerFault``): ``broker-outage``
stops the server (SIGTERM) and starts it again on the same store; ``broker-kill`` kills it
(SIGKILL: no clean shutdown of its store); ``broker-hang`` freezes it (SIGSTOP), then lets it go
on (SIGCONT): the process, its store and every TCP connection stay, the server only stops
answering, which is what a stalled broker or a half-open connection looks like to a client.
The hang is applied several times (5, 20 and 60 s at full length), and each time every worker
must publish and consume again within ``HANG_RECOVERY_S`` of the SIGCONT. ``disk-full`` is the
outage with every worker's outbox on one small tmpfs (``SMALL_DISK_BYTES``), which fills while
NATS is down: the workers must hold back (nothing dies, nothing is dropped), say so in
``/health``, and drain it once NATS is back (it needs root, to mount the tmpfs).

What runs: the four workloads as real processes on the rig's nats-server, in paper mode:
marketdata (synthetic candles for two symbols, ``CANDLES_PER_SECOND`` steps a second, a fixed
number of steps), inference (the shipped ONNX model), execution and the portfolio, with a policy
whose ``minConfidence`` is 0 so every signal can become an order, and an ACTIVE latch with
heartbeats. Once orders are filling, the nats-server is stopped for the outage while every
worker keeps running (what they publish goes to their disk outboxes), then started again on the
same store directory and port. The feed goes on after the restart and then ends by itself (its
step count), the pipeline drains, and every stream is read back from the server.

Criteria, and why each:

* ``events lost == 0``: candles (per symbol, every open time from the first to the last stored,
  and marketdata's own published count equal to what is stored), signals (one per candle from
  the first full model window on), orders (every intent has a final update) and fills (each
  intent's filled quantity in its updates equals its fills on FILLS). This is requirement 1.
* ``duplicates == 0``: by each message's natural id, per stream: the outbox replays with the
  original ``Nats-Msg-Id``, so a message that reached the stream before its ack was lost must
  not be there twice.
* ``out of order == 0``: per symbol, candle (and signal) times strictly increasing in stream
  order; per intent, its updates in a legal state order; per execution worker and symbol, its
  fills in the order the paper exchange made them. "Replayed in order" is the point.
* ``messages without their cause == 0``: signals for no candle, updates of no intent, fills of
  no order. A count that goes up on both sides would hide a loss.
* ``outbox buffered during the outage > 0`` (``qtrader_outbox_buffered_total``): proves the
  outage hit while the workers were producing; without it the zeros above prove nothing.
* ``orders filled after NATS returned > 0``: trading resumed, from the FILLS stream.
* ``portfolio vs exact account == 0`` mismatches: the final snapshot against an independent
  ``Fraction`` account of the FILLS stream (``qtrader_tools.exact``), marked at each symbol's
  last stored close: realized and unrealized PnL, fees and equity to the cent, positions
  exactly.
* ``slowest recovery after a hang <= HANG_RECOVERY_S`` (``broker-hang``): from the SIGCONT
  until the rig pings the server, marketdata has published and inference consumed again, and
  every outbox is empty (the other faults report this time as a figure).
* ``outbox disk errors > 0`` (``disk-full``, ``qtrader_outbox_disk_errors_total``): the disk
  did fill while the workers produced; without it the zeros above prove nothing about it. A
  worker that died on it fails the run at once (the rig checks its processes throughout).
* ``workers whose /health recovered == 4``: every check OK again, or in the state it was in
  while trading before the outage (a DEGRADED that has nothing to do with NATS, such as a
  model served without calibration figures, is not the outage's doing; it is in the figures);
  marketdata's own feed reports DEGRADED once its fixed run has ended, by design.

Figures: events per stream, the outage's length, the deepest outbox seen, the time to drain
after the restart, what each worker buffered.

Length: the outage is 60 s at full length (``qtrader stress --scale 1``: marketdata buffers
about 2,400 candles, execution halts itself after its 10 s heartbeat timeout and resumes; about
80 s in all), ``60 x scale`` scaled, at least ``MIN_OUTAGE_S``: 6 s at the default 0.1 (about
30 s in all, most of it the feed's fixed run of ``LEAD_STEPS`` plus the outage plus
``TRAIL_S``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path

from qtrader.bus.errors import BusUnavailable
from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    Candle,
    Fill,
    OrderIntent,
    OrderUpdate,
    PortfolioSnapshot,
    Signal,
)
from qtrader.contracts.policy import TradingPolicy
from qtrader.inference.features import WINDOW
from qtrader.local.nats_server import EmbeddedNats
from qtrader_tools.exact import last_closes, ledger_mismatches
from qtrader_tools.processes import Child
from qtrader_tools.stress.harness import Rig, ScenarioFailure, policy_document
from qtrader_tools.stress.invariants import (
    check_exposure,
    from_paper_fills,
    judge_exposure,
    paper_limits,
)
from qtrader_tools.stress.probes import family_total
from qtrader_tools.stress.result import ScenarioResult
from qtrader_tools.stress.scenario import StressOptions
from qtrader_tools.stress.stream_audit import (
    CandleAudit,
    OrderAudit,
    SignalAudit,
    audit_candles,
    audit_orders,
    audit_signals,
    fills_out_of_venue_order,
    paper_fill_order,
)

SYMBOLS = ("BTCUSDT", "ETHUSDT")
CAPITAL = Decimal(10_000)
CANDLES_PER_SECOND = 20.0  # marketdata steps a second (a candle of each symbol per step)
FULL_OUTAGE_S = 60.0
MIN_OUTAGE_S = 4.0
LEAD_STEPS = 80  # steps allowed before the first fill; the outage starts at that fill
TRAIL_S = 3.0  # feed time left after the restart, at least (trading goes on)
START_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 90.0
# The intents consumer's ack wait (30 s) and time to settle after it.
INTENT_REDELIVERY_S = subjects.EXECUTION_INTENTS.ack_wait_s + 15.0
QUIET_ROUNDS = 6  # metric rounds (POLL_S apart) with nothing new: the pipeline has drained
POLL_S = 0.25

FULL_HANGS_S = (5.0, 20.0, 60.0)
MIN_HANG_S = 5.0
HANG_RECOVERY_S = 10.0  # the requirement: publishing and consuming again within 10 s
# The outboxes' disk in disk-full: four outboxes' files (a 32 KiB shared-memory file each) and
# room for a few hundred candles, so it fills within the shortest outage.
SMALL_DISK_BYTES = 384 * 1024

DEPTH = "qtrader_outbox_depth"
DISK_ERRORS = "qtrader_outbox_disk_errors_total"
BUFFERED = "qtrader_outbox_buffered_total"


def pipeline_policy(name: str = "stress-broker-outage") -> TradingPolicy:
    return policy_document(
        name,
        symbols=list(SYMBOLS),
        # Every signal the model makes may become an order, so orders flow through the outage.
        risk={"minConfidence": 0.0, "maxPositionUsd": "1000", "maxOpenPositions": 2},
        paper={"initialCapitalUsd": str(CAPITAL), "feeBps": "4", "slippageBps": "2"},
    )


class BrokerFault(enum.Enum):
    STOP = "stop"  # SIGTERM, started again on the same store and port
    KILL = "kill"  # SIGKILL, started again on the same store and port
    HANG = "hang"  # SIGSTOP, then SIGCONT: nothing restarts, the server just stops answering

    def begin(self, nats: EmbeddedNats) -> None:
        if self is BrokerFault.HANG:
            os.kill(_pid(nats), signal.SIGSTOP)
        else:
            nats.stop(kill=self is BrokerFault.KILL)

    def end(self, nats: EmbeddedNats) -> None:
        if self is BrokerFault.HANG:
            os.kill(_pid(nats), signal.SIGCONT)
        else:
            nats.start()

    def durations_s(self, options: StressOptions) -> list[float]:
        if self is BrokerFault.HANG:
            return sorted({options.scaled(full, minimum=MIN_HANG_S) for full in FULL_HANGS_S})
        return [options.scaled(FULL_OUTAGE_S, minimum=MIN_OUTAGE_S)]


def _pid(nats: EmbeddedNats) -> int:
    if nats.pid is None:
        raise ScenarioFailure("the nats-server is not running")
    return nats.pid


def run(options: StressOptions, result: ScenarioResult) -> None:
    asyncio.run(_run(options, result, BrokerFault.STOP))


def run_with(options: StressOptions, result: ScenarioResult, fault: BrokerFault) -> None:
    asyncio.run(_run(options, result, fault))


def run_disk_full(options: StressOptions, result: ScenarioResult) -> None:
    disk = options.work_dir / "outbox-disk"
    with small_disk(disk, SMALL_DISK_BYTES):
        asyncio.run(_run(options, result, BrokerFault.STOP, outbox_dir=disk))


@contextlib.contextmanager
def small_disk(path: Path, size_bytes: int) -> Iterator[None]:
    """A tmpfs of ``size_bytes`` mounted at ``path`` (root only), unmounted on the way out."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        raise ScenarioFailure(f"cannot mount a small disk (root needed): {mounted.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@dataclass(frozen=True, kw_only=True)
class Pipeline:
    marketdata: Child
    inference: Child
    execution: Child
    portfolio: Child

    @property
    def workers(self) -> list[Child]:
        return [self.marketdata, self.inference, self.execution, self.portfolio]


@dataclass(frozen=True, kw_only=True)
class ReadBack:
    candles: list[Candle]
    signals: list[Signal]
    intents: list[OrderIntent]
    updates: list[OrderUpdate]
    fills: list[Fill]
    snapshot: PortfolioSnapshot | None


async def _run(
    options: StressOptions,
    result: ScenarioResult,
    fault: BrokerFault,
    *,
    outbox_dir: Path | None = None,
) -> None:
    durations = fault.durations_s(options)
    recovery_allowance_s = HANG_RECOVERY_S * len(durations)
    steps = LEAD_STEPS + math.ceil(
        CANDLES_PER_SECOND * (sum(durations) + recovery_allowance_s + TRAIL_S)
    )
    figures = result.figures
    figures.update({"fault": fault.value, "outages target s": durations, "feed steps": steps})
    async with Rig(options.work_dir) as rig:
        if outbox_dir is not None:
            rig.children.outbox_dir = outbox_dir
        pipeline = await start_pipeline(rig, options, steps)
        disk_errors_before = await totals(rig, pipeline.workers, DISK_ERRORS)
        baseline = await _outage(
            rig, pipeline, options, result, fault=fault, durations=durations, steps=steps
        )
        await wait_feed_end(rig, pipeline, steps)
        options.say("broker-outage: feed ended; waiting for the pipeline to drain")
        await wait_quiet(rig, pipeline)
        published = {s: await _published(rig, pipeline.marketdata, s) for s in SYMBOLS}
        back = await read_back(rig)
        back = await settled_snapshot(rig, back)
        health = await health_of(rig, pipeline.workers)
        disk_errors = await totals(rig, pipeline.workers, DISK_ERRORS)
    figures["health at the end (checks not OK)"] = not_ok(health)
    if outbox_dir is not None:
        errors = {w: int(disk_errors[w] - disk_errors_before[w]) for w in disk_errors}
        figures["outbox disk errors per worker"] = errors
        result.check("outbox disk errors", sum(errors.values()), ">", 0)
    healthy = sum(recovered(w, health[w], baseline.get(w, {})) for w in health)
    _judge(result, back, published=published, healthy=healthy, fault=fault)


# --- the run --------------------------------------------------------------------------------


async def start_pipeline(
    rig: Rig, options: StressOptions, steps: int, *, policy: TradingPolicy | None = None
) -> Pipeline:
    """The policy, an ACTIVE latch; the consumers first, then the feed (so it is all traded)."""
    await rig.publish_policy(policy or pipeline_policy())
    await rig.arm_without_control_plane()
    inference = rig.workload("inference")
    execution = rig.workload("execution", None, "--worker-id", "stress-execution")
    portfolio = rig.workload("portfolio")
    await rig.wait_healthy([inference, execution, portfolio])
    await rig.until(
        lambda: _has_snapshot(rig), timeout_s=START_TIMEOUT_S, what="the portfolio's equity"
    )
    pace = ("--candles-per-second", f"{CANDLES_PER_SECOND:g}", "--max-candles", str(steps))
    marketdata = rig.workload("marketdata", None, "--seed", "17", *pace)
    await rig.wait_healthy([marketdata])
    options.say(f"4 workers up; feed of {steps} steps started")
    return Pipeline(
        marketdata=marketdata, inference=inference, execution=execution, portfolio=portfolio
    )


async def _has_snapshot(rig: Rig) -> bool:
    snapshot = await rig.bus.last_message(
        subjects.PORTFOLIO, subjects.PORTFOLIO_SNAPSHOT, PortfolioSnapshot
    )
    return snapshot is not None


async def _outage(
    rig: Rig,
    pipeline: Pipeline,
    options: StressOptions,
    result: ScenarioResult,
    *,
    fault: BrokerFault,
    durations: list[float],
    steps: int,
) -> dict[str, Health]:
    """Once orders fill: the fault for each of ``durations``, released, until every worker
    publishes and consumes again and every outbox is empty. Returns the workers' health
    while trading, before the first fault."""
    figures = result.figures
    execution = pipeline.execution
    waited = await rig.until(
        lambda: at_least(family_total(rig, execution, "qtrader_fills_total"), 1),
        timeout_s=START_TIMEOUT_S,
        what="the first fill",
    )
    done = await feed_steps(rig, pipeline.marketdata)
    figures.update({"first fill after s": round(waited, 2), "feed steps before outage": done})
    if steps - done < CANDLES_PER_SECOND * sum(durations):
        raise ScenarioFailure(
            f"the first fill came after {done} of {steps} feed steps: too late for the outage "
            "to hit while the feed runs (the machine is too slow for this pace)"
        )
    buffered_before = await totals(rig, pipeline.workers, BUFFERED)
    baseline = await health_of(rig, pipeline.workers)
    figures["health before the outage (checks not OK)"] = not_ok(baseline)
    watch = DepthWatch(rig, pipeline.workers)
    outages, recoveries = [], []
    for seconds in durations:
        options.say(f"broker-{fault.value}: orders filling; NATS {fault.value} for {seconds:g} s")
        await asyncio.to_thread(fault.begin, rig.nats)
        down_at = time.monotonic()
        figures.setdefault("outage started at (ms)", int(time.time() * 1000))
        await watch.sample_until(down_at + seconds)
        progress = await _producing(rig, pipeline)
        await asyncio.to_thread(fault.end, rig.nats)
        up_at = time.monotonic()
        figures.setdefault("restarted at (ms)", int(time.time() * 1000))
        outages.append(round(up_at - down_at, 2))
        options.say(f"broker-{fault.value}: NATS is back; waiting for the pipeline to resume")
        await rig.until(
            _resumed(rig, pipeline, watch, since=progress),
            timeout_s=SETTLE_TIMEOUT_S,
            what="every worker to publish and consume again and every outbox to drain",
        )
        recoveries.append(round(time.monotonic() - up_at, 2))
    figures["outages s"] = outages
    figures["recovered after s (publishing, consuming, outboxes empty)"] = recoveries
    buffered_after = await totals(rig, pipeline.workers, BUFFERED)
    figures["outbox buffered per worker"] = {
        name: int(buffered_after[name] - buffered_before[name]) for name in buffered_after
    }
    figures["outbox buffered during the outage"] = int(
        sum(buffered_after.values()) - sum(buffered_before.values())
    )
    figures["max outbox depth seen"] = watch.max_total
    figures["max outbox depth per worker"] = watch.max_by_worker
    return baseline


class DepthWatch:
    """Samples every worker's outbox depth (its own metric); keeps the deepest seen."""

    def __init__(self, rig: Rig, workers: list[Child]) -> None:
        self._rig = rig
        self._workers = workers
        self.max_total = 0
        self.max_by_worker = {w.name: 0 for w in workers}

    async def sample(self) -> int:
        depths = await totals(self._rig, self._workers, DEPTH)
        for name, depth in depths.items():
            self.max_by_worker[name] = max(self.max_by_worker[name], int(depth))
        total = int(sum(depths.values()))
        self.max_total = max(self.max_total, total)
        return total

    async def sample_until(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            self._rig.check()
            await self.sample()
            await asyncio.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))

    async def all_empty(self) -> bool:
        return await self.sample() == 0


async def _producing(rig: Rig, pipeline: Pipeline) -> tuple[float, float]:
    """What marketdata has published and inference consumed, so far."""
    return (
        await family_total(rig, pipeline.marketdata, "qtrader_candles_published_total"),
        await family_total(rig, pipeline.inference, "qtrader_messages_consumed_total"),
    )


def _resumed(
    rig: Rig, pipeline: Pipeline, watch: DepthWatch, *, since: tuple[float, float]
) -> Callable[[], Awaitable[bool]]:
    """The rig pings the server, marketdata published and inference consumed more than at
    ``since``, and every outbox is empty."""

    async def resumed() -> bool:
        if not rig.bus.connected:
            return False
        try:
            await rig.bus.round_trip_s()
        except BusUnavailable:
            return False
        published, consumed = await _producing(rig, pipeline)
        moving = published > since[0] and consumed > since[1]
        return moving and await watch.all_empty()

    return resumed


async def at_least(value: Awaitable[float], minimum: float) -> bool:
    return await value >= minimum


async def totals(rig: Rig, workers: list[Child], name: str) -> dict[str, float]:
    return {w.name: await family_total(rig, w, name) for w in workers}


async def _published(rig: Rig, marketdata: Child, symbol: str) -> int:
    return int(await rig.metric(marketdata, "qtrader_candles_published_total", symbol=symbol))


async def feed_steps(rig: Rig, marketdata: Child) -> int:
    """Feed steps done by the running marketdata process: the fewest candles it made for any
    symbol, the ones the stream held already included (a restarted process makes again what
    its predecessor had stored or left in its outbox; not counted as published, but steps)."""
    return min([await _made(rig, marketdata, s) for s in SYMBOLS])


async def _made(rig: Rig, marketdata: Child, symbol: str) -> int:
    duplicates = await rig.metric(marketdata, "qtrader_candles_duplicate_total", symbol=symbol)
    return await _published(rig, marketdata, symbol) + int(duplicates)


async def wait_feed_end(rig: Rig, pipeline: Pipeline, steps: int) -> None:
    done: list[int] = [0]

    async def ended() -> bool:
        done[0] = await feed_steps(rig, pipeline.marketdata)
        return done[0] >= steps

    budget = steps / CANDLES_PER_SECOND + SETTLE_TIMEOUT_S
    try:
        await rig.until(ended, timeout_s=budget, what=f"the feed's {steps} steps")
    except ScenarioFailure as exc:  # say how far it got: stalled, or restarted and counting
        raise ScenarioFailure(f"{exc} (the feed's process had made {done[0]})") from None


async def wait_quiet(rig: Rig, pipeline: Pipeline, *, feed_stopped: bool = False) -> None:
    """Until every outbox is empty and no worker's counts moved for ``QUIET_ROUNDS`` rounds
    (marketdata's outbox left out once its process was stopped: it has no /metrics then)."""
    seen: list[tuple[float, ...]] = []
    workers = pipeline.workers[1:] if feed_stopped else pipeline.workers

    async def quiet() -> bool:
        seen.append(await _progress(rig, pipeline))
        depths = await totals(rig, workers, DEPTH)
        last = seen[-QUIET_ROUNDS:]
        return sum(depths.values()) == 0 and len(last) == QUIET_ROUNDS and len(set(last)) == 1

    await rig.until(quiet, timeout_s=SETTLE_TIMEOUT_S, what="the pipeline to drain")
    await _intents_final(rig)


async def _intents_final(rig: Rig) -> None:
    """Until every intent has a final update, for at most ``INTENT_REDELIVERY_S``: an intent a
    killed worker had taken comes again only after its ack wait, then settles; one that never
    does is judged as lost (``events lost``), not waited for forever."""

    async def final() -> bool:
        back = await read_back(rig)
        return audit_orders(back.intents, back.updates, back.fills).without_final == 0

    with contextlib.suppress(ScenarioFailure):
        await rig.until(final, timeout_s=INTENT_REDELIVERY_S, what="every intent final")


async def _progress(rig: Rig, pipeline: Pipeline) -> tuple[float, ...]:
    execution = pipeline.execution
    return (
        await family_total(rig, pipeline.inference, "qtrader_signals_emitted_total"),
        await family_total(rig, execution, "qtrader_messages_consumed_total"),
        await family_total(rig, execution, "qtrader_order_updates_total"),
        await family_total(rig, execution, "qtrader_signal_queue_depth"),
        await family_total(rig, pipeline.portfolio, "qtrader_portfolio_fills_applied_total"),
    )


async def read_back(rig: Rig) -> ReadBack:
    every = subjects.all_of
    return ReadBack(
        candles=await rig.read_stream(subjects.MARKET, every(subjects.CANDLE_PREFIX), Candle),
        signals=await rig.read_stream(subjects.SIGNALS, every(subjects.SIGNAL_PREFIX), Signal),
        intents=await rig.read_stream(
            subjects.ORDERS, every(subjects.ORDER_INTENT_PREFIX), OrderIntent
        ),
        updates=await rig.read_stream(
            subjects.ORDERS, every(subjects.ORDER_UPDATE_PREFIX), OrderUpdate
        ),
        fills=await rig.read_stream(subjects.FILLS, every(subjects.FILL_PREFIX), Fill),
        snapshot=None,
    )


async def settled_snapshot(rig: Rig, back: ReadBack) -> ReadBack:
    """The newest snapshot once it has applied every fill and marked at the last closes (or
    the newest one there is when that does not happen in time: the criterion then fails)."""
    closes = last_closes(back.candles)
    found: list[PortfolioSnapshot] = []

    async def settled() -> bool:
        snapshot = await rig.bus.last_message(
            subjects.PORTFOLIO, subjects.PORTFOLIO_SNAPSHOT, PortfolioSnapshot
        )
        if not isinstance(snapshot, PortfolioSnapshot):
            return False
        found.append(snapshot)
        marks = {p.symbol: p.mark_price for p in snapshot.positions if p.quantity != 0}
        return snapshot.fills_applied == len(back.fills) and all(
            closes.get(s) == m for s, m in marks.items()
        )

    with contextlib.suppress(ScenarioFailure):  # judged as it is: the account will not match
        await rig.until(settled, timeout_s=15.0, what="the portfolio's final snapshot")
    return replace(back, snapshot=found[-1] if found else None)


Health = dict[str, tuple[str, str]]  # dependency -> (status, detail)


async def health_of(rig: Rig, workers: list[Child]) -> dict[str, Health]:
    return {w.name: await rig.checks(w) for w in workers}


def not_ok(health: dict[str, Health]) -> dict[str, dict[str, str]]:
    """The checks that are not OK, with their detail, for the report."""
    report = {
        worker: {
            name: f"{status}: {detail}"
            for name, (status, detail) in checks.items()
            if status != "OK"
        }
        for worker, checks in health.items()
    }
    return {worker: checks for worker, checks in report.items() if checks}


def recovered(worker: str, now: Health, before: Health) -> bool:
    """Every check OK, or in the state it was in while trading before the outage (a model
    served without calibration figures is DEGRADED whatever NATS does); marketdata's feed is
    DEGRADED once its fixed run has ended, by design."""
    for name, (status, detail) in now.items():
        if status == "OK" or (worker == "marketdata" and name == "feed" and "ended" in detail):
            continue
        if before.get(name, ("", ""))[0] != status:
            return False
    return bool(now)


# --- the verdict ----------------------------------------------------------------------------


def _judge(
    result: ScenarioResult,
    back: ReadBack,
    *,
    published: dict[str, int],
    healthy: int,
    fault: BrokerFault,
) -> None:
    candles = audit_candles(back.candles)
    unpublished = sum(abs(published[s] - candles.stored.get(s, 0)) for s in SYMBOLS)
    result.figures["candles published (marketdata's metric)"] = published
    judge_pipeline(result, back, policy=pipeline_policy(), unpublished=unpublished)
    restarted_ms = int(result.figures.get("restarted at (ms)", 0))
    result.check(
        "outbox buffered during the outage",
        result.figures.get("outbox buffered during the outage"),
        ">",
        0,
    )
    result.check(
        "orders filled after NATS returned",
        sum(1 for f in back.fills if f.ts_ms > restarted_ms) if restarted_ms else None,
        ">",
        0,
    )
    if fault is BrokerFault.HANG:
        recoveries = result.figures["recovered after s (publishing, consuming, outboxes empty)"]
        result.check("slowest recovery after a hang (s)", max(recoveries), "<=", HANG_RECOVERY_S)
    result.check("workers whose /health recovered", healthy, "==", 4)


def judge_pipeline(
    result: ScenarioResult, back: ReadBack, *, policy: TradingPolicy, unpublished: int = 0
) -> None:
    """The criteria every pipeline fault shares, judged from the streams read back: nothing
    lost (``unpublished``: candles marketdata counted that the stream lacks), duplicated or
    out of order, nothing without its cause, the portfolio equal to the exact account of
    FILLS, and the exposure invariant against ``policy``."""
    candles = audit_candles(back.candles)
    signals = audit_signals(back.candles, back.signals, window=WINDOW)
    orders = audit_orders(back.intents, back.updates, back.fills)
    _figures(result, candles, signals, orders)
    lost = candles.missing + unpublished + signals.missing
    lost += orders.without_final + orders.fill_mismatches
    result.check("events lost", lost, "==", 0)
    result.check("duplicates", candles.duplicates + signals.duplicates + orders.duplicates, "==", 0)
    late_fills = fills_out_of_venue_order(back.fills, back.updates, paper_fill_order(back.fills))
    result.figures["fills on FILLS after a later fill of their worker"] = late_fills
    result.check(
        "out of order",
        candles.out_of_order + signals.out_of_order + orders.illegal_order + late_fills,
        "==",
        0,
    )
    result.check(
        "messages without their cause",
        signals.unexplained + orders.orphan_updates + orders.orphan_fills,
        "==",
        0,
    )
    mismatches = ledger_mismatches(
        back.snapshot, back.fills, marks=last_closes(back.candles), capital=CAPITAL
    )
    result.figures["portfolio mismatches"] = mismatches
    result.check("portfolio vs exact account of FILLS", len(mismatches), "==", 0)
    limits = paper_limits(policy.spec)  # the rig has closed: judged from what it read back
    report = check_exposure(trades=from_paper_fills(back.fills), limits=limits)
    judge_exposure(result, report)


def _figures(
    result: ScenarioResult,
    candles: CandleAudit,
    signals: SignalAudit,
    orders: OrderAudit,
) -> None:
    result.figures.update(
        {
            "candles stored": candles.stored,
            "candles missing": candles.missing,
            "signals stored": signals.stored,
            "signals expected": signals.expected,
            "signals missing": signals.missing,
            "order intents": orders.intents,
            "order updates": orders.updates,
            "fills": orders.fills,
            "intents filled": orders.filled_intents,
            "intents without a final update": orders.without_final,
            "fill mismatches": orders.fill_mismatches,
            "illegal update orders": orders.illegal_order,
        }
    )
