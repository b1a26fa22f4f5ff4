"""``qtrader bench halt``: how long a trip takes to be obeyed by every execution worker.

What is timed is what an operator waits for: from just before ``publish_latch`` writes a HALTED
revision (KV put, then the fast broadcast) until the acknowledgement of that revision from the
last of N execution workers arrives on CONTROL_HALT_ACK. A worker acknowledges only after the
latch is in force and its open orders are cancelled, so the figure is "trip -> all halted".
Each trip is followed by an ACTIVE revision (also awaited) before the next one.

The set-up is the real one, on one machine: an embedded nats-server, the policy and an ACTIVE
latch published, control heartbeats, N ``qtrader execution`` processes and a portfolio (for the
equity), and a stand-in for marketdata and inference that publishes candles and LONG/SHORT
signals at ``FEED_HZ``, so orders are being decided and sent while the latch flips.

Choices worth knowing:

* Receipt times come from a dedicated subscription that stamps ``perf_counter`` in the message
  callback, the first answer per (worker, revision). ``AckCollector`` keeps only each worker's
  latest answer, and the heartbeat's presence answers would move its timestamps.
* The baseline is the same fan-out without JetStream and without a worker's logic: N separate
  echo processes answer a core NATS publish. It goes through ``Bus`` like everything else (the
  README's rule: only ``bus/nats_bus.py`` imports ``nats``) and carries the same message kinds
  (a ``HaltLatch`` out, a ``HaltAck`` back), so the ratio is what the halt path adds on top of
  the transport. It runs once the workers are up, before the feed starts: the quiet floor.
* The feed runs in its own process, as marketdata and inference do: in the benchmark's event
  loop its publishes would delay the receipt callbacks being timed.
* Hold times in each state are random (seeded), so trips do not fall in step with the feed.
* Orders after acknowledgement: every order update is read back from the ORDERS stream; a
  FILLED update of worker W with ``ts_ms`` strictly between W's ack of a HALTED revision
  (``HaltAck.ts_ms``) and the issue time of the ACTIVE revision after it is a violation. Both
  stamps are this machine's wall clock. The signals denied as halted and the intents refused by
  the halt gate during the trips are counted too: without them a 0 would prove nothing, so a run
  without any is a failure.

Everything started here (nats-server, workers, echoes, feed) is stopped at the end, also on
failure or Ctrl-C: SIGTERM, then SIGKILL after a grace period; the temporary directory goes too.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

import httpx

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    Candle,
    CandleSource,
    Direction,
    HaltAck,
    HaltLatch,
    OrderStatus,
    OrderUpdate,
    RefusedBy,
    Signal,
    TradingState,
)
from qtrader.contracts.policy import TradingPolicy, parse_policy
from qtrader.control.halt_channel import publish_latch
from qtrader.local.control import heartbeat_forever, publish_policy
from qtrader.local.nats_server import EmbeddedNats, NatsServerError
from qtrader_tools import metrics
from qtrader_tools.benchmarks.harness import BenchFailure, ms, percentile, report, wait_healthy
from qtrader_tools.processes import Child, ChildExited, Children

SYMBOL = "BTCUSDT"
ISSUER = "qtrader bench"
FEED_HZ = 50.0  # candle + signal pairs per second from the stand-in feed
HOLD_S = (0.015, 0.035)  # time spent in each state between transitions (uniform, seeded)
WARMUP = 5  # trips and echo rounds run first and not counted (their windows are audited)
ACK_TIMEOUT_S = 5.0
START_TIMEOUT_S = 60.0
# Subjects no workload listens to: the baseline's ping and its answers.
ECHO_PING = f"{subjects.ROOT}.bench.echo.ping"
ECHO_PONG = f"{subjects.ROOT}.bench.echo.pong"
_PEER = "import sys; from qtrader_tools.benchmarks.halt import peer; sys.exit(peer(sys.argv[1:]))"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _policy() -> TradingPolicy:
    return parse_policy(
        {
            "apiVersion": "qtrader.dev/v1alpha1",
            "kind": "TradingPolicy",
            "metadata": {"name": "bench-halt"},
            "spec": {"symbols": [SYMBOL], "risk": {"minConfidence": 0.0}},
        }
    )


# --- the helper processes: echo (baseline) and feed (orders flowing) --------------------------


def peer(argv: Sequence[str]) -> int:
    """Entry of a helper process: ``echo NATS_URL NAME`` or ``feed NATS_URL HZ``."""
    role, url, argument = argv
    if role not in ("echo", "feed"):
        raise SystemExit(f"unknown helper role {role!r}: echo or feed")
    coroutine = _echo(url, argument) if role == "echo" else _feed(url, float(argument))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(coroutine)
    return 0


async def _echo(url: str, name: str) -> None:
    """Answer every ping with a HaltAck naming this process, as a worker answers a latch."""
    bus = Bus(url=url, client_name=name)
    await bus.connect()

    async def answer(ping: HaltLatch) -> None:
        pong = HaltAck(worker_id=name, revision=ping.revision, state=ping.state, ts_ms=_now_ms())
        await bus.broadcast(ECHO_PONG, pong)

    await bus.subscribe(ECHO_PING, HaltLatch, answer, label="bench-echo")


async def _feed(url: str, hz: float) -> None:
    """Candles and alternating LONG/SHORT signals at ``hz`` pairs a second, until killed."""
    bus = Bus(url=url, client_name="bench-feed")
    await bus.connect()
    index = 0
    next_at = time.monotonic()
    while True:
        candle, signal_ = _market_step(index)
        await bus.publish(subjects.candle_subject(SYMBOL), candle)
        await bus.publish(subjects.signal_subject(SYMBOL), signal_)
        index += 1
        next_at += 1.0 / hz
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))


def _market_step(index: int) -> tuple[Candle, Signal]:
    price = Decimal(30_000) + (index % 10) * 10
    open_time_ms = 1_700_000_000_000 + index * 60_000
    candle = Candle(
        symbol=SYMBOL,
        interval="1m",
        open_time_ms=open_time_ms,
        close_time_ms=open_time_ms + 59_999,
        open=price,
        high=price + 5,
        low=price - 5,
        close=price,
        volume=Decimal(1),
        source=CandleSource.SYNTHETIC,
    )
    signal_ = Signal(
        signal_id=f"bench:{index}",
        symbol=SYMBOL,
        direction=Direction.LONG if index % 2 == 0 else Direction.SHORT,
        confidence=0.9,
        model_version="bench",
        candle_open_time_ms=open_time_ms,
        price=price,
        created_at_ms=_now_ms(),
    )
    return candle, signal_


# --- processes ----------------------------------------------------------------------------------


def spawn_peer(children: Children, role: str, url: str, argument: str, *, name: str) -> Child:
    """A helper process of this benchmark (an echo or the feed), ``peer`` in its own process."""
    return children.spawn(name, ["-c", _PEER, role, url, argument])


# --- receipts -----------------------------------------------------------------------------------


class Receipts:
    """The first answer of each sender to each revision, stamped with perf_counter on receipt."""

    def __init__(self, expected: Iterable[str]) -> None:
        self.expected = frozenset(expected)
        self._first: dict[tuple[str, int], tuple[float, HaltAck]] = {}
        self._changed = asyncio.Event()

    async def on_answer(self, ack: HaltAck) -> None:
        heard = time.perf_counter()
        key = (ack.worker_id, ack.revision)
        if ack.worker_id in self.expected and key not in self._first:
            self._first[key] = (heard, ack)
            self._changed.set()

    def answered(self, revision: int) -> set[str]:
        return {w for w in self.expected if (w, revision) in self._first}

    def ack(self, worker: str, revision: int) -> HaltAck:
        return self._first[(worker, revision)][1]

    def last_heard(self, revision: int) -> float:
        return max(self._first[(w, revision)][0] for w in self.expected)

    async def wait(self, revision: int, *, timeout_s: float) -> bool:
        """True once every expected sender answered ``revision``; False after the timeout."""
        deadline = time.monotonic() + timeout_s
        while self.answered(revision) != self.expected:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return True

    def pending(self, revision: int) -> list[str]:
        return sorted(self.expected - self.answered(revision))


# --- the measurements ---------------------------------------------------------------------------


class Latches:
    """The benchmark's latch revisions, numbered from 1 on a fresh server."""

    def __init__(self) -> None:
        self._revision = 0

    def next(self, state: TradingState, reason: str) -> HaltLatch:
        self._revision += 1
        return HaltLatch(
            state=state,
            revision=self._revision,
            reason=reason,
            issued_by=ISSUER,
            issued_at_ms=_now_ms(),
        )


