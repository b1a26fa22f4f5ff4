"""Publishing that survives a broker outage: send now, or keep it in the outbox and replay.

``publish`` sends straight to JetStream while the outbox is empty. When the send fails (NATS
unreachable, no acknowledgement in time) the message goes to the outbox, and so does every
message after it until the outbox is empty again, so the stream receives them in publish order.
``replay_forever`` sends the outbox's entries oldest first with their original ``Nats-Msg-Id``
and removes each one only once the stream acknowledged it; a message that did reach the stream
before its acknowledgement was lost is dropped by the stream's duplicate window.

A full outbox raises ``BusBackPressure``: the producer stops taking work, nothing is dropped.
So does an outbox whose disk fails (full, read-only, I/O errors): ``health`` is then CRITICAL
naming the file and the error, and the outbox takes nothing more until replay has emptied it.
Why until empty: removals need disk space too, and outboxes of other workers may share the disk;
were each to go on appending whenever a removal freed a page, none would drain. An entry that
was replayed but cannot be removed stays; replay goes on with the next, and once every entry was
sent the outbox is cleared by deleting its files (``Outbox.clear``), which needs no space. Should
the worker stop before that, the next run sends those entries again and the stream's duplicate
window drops the copies.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from qtrader.bus.errors import BusBackPressure, BusUnavailable
from qtrader.bus.outbox import Outbox, OutboxFull, OutboxUnwritable
from qtrader.health.contract import DependencyHealth, Status

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamAck:
    """What the stream answered to a publish: the message's sequence, and whether it held that
    message id already (``duplicate``: the server dropped this copy; nothing new was stored)."""

    sequence: int
    duplicate: bool


Entry = tuple[str, bytes, str]  # subject, payload, Nats-Msg-Id
# Entries sent together -> each one's answer: the stream's, or why it got none.
SendWave = Callable[[Sequence[Entry]], Awaitable[list[StreamAck | BusUnavailable]]]

OUTBOX_DEPTH = Gauge("qtrader_outbox_depth", "Messages waiting in the disk outbox.")
OUTBOX_OLDEST_AGE = Gauge(
    "qtrader_outbox_oldest_age_seconds", "Age of the oldest message in the disk outbox."
)
OUTBOX_BUFFERED = Counter("qtrader_outbox_buffered_total", "Messages written to the outbox.")
OUTBOX_REPLAYED = Counter(
    "qtrader_outbox_replayed_total", "Outbox messages acknowledged by JetStream on replay."
)
OUTBOX_REFUSED = Counter(
    "qtrader_outbox_refused_total",
    "Publishes refused because the outbox was full or its disk had failed.",
)
OUTBOX_DISK_ERRORS = Counter(
    "qtrader_outbox_disk_errors_total",
    "Outbox reads and writes that failed on the disk (full, read-only, I/O error), by step.",
    ["step"],
)

_REPLAY_BATCH = 256


class OutboxPublisher:
    def __init__(self, outbox: Outbox, send: SendWave, *, retry_interval_s: float = 0.5) -> None:
        self._outbox = outbox
        self._send = send
        self._retry_interval_s = retry_interval_s
        self._pending = asyncio.Event()
        self._disk_error: str | None = None  # the last disk failure, until the outbox is empty
        self._sent_through = 0  # the replay's position, past entries sent but not removable
        if len(outbox):
            self._pending.set()  # left by a previous run of this worker: replay it first
        OUTBOX_DEPTH.set_function(lambda: len(self._outbox))
        OUTBOX_OLDEST_AGE.set_function(self._outbox.oldest_age_s)

    @property
    def depth(self) -> int:
        return len(self._outbox)

    async def publish(self, subject: str, payload: bytes, msg_id: str) -> StreamAck | None:
        """The stream's answer when sent now; None when kept in the outbox for replay."""
        [answer] = await self.publish_many([(subject, payload, msg_id)])
        if isinstance(answer, BusBackPressure):
            raise answer
        return answer

    async def publish_many(
        self, entries: Sequence[Entry]
    ) -> list[StreamAck | BusBackPressure | None]:
        """``publish`` of entries sent together (each of a subject of its own): each one's
        answer, None where it was kept, or the ``BusBackPressure`` that kept it from the
        outbox too."""
        sent: Sequence[StreamAck | BusUnavailable | None] = (
            [None] * len(entries) if len(self._outbox) else await self._send(entries)
        )
        answers: list[StreamAck | BusBackPressure | None] = []
        for entry, answer in zip(entries, sent, strict=True):
            if isinstance(answer, StreamAck):
                answers.append(answer)
                continue
            if answer is not None:
                log.warning("%s: keeping it on disk", answer)
            try:
                self._keep(*entry)
            except BusBackPressure as exc:
                answers.append(exc)
                continue
            answers.append(None)
        return answers

    def _keep(self, subject: str, payload: bytes, msg_id: str) -> None:
        if self._disk_error is not None:
            OUTBOX_REFUSED.inc()
            raise BusBackPressure(f"{self._disk_error}: draining it before taking more")
        try:
            self._outbox.append(subject, msg_id, payload)
        except OutboxFull as exc:
            OUTBOX_REFUSED.inc()
            raise BusBackPressure(str(exc)) from exc
        except OutboxUnwritable as exc:
            self._disk_failed("append", exc)
            raise BusBackPressure(f"NATS unreachable and {exc}") from exc
        OUTBOX_BUFFERED.inc()
        self._pending.set()

    async def replay_forever(self) -> None:
        while True:
            await self._pending.wait()
            if await self.replay():
                self._pending.clear()
            else:
                await asyncio.sleep(self._retry_interval_s)

    async def replay(self) -> bool:
        """Send what the outbox holds, oldest first; True once it is empty."""
        try:
            while entries := self._outbox.oldest(_REPLAY_BATCH, after=self._sent_through):
                for entry in entries:
                    [answer] = await self._send([(entry.subject, entry.payload, entry.msg_id)])
                    if isinstance(answer, BusUnavailable):
                        return False
                    self._sent_through = entry.seq
                    OUTBOX_REPLAYED.inc()
                    self._remove(entry.seq)
            if len(self._outbox):  # all sent; what could not be removed goes with the files
                self._outbox.clear()
        except OutboxUnwritable as exc:
            self._disk_failed("replay", exc)
            return False
        self._sent_through = 0
        self._disk_error = None
        return True

    def _remove(self, seq: int) -> None:
        try:
            self._outbox.remove(seq)
        except OutboxUnwritable as exc:  # sent all the same: cleared with the rest at the end
            self._disk_failed("remove", exc)

    def _disk_failed(self, step: str, exc: OutboxUnwritable) -> None:
        OUTBOX_DISK_ERRORS.labels(step).inc()
        if self._disk_error is None:
            log.error("the outbox's disk failed (%s): %s", step, exc)
        self._disk_error = str(exc)
        self._pending.set()  # replay lifts the error once the outbox is empty, even if it is now

    def health(self) -> DependencyHealth:
        depth = len(self._outbox)
        if self._disk_error is not None:
            return DependencyHealth(
                name="outbox",
                status=Status.CRITICAL,
                detail=f"{self._disk_error} ({depth} messages held)",
            )
        if self._outbox.full:
            return DependencyHealth(
                name="outbox",
                status=Status.CRITICAL,
                detail=f"full ({depth} messages): NATS unreachable, producing stopped",
            )
        if depth:
            age = self._outbox.oldest_age_s()
            return DependencyHealth(
                name="outbox",
                status=Status.DEGRADED,
                detail=f"{depth} messages waiting for NATS, the oldest for {age:.1f} s",
            )
        return DependencyHealth(name="outbox", status=Status.OK, detail="empty")

    def close(self) -> None:
        self._outbox.close()
