"""``qtrader bench outbox``: what the disk outbox costs, and that an outage loses nothing.

Everything runs against a nats-server the benchmark starts (free port, temporary store) and
SQLite files in the same temporary directory. Each figure stands beside a baseline measured in
the same run:

* **Buffering.** ``Bus.publish`` while NATS is stopped, so every event goes to the outbox
  (encoding included, as a producer pays it), with ``synchronous=FULL`` (the default: on disk
  when ``append`` returns) and ``NORMAL``. Baseline: raw SQLite inserts, one row per transaction,
  WAL, same ``synchronous``, same rows (subject, id, encoded event, time) in the outbox's own
  table (an ``Outbox`` creates the file, the baseline then writes to it with plain ``sqlite3``).
  The first publish of a buffering run waits for its acknowledgement until the publish timeout,
  as in a real outage; it is not timed.
* **Replay.** The events buffered above drained to JetStream once NATS is back (each sent with
  its id, acknowledged, then deleted from the outbox), from the FULL and from the NORMAL file.
  Timed from the start of ``Bus.replay_forever`` (the connection and JetStream answering again
  first) until the outbox is empty. Baseline: ``Bus.publish`` without an outbox, each publish
  awaiting its acknowledgement, on the same server. Also measured against it: publishing through
  a Bus with an (empty) outbox while NATS is up, the healthy path.
* **End to end.** N events published through a Bus with a FULL outbox while the broker is
  stopped at 20% of them for ``--outage`` seconds and restarted on the same store directory and
  port. The restart falls mid-stream: should the producer reach 80% of the events first, it
  waits there for the broker (the wait is reported). Then the stream is read back from the
  server: events lost, duplicated, and whether they are in publish order. The events of the
  replay measurement are read back and checked the same way.

Every phase publishes candles of its own symbol, so their ``Nats-Msg-Id`` never collide and each
phase reads back only its own events.

Exit 0 when nothing was lost or duplicated and everything arrived in order; 1 otherwise, or when
the run failed (a server that did not start, a publish never acknowledged while NATS was up); 130
when interrupted. The last line of the output is one JSON object with every figure.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

from qtrader.bus.errors import BusError
from qtrader.bus.nats_bus import Bus
from qtrader.bus.outbox import Outbox, Synchronous
from qtrader.contracts import subjects
from qtrader.contracts.messages import Candle
from qtrader.local.nats_server import EmbeddedNats, NatsServerError
from qtrader_tools.benchmarks.harness import BenchFailure, report
from qtrader_tools.candles import flat_candle

START_MS = 1_700_000_000_000
MINUTE_MS = 60_000
PUBLISH_TIMEOUT_S = 0.5  # of the outbox buses: how long a publish waits before going to disk
READY_TIMEOUT_S = 60.0  # for NATS to answer again after a restart
WARMUP = 200  # publishes before the first timed one
IDLE_S = 3.0  # reading back: nothing new for this long, and the stream is read
MODES: tuple[Synchronous, ...] = ("FULL", "NORMAL")
# One symbol per phase: distinct subjects and distinct Nats-Msg-Id.
RAW, PASS, E2E, PROBE = "BENCHRAW", "BENCHPASS", "BENCHE2E", "BENCHPROBE"
BUFFERED: dict[Synchronous, str] = {"FULL": "BENCHFULL", "NORMAL": "BENCHNORMAL"}
_INSERT = "INSERT INTO outbox (subject, msg_id, payload, created_at) VALUES (?, ?, ?, ?)"


@dataclass(frozen=True)
class Rate:
    events: int
    seconds: float

    @property
    def per_s(self) -> float:
        return round(self.events / self.seconds, 1) if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Audit:
    """What the stream holds of one phase's events, read back from the server."""

    expected: int
    received: int
    lost: int
    duplicated: int
    in_order: bool


def audit(indexes: Sequence[int], expected: int) -> Audit:
    """Events ``0..expected-1`` as read back (by index): lost, duplicated, in publish order."""
    seen = set(indexes)
    return Audit(
        expected=expected,
        received=len(indexes),
        lost=sum(1 for index in range(expected) if index not in seen),
        duplicated=len(indexes) - len(seen),
        in_order=all(a <= b for a, b in itertools.pairwise(indexes)),
    )