@dataclass(frozen=True, kw_only=True)
class Trip:
    halt: HaltLatch
    rearm: HaltLatch
    halt_s: float  # publish -> last worker's ack of the HALTED revision
    publish_s: float  # of which publish_latch itself (KV put, then the broadcast)
    rearm_s: float  # publish -> last worker's ack of the ACTIVE revision after it


async def _transition(
    bus: Bus, receipts: Receipts, latch: HaltLatch, children: Children
) -> tuple[float, float]:
    """Publish ``latch``, wait for every worker's ack: seconds to the last ack, to published."""
    started = time.perf_counter()
    await publish_latch(bus, latch)
    published = time.perf_counter() - started
    if not await receipts.wait(latch.revision, timeout_s=ACK_TIMEOUT_S):
        children.check_alive()  # a dead worker is the likeliest cause: say so first
        pending = receipts.pending(latch.revision)
        logs = "\n".join(f"--- {w} ---\n{children.log_of(w)}" for w in pending)
        raise BenchFailure(
            f"latch revision {latch.revision} ({latch.state.value}) not acknowledged within "
            f"{ACK_TIMEOUT_S:g}s by {', '.join(pending)}\n{logs}"
        )
    return receipts.last_heard(latch.revision) - started, published


async def _trips(
    bus: Bus, receipts: Receipts, latches: Latches, children: Children, count: int
) -> list[Trip]:
    """``count`` trips, each HALTED then ACTIVE again, with a random hold in each state."""
    rng = random.Random(7)
    trips = []
    for number in range(1, count + 1):
        halt = latches.next(TradingState.HALTED, f"bench trip {number}")
        halt_s, publish_s = await _transition(bus, receipts, halt, children)
        await asyncio.sleep(rng.uniform(*HOLD_S))
        rearm = latches.next(TradingState.ACTIVE, f"bench re-arm {number}")
        rearm_s, _ = await _transition(bus, receipts, rearm, children)
        await asyncio.sleep(rng.uniform(*HOLD_S))
        trips.append(
            Trip(halt=halt, rearm=rearm, halt_s=halt_s, publish_s=publish_s, rearm_s=rearm_s)
        )
    return trips


