"""ESS lifecycle: trip, a reset refused inside the cooldown, a reset after it, again and again,
with orders flowing the whole time and checked at each step.

What runs: local mode's real control plane (``LocalControlPlane``, as ``qtrader up`` runs it)
reconciling one EmergencyStop (cooldown ``COOLDOWN_S``, manual reset required, ack timeout
``ACK_TIMEOUT_S``), two ``qtrader execution`` workers in paper mode and a portfolio, and a feed
process (``qtrader_tools.benchmarks.halt``'s) publishing candles and signals of alternating
direction at ``FEED_HZ``, so every signal makes an order (``minConfidence`` 0). Each cycle is
driven as ``qtrader ess trip`` and ``qtrader ess reset`` drive it, through
``qtrader.local.ess_client`` (the code the CLI runs):

1. trip: the status must say Tripped, the latch HALTED, and both workers must have
   acknowledged that latch revision (``status.acknowledgements``);
2. reset inside the cooldown: refused (the spec is set back to tripped), still Tripped and
   HALTED;
3. reset after the cooldown: Armed, latch ACTIVE, and orders fill again.

Criteria, and why each:

* ``orders filled after a worker's halt acknowledgement == 0`` (summed over cycles): from the
  ORDERS stream, FILLED or partially filled updates of worker W stamped after W's
  acknowledgement of the HALTED revision and before the ACTIVE latch that ended it. The
  promise of requirement 7; a refused reset must not reopen the gate either.
* ``orders stopped by the halt > 0``: signals the workers denied as halted (their metric) plus
  intents the halt gate refused while halted (the gate's updates on ORDERS). Without
  orders knocking on the closed gate, the 0 above proves nothing.
* ``cycles with every state as required == cycles``: each step's verdict, status, latch and
  spec (a cycle's problems are listed in its figures).
* ``resets refused inside the cooldown == cycles``, ``cycles where fills resumed == cycles``
  (a FILLED update within ``FILL_BOUND_S`` of the re-arm, from ORDERS; when none comes, the
  workers' denial and drop counts meanwhile say why), ``cycles with both acknowledgements``.
* ``trip -> all acknowledged p99 <= ACK_BOUND_S``: from the moment the trip is requested to the
  later of the two workers' acknowledgement times (their own clocks, as the status reports
  them; one machine, one clock). Generous: the machine is shared.
* ``tripCount == cycles`` and ``resetCount == cycles`` from the status at the end.

Length: 10 cycles at full length (``--scale 1``), ``round(10 x scale)`` scaled, at least
``MIN_CYCLES``: 3 at the default 0.1. A cycle takes the cooldown plus a second or so: about
15-20 s in all at 0.1, 40-50 s at full length (longer when fills do not resume, each such
cycle waiting ``FILL_BOUND_S``).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    HaltLatch,
    OrderStatus,
    OrderUpdate,
    RefusedBy,
    TradingState,
)
from qtrader.control.ess_status import EssState, parse_time
from qtrader.local import ess_client
from qtrader.local.control_plane import EssRecord
from qtrader_tools.benchmarks.halt import spawn_peer
from qtrader_tools.benchmarks.harness import percentile
from qtrader_tools.processes import Child
from qtrader_tools.stress.harness import Rig, ScenarioFailure, emergency_stop, policy_document
from qtrader_tools.stress.probes import family_total, labelled
from qtrader_tools.stress.result import ScenarioResult
from qtrader_tools.stress.scenario import StressOptions

NAME = "main"
SYMBOL = "BTCUSDT"  # the feed's symbol
WORKERS = ("stress-ess-1", "stress-ess-2")
TRIPPED_BY = "cli:stress"
FULL_CYCLES = 10
MIN_CYCLES = 3
COOLDOWN_S = 2
ACK_TIMEOUT_S = 2
FEED_HZ = 20.0
ACK_BOUND_S = 2.0  # trip requested -> the last worker's acknowledgement, p99
FILL_BOUND_S = 10.0  # re-armed -> the first fill
ANSWER_TIMEOUT_S = 10.0  # for the control plane to observe a patch (the CLI's --wait)
START_TIMEOUT_S = 60.0
TRADE_HOLD_S = (0.2, 0.8)  # trading after the fills resumed, before the next trip (seeded)
_FILLING = (OrderStatus.FILLED, OrderStatus.PARTIALLY_FILLED)
# A sample, by name and labels; no labels: the whole family.
DENIED_HALTED: tuple[str, dict[str, str]] = ("qtrader_signals_denied_total", {"reason": "halted"})
FILLED_TOTAL: tuple[str, dict[str, str]] = ("qtrader_fills_total", {})


def run(options: StressOptions, result: ScenarioResult) -> None:
    asyncio.run(_run(options, result))


@dataclass(kw_only=True)
class Cycle:
    """What one cycle saw, step by step; ``problems`` names every step not as required."""

    number: int
    trip_requested_ms: int = 0
    halt_revision: int = 0
    acks_ms: dict[str, int] = field(default_factory=dict)  # worker -> its ack of the halt
    acked_wait_s: float | None = None  # trip requested -> the status showing every ack
    early_refused: bool = False
    rearm_ms: int | None = None  # issue time of the ACTIVE latch that ended the halt
    denied_halted: int = 0  # signals the workers denied as halted (their metric)
    problems: list[str] = field(default_factory=list)  # states not as required
    no_fill: str = ""  # why no fill came after the re-arm, when none did (the order flow)

    def expect(self, ok: bool, problem: str) -> None:
        if not ok:
            self.problems.append(problem)

    @property
    def trip_to_all_acked_s(self) -> float | None:
        if set(self.acks_ms) != set(WORKERS):
            return None
        return max(0, max(self.acks_ms.values()) - self.trip_requested_ms) / 1000

    def summary(self) -> dict[str, Any]:
        return {
            "cycle": self.number,
            "trip->all acked s": self.trip_to_all_acked_s,
            "status showed every ack after s": self.acked_wait_s,
            "early reset refused": self.early_refused,
            "signals denied as halted": self.denied_halted,
            "problems": self.problems,
            "no fill after the re-arm": self.no_fill,
        }


async def _run(options: StressOptions, result: ScenarioResult) -> None:
    count = max(MIN_CYCLES, round(FULL_CYCLES * options.scale))
    result.figures["cycles"] = count
    cycles: list[Cycle] = []
    async with Rig(options.work_dir) as rig:
        executions = await _start(rig, options)
        hold = random.Random(7)
        for number in range(1, count + 1):
            cycle = Cycle(number=number)
            cycles.append(cycle)
            await _one_cycle(rig, executions, cycle, hold)
            result.figures["cycle details"] = [c.summary() for c in cycles]
            verdict = cycle.problems or "states as required"
            fills = (
                f"no fill after the re-arm: {cycle.no_fill}" if cycle.no_fill else "fills resumed"
            )
            options.say(f"ess-lifecycle: cycle {number}: {verdict}; {fills}")
        record = await ess_client.read_record(rig.bus, NAME)
        updates = await rig.read_stream(
            subjects.ORDERS, subjects.all_of(subjects.ORDER_UPDATE_PREFIX), OrderUpdate
        )
        await rig.judge_exposure(result)
    _judge(result, cycles, updates, record)


async def _start(rig: Rig, options: StressOptions) -> list[Child]:
    """Control plane, policy, two executions and a portfolio; the feed; until both trade."""
    await rig.start_control_plane(
        emergency_stop(
            NAME,
            cooldownSeconds=COOLDOWN_S,
            requireManualReset=True,
            ackTimeoutSeconds=ACK_TIMEOUT_S,
        )
    )
    await rig.publish_policy(
        policy_document("stress-ess-lifecycle", symbols=[SYMBOL], risk={"minConfidence": 0.0})
    )
    executions = [rig.workload("execution", w, "--worker-id", w) for w in WORKERS]
    portfolio = rig.workload("portfolio")
    await rig.wait_healthy([*executions, portfolio])
    spawn_peer(rig.children, "feed", rig.url, f"{FEED_HZ:g}", name="feed")

    async def both_trading() -> bool:
        sent = [
            await rig.metric(w, "qtrader_orders_sent_total", exchange="paper") for w in executions
        ]
        return all(s >= 1 for s in sent)

    await rig.until(both_trading, timeout_s=START_TIMEOUT_S, what="both workers sending orders")
    options.say("ess-lifecycle: control plane, 2 executions, a portfolio and the feed; trading")
    return executions


async def _one_cycle(rig: Rig, executions: list[Child], cycle: Cycle, hold: random.Random) -> None:
    denied_before = await _total(rig, executions, DENIED_HALTED)
    record = await _trip(rig, cycle)
    cooldown_until = record.ess_status().cooldown_until
    await _early_reset(rig, cycle, cooldown_until)
    if cooldown_until is not None:
        left = (cooldown_until - datetime.now(UTC)).total_seconds()
        await asyncio.sleep(max(0.0, left) + 0.1)
    cycle.denied_halted = int(await _total(rig, executions, DENIED_HALTED) - denied_before)
    await _reset(rig, executions, cycle)
    await asyncio.sleep(hold.uniform(*TRADE_HOLD_S))  # trips fall at different moments


async def _trip(rig: Rig, cycle: Cycle) -> EssRecord:
    """``qtrader ess trip``: Tripped, HALTED, and both workers' acknowledgements of it."""
    bus = rig.bus
    started = time.monotonic()
    cycle.trip_requested_ms = _now_ms()
    outcome = await ess_client.trip(
        bus,
        name=NAME,
        reason=f"stress cycle {cycle.number}",
        mode=None,
        tripped_by=TRIPPED_BY,
        timeout_s=ANSWER_TIMEOUT_S,
    )
    cycle.expect(outcome.verdict is ess_client.Verdict.TRIPPED, f"trip: {outcome.verdict}")
    record = await ess_client.wait_for_acks(bus, name=NAME, timeout_s=ANSWER_TIMEOUT_S)
    cycle.acked_wait_s = round(time.monotonic() - started, 3)
    status = record.ess_status()
    cycle.halt_revision = status.latch_revision
    cycle.expect(status.state is EssState.TRIPPED, f"after the trip: {status.state}")
    await _expect_latch(rig, cycle, TradingState.HALTED, status.latch_revision, "after the trip")
    cycle.acks_ms = _acknowledged(record, status.latch_revision, TradingState.HALTED)
    missing = sorted(set(WORKERS) - set(cycle.acks_ms))
    cycle.expect(not missing, f"no acknowledgement of the halt from {missing}")
    return record