def candle(symbol: str, index: int) -> Candle:
    return flat_candle(
        symbol, Decimal(30_000) + index % 7, open_time_ms=START_MS + index * MINUTE_MS
    )


def candles(symbol: str, count: int) -> list[Candle]:
    """Built before a timed loop: the loop times publishing, not building."""
    return [candle(symbol, index) for index in range(count)]


def _index(event: Candle) -> int:
    return (event.open_time_ms - START_MS) // MINUTE_MS


# --- SQLite baseline ----------------------------------------------------------------------------


def sqlite_insert_rate(path: Path, synchronous: Synchronous, events: Sequence[Candle]) -> Rate:
    """Raw inserts into the outbox's own table, one row (one transaction) per event, WAL."""
    Outbox(path).close()  # the outbox creates the file and its table: the very same row shape
    rows = [(subjects.candle_subject(e.symbol), e.dedup_id, e.encode()) for e in events]
    db = sqlite3.connect(path, isolation_level=None)  # autocommit: one transaction per row
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        began = time.perf_counter()
        for subject, msg_id, payload in rows:
            db.execute(_INSERT, (subject, msg_id, payload, time.time()))
        return Rate(len(rows), time.perf_counter() - began)
    finally:
        db.close()


# --- publishing ---------------------------------------------------------------------------------


async def publish_rate(bus: Bus, events: Sequence[Candle]) -> tuple[Rate, int]:
    """Each event published and its acknowledgement awaited; also how many went to the outbox."""
    kept = 0
    began = time.perf_counter()
    for event in events:
        try:
            sequence = await bus.publish(subjects.candle_subject(event.symbol), event)
        except BusError as exc:
            raise BenchFailure(f"a publish failed while NATS was up: {exc}") from exc
        kept += sequence is None
    return Rate(len(events), time.perf_counter() - began), kept


async def buffer_rate(bus: Bus, events: Sequence[Candle]) -> Rate:
    """Publishes while NATS is down: the first waits for its timeout, the others are timed."""
    subject = subjects.candle_subject(events[0].symbol)
    if await bus.publish(subject, events[0]) is not None:
        raise BenchFailure("NATS acknowledged a publish while it was stopped")
    began = time.perf_counter()
    for event in events[1:]:
        if await bus.publish(subject, event) is not None:
            raise BenchFailure("NATS acknowledged a publish while it was stopped")
    return Rate(len(events) - 1, time.perf_counter() - began)


async def replay_rate(bus: Bus, *, timeout_s: float) -> Rate:
    """The outbox drained by ``replay_forever``, timed until it is empty."""
    events = bus.outbox_depth()
    began = time.perf_counter()
    replay = asyncio.create_task(bus.replay_forever())
    try:
        await _drained(bus, began + timeout_s)
    finally:
        await _cancel(replay)
    return Rate(events, time.perf_counter() - began)


async def _drained(bus: Bus, deadline: float) -> None:
    while bus.outbox_depth():
        if time.perf_counter() > deadline:
            raise BenchFailure(f"{bus.outbox_depth()} events still in the outbox at the deadline")
        await asyncio.sleep(0.005)