async def _baseline(bus: Bus, receipts: Receipts, rounds: int) -> list[float]:
    """Seconds from a core publish of a latch to the last echo's answer, ``rounds`` times.

    Rounds are paced like the trips' transitions: back to back, a round could also wait for
    the echoes to finish flushing their previous answer, which no trip does.
    """
    rng = random.Random(7)
    latencies = []
    for number in range(1, rounds + 1):
        ping = HaltLatch(state=TradingState.HALTED, revision=number, issued_at_ms=_now_ms())
        started = time.perf_counter()
        await bus.broadcast(ECHO_PING, ping)
        if not await receipts.wait(number, timeout_s=ACK_TIMEOUT_S):
            raise BenchFailure(f"echo round {number}: no answer from {receipts.pending(number)}")
        latencies.append(receipts.last_heard(number) - started)
        await asyncio.sleep(rng.uniform(*HOLD_S))
    return latencies


async def _echoes_ready(bus: Bus, receipts: Receipts, children: Children) -> None:
    """Ping (with revisions above any measured round) until every echo process answers."""
    deadline = time.monotonic() + START_TIMEOUT_S
    revision = 1_000_000_000
    while True:
        children.check_alive()
        revision += 1
        ping = HaltLatch(state=TradingState.ACTIVE, revision=revision, issued_at_ms=_now_ms())
        await bus.broadcast(ECHO_PING, ping)
        if await receipts.wait(revision, timeout_s=0.2):
            return
        if time.monotonic() > deadline:
            raise BenchFailure(f"echo processes not answering: {receipts.pending(revision)}")


# --- health, metrics and the order audit --------------------------------------------------------