async def _early_reset(rig: Rig, cycle: Cycle, cooldown_until: datetime | None) -> None:
    """``qtrader ess reset`` inside the cooldown: refused, still Tripped and HALTED."""
    inside = cooldown_until is not None and datetime.now(UTC) < cooldown_until
    outcome = await ess_client.reset(rig.bus, name=NAME, timeout_s=ANSWER_TIMEOUT_S)
    record = outcome.record
    status = record.ess_status()
    cycle.early_refused = inside and outcome.verdict is ess_client.Verdict.REFUSED
    cycle.expect(inside, "the early reset came after the cooldown (too slow to test it)")
    cycle.expect(cycle.early_refused, f"early reset: {outcome.verdict}")
    cycle.expect(record.spec.tripped, "the refused reset left the spec untripped")
    cycle.expect(status.state is EssState.TRIPPED, f"after the early reset: {status.state}")
    await _expect_latch(rig, cycle, TradingState.HALTED, cycle.halt_revision, "after early reset")


async def _reset(rig: Rig, executions: list[Child], cycle: Cycle) -> None:
    """``qtrader ess reset`` after the cooldown: Armed, ACTIVE, and orders fill again."""
    filled_before = await _total(rig, executions, FILLED_TOTAL)
    outcome = await ess_client.reset(rig.bus, name=NAME, timeout_s=ANSWER_TIMEOUT_S)
    cycle.expect(outcome.verdict is ess_client.Verdict.RESET, f"reset: {outcome.verdict}")
    status = outcome.record.ess_status()
    cycle.expect(status.state is EssState.ARMED, f"after the reset: {status.state}")
    latch = await _expect_latch(
        rig, cycle, TradingState.ACTIVE, status.latch_revision, "after the reset"
    )
    cycle.rearm_ms = latch.issued_at_ms if latch is not None else None

    async def filled_again() -> bool:
        return await _total(rig, executions, FILLED_TOTAL) > filled_before

    denied_before = await _denials(rig, executions)
    try:
        await rig.until(filled_again, timeout_s=FILL_BOUND_S, what="a fill after the re-arm")
    except ScenarioFailure:
        denied = await _denials(rig, executions)
        why = {k: int(v - denied_before.get(k, 0)) for k, v in denied.items()}
        why = {k: v for k, v in why.items() if v}
        cycle.no_fill = f"none within {FILL_BOUND_S:g} s; meanwhile {why}"