async def _cancel(*tasks: asyncio.Task[Any]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def until_answering(buses: Sequence[Bus], probe: Bus) -> None:
    """Every bus reconnected and JetStream acknowledging again (its streams recovered).

    Timing a replay from the restart would time the client's reconnect wait and the server's
    recovery; the replay rate is about draining, so it starts once both are done.
    """
    deadline = time.monotonic() + READY_TIMEOUT_S
    for attempt in itertools.count():
        if all(bus.connected for bus in buses):
            event = candle(PROBE, attempt)
            try:
                await probe.publish(subjects.candle_subject(PROBE), event)
                return
            except BusError:
                pass
        if time.monotonic() > deadline:
            raise BenchFailure(f"NATS not answering {READY_TIMEOUT_S:g}s after its restart")
        await asyncio.sleep(0.1)


# --- reading back -------------------------------------------------------------------------------


async def read_back(bus: Bus, symbol: str) -> list[int]:
    """Indexes of every event stored on ``symbol``'s subject, in stream order.

    Until the reader has caught up with what the stream held when it started, or nothing new
    came for ``IDLE_S`` (nothing stored at all: ``caught_up`` is never set then).
    """
    indexes: list[int] = []
    caught_up = asyncio.Event()

    async def collect(event: Candle) -> None:
        indexes.append(_index(event))

    reader = asyncio.create_task(
        bus.replay(
            subjects.MARKET,
            subjects.candle_subject(symbol),
            Candle,
            collect,
            label="bench-outbox",
            caught_up=caught_up,
        )
    )
    waiter = asyncio.create_task(caught_up.wait())
    try:
        seen = -1
        while len(indexes) != seen:
            seen = len(indexes)
            done, _ = await asyncio.wait(
                {reader, waiter}, timeout=IDLE_S, return_when=asyncio.FIRST_COMPLETED
            )
            if reader in done:
                reader.result()  # its error, if it failed
                raise BenchFailure(f"reading {symbol} back stopped")
            if waiter in done:
                break
    finally:
        await _cancel(reader, waiter)
    return indexes


# --- end to end ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EndToEnd:
    events: int
    kept: int  # publishes that went to the outbox
    max_depth: int
    after_restart: int  # events published once the broker was back
    held_s: float  # the producer's wait at 80% for the restart (0 when it came earlier)
    publish_s: float  # first publish -> last publish returned
    drain_s: float  # restart -> outbox empty
    total_s: float  # first publish -> outbox empty


class Outage:
    """Stops the broker when told to, keeps it down ``seconds``, starts it on the same store."""

    def __init__(self, nats: EmbeddedNats, seconds: float) -> None:
        self._nats = nats
        self._seconds = seconds
        self.begin = asyncio.Event()
        self.restarted = asyncio.Event()
        self.restarted_at = 0.0

    async def run(self) -> None:
        await self.begin.wait()
        await asyncio.to_thread(self._nats.stop)
        await asyncio.sleep(self._seconds)
        await asyncio.to_thread(self._nats.start)
        self.restarted_at = time.perf_counter()
        self.restarted.set()


async def end_to_end(
    bus: Bus, nats: EmbeddedNats, events: Sequence[Candle], *, outage_s: float, timeout_s: float
) -> EndToEnd:
    outage = Outage(nats, outage_s)
    broker = asyncio.create_task(outage.run())
    replay = asyncio.create_task(bus.replay_forever())
    subject = subjects.candle_subject(events[0].symbol)
    kept = max_depth = after_restart = 0
    held_s = 0.0
    try:
        began = time.perf_counter()
        for index, event in enumerate(events):
            if index == len(events) // 5:
                outage.begin.set()
                await asyncio.sleep(0)  # let the outage begin
            elif index == len(events) * 4 // 5 and not outage.restarted.is_set():
                waited = time.perf_counter()
                await outage.restarted.wait()
                held_s = time.perf_counter() - waited
            after_restart += outage.restarted.is_set()
            kept += await bus.publish(subject, event) is None
            max_depth = max(max_depth, bus.outbox_depth())
        published = time.perf_counter()
        await broker
        await _drained(bus, published + timeout_s)
        drained = time.perf_counter()
    finally:
        await _cancel(replay, broker)
    return EndToEnd(
        events=len(events),
        kept=kept,
        max_depth=max_depth,
        after_restart=after_restart,
        held_s=held_s,
        publish_s=published - began,
        drain_s=drained - outage.restarted_at,
        total_s=drained - began,
    )


# --- the run ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Figures:
    sqlite: dict[Synchronous, Rate]
    buffer: dict[Synchronous, Rate]
    jetstream: Rate
    passthrough: Rate
    passthrough_kept: int
    replay: dict[Synchronous, Rate]
    replay_audit: dict[Synchronous, Audit]
    e2e: EndToEnd
    e2e_audit: Audit


class OutboxBench:
    """One run: the server, the buses it opens and the outbox files, all closed by ``close``."""

    def __init__(self, nats: EmbeddedNats, work_dir: Path, *, events: int) -> None:
        self._nats = nats
        self._dir = work_dir
        self._events = events
        self._capacity = max(100_000, events)
        self._buses: list[Bus] = []
        self._outboxes: list[Outbox] = []
        self._began = time.monotonic()
        self.control = self._bus("bench-outbox-control")

    def _bus(self, name: str, synchronous: Synchronous | None = None) -> Bus:
        outbox = None
        if synchronous is not None:
            path = self._dir / f"{name}.db"
            outbox = Outbox(path, capacity=self._capacity, synchronous=synchronous)
            self._outboxes.append(outbox)
        # The control bus (the raw baseline, probes, reading back) keeps the default timeout.
        timeout_s = None if outbox is None else PUBLISH_TIMEOUT_S
        bus = Bus(url=self._nats.url, client_name=name, outbox=outbox, publish_timeout_s=timeout_s)
        self._buses.append(bus)
        return bus

    @property
    def _timeout_s(self) -> float:
        """For a drain: generous, a stall is what it catches."""
        return 120 + self._events / 50

    async def close(self) -> None:
        try:
            await asyncio.gather(*(bus.close() for bus in self._buses))
        finally:
            for outbox in self._outboxes:
                outbox.close()

    async def measure(self, *, outage_s: float) -> Figures:
        n = self._events
        await self.control.connect()
        await self.control.ensure_topology()
        await publish_rate(self.control, candles(PROBE, WARMUP))  # connection, stream, caches
        jetstream, _ = await publish_rate(self.control, candles(RAW, n))
        self._progress(f"raw JetStream publish: {jetstream.per_s:,.0f}/s")
        passing = self._bus("bench-outbox-pass", "FULL")
        await passing.connect()
        passthrough, passthrough_kept = await publish_rate(passing, candles(PASS, n))
        if passthrough_kept:  # a slow acknowledgement sent some to the outbox: drain them
            await replay_rate(passing, timeout_s=self._timeout_s)
        self._progress(f"publish with an outbox, NATS up: {passthrough.per_s:,.0f}/s")
        sqlite, buffer, replay = await self._buffer_and_replay()
        replay_audit = {m: audit(await read_back(self.control, BUFFERED[m]), n) for m in MODES}
        e2e, e2e_audit = await self._end_to_end(outage_s)
        return Figures(
            sqlite=sqlite,
            buffer=buffer,
            jetstream=jetstream,
            passthrough=passthrough,
            passthrough_kept=passthrough_kept,
            replay=replay,
            replay_audit=replay_audit,
            e2e=e2e,
            e2e_audit=e2e_audit,
        )

    async def _buffer_and_replay(
        self,
    ) -> tuple[dict[Synchronous, Rate], dict[Synchronous, Rate], dict[Synchronous, Rate]]:
        """NATS stopped: raw SQLite, then buffering, per mode; NATS back: replay, per mode."""
        buses = {m: self._bus(f"bench-outbox-{m.lower()}", m) for m in MODES}
        for bus in buses.values():
            await bus.connect()
        await asyncio.to_thread(self._nats.stop)
        sqlite: dict[Synchronous, Rate] = {}
        buffer: dict[Synchronous, Rate] = {}
        for mode, bus in buses.items():
            events = candles(BUFFERED[mode], self._events)
            sqlite[mode] = sqlite_insert_rate(self._dir / f"raw-{mode.lower()}.db", mode, events)
            buffer[mode] = await buffer_rate(bus, events)
            self._progress(
                f"NATS down, {mode}: raw SQLite {sqlite[mode].per_s:,.0f}/s, "
                f"buffering {buffer[mode].per_s:,.0f}/s"
            )
        await asyncio.to_thread(self._nats.start)
        await until_answering([self.control, *buses.values()], self.control)
        replay: dict[Synchronous, Rate] = {}
        for mode, bus in buses.items():
            replay[mode] = await replay_rate(bus, timeout_s=self._timeout_s)
            self._progress(f"NATS back: replay from {mode} {replay[mode].per_s:,.0f}/s")
        return sqlite, buffer, replay

    async def _end_to_end(self, outage_s: float) -> tuple[EndToEnd, Audit]:
        bus = self._bus("bench-outbox-e2e", "FULL")
        await bus.connect()
        self._progress(f"end to end: {self._events} events, a {outage_s:g}s outage at 20%")
        e2e = await end_to_end(
            bus,
            self._nats,
            candles(E2E, self._events),
            outage_s=outage_s,
            timeout_s=self._timeout_s,
        )
        await until_answering([self.control], self.control)
        result = audit(await read_back(self.control, E2E), self._events)
        self._progress(
            f"end to end: {e2e.kept} kept in the outbox, drained {e2e.drain_s:.2f}s after the "
            f"restart; read back {result.received}"
        )
        return e2e, result

    def _progress(self, text: str) -> None:
        elapsed = time.monotonic() - self._began
        print(f"qtrader bench outbox: [{elapsed:5.1f}s] {text}", file=sys.stderr, flush=True)


# --- the report ---------------------------------------------------------------------------------


def _ratio(figure: Rate, baseline: Rate) -> float:
    return round(figure.per_s / baseline.per_s, 3) if baseline.per_s > 0 else 0.0


def summary(figures: Figures, *, events: int, outage_s: float, wall_s: float) -> dict[str, Any]:
    """The figures as one flat JSON object (the last line of the output)."""
    e2e, checked = figures.e2e, figures.e2e_audit
    result: dict[str, Any] = {"benchmark": "outbox", "events": events, "outage_s": outage_s}
    for mode in MODES:
        low = mode.lower()
        result[f"sqlite_{low}_per_s"] = figures.sqlite[mode].per_s
        result[f"buffer_{low}_per_s"] = figures.buffer[mode].per_s
        result[f"buffer_{low}_vs_sqlite"] = _ratio(figures.buffer[mode], figures.sqlite[mode])
    result["jetstream_per_s"] = figures.jetstream.per_s
    result["passthrough_per_s"] = figures.passthrough.per_s
    result["passthrough_vs_jetstream"] = _ratio(figures.passthrough, figures.jetstream)
    result["passthrough_kept"] = figures.passthrough_kept
    for mode in MODES:
        low = mode.lower()
        result[f"replay_{low}_per_s"] = figures.replay[mode].per_s
        result[f"replay_{low}_vs_jetstream"] = _ratio(figures.replay[mode], figures.jetstream)
    replayed = figures.replay_audit.values()
    result["replay_lost"] = sum(a.lost for a in replayed)
    result["replay_duplicated"] = sum(a.duplicated for a in replayed)
    result["replay_in_order"] = all(a.in_order for a in replayed)
    result |= {
        "e2e_kept": e2e.kept,
        "e2e_max_depth": e2e.max_depth,
        "e2e_after_restart": e2e.after_restart,
        "e2e_held_s": round(e2e.held_s, 3),
        "e2e_publish_s": round(e2e.publish_s, 3),
        "e2e_drain_s": round(e2e.drain_s, 3),
        "e2e_s": round(e2e.total_s, 3),
        "e2e_per_s": Rate(e2e.events, e2e.total_s).per_s,
        "received": checked.received,
        "lost": checked.lost,
        "duplicated": checked.duplicated,
        "in_order": checked.in_order,
        "wall_s": round(wall_s, 1),
    }
    return result


# (label, figure key, baseline label, baseline key, ratio key); rates are ``<key>_per_s``.
_RATE_ROWS = (
    ("buffering, NATS down, FULL", "buffer_full", "raw SQLite insert, FULL", "sqlite_full",
     "buffer_full_vs_sqlite"),
    ("buffering, NATS down, NORMAL", "buffer_normal", "raw SQLite insert, NORMAL", "sqlite_normal",
     "buffer_normal_vs_sqlite"),
    ("replay from FULL", "replay_full", "raw JetStream publish", "jetstream",
     "replay_full_vs_jetstream"),
    ("replay from NORMAL", "replay_normal", "raw JetStream publish", "jetstream",
     "replay_normal_vs_jetstream"),
    ("with an outbox, NATS up", "passthrough", "raw JetStream publish", "jetstream",
     "passthrough_vs_jetstream"),
)  # fmt: skip


def _rate_table(result: dict[str, Any]) -> list[str]:
    width = max(len(row[0]) for row in _RATE_ROWS)
    base_width = max(len(row[2]) for row in _RATE_ROWS)
    header = f"{'':<{width}}  {'events/s':>9}  {'baseline':<{base_width}}  {'events/s':>9}  ratio"
    lines = [header]
    for label, figure, base_label, base, ratio_key in _RATE_ROWS:
        ratio = result[ratio_key]
        lines.append(
            f"{label:<{width}}  {result[f'{figure}_per_s']:>9,.0f}  {base_label:<{base_width}}  "
            f"{result[f'{base}_per_s']:>9,.0f}  {ratio:.3f}"
        )
    return lines


def render(result: dict[str, Any]) -> str:
    """The human-readable table: each rate beside its baseline and their ratio, then the run
    across an outage and what was read back."""
    yes_no = {True: "yes", False: "NO"}
    rows = [
        (
            "end to end",
            f"{result['events']:,} events, broker down {result['outage_s']:g} s at 20%: "
            f"{result['e2e_kept']:,} kept in the outbox (max depth {result['e2e_max_depth']:,}), "
            f"{result['e2e_after_restart']:,} published after the restart",
        ),
        (
            "  timing",
            f"published in {result['e2e_publish_s']:.2f} s (held {result['e2e_held_s']:.2f} s), "
            f"outbox empty {result['e2e_drain_s']:.2f} s after the restart, "
            f"{result['e2e_s']:.2f} s in all ({result['e2e_per_s']:,.0f}/s)",
        ),
        (
            "  read back",
            f"{result['received']:,} received: {result['lost']} lost, "
            f"{result['duplicated']} duplicated, in order: {yes_no[result['in_order']]}",
        ),
        (
            "replayed, read back",
            f"{result['replay_lost']} lost, {result['replay_duplicated']} duplicated, "
            f"in order: {yes_no[result['replay_in_order']]}",
        ),
        ("wall time", f"{result['wall_s']:.1f} s"),
    ]
    title = (
        f"outbox: the SQLite WAL outbox beside raw SQLite and raw JetStream, same run "
        f"({result['events']:,} events a phase)"
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
    """Why the run fails, or None."""
    if result["lost"] or result["duplicated"] or not result["in_order"]:
        return (
            f"end to end: {result['lost']} lost, {result['duplicated']} duplicated, "
            f"in order: {result['in_order']}"
        )
    if result["replay_lost"] or result["replay_duplicated"] or not result["replay_in_order"]:
        return (
            f"replay: {result['replay_lost']} lost, {result['replay_duplicated']} duplicated, "
            f"in order: {result['replay_in_order']}"
        )
    if result["e2e_kept"] == 0:
        return "the outage sent nothing to the outbox, so 0 lost proves nothing"
    return None


def run(
    *, events: int, outage_s: float, json_path: Path | None = None, out: TextIO = sys.stdout
) -> int:
    """Run the benchmark, print the table and the JSON line; the exit code of ``qtrader bench``."""
    started = time.monotonic()
    try:
        figures = _run_stack(events=events, outage_s=outage_s)
    except (BenchFailure, BusError, NatsServerError) as exc:
        print(f"qtrader bench outbox: failed: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("qtrader bench outbox: interrupted; what it started is stopped", file=sys.stderr)
        return 130
    result = summary(figures, events=events, outage_s=outage_s, wall_s=time.monotonic() - started)
    return report("outbox", result, render=render, verdict=verdict, json_path=json_path, out=out)


def _run_stack(*, events: int, outage_s: float) -> Figures:
    """nats-server and the SQLite files in a temporary directory, all gone when this returns."""
    with tempfile.TemporaryDirectory(prefix="qtrader-bench-", ignore_cleanup_errors=True) as tmp:
        nats = EmbeddedNats(store_dir=Path(tmp) / "nats")
        try:
            nats.start()
            return asyncio.run(_main(nats, Path(tmp), events=events, outage_s=outage_s))
        finally:
            nats.stop()


async def _main(nats: EmbeddedNats, work_dir: Path, *, events: int, outage_s: float) -> Figures:
    """The measurement, cancelled by SIGTERM as asyncio.run cancels it on Ctrl-C."""
    main = asyncio.current_task()
    assert main is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    bench = OutboxBench(nats, work_dir, events=events)
    try:
        return await bench.measure(outage_s=outage_s)
    finally:
        await bench.close()