async def _metric(client: httpx.AsyncClient, child: Child, name: str, **labels: str) -> float:
    """One sample of a workload's /metrics, ``name`` with exactly ``labels``; 0.0 when absent."""
    return metrics.value(metrics.parse((await client.get(child.metrics_url)).text), name, **labels)


async def _metric_total(
    client: httpx.AsyncClient, workers: list[Child], name: str, **labels: str
) -> float:
    values = await asyncio.gather(*(_metric(client, w, name, **labels) for w in workers))
    return sum(values)


async def _wait_trading(
    client: httpx.AsyncClient, workers: list[Child], children: Children
) -> None:
    """Until every worker has sent an order: policy, latch, heartbeat, equity, prices all there."""
    deadline = time.monotonic() + START_TIMEOUT_S
    sample = "qtrader_orders_sent_total"
    while True:
        children.check_alive()
        sent = await asyncio.gather(
            *(_metric(client, w, sample, exchange="paper") for w in workers)
        )
        if all(s >= 1 for s in sent):
            return
        if time.monotonic() > deadline:
            idle = [w.name for w, s in zip(workers, sent, strict=True) if s < 1]
            raise BenchFailure(f"no order sent after {START_TIMEOUT_S:g}s by {idle}")
        await asyncio.sleep(0.2)


async def _order_updates(bus: Bus) -> list[OrderUpdate]:
    """Every order update in the ORDERS stream, up to the newest one stored when called."""
    newest = await bus.last_message(
        subjects.ORDERS, subjects.order_update_subject(SYMBOL), OrderUpdate
    )
    if not isinstance(newest, OrderUpdate):  # none, or one that does not decode
        return []
    updates: list[OrderUpdate] = []
    caught_up = asyncio.Event()

    async def collect(update: OrderUpdate) -> None:
        updates.append(update)
        if update == newest:
            caught_up.set()

    reader = asyncio.create_task(
        bus.replay(
            subjects.ORDERS,
            subjects.all_of(subjects.ORDER_UPDATE_PREFIX),
            OrderUpdate,
            collect,
            label="bench-orders",
        )
    )
    try:
        await asyncio.wait_for(caught_up.wait(), START_TIMEOUT_S)
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    return updates


def _fills_after_ack(updates: list[OrderUpdate], trips: list[Trip], receipts: Receipts) -> int:
    """FILLED updates stamped strictly inside a worker's (HALTED ack, next ACTIVE issued)."""
    windows = {
        worker: [(receipts.ack(worker, t.halt.revision).ts_ms, t.rearm.issued_at_ms) for t in trips]
        for worker in receipts.expected
    }
    return sum(
        1
        for u in updates
        if u.status is OrderStatus.FILLED
        and any(start < u.ts_ms < end for start, end in windows.get(u.worker_id, ()))
    )


# --- the run ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Figures:
    trips: list[Trip]
    baseline_s: list[float]
    orders_filled: int
    filled_during_trips: int
    orders_after_ack: int
    denied_while_halted: int
    refused_while_halted: int


