"""``qtrader bench pipeline``: candles to order decisions through the real workers, per second.

The set-up is the real one on one machine: a nats-server the benchmark starts (free port,
temporary store), the policy and an ACTIVE latch published, control heartbeats, and the
workload processes ``qtrader portfolio``, ``qtrader inference`` (the packaged ONNX model) and
``qtrader execution`` (paper mode), each with its own outbox as in a deployment. The benchmark
itself plays marketdata: it publishes seeded synthetic candles (``SyntheticMarket``, one candle
per symbol per step) through ``Bus.publish_many``, a step's candles together, as the
marketdata worker publishes a step.

The policy opens the throttles so the figure is the pipeline's capacity, not the policy's limit:
every signal acted on (``minConfidence`` 0), an intake of 10,000 signals with a 1 h ttl, up to
1,000 decisions a cycle, and a 10 ms decision cycle (``--cycle 0.01``; the default 0.25 s with
10 a cycle would cap execution at 40 decisions/s).

Phases, in order:

* **Warm-up.** ``WINDOW + 8`` steps: the model loaded, every feature window full, every worker
  connected and trading. Not timed; waited for until everything is settled (below).
* **Baseline**, same server, same moment, workers idle: raw nats-py, no ``Bus``, no decoding.
  JetStream publish + acknowledgement, one at a time, of messages of the run's candle size (the
  encoded candles themselves, each with its ``Nats-Msg-Id`` as ``Bus`` sends it) into a stream of
  their own (file storage, like the pipeline's); then a durable pull consumer with explicit acks
  reading them back in batches of 64, as ``Bus.consume`` does.
  (The benchmark imports ``nats`` itself for this and for reading consumer states: the raw
  client is the baseline, and ``Bus`` has no call for a consumer's state.)
* **Latency.** Steps paced at ``LATENCY_HZ``, light load: for each candle, from just before its
  publish to the receipt of its signal, and to the receipt of the order intent made from that
  signal (only some signals change the position; the others are decided ``no_change`` and make
  no message, so the intent figures come from fewer candles). Receipts come from a core NATS
  subscription in this process, stamped with ``perf_counter`` in the callback, held for this
  phase only (in the throughput run it would take the workers' CPU).
* **Throughput.** ``candles`` steps published back to back. From just before the first publish
  until the first poll (every ``POLL_S``) that finds the inference consumer drained (every candle
  handled and acknowledged, so every signal published): signals/s. Until the first poll that also
  finds the execution consumer drained, its intake empty, and its decisions (intents + denials,
  from its ``/metrics``) plus intake drops equal to the signals stored: decisions/s. The poll's
  period bounds the timing error. Over the same span, the CPU seconds each process used (from
  ``/proc``: the three workers, nats-server and this benchmark), per signal: where the two
  cores go, steadier from run to run than a rate on a shared machine.
  And the messages each process sent nats-server and was delivered by it (nats-server's own
  counts per connection, from its monitoring port's ``/connz``), per signal: what the pipeline's
  design costs in message operations, whatever the code around each costs.

Every candle is accounted for: after the warm-up each candle makes exactly one signal, so the
measured phases must store as many signals as they published candles, every signal must be
decided or dropped with a reason, every intent the execution counted must be in the ORDERS
stream, and the portfolio must have applied every fill in the FILLS stream. Exit 0 when all of
that holds; 1 otherwise or when the run failed (a process died, nothing moved for ``STALL_S``);
130 when interrupted. Everything started here is stopped at the end, also on failure, Ctrl-C or
SIGTERM. The last line of the output is one JSON object with every figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import httpx
import nats
import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

from qtrader.bus.errors import BusError
from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    Candle,
    OrderIntent,
    Pack,
    PortfolioSnapshot,
    Signal,
    TradingState,
    decode_all,
)
from qtrader.contracts.policy import TradingPolicy, parse_policy
from qtrader.inference.features import WINDOW
from qtrader.instruments import paper_exchange_info
from qtrader.local.control import heartbeat_forever, write_latch
from qtrader.local.control import publish_policy as publish_policy_revision
from qtrader.local.nats_server import EmbeddedNats, NatsServerError, free_port
from qtrader.marketdata.synthetic import SyntheticConfig, SyntheticMarket
from qtrader_tools import metrics
from qtrader_tools.benchmarks.harness import BenchFailure, ms, percentile, report, wait_healthy
from qtrader_tools.processes import Child, ChildExited, Children

ISSUER = "qtrader bench"
SEED = 11
WARMUP_EXTRA = 8  # steps after the feature windows are full, before anything is measured
LATENCY_HZ = 10.0  # candle steps a second in the latency phase
CYCLE_S = 0.01  # the execution's decision cycle
POLL_S = 0.05
START_TIMEOUT_S = 90.0
STALL_S = 30.0  # nothing decided, nothing drained for this long: the run failed
RAW_MIN = 2000  # baseline messages at least, whatever the run's size
RAW_WARMUP = 200
RAW_STREAM = "BENCH_RAW"
RAW_SUBJECT = "bench.raw.candle"
RAW_DURABLE = "bench-raw"
EXECUTION = "execution"
WORKERS = ("inference", EXECUTION, "portfolio")
_ERRORS = (BusError, NatsServerError, ChildExited, nats.errors.Error, httpx.HTTPError, OSError)


class Interrupt:
    """SIGTERM, remembered as well as delivered as a cancellation of the main task.

    A cancellation can be lost: ``asyncio.wait_for`` (under nats-py's request, Python 3.11)
    returns the result instead when the answer arrived at that very moment. The loops check
    this flag too, so a SIGTERM always ends the run.
    """

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self._task = task
        self.requested = False

    def __call__(self) -> None:
        self.requested = True
        self._task.cancel()

    def check(self) -> None:
        if self.requested:
            raise asyncio.CancelledError


def bench_symbols(count: int) -> tuple[str, ...]:
    """The first ``count`` symbols the paper exchange lists."""
    listed = tuple(paper_exchange_info().instruments)
    if not 1 <= count <= len(listed):
        raise ValueError(f"symbols must be 1-{len(listed)} (the paper exchange's), got {count}")
    return listed[:count]


def _policy(symbols: Sequence[str]) -> TradingPolicy:
    return parse_policy(
        {
            "apiVersion": "qtrader.dev/v1alpha1",
            "kind": "TradingPolicy",
            "metadata": {"name": "bench-pipeline"},
            "spec": {
                "symbols": list(symbols),
                "risk": {
                    "minConfidence": 0.0,
                    "maxOpenPositions": len(symbols),
                    "maxPositionUsd": "1000",
                },
                "signals": {"queueSize": 10_000, "maxPerCycle": 1000, "ttlSeconds": 3600},
                "paper": {"initialCapitalUsd": "100000"},
            },
        }
    )


# --- candles ------------------------------------------------------------------------------------


class Feed:
    """The seeded synthetic market, handed out a phase at a time (the series goes on)."""

    def __init__(self, symbols: Sequence[str], seed: int = SEED) -> None:
        config = SyntheticConfig(symbols=tuple(symbols), seed=seed)
        self._candles = SyntheticMarket(config, paper_exchange_info()).candles()
        self._width = len(symbols)

    def steps(self, count: int) -> list[Candle]:
        """``count`` steps: one candle per symbol each, built before anything is timed."""
        return list(itertools.islice(self._candles, count * self._width))


# --- receipts (latency) -------------------------------------------------------------------------

Key = tuple[str, int]  # (symbol, candle open time)


@dataclass
class Stamps:
    """perf_counter of each candle's publish, and of the first receipt of its signal and intent."""

    published: dict[Key, float] = field(default_factory=dict)
    signals: dict[Key, float] = field(default_factory=dict)
    signal_keys: dict[str, Key] = field(default_factory=dict)
    intents: dict[str, tuple[str, float]] = field(default_factory=dict)  # intent id -> signal id

    async def on_signal(self, signal_: Signal) -> None:
        heard = time.perf_counter()
        key = (signal_.symbol, signal_.candle_open_time_ms)
        self.signals.setdefault(key, heard)
        self.signal_keys.setdefault(signal_.signal_id, key)

    async def on_intent(self, intent: OrderIntent) -> None:
        heard = time.perf_counter()
        if intent.signal_id is not None:
            self.intents.setdefault(intent.intent_id, (intent.signal_id, heard))

    def latencies(self, candles: Sequence[Candle]) -> tuple[list[float], list[float]]:
        """Seconds from publish to signal, and to intent, of ``candles`` (those that have one)."""
        keys = {(c.symbol, c.open_time_ms) for c in candles}
        to_signal = [self.signals[k] - self.published[k] for k in keys if k in self.signals]
        to_intent = []
        for signal_id, heard in self.intents.values():
            key = self.signal_keys.get(signal_id)
            if key in keys:
                to_intent.append(heard - self.published[key])
        return to_signal, to_intent


# --- what the server and the workers say ---------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class State:
    """The pipeline's counts: JetStream's own, and the execution's and portfolio's metrics."""

    signals: int = 0  # stored in QT_SIGNALS (a pack's signals each)
    inference_backlog: int = 0  # candles not yet delivered or not yet acknowledged
    execution_backlog: int = 0  # signals likewise
    intents: int = 0  # the execution's count of intents published
    denied: dict[str, int] = field(default_factory=dict)  # by reason
    dropped: dict[str, int] = field(default_factory=dict)  # by the intake, by reason
    queued: int = 0  # in the execution's intake
    intents_stored: int = 0  # in QT_ORDERS
    fills_stored: int = 0  # in QT_FILLS
    fills_applied: int = 0  # by the portfolio

    @property
    def decisions(self) -> int:
        return self.intents + sum(self.denied.values())

    @property
    def drained(self) -> bool:
        return self.inference_backlog == 0 and self.execution_backlog == 0

    @property
    def settled(self) -> bool:
        """Every candle handled, every signal delivered, decided or dropped."""
        decided = self.decisions + sum(self.dropped.values())
        return self.drained and self.queued == 0 and decided == self.signals


def metric_samples(text: str, name: str) -> dict[str, float]:
    """Samples of ``name`` in a /metrics page, by the value of their first label ("" if none)."""
    found: dict[str, float] = {}
    for sample in metrics.parse(text):
        if sample.name == name:
            label = next(iter(sample.labels.values()), "")
            found[label] = found.get(label, 0.0) + sample.value
    return found


class Messages(NamedTuple):
    sent: int  # by the process to nats-server: publishes, acknowledgements, pull requests
    received: int  # by the process from nats-server: deliveries, publish acknowledgements


def _process_of(connection_name: str) -> str:
    """``inference:vm-1`` -> ``inference``; this benchmark's own connections -> ``benchmark``."""
    if connection_name.startswith("qtrader-bench-"):
        return "benchmark"
    return connection_name.partition(":")[0] or "unnamed"


def _counts(samples: dict[str, float]) -> dict[str, int]:
    return {label: int(value) for label, value in sorted(samples.items()) if value}


class Observer:
    """Reads the pipeline's state: consumer and stream states, and the workers' /metrics."""

    def __init__(
        self, js: JetStreamContext, http: httpx.AsyncClient, monitor_url: str | None
    ) -> None:
        self._js = js
        self._http = http
        self._monitor_url = monitor_url
        self.execution: Child | None = None
        self.portfolio: Child | None = None
        self._signals = _StoredCount(
            js, subjects.SIGNALS.name, subjects.all_of(subjects.SIGNAL_PREFIX)
        )

    async def messages_by_process(self) -> dict[str, Messages] | None:
        """What nats-server counted for each process's connections so far (its ``/connz``):
        messages each sent it and it delivered to each. None without its monitoring port."""
        if self._monitor_url is None:
            return None
        reply = await self._http.get(f"{self._monitor_url}/connz", params={"limit": 1024})
        counts: dict[str, Messages] = {}
        for connection in reply.json()["connections"]:
            process = _process_of(str(connection.get("name", "")))
            sent, received = counts.get(process, Messages(0, 0))
            counts[process] = Messages(
                sent + int(connection["in_msgs"]), received + int(connection["out_msgs"])
            )
        return counts

    async def backlog(self, spec: subjects.ConsumerSpec) -> int:
        info = await self._js.consumer_info(spec.stream.name, spec.durable)
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    async def messages(self, stream: str, filter_subject: str | None = None) -> int:
        info = await self._js.stream_info(stream, subjects_filter=filter_subject)
        if filter_subject is None:
            return int(info.state.messages)
        return sum((info.state.subjects or {}).values())

    async def metrics(self, child: Child | None) -> str:
        if child is None:
            raise BenchFailure("a workload was not started")
        return (await self._http.get(child.metrics_url)).text

    async def drain_state(self) -> State:
        """The consumers' backlogs; the execution's counts only once both are drained."""
        state = State(
            inference_backlog=await self.backlog(subjects.INFERENCE_CANDLES),
            execution_backlog=await self.backlog(subjects.EXECUTION_SIGNALS),
        )
        if not state.drained:
            return state
        return await self._decisions(state)

    async def _decisions(self, state: State) -> State:
        text = await self.metrics(self.execution)
        return replace(
            state,
            signals=await self._signals.count(),
            intents=int(sum(metric_samples(text, "qtrader_order_intents_total").values())),
            denied=_counts(metric_samples(text, "qtrader_signals_denied_total")),
            dropped=_counts(metric_samples(text, "qtrader_signals_dropped_total")),
            queued=int(sum(metric_samples(text, "qtrader_signal_queue_depth").values())),
        )

    async def full_state(self) -> State:
        state = await self._decisions(
            State(
                inference_backlog=await self.backlog(subjects.INFERENCE_CANDLES),
                execution_backlog=await self.backlog(subjects.EXECUTION_SIGNALS),
            )
        )
        applied = metric_samples(
            await self.metrics(self.portfolio), "qtrader_portfolio_fills_applied_total"
        )
        return replace(
            state,
            intents_stored=await self.messages(
                subjects.ORDERS.name, subjects.all_of(subjects.ORDER_INTENT_PREFIX)
            ),
            fills_stored=await self.messages(subjects.FILLS.name),
            fills_applied=int(sum(applied.values())),
        )


class _StoredCount:
    """The messages of a kind a stream stores, a pack's items each: what its consumers are
    handed. Read on from where the last count stopped, so each stored message is read once."""

    def __init__(self, js: JetStreamContext, stream: str, subject: str) -> None:
        self._js, self._stream, self._subject = js, stream, subject
        self._through = 0  # the last stream sequence counted
        self._count = 0

    async def count(self) -> int:
        last = int((await self._js.stream_info(self._stream)).state.last_seq)
        if last <= self._through:
            return self._count
        reader = await self._js.pull_subscribe(
            self._subject,
            stream=self._stream,
            config=ConsumerConfig(
                ack_policy=AckPolicy.NONE,
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=self._through + 1,
            ),
        )
        try:
            while self._through < last:
                try:
                    batch = await reader.fetch(1024, timeout=1.0)
                except nats.errors.TimeoutError:
                    break  # the rest of the range is other subjects' messages
                for msg in batch:
                    self._count += len(decode_all(msg.data, Signal).messages)
                    self._through = max(self._through, msg.metadata.sequence.stream)
        finally:
            await reader.unsubscribe()
        return self._count


@dataclass(frozen=True)
class Settled:
    state: State
    signals_at: float  # perf_counter of the first poll that found the inference drained
    decisions_at: float  # ... that found everything settled


async def wait_settled(
    observer: Observer,
    children: Children,
    interrupt: Interrupt,
    publishing: asyncio.Task[Any] | None = None,
) -> Settled:
    """Poll until every candle published is handled and every signal decided or dropped."""
    while publishing is not None and not publishing.done():  # no polling load meanwhile
        await asyncio.wait({publishing}, timeout=1.0)
        interrupt.check()
        children.check_alive()
    if publishing is not None:
        publishing.result()  # its error, if it failed
    signals_at: float | None = None
    progress: tuple[int, ...] = ()
    moved_at = time.monotonic()
    while True:
        state = await observer.drain_state()
        now = time.perf_counter()
        if signals_at is None and state.inference_backlog == 0:
            signals_at = now
        if signals_at is not None and state.settled:
            return Settled(state, signals_at, now)
        interrupt.check()
        children.check_alive()
        seen = (state.inference_backlog, state.execution_backlog, state.decisions, state.signals)
        if seen != progress:
            progress, moved_at = seen, time.monotonic()
        elif time.monotonic() - moved_at > STALL_S:
            raise BenchFailure(f"nothing moved for {STALL_S:g}s: {state}")
        await asyncio.sleep(POLL_S)


# --- the baseline: raw nats-py ------------------------------------------------------------------


@dataclass(frozen=True)
class Rate:
    count: int
    seconds: float

    @property
    def per_s(self) -> float:
        return round(self.count / self.seconds, 1) if self.seconds > 0 else 0.0


def _cycle(payloads: Sequence[bytes], count: int) -> Iterator[tuple[int, bytes]]:
    return enumerate(itertools.islice(itertools.cycle(payloads), count))


async def raw_publish_rate(js: JetStreamContext, payloads: Sequence[bytes], count: int) -> Rate:
    """``count`` JetStream publishes, each awaiting its acknowledgement, after a warm-up."""
    await js.add_stream(
        StreamConfig(
            name=RAW_STREAM,
            subjects=[RAW_SUBJECT],
            storage=StorageType.FILE,
            duplicate_window=subjects.MARKET.duplicate_window_s,
        )
    )
    for index, payload in _cycle(payloads, RAW_WARMUP):
        await js.publish(RAW_SUBJECT, payload, headers={"Nats-Msg-Id": f"warm-{index}"})
    began = time.perf_counter()
    for index, payload in _cycle(payloads, count):
        await js.publish(RAW_SUBJECT, payload, headers={"Nats-Msg-Id": f"raw-{index}"})
    return Rate(count, time.perf_counter() - began)


async def raw_consume_rate(js: JetStreamContext, count: int) -> Rate:
    """Everything in the raw stream read by a durable pull consumer, acked one by one."""
    config = ConsumerConfig(
        durable_name=RAW_DURABLE,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        max_ack_pending=subjects.INFERENCE_CANDLES.max_ack_pending,
    )
    subscription = await js.pull_subscribe(
        RAW_SUBJECT, durable=RAW_DURABLE, stream=RAW_STREAM, config=config
    )
    try:
        got = 0
        began = time.perf_counter()
        while got < count:
            messages = await subscription.fetch(64, timeout=5.0)
            for message in messages:
                await message.ack()
            got += len(messages)
        return Rate(got, time.perf_counter() - began)
    finally:
        await subscription.unsubscribe()


# --- the run ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Phase:
    candles: int
    before: State
    after: State

    @property
    def signals(self) -> int:
        return self.after.signals - self.before.signals

    @property
    def decisions(self) -> int:
        return self.after.decisions - self.before.decisions

    @property
    def intents(self) -> int:
        return self.after.intents - self.before.intents


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    """What a phase added to counts by label."""
    changed = {label: n - before.get(label, 0) for label, n in after.items()}
    return {label: n for label, n in changed.items() if n}


@dataclass(frozen=True, kw_only=True)
class Figures:
    symbols: int
    candles: int
    payload_bytes: int
    raw_publish: Rate
    raw_consume: Rate
    latency: Phase
    latency_signal_s: list[float]
    latency_intent_s: list[float]
    throughput: Phase
    publish: Rate  # the benchmark's own candle publishing during the throughput phase
    signals_s: float
    decisions_s: float
    cpu_s: dict[str, float | None]  # CPU seconds of each process over the throughput run
    # Messages each process sent and received over the throughput run (None: not counted).
    messages: dict[str, Messages] | None
    final: State


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds process ``pid`` has used, from ``/proc`` (None without it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _messages_used(
    after: dict[str, Messages] | None, before: dict[str, Messages] | None
) -> dict[str, Messages] | None:
    if after is None or before is None:
        return None
    return {
        process: Messages(
            end.sent - before.get(process, Messages(0, 0)).sent,
            end.received - before.get(process, Messages(0, 0)).received,
        )
        for process, end in sorted(after.items())
    }


def _cpu_used(
    after: dict[str, float | None], before: dict[str, float | None]
) -> dict[str, float | None]:
    used: dict[str, float | None] = {}
    for name, end in after.items():
        start = before.get(name)
        used[name] = None if end is None or start is None else round(end - start, 3)
    return used


class PipelineBench:
    """One run: the control bus, the workers, the raw client, the receipts."""

    def __init__(
        self,
        bus: Bus,
        raw: Client,
        url: str,
        children: Children,
        observer: Observer,
        symbols: Sequence[str],
        interrupt: Interrupt,
        *,
        nats_pid: int | None,
    ) -> None:
        self._bus = bus
        self._nats_pid = nats_pid
        self._interrupt = interrupt
        self._js = raw.jetstream(timeout=10.0)
        self._url = url
        self._children = children
        self._observer = observer
        self._symbols = tuple(symbols)
        self._feed = Feed(symbols)
        self._stamps = Stamps()
        self._tasks: list[asyncio.Task[None]] = []
        self._began = time.monotonic()

    async def start(self, http: httpx.AsyncClient) -> None:
        """Topology, policy, an ACTIVE latch, heartbeats, receipts; then the workers, portfolio
        first (execution decides nothing without the equity of its first snapshot)."""
        bus, url, children = self._bus, self._url, self._children
        await bus.ensure_topology()
        await publish_policy_revision(bus, _policy(self._symbols))
        await write_latch(bus, state=TradingState.ACTIVE, reason="bench armed", issued_by=ISSUER)
        self._tasks.append(asyncio.create_task(heartbeat_forever(bus, issued_by=ISSUER)))
        portfolio = children.workload("portfolio", "portfolio", url)
        self._observer.portfolio = portfolio
        await wait_healthy(http, [portfolio], children, timeout_s=START_TIMEOUT_S)
        await _wait_snapshot(bus, children)
        execution = children.workload(
            "execution", EXECUTION, url, "--worker-id", "bench-1", "--cycle", str(CYCLE_S)
        )
        self._observer.execution = execution
        inference = children.workload("inference", "inference", url)
        await wait_healthy(http, [execution, inference], children, timeout_s=START_TIMEOUT_S)
        self.progress("portfolio, inference and execution are up")

    async def stop_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def measure(self, *, candles: int, latency_steps: int) -> Figures:
        warmup = self._feed.steps(WINDOW + WARMUP_EXTRA)
        await self._publish(warmup)
        await wait_settled(self._observer, self._children, self._interrupt)
        self.progress(f"warm-up: {len(warmup)} candles, every feature window full")
        # In series order: a candle older than its symbol's last one is ignored by inference.
        latency_candles = self._feed.steps(latency_steps)
        throughput_candles = self._feed.steps(candles)
        payloads = [c.encode() for c in throughput_candles]
        raw_count = max(RAW_MIN, len(payloads))
        raw_publish = await raw_publish_rate(self._js, payloads, raw_count)
        raw_consume = await raw_consume_rate(self._js, raw_count + RAW_WARMUP)
        self.progress(
            f"baseline: raw publish {raw_publish.per_s:,.0f}/s, "
            f"raw pull-consume {raw_consume.per_s:,.0f}/s"
        )
        latency = await self._latency_phase(latency_candles)
        to_signal, to_intent = self._stamps.latencies(latency_candles)
        self.progress(f"latency: {len(latency_candles)} candles at {LATENCY_HZ:g} steps/s")
        throughput, publish, signals_s, decisions_s, cpu_s, messages = await self._throughput_phase(
            throughput_candles
        )
        self.progress(
            f"throughput: {throughput.signals:,} signals in {signals_s:.2f}s, "
            f"{throughput.decisions:,} decisions in {decisions_s:.2f}s"
        )
        final = await self._portfolio_caught_up()
        return Figures(
            symbols=len(self._symbols),
            candles=candles,
            payload_bytes=round(sum(len(p) for p in payloads) / len(payloads)),
            raw_publish=raw_publish,
            raw_consume=raw_consume,
            latency=latency,
            latency_signal_s=to_signal,
            latency_intent_s=to_intent,
            throughput=throughput,
            publish=publish,
            signals_s=signals_s,
            decisions_s=decisions_s,
            cpu_s=cpu_s,
            messages=messages,
            final=final,
        )

    async def _publish(self, candles: Sequence[Candle]) -> Rate:
        began = time.perf_counter()
        width = len(self._symbols)
        for step in range(0, len(candles), width):
            self._interrupt.check()
            await self._publish_step(candles[step : step + width])
        return Rate(len(candles), time.perf_counter() - began)

    async def _publish_step(self, candles: Sequence[Candle]) -> None:
        """A step's candles in one pack, as marketdata publishes a step."""
        results = await self._bus.publish_many([(subjects.CANDLE_STEP, Pack(tuple(candles)))])
        failed = [result for result in results if isinstance(result, BaseException)]
        if failed:
            raise failed[0]

    @contextlib.asynccontextmanager
    async def _receipts(self) -> AsyncIterator[None]:
        """Signals and intents stamped on receipt, for the latency phase only: during the
        throughput run, receiving and decoding every signal here would take CPU from the
        workers on the same cores (JetStream's counts measure that run)."""
        stamps, registered = self._stamps, [asyncio.Event(), asyncio.Event()]
        receipts = [
            asyncio.create_task(
                self._bus.subscribe(
                    subjects.all_of(subjects.SIGNAL_PREFIX),
                    Signal,
                    stamps.on_signal,
                    label="bench-signals",
                    registered=registered[0],
                )
            ),
            asyncio.create_task(
                self._bus.subscribe(
                    subjects.all_of(subjects.ORDER_INTENT_PREFIX),
                    OrderIntent,
                    stamps.on_intent,
                    label="bench-intents",
                    registered=registered[1],
                )
            ),
        ]
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                await asyncio.gather(*(event.wait() for event in registered))
            yield
        finally:
            for task in receipts:
                task.cancel()
            await asyncio.gather(*receipts, return_exceptions=True)

    async def _latency_phase(self, candles: Sequence[Candle]) -> Phase:
        async with self._receipts():
            return await self._paced(candles)

    async def _paced(self, candles: Sequence[Candle]) -> Phase:
        before = await self._observer.full_state()
        width = len(self._symbols)
        next_at = time.monotonic()
        for step in range(0, len(candles), width):
            self._interrupt.check()
            published = time.perf_counter()
            for candle in candles[step : step + width]:
                self._stamps.published[(candle.symbol, candle.open_time_ms)] = published
            await self._publish_step(candles[step : step + width])
            next_at += 1 / LATENCY_HZ
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await wait_settled(self._observer, self._children, self._interrupt)
        return Phase(candles=len(candles), before=before, after=await self._observer.full_state())

    async def _throughput_phase(
        self, candles: Sequence[Candle]
    ) -> tuple[Phase, Rate, float, float, dict[str, float | None], dict[str, Messages] | None]:
        before = await self._observer.full_state()
        messages_before = await self._observer.messages_by_process()
        cpu_before = self._cpu()
        began = time.perf_counter()
        publishing = asyncio.create_task(self._publish(candles))
        settled = await wait_settled(self._observer, self._children, self._interrupt, publishing)
        cpu_s = _cpu_used(self._cpu(), cpu_before)
        messages = _messages_used(await self._observer.messages_by_process(), messages_before)
        publish = publishing.result()
        after = await self._observer.full_state()
        phase = Phase(candles=len(candles), before=before, after=after)
        signals_s, decisions_s = settled.signals_at - began, settled.decisions_at - began
        return phase, publish, signals_s, decisions_s, cpu_s, messages

    def _cpu(self) -> dict[str, float | None]:
        """CPU seconds used so far by each process of the pipeline, by name."""
        pids: dict[str, int | None] = {name: self._children[name].process.pid for name in WORKERS}
        pids["nats-server"] = self._nats_pid
        pids["benchmark"] = os.getpid()
        return {name: None if pid is None else cpu_seconds(pid) for name, pid in pids.items()}

    async def _portfolio_caught_up(self) -> State:
        """The final counts, once the portfolio has applied every fill stored (or timed out)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            state = await self._observer.full_state()
            if state.fills_applied >= state.fills_stored or time.monotonic() > deadline:
                return state
            self._children.check_alive()
            await asyncio.sleep(0.2)

    def progress(self, text: str) -> None:
        elapsed = time.monotonic() - self._began
        print(f"qtrader bench pipeline: [{elapsed:5.1f}s] {text}", file=sys.stderr, flush=True)


async def _wait_snapshot(bus: Bus, children: Children) -> None:
    """Until the portfolio's first snapshot is stored: the equity execution reads at start."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while (
        await bus.last_message(subjects.PORTFOLIO, subjects.PORTFOLIO_SNAPSHOT, PortfolioSnapshot)
        is None
    ):
        children.check_alive()
        if time.monotonic() > deadline:
            raise BenchFailure(f"no portfolio snapshot after {START_TIMEOUT_S:g}s")
        await asyncio.sleep(0.1)


# --- the report ---------------------------------------------------------------------------------


def _spread(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p99_ms": None}
    return {"p50_ms": ms(percentile(values, 50)), "p99_ms": ms(percentile(values, 99))}


def _ratio(figure: float, baseline: float) -> float:
    return round(figure / baseline, 4) if baseline > 0 else 0.0


def summary(figures: Figures, *, wall_s: float) -> dict[str, Any]:
    """The figures as one flat JSON object (the last line of the output)."""
    phase, final = figures.throughput, figures.final
    signals_per_s = round(phase.signals / figures.signals_s, 1) if figures.signals_s > 0 else 0.0
    decisions_per_s = (
        round(phase.decisions / figures.decisions_s, 1) if figures.decisions_s > 0 else 0.0
    )
    latency = figures.latency
    to_signal, to_intent = _spread(figures.latency_signal_s), _spread(figures.latency_intent_s)
    return {
        "benchmark": "pipeline",
        "symbols": figures.symbols,
        "candles": figures.candles,
        "candles_total": phase.candles,
        "payload_bytes": figures.payload_bytes,
        "cycle_s": CYCLE_S,
        "signals": phase.signals,
        "decisions": phase.decisions,
        "intents": phase.intents,
        "denied": _delta(phase.after.denied, phase.before.denied),
        "dropped": _delta(phase.after.dropped, phase.before.dropped),
        "signals_s": round(figures.signals_s, 3),
        "decisions_s": round(figures.decisions_s, 3),
        "signals_per_s": signals_per_s,
        "decisions_per_s": decisions_per_s,
        "candle_publish_per_s": figures.publish.per_s,
        "raw_messages": figures.raw_publish.count,
        "raw_publish_per_s": figures.raw_publish.per_s,
        "raw_consume_per_s": figures.raw_consume.per_s,
        "signals_vs_raw_publish": _ratio(signals_per_s, figures.raw_publish.per_s),
        "signals_vs_raw_consume": _ratio(signals_per_s, figures.raw_consume.per_s),
        "decisions_vs_raw_publish": _ratio(decisions_per_s, figures.raw_publish.per_s),
        "latency_hz": LATENCY_HZ,
        "latency_candles": latency.candles,
        "latency_signals": latency.signals,
        "latency_decisions": latency.decisions,
        "latency_intents": latency.intents,
        "signal_samples": len(figures.latency_signal_s),
        "signal_p50_ms": to_signal["p50_ms"],
        "signal_p99_ms": to_signal["p99_ms"],
        "intent_samples": len(figures.latency_intent_s),
        "intent_p50_ms": to_intent["p50_ms"],
        "intent_p99_ms": to_intent["p99_ms"],
        "signals_stored": final.signals,
        "decisions_total": final.decisions,
        "dropped_total": sum(final.dropped.values()),
        "queued": final.queued,
        "inference_backlog": final.inference_backlog,
        "execution_backlog": final.execution_backlog,
        "intents_counted": final.intents,
        "intents_stored": final.intents_stored,
        "fills_stored": final.fills_stored,
        "fills_applied": final.fills_applied,
        "cpu_s": figures.cpu_s,
        "cpu_us_per_signal": _per_signal(figures.cpu_s, phase.signals),
        "messages": None
        if figures.messages is None
        else {process: counts._asdict() for process, counts in figures.messages.items()},
        "messages_per_signal": _messages_per_signal(figures.messages, phase.signals),
        "wall_s": round(wall_s, 1),
    }


def _per_signal(cpu_s: dict[str, float | None], signals: int) -> dict[str, float | None]:
    """Microseconds of CPU per signal of the throughput run, by process and in all."""
    if not signals:
        return {name: None for name in [*cpu_s, "total"]}
    per_signal = {
        name: None if used is None else round(used * 1e6 / signals, 1)
        for name, used in cpu_s.items()
    }
    known = [used for used in cpu_s.values() if used is not None]
    per_signal["total"] = round(sum(known) * 1e6 / signals, 1) if known else None
    return per_signal


def _messages_per_signal(
    messages: dict[str, Messages] | None, signals: int
) -> dict[str, float] | None:
    """Messages per signal of the throughput run, sent and received, by process and in all
    (each message a process sent or received is one; a message published by one process and
    delivered to three counts four times: nats-server handles it four times)."""
    if messages is None or not signals:
        return None
    per_signal = {
        process: round((counts.sent + counts.received) / signals, 2)
        for process, counts in messages.items()
    }
    total = sum(counts.sent + counts.received for counts in messages.values())
    per_signal["total"] = round(total / signals, 2)
    return per_signal


def _rate_table(result: dict[str, Any]) -> list[str]:
    rows = (
        ("signals/s, candle -> signal", "signals_per_s", "raw publish + ack", "raw_publish_per_s",
         "signals_vs_raw_publish"),
        ("", "", "raw pull-consume + ack", "raw_consume_per_s", "signals_vs_raw_consume"),
        ("decisions/s, candle -> decided", "decisions_per_s", "raw publish + ack",
         "raw_publish_per_s", "decisions_vs_raw_publish"),
        ("candles published/s (Bus)", "candle_publish_per_s", "raw publish + ack",
         "raw_publish_per_s", ""),
    )  # fmt: skip
    lines = [f"{'':<30}  {'per s':>8}  {'baseline':<22}  {'per s':>8}  ratio"]
    for label, key, base_label, base_key, ratio_key in rows:
        figure = f"{result[key]:>8,.0f}" if key else f"{'':>8}"
        ratio = f"{result[ratio_key]:.3f}" if ratio_key else ""
        if not ratio_key and result[base_key]:
            ratio = f"{result[key] / result[base_key]:.3f}"
        lines.append(f"{label:<30}  {figure}  {base_label:<22}  {result[base_key]:>8,.0f}  {ratio}")
    return lines


def _cpu_text(per_signal: dict[str, float | None]) -> str:
    return ", ".join(
        f"{name} {'n/a' if used is None else f'{used:,.0f}'}" for name, used in per_signal.items()
    )


def _messages_text(per_signal: dict[str, float] | None) -> str:
    if per_signal is None:
        return "n/a (nats-server's monitoring port did not answer)"
    return ", ".join(f"{process} {count:.2f}" for process, count in per_signal.items())


def _ms_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def render(result: dict[str, Any]) -> str:
    """The human-readable table: each rate beside its baselines, then latency and accounting."""
    denied = ", ".join(f"{n:,} {reason}" for reason, n in result["denied"].items()) or "none"
    dropped = ", ".join(f"{n:,} {reason}" for reason, n in result["dropped"].items()) or "none"
    rows = [
        (
            "throughput run",
            f"{result['candles_total']:,} candles ({result['symbols']} symbols x "
            f"{result['candles']:,} steps, {result['payload_bytes']} bytes each): "
            f"{result['signals']:,} signals in {result['signals_s']:.2f} s, "
            f"{result['decisions']:,} decided in {result['decisions_s']:.2f} s, "
            f"{result['intents']:,} intents",
        ),
        ("  denied", denied),
        ("  dropped by the intake", dropped),
        (
            "latency run",
            f"{result['latency_candles']:,} candles at {result['latency_hz']:g} steps/s, "
            f"decision cycle {result['cycle_s'] * 1000:g} ms",
        ),
        (
            "  candle -> signal ms",
            f"p50 {_ms_text(result['signal_p50_ms'])}  p99 {_ms_text(result['signal_p99_ms'])}"
            f"  ({result['signal_samples']:,} candles)",
        ),
        (
            "  candle -> intent ms",
            f"p50 {_ms_text(result['intent_p50_ms'])}  p99 {_ms_text(result['intent_p99_ms'])}"
            f"  ({result['intent_samples']:,} candles that changed a position)",
        ),
        (
            "accounted for",
            f"{result['signals_stored']:,} signals stored, {result['decisions_total']:,} decided "
            f"+ {result['dropped_total']:,} dropped, {result['queued']} queued; intents "
            f"{result['intents_counted']:,} counted / {result['intents_stored']:,} stored; fills "
            f"{result['fills_stored']:,} stored / {result['fills_applied']:,} applied",
        ),
        ("CPU per signal, µs", _cpu_text(result["cpu_us_per_signal"])),
        ("messages per signal", _messages_text(result["messages_per_signal"])),
        ("wall time", f"{result['wall_s']:.1f} s"),
    ]
    title = (
        "pipeline: candles -> inference -> execution (paper) -> portfolio, real processes, "
        "beside raw nats-py on the same server"
    )
    width = max(len(label) for label, _ in rows)
    return "\n".join(
        [
            title,
            *(f"  {line}" for line in _rate_table(result)),
            *(f"  {label:<{width}}  {value}" for label, value in rows),
        ]
    )


def verdict(result: dict[str, Any]) -> str | None:
    """Why the run fails (a candle not accounted for), or None."""
    measured = result["candles_total"] + result["latency_candles"]
    if result["signals"] + result["latency_signals"] != measured:
        return (
            f"{measured} candles published after the warm-up made "
            f"{result['signals'] + result['latency_signals']} signals, not one each"
        )
    decided = result["decisions_total"] + result["dropped_total"]
    if decided != result["signals_stored"] or result["queued"]:
        return (
            f"{result['signals_stored']} signals stored but {decided} decided or dropped, "
            f"{result['queued']} queued"
        )
    if result["inference_backlog"] or result["execution_backlog"]:
        return "a consumer still has messages pending"
    if result["intents_counted"] != result["intents_stored"]:
        return (
            f"the execution counted {result['intents_counted']} intents, "
            f"the ORDERS stream holds {result['intents_stored']}"
        )
    if result["fills_applied"] != result["fills_stored"]:
        return f"the portfolio applied {result['fills_applied']} of {result['fills_stored']} fills"
    return None


def run(
    *,
    candles: int = 1000,
    symbols: int = 4,
    json_path: Path | None = None,
    latency_steps: int | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """Run the benchmark, print the table and the JSON line; the exit code of ``qtrader bench``.

    ``candles`` steps in the throughput run (one candle per symbol each), ``symbols`` symbols;
    the latency run takes ``latency_steps`` (default: a fifth of ``candles``, 20 to 100).
    """
    names = bench_symbols(symbols)
    if candles < 1:
        raise ValueError(f"candles must be >= 1, got {candles}")
    steps = latency_steps if latency_steps is not None else min(100, max(20, candles // 5))
    started = time.monotonic()
    try:
        figures = _run_stack(names, candles=candles, latency_steps=steps)
    except (BenchFailure, *_ERRORS) as exc:
        print(f"qtrader bench pipeline: failed: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("qtrader bench pipeline: interrupted; what it started is stopped", file=sys.stderr)
        return 130
    result = summary(figures, wall_s=time.monotonic() - started)
    return report("pipeline", result, render=render, verdict=verdict, json_path=json_path, out=out)


def _run_stack(symbols: Sequence[str], *, candles: int, latency_steps: int) -> Figures:
    """nats-server and every process in a temporary directory, all gone when this returns."""
    with tempfile.TemporaryDirectory(prefix="qtrader-bench-", ignore_cleanup_errors=True) as tmp:
        nats_server = EmbeddedNats(store_dir=Path(tmp) / "nats", monitor_port=free_port())
        try:
            with Children(Path(tmp)) as children:
                nats_server.start()
                try:
                    return asyncio.run(
                        _main(
                            nats_server.url,
                            nats_server.monitor_url,
                            children,
                            symbols,
                            nats_pid=nats_server.pid,
                            candles=candles,
                            latency_steps=latency_steps,
                        )
                    )
                except BenchFailure as exc:
                    logs = "\n".join(
                        f"--- {name} ---\n{children.log_of(name)}"
                        for name in ("inference", EXECUTION, "portfolio")
                    )
                    raise BenchFailure(f"{exc}\n{logs}") from exc
        finally:
            nats_server.stop()


async def _main(
    url: str,
    monitor_url: str | None,
    children: Children,
    symbols: Sequence[str],
    *,
    nats_pid: int | None,
    candles: int,
    latency_steps: int,
) -> Figures:
    """The measurement, cancelled by SIGTERM as asyncio.run cancels it on Ctrl-C."""
    main = asyncio.current_task()
    assert main is not None
    interrupt = Interrupt(main)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, interrupt)
    bus = Bus(url=url, client_name="qtrader-bench-pipeline")
    raw = await nats.connect(url, name="qtrader-bench-raw", allow_reconnect=False)
    try:
        await bus.connect()
        async with httpx.AsyncClient(timeout=5.0) as http:
            observer = Observer(raw.jetstream(timeout=10.0), http, monitor_url)
            bench = PipelineBench(
                bus, raw, url, children, observer, symbols, interrupt, nats_pid=nats_pid
            )
            try:
                await bench.start(http)
                return await bench.measure(candles=candles, latency_steps=latency_steps)
            finally:
                await bench.stop_tasks()
    finally:
        try:
            await raw.close()
        finally:
            await bus.close()
