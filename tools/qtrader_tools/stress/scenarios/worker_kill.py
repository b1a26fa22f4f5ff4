"""Worker kill: each workload SIGKILLed in turn while the pipeline trades, started again by the
supervisor; nothing lost, nothing doubled, the portfolio exact.

What runs: the pipeline of ``broker_outage`` (nats-server and the four workloads as real
processes in paper mode, the same policy, feed and latch), kept up by ``qtrader up``'s
supervisor (``local.supervisor.Supervisor`` through ``Rig.supervise``): a workload that dies is
started again with the same command, health port, outbox directory and NATS store, after the
supervisor's back-off. Once orders fill, marketdata, inference, execution and the portfolio are
killed in turn (SIGKILL: no shutdown, no flush, whatever was in flight is cut), ``GAP_S`` of
trading before each, and each must be back and working before the next: marketdata publishing
candles, inference consuming candles and emitting signals, execution consuming signals, the
portfolio publishing snapshots (each counted by the new process itself, so from zero). The
feed's fixed run (``--max-candles``, counted per process) is long enough for the kills after
marketdata's last restart; then it ends by itself and the pipeline drains.

Criteria, and why each:

* ``slowest recovery after a kill (s) <= RECOVERY_BOUND_S`` (10 s, the rule broker-hang keeps;
  about 1.5 s measured here): from the SIGKILL until the new
  process is up and doing its work (each worker's time is a figure). The bound is what a
  restart costs on a loaded 2-core machine (Python, onnxruntime, the NATS handshake, the
  fill replay) plus the supervisor's 0.5 s back-off, with room; a hang or a crash loop is not.
* ``supervisor restarts == kills`` per workload, and 0 for the nats-server: every kill was
  noticed and repaired once, nothing else died (a worker that failed again after its restart
  would show as a second restart).
* the common criteria (``broker_outage.judge_pipeline``), judged from the streams, not from a
  worker's metric: candles none lost (contiguous open times per symbol), none duplicated,
  none out of order; a signal for each candle past the warm-up, once; every intent with one
  final state in a legal order, every fill unique by ``fill_id`` and matching its updates;
  nothing without its cause; the final snapshot equal to the exact account of FILLS; the
  exposure invariant.
* ``workers whose /health recovered == 4``: every check OK at the end, or as it was while
  trading before the first kill (marketdata's ended feed is DEGRADED by design).

Length: at full length (``--scale 1``) three rounds of the four kills with 20 s of trading
before each (about 5 minutes); the default 0.1 is one round with ``MIN_GAP_S`` before each.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import time
from collections.abc import Awaitable, Callable

from qtrader.local.supervisor import Supervisor
from qtrader_tools.processes import Child
from qtrader_tools.stress.harness import Rig, ScenarioFailure
from qtrader_tools.stress.probes import family_total
from qtrader_tools.stress.result import ScenarioResult
from qtrader_tools.stress.scenario import StressOptions
from qtrader_tools.stress.scenarios.broker_outage import (
    CANDLES_PER_SECOND,
    LEAD_STEPS,
    START_TIMEOUT_S,
    TRAIL_S,
    at_least,
    feed_steps,
    health_of,
    judge_pipeline,
    not_ok,
    pipeline_policy,
    read_back,
    recovered,
    settled_snapshot,
    start_pipeline,
    wait_feed_end,
    wait_quiet,
)

POLICY = pipeline_policy("stress-worker-kill")
FULL_ROUNDS = 3
FULL_GAP_S = 20.0
MIN_GAP_S = 2.0
RECOVERY_BOUND_S = 10.0  # the broker-hang rule; a restart here takes about 1.5 s
EXPECTED_RECOVERY_S = 6.0  # what a restart takes here: sizes the feed, judges nothing
RECOVERY_TIMEOUT_S = 60.0  # give up waiting (the bound above is the criterion)

# What proves each new process is doing its work: counters of its own, so from zero.
WORKING: dict[str, tuple[str, ...]] = {
    "marketdata": ("qtrader_candles_published_total",),
    "inference": ("qtrader_messages_consumed_total", "qtrader_signals_emitted_total"),
    "execution": ("qtrader_messages_consumed_total",),
    "portfolio": ("qtrader_portfolio_snapshots_published_total",),
}


def run(options: StressOptions, result: ScenarioResult) -> None:
    asyncio.run(_run(options, result))


async def _run(options: StressOptions, result: ScenarioResult) -> None:
    rounds = max(1, round(FULL_ROUNDS * options.scale))
    gap_s = options.scaled(FULL_GAP_S, minimum=MIN_GAP_S)
    # Each marketdata process runs this many steps: enough for the other three kills after
    # its own restart, then the trail.
    after_restart_s = 3 * (gap_s + EXPECTED_RECOVERY_S) + TRAIL_S
    steps = LEAD_STEPS + math.ceil(CANDLES_PER_SECOND * after_restart_s)
    figures = result.figures
    figures.update({"rounds": rounds, "trading before each kill s": gap_s, "feed steps": steps})
    async with Rig(options.work_dir) as rig:
        pipeline = await start_pipeline(rig, options, steps, policy=POLICY)
        supervisor = rig.supervise(pipeline.workers)
        await rig.until(
            lambda: at_least(family_total(rig, pipeline.execution, "qtrader_fills_total"), 1),
            timeout_s=START_TIMEOUT_S,
            what="the first fill",
        )
        baseline = await health_of(rig, pipeline.workers)
        result.figures["health before the kills (checks not OK)"] = not_ok(baseline)
        recoveries: dict[str, list[float]] = {w.name: [] for w in pipeline.workers}
        for round_ in range(rounds):
            for worker in pipeline.workers:
                await _trade_for(rig, gap_s)
                options.say(f"worker-kill: round {round_ + 1}, SIGKILL {worker.name}")
                recoveries[worker.name].append(await _kill(rig, supervisor, worker))
        if await feed_steps(rig, pipeline.marketdata) >= steps:
            raise ScenarioFailure(
                "the feed ended before the last kill: the machine is too slow for this pace"
            )
        await wait_feed_end(rig, pipeline, steps)
        options.say("worker-kill: feed ended; waiting for the pipeline to drain")
        await wait_quiet(rig, pipeline)
        back = await settled_snapshot(rig, await read_back(rig))
        health = await health_of(rig, pipeline.workers)
        restarts, down = supervisor.restarts, supervisor.down()
    _judge(result, recoveries, restarts=restarts, down=down, rounds=rounds)
    result.figures["health at the end (checks not OK)"] = not_ok(health)
    judge_pipeline(result, back, policy=POLICY)
    healthy = sum(recovered(w, health[w], baseline.get(w, {})) for w in health)
    result.check("workers whose /health recovered", healthy, "==", 4)


async def _trade_for(rig: Rig, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        rig.check()
        await asyncio.sleep(min(0.25, max(0.0, deadline - time.monotonic())))


async def _kill(rig: Rig, supervisor: Supervisor, worker: Child) -> float:
    """SIGKILL ``worker``'s process; seconds until the supervisor has started it again and
    the new process does its work."""
    before = supervisor.restarts[worker.name]
    os.kill(rig.children[worker.name].process.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    await rig.until(
        _working_again(rig, supervisor, worker, restarts_before=before),
        timeout_s=RECOVERY_TIMEOUT_S,
        what=f"{worker.name} to be restarted and working",
    )
    return round(time.monotonic() - killed_at, 2)


def _working_again(
    rig: Rig, supervisor: Supervisor, worker: Child, *, restarts_before: int
) -> Callable[[], Awaitable[bool]]:
    async def working() -> bool:
        if supervisor.restarts[worker.name] <= restarts_before:
            return False
        # The same port as before: the Child of the first process reads the new one.
        return all([await family_total(rig, worker, m) > 0 for m in WORKING[worker.name]])

    return working


def _judge(
    result: ScenarioResult,
    recoveries: dict[str, list[float]],
    *,
    restarts: dict[str, int],
    down: list[str],
    rounds: int,
) -> None:
    result.figures["recovered after s (per kill)"] = recoveries
    result.figures["supervisor restarts"] = restarts
    slowest = max(s for times in recoveries.values() for s in times)
    result.check("slowest recovery after a kill (s)", slowest, "<=", RECOVERY_BOUND_S)
    kills = {name: 0 if name == "nats-server" else rounds for name in restarts}
    wrong = {name: n for name, n in restarts.items() if n != kills[name]}
    result.figures["restarts other than the kills"] = wrong
    result.check("workloads whose restarts differ from their kills", len(wrong), "==", 0)
    result.check("processes down at the end", len(down), "==", 0)