class HaltBench:
    """One run: the processes it starts, the baseline, the trips, what the audit needs."""

    def __init__(
        self, bus: Bus, url: str, children: Children, client: httpx.AsyncClient, *, workers: int
    ) -> None:
        self._bus = bus
        self._url = url
        self._children = children
        self._client = client
        self._latches = Latches()
        self.acks = Receipts(f"bench-{n}" for n in range(1, workers + 1))
        self._pongs = Receipts(f"echo-{n}" for n in range(1, workers + 1))
        self._executions: list[Child] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._began = time.monotonic()

    async def start(self) -> None:
        """Topology, policy, an ACTIVE latch, heartbeats; then the workers and the echoes."""
        bus, url = self._bus, self._url
        await bus.ensure_topology()
        await publish_policy(bus, _policy())
        await publish_latch(bus, self._latches.next(TradingState.ACTIVE, "bench armed"))
        self._tasks += [
            asyncio.create_task(
                bus.subscribe(
                    subjects.CONTROL_HALT_ACK, HaltAck, self.acks.on_answer, label="bench-acks"
                )
            ),
            asyncio.create_task(
                bus.subscribe(ECHO_PONG, HaltAck, self._pongs.on_answer, label="bench-pongs")
            ),
            asyncio.create_task(heartbeat_forever(bus, issued_by=ISSUER)),
        ]
        self._executions = [
            self._children.workload("execution", w, url, "--worker-id", w)
            for w in sorted(self.acks.expected)
        ]
        portfolio = self._children.workload("portfolio", "portfolio", url)
        for echo in sorted(self._pongs.expected):
            spawn_peer(self._children, "echo", url, echo, name=echo)
        await wait_healthy(
            self._client,
            [*self._executions, portfolio],
            self._children,
            timeout_s=START_TIMEOUT_S,
        )
        self._progress(f"{len(self._executions)} execution workers and a portfolio are up")

    async def baseline(self, rounds: int) -> list[float]:
        """The echo round trips, while the workers are up and idle; then the echoes go."""
        await _echoes_ready(self._bus, self._pongs, self._children)
        latencies = await _baseline(self._bus, self._pongs, rounds)
        self._children.stop(sorted(self._pongs.expected))
        self._progress(f"baseline done ({rounds} rounds); starting the feed")
        return latencies

    async def trips(self, count: int) -> tuple[list[Trip], int]:
        """The trips while the feed runs; also the signals denied as halted meanwhile."""
        spawn_peer(self._children, "feed", self._url, str(FEED_HZ), name="feed")
        await _wait_trading(self._client, self._executions, self._children)
        self._progress(f"orders flowing; {count} trips")
        denied = "qtrader_signals_denied_total"
        before = await _metric_total(self._client, self._executions, denied, reason="halted")
        done = await _trips(self._bus, self.acks, self._latches, self._children, count)
        after = await _metric_total(self._client, self._executions, denied, reason="halted")
        self._children.stop(["feed"])
        self._progress("trips done; reading the order updates back")
        return done, int(after - before)

    async def stop_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _progress(self, text: str) -> None:
        elapsed = time.monotonic() - self._began
        print(f"qtrader bench halt: [{elapsed:5.1f}s] {text}", file=sys.stderr, flush=True)


async def _measure(url: str, children: Children, *, trips: int, workers: int) -> Figures:
    bus = Bus(url=url, client_name="qtrader-bench")
    await bus.connect()
    try:
        async with httpx.AsyncClient(timeout=3.0) as client:
            bench = HaltBench(bus, url, children, client, workers=workers)
            try:
                await bench.start()
                baseline = (await bench.baseline(WARMUP + trips))[WARMUP:]
                done, denied = await bench.trips(WARMUP + trips)
            finally:
                await bench.stop_tasks()
        updates = await _order_updates(bus)
        return _figures(done, baseline, updates, bench.acks, denied=denied)
    finally:
        await bus.close()


def _figures(
    done: list[Trip],
    baseline: list[float],
    updates: list[OrderUpdate],
    acks: Receipts,
    *,
    denied: int,
) -> Figures:
    started_ms = done[0].halt.issued_at_ms
    ended_ms = done[-1].rearm.issued_at_ms
    filled = [u for u in updates if u.status is OrderStatus.FILLED]
    refused = [u for u in updates if u.refused_by is RefusedBy.HALT_GATE and u.ts_ms >= started_ms]
    return Figures(
        trips=done[WARMUP:],
        baseline_s=baseline,
        orders_filled=len(filled),
        filled_during_trips=sum(1 for u in filled if started_ms <= u.ts_ms <= ended_ms),
        orders_after_ack=_fills_after_ack(updates, done, acks),
        denied_while_halted=denied,
        refused_while_halted=len(refused),
    )


# --- the report ---------------------------------------------------------------------------------


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50_ms": ms(percentile(values, 50)),
        "p99_ms": ms(percentile(values, 99)),
        "max_ms": ms(max(values)),
    }