async def _denials(rig: Rig, executions: list[Child]) -> dict[str, float]:
    """Signals denied and dropped, by worker and reason: why no order was made."""
    found: dict[str, float] = {}
    for worker in executions:
        for family in ("qtrader_signals_denied_total", "qtrader_signals_dropped_total"):
            for labels, value in (await labelled(rig, worker, family)).items():
                found[f"{worker.name} {family.removeprefix('qtrader_')} {labels}"] = value
    return found


async def _expect_latch(
    rig: Rig, cycle: Cycle, state: TradingState, revision: int, when: str
) -> HaltLatch | None:
    stored = await rig.bus.kv_get(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch)
    latch = stored if isinstance(stored, HaltLatch) else None
    seen = str(stored) if latch is None else f"{latch.state.value} revision {latch.revision}"
    cycle.expect(
        latch is not None and latch.state is state and latch.revision == revision,
        f"latch {when}: {seen}, expected {state.value} revision {revision}",
    )
    return latch


def _acknowledged(record: EssRecord, revision: int, state: TradingState) -> dict[str, int]:
    """Each worker's acknowledgement time (ms) of ``revision`` in ``state``, from the status."""
    acks: dict[str, int] = {}
    for ack in record.list_in_status("acknowledgements"):
        if ack.get("revision") == revision and ack.get("state") == state.value:
            acks[str(ack["worker"])] = int(parse_time(ack["at"]).timestamp() * 1000)
    return acks