def summary(figures: Figures, *, workers: int, wall_s: float) -> dict[str, Any]:
    """The figures as one flat JSON object (the last line of the output)."""
    halt = _spread([t.halt_s for t in figures.trips])
    base = _spread(figures.baseline_s)
    publish = _spread([t.publish_s for t in figures.trips])
    rearm = _spread([t.rearm_s for t in figures.trips])
    return {
        "benchmark": "halt",
        "trips": len(figures.trips),
        "workers": workers,
        **halt,
        **{f"baseline_{k}": v for k, v in base.items()},
        "ratio_p99": round(halt["p99_ms"] / base["p99_ms"], 2),
        **{f"publish_{k}": v for k, v in publish.items()},
        **{f"rearm_{k}": v for k, v in rearm.items()},
        "orders_filled": figures.orders_filled,
        "orders_filled_during_trips": figures.filled_during_trips,
        "signals_denied_while_halted": figures.denied_while_halted,
        "intents_refused_while_halted": figures.refused_while_halted,
        "orders_after_ack": figures.orders_after_ack,
        "warmup": WARMUP,
        "feed_hz": FEED_HZ,
        "wall_s": round(wall_s, 1),
    }


def _row(result: dict[str, Any], prefix: str = "") -> str:
    return "  ".join(f"{q} {result[f'{prefix}{q}_ms']:7.3f}" for q in ("p50", "p99", "max"))


def render(result: dict[str, Any]) -> str:
    """The human-readable table."""
    n = result["workers"]
    rows = [
        ("trips", f"{result['trips']} (+{result['warmup']} warm-up), {n} execution workers"),
        ("halt latency ms", _row(result)),
        ("  of which publish_latch", _row(result, "publish_")),
        ("re-arm latency ms", _row(result, "rearm_")),
        (f"baseline 1 -> {n} -> 1 ms", _row(result, "baseline_")),
        ("p99 / baseline p99", f"{result['ratio_p99']:.2f}x"),
        (
            "orders filled",
            f"{result['orders_filled']} ({result['orders_filled_during_trips']} during trips)",
        ),
        (
            "while halted",
            f"{result['signals_denied_while_halted']} signals denied, "
            f"{result['intents_refused_while_halted']} intents refused",
        ),
        ("orders after ack", str(result["orders_after_ack"])),
        ("wall time", f"{result['wall_s']:.1f} s"),
    ]
    title = f"halt: operator publishes a trip -> the last of {n} execution workers acknowledges"
    width = max(len(label) for label, _ in rows)
    return "\n".join([title, *(f"  {label:<{width}}  {value}" for label, value in rows)])


def _verdict(result: dict[str, Any]) -> str | None:
    """Why the run fails, or None."""
    if result["orders_after_ack"] > 0:
        return f"{result['orders_after_ack']} order(s) filled after a worker acknowledged a halt"
    if result["signals_denied_while_halted"] + result["intents_refused_while_halted"] == 0:
        return "no signal reached a halted worker, so 0 orders after ack proves nothing"
    return None


def run(
    *, trips: int, workers: int, json_path: Path | None = None, out: TextIO = sys.stdout
) -> int:
    """Run the benchmark, print the table and the JSON line; the exit code of ``qtrader bench``."""
    started = time.monotonic()
    try:
        figures = _run_stack(trips=trips, workers=workers)
    except (BenchFailure, ChildExited) as exc:
        print(f"qtrader bench halt: failed: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("qtrader bench halt: interrupted; everything it started was stopped", file=sys.stderr)
        return 130
    result = summary(figures, workers=workers, wall_s=time.monotonic() - started)
    return report("halt", result, render=render, verdict=_verdict, json_path=json_path, out=out)


def _run_stack(*, trips: int, workers: int) -> Figures:
    """nats-server and every process in a temporary directory, all gone when this returns."""
    with tempfile.TemporaryDirectory(prefix="qtrader-bench-", ignore_cleanup_errors=True) as tmp:
        nats = EmbeddedNats(store_dir=Path(tmp) / "nats")
        try:
            with Children(Path(tmp)) as children:
                nats.start()
                return asyncio.run(_main(nats.url, children, trips=trips, workers=workers))
        except NatsServerError as exc:
            raise BenchFailure(str(exc)) from exc
        finally:
            nats.stop()


async def _main(url: str, children: Children, *, trips: int, workers: int) -> Figures:
    """The measurement, cancelled by SIGTERM as asyncio.run cancels it on Ctrl-C."""
    main = asyncio.current_task()
    assert main is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    return await _measure(url, children, trips=trips, workers=workers)