async def _total(rig: Rig, workers: list[Child], sample: tuple[str, dict[str, str]]) -> float:
    """A sample (a name and its labels) or, without labels, a whole family, summed over
    workers."""
    name, labels = sample
    if labels:
        return sum([await rig.metric(w, name, **labels) for w in workers])
    return sum([await family_total(rig, w, name) for w in workers])


def _now_ms() -> int:
    return int(time.time() * 1000)


# --- the verdict ----------------------------------------------------------------------------


def filled_after_ack(updates: list[OrderUpdate], cycle: Cycle) -> int:
    """Fills reported by a worker with a time after its ack of the halt, before the re-arm."""
    end = cycle.rearm_ms if cycle.rearm_ms is not None else math.inf
    return sum(
        1
        for u in updates
        if u.status in _FILLING
        and u.filled_quantity > 0
        and u.worker_id in cycle.acks_ms
        and cycle.acks_ms[u.worker_id] < u.ts_ms < end
    )


def refused_by_gate(updates: list[OrderUpdate], cycle: Cycle) -> int:
    end = cycle.rearm_ms if cycle.rearm_ms is not None else math.inf
    return sum(
        1
        for u in updates
        if u.refused_by is RefusedBy.HALT_GATE and cycle.trip_requested_ms <= u.ts_ms <= end
    )


def first_fill_after_rearm_s(
    updates: list[OrderUpdate], cycle: Cycle, next_trip_ms: float
) -> float | None:
    """Seconds from the re-arm to the first FILLED update before the next trip, if any."""
    if cycle.rearm_ms is None:
        return None
    start = cycle.rearm_ms
    times = [
        u.ts_ms
        for u in updates
        if u.status is OrderStatus.FILLED and start <= u.ts_ms < next_trip_ms
    ]
    return (min(times) - start) / 1000 if times else None


def p99(values: list[float]) -> float | None:
    """The 99th percentile, linear between closest ranks; None without values."""
    return percentile(values, 99) if values else None


def _judge(
    result: ScenarioResult, cycles: list[Cycle], updates: list[OrderUpdate], record: EssRecord
) -> None:
    count = int(result.figures["cycles"])
    ends = [c.trip_requested_ms for c in cycles[1:]] + [math.inf]
    resumed = [
        first_fill_after_rearm_s(updates, c, end) for c, end in zip(cycles, ends, strict=True)
    ]
    after_ack = sum(filled_after_ack(updates, c) for c in cycles)
    refused = sum(refused_by_gate(updates, c) for c in cycles)
    latencies = [c.trip_to_all_acked_s for c in cycles if c.trip_to_all_acked_s is not None]
    denied = sum(c.denied_halted for c in cycles)
    status = record.ess_status()
    result.figures.update(
        {
            "orders filled after a halt acknowledgement": after_ack,
            "intents refused by the halt gate (ORDERS)": refused,
            "signals denied as halted (metrics)": denied,
            "time to first fill after re-arm s": resumed,
            "trip->all acked s": latencies,
            "status showed every ack after s": [c.acked_wait_s for c in cycles],
            "order updates read back": len(updates),
            "tripCount": status.trip_count,
            "resetCount": status.reset_count,
        }
    )
    result.check("orders filled after a worker's halt acknowledgement", after_ack, "==", 0)
    result.check(
        "orders stopped by the halt (signals denied, intents refused)", denied + refused, ">", 0
    )
    result.check(
        "cycles with every state as required", sum(not c.problems for c in cycles), "==", count
    )
    result.check(
        "resets refused inside the cooldown", sum(c.early_refused for c in cycles), "==", count
    )
    result.check(
        f"cycles where fills resumed within {FILL_BOUND_S:g} s",
        sum(1 for s in resumed if s is not None and s <= FILL_BOUND_S),
        "==",
        count,
    )
    result.check("trip -> all acknowledged p99", p99(latencies), "<=", ACK_BOUND_S, "s")
    result.check("cycles with both acknowledgements", len(latencies), "==", count)
    result.check("tripCount", status.trip_count, "==", count)
    result.check("resetCount", status.reset_count, "==", count)
