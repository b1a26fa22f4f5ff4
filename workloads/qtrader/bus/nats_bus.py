"""The NATS JetStream bus: the only module that imports ``nats``.

What it guarantees to the roles above it:
- the streams, durable consumers and KV buckets of ``contracts.subjects`` exist (created
  idempotently at start, so any replica of any role can start first);
- every JetStream publish carries ``Nats-Msg-Id`` = the message's ``dedup_id``, so a repeat
  inside the stream's duplicate window is dropped by the server, not by luck; the server's
  answer says so (``publish_acked``: ``duplicate``, nothing new stored);
- what a restarted role needs to go on where the streams say it was can be read at start: a few
  stored messages (``last_message``, ``stored_messages``) and a durable consumer's position
  (``consumer_position``: its ack floor and the last message it handed out);
- durable pull consumers with explicit acks: a message is acked only after its handler returned,
  nak'ed with a delay when the handler failed, and terminated (never redelivered) when it cannot
  be decoded, after one log line and a count in ``qtrader_messages_rejected_total``;
- the client reconnects forever; ``connected`` and the reconnect count are metrics, and the
  consumer's pending count is exported as its lag;
- a consumer that must see its messages in stream order (``consume_batches`` with
  ``after_connection_loss``) is told of every lost connection before it handles the next
  fetch: messages the server handed out while the connection died never arrive, and the
  server hands them out again only after their ack wait, after newer ones;
- a hung broker (a stall, a half-open connection) is noticed within a few seconds and the client
  reconnects: it pings every ``PING_INTERVAL_S`` and gives the connection up after
  ``MAX_OUTSTANDING_PINGS`` unanswered (nats-py's defaults take six minutes);
- no PING/PONG round trip is ever cancelled while the connection that sent it lives. nats-py
  2.16 cancels the future of a ``flush`` that times out, and the PONG that arrives after the
  stall then sets a result on that cancelled future: ``InvalidStateError`` ends the client's
  read loop and the client believes it is connected while it never reads again (no acks, no
  deliveries), and ``flush`` then skips the round trip, so it looks healthy. Our round trips
  (health pings, the broadcast's flush) send the PING with a future of our own, which the
  caller stops waiting for without cancelling it; the client drops it at its next reconnect. A
  read loop that ended anyway is reported and the client made to reconnect;
- a bus of a stack (``stack=``, or ``for_stack`` over one connection) turns every logical name
  it is given (subject, stream, durable, KV key) into that stack's (``subjects.scoped_*``), so
  the roles above it spell only logical names and stacks never meet;
- a stored value that does not decode (a KV key's value, the last message of a subject) is
  returned as ``Undecodable``, never skipped and never raised: those are control data whose
  reader must decide what a bad value means (the halt latch halts, the policy keeps the last
  good one). Each such revision (KV revision, stream sequence) is logged and counted once in
  ``qtrader_messages_rejected_total``, however often it is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    RawStreamMsg,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from prometheus_client import Counter, Gauge

from qtrader.bus.errors import BusUnavailable, NotYet, TopologyError
from qtrader.bus.outbox import Outbox
from qtrader.bus.outbox_publisher import Entry, OutboxPublisher, StreamAck
from qtrader.bus.stream_acks import StreamAcks
from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    Decoded,
    Message,
    MessageRejected,
    Pack,
    RejectReason,
    Undecodable,
    decode,
    decode_all,
)
from qtrader.health.contract import DependencyHealth, Status

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
# What is published: a message, or a pack of messages of one packable kind (one wire message).
Outgoing = Message | Pack[Any]
Handler = Callable[[M], Awaitable[None]]
BatchHandler = Callable[[list[M]], Awaitable[None]]
# A batch handler told what each wire message carried: one message, or a pack's items.
GroupHandler = Callable[[list[list[M]]], Awaitable[None]]
# A handler told each message's stream sequence too (to remember how far it has read).
SequencedHandler = Callable[[M, int], Awaitable[None]]

BUS_CONNECTED = Gauge("qtrader_bus_connected", "1 while the NATS connection is up, else 0.")
BUS_RECONNECTS = Counter("qtrader_bus_reconnects_total", "Reconnections to NATS.")
PUBLISHED = Counter(
    "qtrader_messages_published_total", "Messages published to JetStream.", ["kind"]
)
PUBLISH_FAILURES = Counter(
    "qtrader_publish_failures_total",
    "JetStream publishes that got no acknowledgement, by subject family (market, order, ...).",
    ["family"],
)
CONSUMED = Counter(
    "qtrader_messages_consumed_total", "Messages handled and acknowledged.", ["consumer"]
)
REJECTED = Counter(
    "qtrader_messages_rejected_total",
    "Messages skipped because they could not be decoded, by reason.",
    ["consumer", "reason"],
)
HANDLER_ERRORS = Counter(
    "qtrader_handler_errors_total",
    "Messages whose handler failed; they are redelivered after a delay.",
    ["consumer"],
)
DEFERRED = Counter(
    "qtrader_messages_deferred_total",
    "Messages a handler asked for again later (not finished yet: an order whose outcome the "
    "venue cannot tell); they stay unacknowledged and come again after the delay.",
    ["consumer"],
)
CONSUMER_PENDING = Gauge(
    "qtrader_consumer_pending_messages",
    "Messages in the stream not yet delivered to this durable consumer (its lag).",
    ["consumer"],
)

# An ordered consumer (a replay) asks the server for a heartbeat this often while idle: nats-py
# recreates one that missed two, which is how a replay finds out the broker restarted and forgot
# it. nats-py's default (5 s) left replays blind for 10-20 s after a restart.
REPLAY_HEARTBEAT_S = 1.0
PING_INTERVAL_S = 2
MAX_OUTSTANDING_PINGS = 2
# More unanswered round trips than this means the broker has not answered for a long while: the
# next caller is told at once instead of adding another PING.
_MAX_UNANSWERED_ROUND_TRIPS = 64
REGISTER_RETRY_S = 0.5  # between round trips confirming a subscription the server missed
# Publishes in flight at once in ``publish_many``: enough for every symbol of a step, few enough
# that a wave's acknowledgements come well inside the publish timeout.
_WAVE_LIMIT = 64

_UNAVAILABLE = (
    nats.errors.TimeoutError,
    nats.errors.ConnectionClosedError,
    nats.errors.NoRespondersError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    asyncio.TimeoutError,
    OSError,
)


@dataclass(frozen=True, kw_only=True)
class Route(Generic[M]):
    """One subject (a wildcard too) of a stream read in stream order with others: the type its
    messages decode as and their handler (``Bus.replay_after``)."""

    subject: str
    message_type: type[M]
    handler: SequencedHandler[M]


@dataclass(frozen=True, kw_only=True)
class ConsumerPosition:
    """Stream sequences of a durable consumer: every message through ``acked_through`` is
    acknowledged; ``delivered_through`` is the last one handed out (those after the ack floor
    may be in flight with a worker that died: redelivered only once their ack wait ends)."""

    acked_through: int
    delivered_through: int


@dataclass
class _ConnectionLosses:
    count: int = 0


class Bus:
    """One NATS connection with JetStream, shared by every task of a process."""

    def __init__(
        self,
        *,
        url: str,
        client_name: str,
        request_timeout_s: float = 2.0,
        outbox: Outbox | None = None,
        publish_timeout_s: float | None = None,
        stack: str | None = None,
    ) -> None:
        self._stack = None if stack is None else subjects.check_stack(stack)
        self._url = url
        self._client_name = client_name
        self._timeout = request_timeout_s
        self._publish_timeout_s = publish_timeout_s or request_timeout_s
        # Without an outbox a failed publish raises BusUnavailable and the caller keeps the work.
        self._outbox = None if outbox is None else OutboxPublisher(outbox, self._send_wave)
        # nats-py's flush takes whole seconds.
        self._flush_timeout_s = max(1, math.ceil(request_timeout_s))
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._acks: StreamAcks | None = None
        self._closing = False
        # Shared with the views of ``for_stack``: a loss of the one connection is theirs too.
        self._losses = _ConnectionLosses()
        self._buckets: dict[str, KeyValue] = {}
        # (metric label, key or subject) -> the newest revision refused and counted.
        self._refused: dict[tuple[str, str], int] = {}

    @property
    def stack(self) -> str | None:
        return self._stack

    def for_stack(self, stack: str) -> Bus:
        """A view of this connection that speaks ``stack``'s names (the operator serves many
        stacks over one connection). Connect and close the bus it came from, not the view."""
        view = copy.copy(self)
        view._stack = subjects.check_stack(stack)
        return view

    # --- lifecycle ---------------------------------------------------------------------------

    async def connect(self, *, retry_interval_s: float = 0.5) -> None:
        """Connect, retrying until the broker answers; later outages reconnect by themselves.

        A connection cut short (by an error, or by a caller's timeout cancelling this) is closed
        before this returns or raises: left to the garbage collector, its socket would stay
        open until then and its ResourceWarning would surface wherever the collector runs.
        """
        while True:
            client = Client()
            try:
                await client.connect(
                    self._url,
                    name=self._client_name,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,  # type: ignore[arg-type]  # annotated int, sleeps a float
                    connect_timeout=2,
                    ping_interval=PING_INTERVAL_S,
                    max_outstanding_pings=MAX_OUTSTANDING_PINGS,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    error_cb=self._on_error,
                )
                _stop_if_cancelled()  # the connection is closed below, not left behind
                acks = await StreamAcks.open(client)
            except (nats.errors.NoServersError, *_UNAVAILABLE) as exc:
                await _close_client(client)
                log.warning("NATS at %s not reachable (%s); retrying", self._url, exc)
                await asyncio.sleep(retry_interval_s)
                continue
            except BaseException:
                await _close_client(client)
                raise
            self._nc = client
            self._js = client.jetstream(timeout=self._timeout)
            self._acks = acks
            BUS_CONNECTED.set(1)
            log.info("connected to NATS at %s as %s", self._url, self._client_name)
            return

    async def close(self) -> None:
        """Flush what is in flight (acks, publishes), then close; the connection ends closed
        whatever happens.

        Not ``drain``: by the time a bus closes, the tasks whose callbacks would process the
        subscriptions' pending messages are cancelled, so nats-py's drain waits on queues that
        never empty, and when cut short it leaves its gathered drain tasks with an exception
        nobody retrieves (logged by asyncio as an error). The flush is best effort (it fails
        while the client reconnects); the close after it is not, or the client would keep its
        socket and go on reconnecting.
        """
        self._closing = True
        client = self._nc
        try:
            if client is not None and client.is_connected:
                await self._flush(client)
        finally:
            if client is not None:
                await _close_client(client)
            BUS_CONNECTED.set(0)
            if self._outbox is not None:
                self._outbox.close()  # what it holds stays on disk for the next run
        _stop_if_cancelled()

    async def _flush(self, client: Client) -> None:
        try:
            await client.flush(timeout=self._flush_timeout_s)
        except Exception as exc:  # whatever went wrong, close() closes the connection next
            log.debug("flushing the NATS connection failed (%r); closing it", exc)

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def _on_disconnected(self) -> None:
        BUS_CONNECTED.set(0)
        # Counted at the loss, before the new connection can deliver anything.
        self._losses.count += 1
        # No _nc yet: a connection attempt given up on is being closed, not an outage.
        if not self._closing and self._nc is not None:
            log.warning("disconnected from NATS; reconnecting")

    async def _on_reconnected(self) -> None:
        BUS_CONNECTED.set(1)
        BUS_RECONNECTS.inc()
        log.info("reconnected to NATS")

    async def _on_error(self, exc: Exception) -> None:
        log.debug("NATS client error: %s", exc)
        client = self._nc
        if client is not None and not (client.is_connected or client.is_closed):
            _close_failed_attempt(client)

    @property
    def _jetstream(self) -> JetStreamContext:
        if self._js is None:
            raise BusUnavailable("the bus is not connected; call connect() first")
        return self._js

    @property
    def _client(self) -> Client:
        if self._nc is None:
            raise BusUnavailable("the bus is not connected; call connect() first")
        return self._nc

    async def round_trip_s(self) -> float:
        """Time of one PING/PONG with the server; raises BusUnavailable when it cannot."""
        if not self.connected:
            raise BusUnavailable("not connected to NATS")
        await self._check_read_loop()
        started = time.perf_counter()
        await self._round_trip(self._flush_timeout_s)
        return time.perf_counter() - started

    async def _round_trip(self, timeout_s: float) -> None:
        """One PING/PONG, waited for at most ``timeout_s``: everything written before it has
        reached the server when it returns.

        nats-py's ``flush`` without its cancellation (module docstring): the PONG's future is
        ours and is never cancelled, so a late PONG finds it pending; ``asyncio.wait`` gives up
        on it without touching it. The client forgets it at its next reconnect.

        nats-py 2.16 writes a PING to the socket at once but leaves SUBs and PUBs queued for its
        flusher task, so its PING overtakes them and the PONG proves nothing about them:
        ``_write_pending`` first puts what is queued on the socket, in order.
        """
        client = self._client
        unanswered = sum(1 for pong in client._pongs if not pong.done())
        if unanswered >= _MAX_UNANSWERED_ROUND_TRIPS:
            raise BusUnavailable(f"{unanswered} pings to NATS are unanswered")
        pong: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        try:
            _write_pending(client)
            await client._send_ping(pong)
        except (*_UNAVAILABLE, AssertionError) as exc:  # asserts a transport: none mid-reconnect
            raise BusUnavailable(f"cannot ping NATS: {exc!r}") from exc
        done, _ = await asyncio.wait({pong}, timeout=timeout_s)
        if not done:
            raise BusUnavailable(f"NATS did not answer a ping within {timeout_s:g} s")

    async def _check_read_loop(self) -> None:
        """A connected client whose read loop has ended reads nothing ever again, and its
        ``flush`` returns at once: report it, and make it reconnect (the only way back)."""
        client = self._client
        reading = client._reading_task
        if client.is_connected and (reading is None or reading.done()):
            log.error("the NATS client's read loop has ended; reconnecting")
            await client._process_op_err(nats.errors.StaleConnectionError())
            raise BusUnavailable("the NATS client had stopped reading; reconnecting")

    # --- topology ----------------------------------------------------------------------------

    async def ensure_topology(self) -> None:
        """Create or update every stream, durable consumer and KV bucket (idempotent)."""
        try:
            for stream in subjects.ALL_STREAMS:
                await self._ensure_stream(subjects.scoped_stream(self._stack, stream))
            for consumer in subjects.ALL_CONSUMERS:
                await self.ensure_consumer(consumer)
            for bucket in subjects.ALL_BUCKETS:
                await self._ensure_bucket(bucket)
        except _UNAVAILABLE as exc:
            raise BusUnavailable(f"NATS unavailable while creating streams: {exc!r}") from exc
        except nats.js.errors.APIError as exc:
            raise TopologyError(f"cannot set up JetStream topology: {exc}") from exc

    async def _ensure_stream(self, spec: subjects.StreamSpec) -> None:
        config = StreamConfig(
            name=spec.name,
            subjects=list(spec.subjects),
            storage=StorageType.FILE,
            max_age=spec.max_age_s,
            duplicate_window=spec.duplicate_window_s,
            max_msgs_per_subject=spec.max_msgs_per_subject,
        )
        try:
            await self._jetstream.stream_info(spec.name)
        except nats.js.errors.NotFoundError:
            await self._jetstream.add_stream(config)
            return
        await self._jetstream.update_stream(config)

    async def ensure_consumer(self, spec: subjects.ConsumerSpec) -> None:
        """Create or update one durable consumer (``ensure_topology`` does every declared one)."""
        spec = subjects.scoped_consumer(self._stack, spec)
        config = ConsumerConfig(
            name=spec.durable,
            durable_name=spec.durable,
            filter_subject=spec.filter_subject,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=spec.ack_wait_s,
            max_ack_pending=spec.max_ack_pending,
        )
        await self._jetstream.add_consumer(spec.stream.name, config=config)

    async def _ensure_bucket(self, bucket: str) -> None:
        try:
            await self._jetstream.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            await self._jetstream.create_key_value(
                KeyValueConfig(bucket=bucket, history=16, storage=StorageType.FILE)
            )

    # --- publishing --------------------------------------------------------------------------

    async def publish(self, subject: str, message: Message) -> int | None:
        """Publish to JetStream and wait for the ack; returns the stream sequence.

        With an outbox, a publish NATS does not acknowledge is kept on disk for replay and this
        returns None; a full outbox raises ``BusBackPressure``. Without one it raises
        ``BusUnavailable``.
        """
        ack = await self.publish_acked(subject, message)
        return None if ack is None else ack.sequence

    async def publish_acked(self, subject: str, message: Message) -> StreamAck | None:
        """``publish``, returning the stream's whole answer: ``duplicate`` says the stream held
        this ``dedup_id`` already and stored nothing new (a producer that counts what it added
        must not count it). None: kept in the outbox."""
        [answer] = await self._publish_wave([(subject, message)])
        if isinstance(answer, BusUnavailable):
            raise answer
        return answer

    async def publish_many(
        self, items: Sequence[tuple[str, Outgoing]]
    ) -> list[StreamAck | BusUnavailable | None]:
        """``publish_acked`` of every (subject, message), sent together instead of one
        acknowledgement at a time: one round trip per wave rather than per message.

        A wave holds at most one message per subject, so a subject's messages are sent, and
        stored, in their order whatever fails: the next one goes only after the one before it
        was acknowledged (or kept in the outbox). Each item's result is in its place: the
        stream's answer, None (kept in the outbox), or the error. A wave with an error ends the
        call: every later item comes back with an error too, unsent. The caller retries the
        failed and the unsent items, in their order, and never one the stream stored already
        (which, past the stream's duplicate window, would be stored twice)."""
        results: list[StreamAck | BusUnavailable | None] = []
        for wave in _waves(items):
            answers = await self._publish_wave(wave)
            results += answers
            failure = next((a for a in answers if isinstance(a, BusUnavailable)), None)
            if failure is not None:
                unsent = BusUnavailable(f"not sent: an earlier message failed ({failure})")
                results += [unsent] * (len(items) - len(results))
                break
        return results

    async def _publish_wave(
        self, wave: Sequence[tuple[str, Outgoing]]
    ) -> list[StreamAck | BusUnavailable | None]:
        """Messages of distinct subjects sent together, through the outbox if there is one."""
        entries = [
            (subjects.scoped_subject(self._stack, subject), message.encode(), message.dedup_id)
            for subject, message in wave
        ]
        answers: Sequence[StreamAck | BusUnavailable | None]
        if self._outbox is not None:
            answers = await self._outbox.publish_many(entries)
        else:
            answers = await self._send_wave(entries)
        for (_, message), answer in zip(wave, answers, strict=True):
            if not isinstance(answer, BusUnavailable):
                PUBLISHED.labels(message.KIND).inc(
                    len(message.items) if isinstance(message, Pack) else 1
                )
        return list(answers)

    async def _send_wave(self, entries: Sequence[Entry]) -> list[StreamAck | BusUnavailable]:
        if self._acks is None:
            raise BusUnavailable("the bus is not connected; call connect() first")
        answers = await self._acks.send_wave(
            entries, timeout_s=self._publish_timeout_s, failed=self._count_publish_failure
        )
        _stop_if_cancelled()
        return answers

    def _count_publish_failure(self, subject: str) -> None:
        PUBLISH_FAILURES.labels(_family(subjects.unscoped_subject(self._stack, subject))).inc()

    async def replay_forever(self) -> None:
        """Replay the outbox whenever it holds messages (a no-op without an outbox)."""
        if self._outbox is None:
            await asyncio.Event().wait()
            return
        await self._outbox.replay_forever()

    def outbox_depth(self) -> int:
        return 0 if self._outbox is None else self._outbox.depth

    def outbox_health(self) -> DependencyHealth:
        if self._outbox is None:
            return DependencyHealth(name="outbox", status=Status.OK, detail="not configured")
        return self._outbox.health()

    async def broadcast(self, subject: str, message: Message) -> None:
        """A core NATS publish (no persistence): for fast control messages and heartbeats."""
        subject = subjects.scoped_subject(self._stack, subject)
        try:
            await self._client.publish(subject, message.encode())
        except _UNAVAILABLE as exc:
            raise BusUnavailable(f"broadcast on {subject} failed: {exc!r}") from exc
        _stop_if_cancelled()
        await self._round_trip(self._flush_timeout_s)

    async def announce(self, subject: str, message: Message) -> None:
        """A core NATS publish without the broadcast's round trip: for what only viewers read
        (health reports, stop views), whose loss costs nothing and which must never add pings
        to a stalled server or wait on one."""
        subject = subjects.scoped_subject(self._stack, subject)
        try:
            await self._client.publish(subject, message.encode())
        except _UNAVAILABLE as exc:
            raise BusUnavailable(f"announce on {subject} failed: {exc!r}") from exc
        _stop_if_cancelled()

    # --- consuming ---------------------------------------------------------------------------

    async def consume(
        self,
        spec: subjects.ConsumerSpec,
        message_type: type[M],
        handler: Handler[M],
        *,
        batch: int = 64,
        fetch_timeout_s: float = 1.0,
    ) -> None:
        """Run a durable pull consumer until cancelled, acking each message after its handler."""
        subscription = await self._bind(spec)
        while True:
            _stop_if_cancelled()
            try:
                messages = await _fetch(subscription, batch, timeout_s=fetch_timeout_s)
            except nats.errors.TimeoutError:
                CONSUMER_PENDING.labels(spec.durable).set(0)
                continue
            except _UNAVAILABLE as exc:
                log.debug("fetch on %s failed (%r); waiting for NATS", spec.durable, exc)
                await asyncio.sleep(0.2)
                continue
            for msg in messages:
                await self._handle(
                    spec.durable, msg, message_type, handler, ack_wait_s=spec.ack_wait_s
                )
            if messages:  # a fetch may return an empty batch
                CONSUMER_PENDING.labels(spec.durable).set(messages[-1].metadata.num_pending)

    async def consume_batches(
        self,
        spec: subjects.ConsumerSpec,
        message_type: type[M],
        handler: BatchHandler[M],
        *,
        batch: int = 64,
        fetch_timeout_s: float = 1.0,
    ) -> None:
        """Like ``consume``, but ``handler`` gets every decodable message of a fetch at once
        (a pack's items in its place), and they are all acknowledged after it returns (all
        redelivered if it raises): for a consumer that combines what arrives together without
        acknowledging a message whose effect is still to come."""

        async def flattened(groups: list[list[M]]) -> None:
            await handler([message for group in groups for message in group])

        await self.consume_groups(
            spec, message_type, flattened, batch=batch, fetch_timeout_s=fetch_timeout_s
        )

    async def consume_groups(
        self,
        spec: subjects.ConsumerSpec,
        message_type: type[M],
        handler: GroupHandler[M],
        *,
        batch: int = 64,
        fetch_timeout_s: float = 1.0,
        after_connection_loss: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """``consume_batches`` telling the handler what each wire message carried (one message,
        or a pack's items), in stream order: for a consumer whose output must be grouped the
        same way at every delivery (inference packs the signals of a candle pack, so a pack
        delivered again makes the very same signal pack, which the stream drops as a repeat).

        ``after_connection_loss`` runs once after each lost connection, before the next fetched
        messages are handled (they are handed out again later when it fails): what the server
        had handed out when the connection died comes again only after newer messages, so a
        consumer that needs stream order reads those in flight first (``consumer_position``).
        """
        subscription = await self._bind(spec)
        losses_seen = self._losses.count
        while True:
            _stop_if_cancelled()
            try:
                messages = await _fetch(subscription, batch, timeout_s=fetch_timeout_s)
            except nats.errors.TimeoutError:
                CONSUMER_PENDING.labels(spec.durable).set(0)
                continue
            except _UNAVAILABLE as exc:
                log.debug("fetch on %s failed (%r); waiting for NATS", spec.durable, exc)
                await asyncio.sleep(0.2)
                continue
            if not messages:
                continue
            if after_connection_loss is not None and self._losses.count != losses_seen:
                count = self._losses.count
                if not await _caught_up(spec.durable, after_connection_loss, messages):
                    continue
                losses_seen = count
            await self._handle_batch(spec, messages, message_type, handler)
            CONSUMER_PENDING.labels(spec.durable).set(messages[-1].metadata.num_pending)

    async def _handle_batch(
        self,
        spec: subjects.ConsumerSpec,
        messages: list[Msg],
        message_type: type[M],
        handler: GroupHandler[M],
    ) -> None:
        decoded: list[tuple[Msg, list[M]]] = []
        for msg in messages:
            carried = _decode_counted(spec.durable, msg, message_type)
            if not carried:
                await _settle(msg.term())
            else:
                decoded.append((msg, carried))
        if not decoded:
            return
        try:
            working = [msg for msg, _ in decoded]
            async with _working_on(working, interval_s=spec.ack_wait_s / 3):
                await handler([carried for _, carried in decoded])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            HANDLER_ERRORS.labels(spec.durable).inc()
            if isinstance(exc, BusUnavailable):  # could not publish the effect: later
                log.warning("%s could not publish (%s); redelivered", spec.durable, exc)
            else:
                log.exception(
                    "%s failed to handle %d messages; redelivered", spec.durable, len(decoded)
                )
            for msg, _ in decoded:
                await _settle(msg.nak(delay=1.0))
            return
        for msg, _ in decoded:
            await _settle(msg.ack())
        CONSUMED.labels(spec.durable).inc(len(decoded))

    async def _bind(self, spec: subjects.ConsumerSpec) -> JetStreamContext.PullSubscription:
        spec = subjects.scoped_consumer(self._stack, spec)
        while True:
            try:
                return await self._jetstream.pull_subscribe_bind(
                    durable=spec.durable, stream=spec.stream.name
                )
            except _UNAVAILABLE as exc:
                log.warning("cannot bind consumer %s yet (%r)", spec.durable, exc)
                await asyncio.sleep(0.5)

    async def _handle(
        self,
        consumer: str,
        msg: Msg,
        message_type: type[M],
        handler: Handler[M],
        *,
        ack_wait_s: float,
    ) -> None:
        carried = _decode_counted(consumer, msg, message_type)
        if not carried:
            await _settle(msg.term())
            return
        try:
            async with _working_on((msg,), interval_s=ack_wait_s / 3):
                for message in carried:  # a pack's items in order; all again if one fails
                    await handler(message)
        except asyncio.CancelledError:
            raise
        except NotYet as later:
            log.info(
                "%s takes %s up again in %g s: %s", consumer, msg.subject, later.delay_s, later
            )
            await _settle(msg.nak(delay=later.delay_s))
            DEFERRED.labels(consumer).inc()
            return
        except BusUnavailable as exc:  # its effect could not be published: try again later
            HANDLER_ERRORS.labels(consumer).inc()
            log.warning("%s could not publish for %s (%s); redelivered", consumer, msg.subject, exc)
            await _settle(msg.nak(delay=1.0))
            return
        except Exception:
            HANDLER_ERRORS.labels(consumer).inc()
            log.exception("%s failed to handle %s; it will be redelivered", consumer, msg.subject)
            await _settle(msg.nak(delay=1.0))
            return
        await _settle(msg.ack())
        CONSUMED.labels(consumer).inc()

    async def subscribe(
        self,
        subject: str,
        message_type: type[M],
        handler: Handler[M],
        *,
        label: str,
        registered: asyncio.Event | None = None,
    ) -> None:
        """A core NATS subscription (every replica gets every message) until cancelled.

        A core subscription gets only what is published after the server has it, and nats-py
        returns from ``subscribe`` before the SUB is even written: ``registered`` is set once a
        round trip after it has come back (the server handles a connection's commands in order),
        tried again every ``REGISTER_RETRY_S`` while the server cannot answer."""

        async def on_message(msg: Msg) -> None:
            await _deliver(label, msg, message_type, handler)

        subject = subjects.scoped_subject(self._stack, subject)
        subscription = await self._client.subscribe(subject, cb=on_message)
        confirm = None if registered is None else self._confirm(subject, registered)
        await _hold(subscription, first=confirm)

    async def _confirm(self, subject: str, registered: asyncio.Event) -> None:
        """Set ``registered`` once a round trip has come back."""
        while True:
            _stop_if_cancelled()
            try:
                await self._round_trip(self._flush_timeout_s)
                registered.set()
                return
            except BusUnavailable as exc:  # the SUB is sent again at the reconnect
                log.warning("subscription to %s not confirmed yet: %s", subject, exc)
                await asyncio.sleep(REGISTER_RETRY_S)

    async def replay(
        self,
        stream: subjects.StreamSpec,
        filter_subject: str,
        message_type: type[M],
        handler: Handler[M],
        *,
        label: str,
        caught_up: asyncio.Event | None = None,
        from_now: bool = False,
        from_last: bool = False,
    ) -> None:
        """Deliver every stored message from the first, then new ones, in order, until cancelled.

        An ordered ephemeral consumer: nothing to ack, recreated by the client after a gap or a
        reconnect. For state that is rebuilt from a stream at every start (the portfolio, the
        execution's positions). ``caught_up`` is set once every message stored when this started
        has been handled. ``from_last`` starts at each subject's last stored message (the last
        price of each symbol), then every new one. ``from_now`` skips what is stored already:
        every message stored from
        now on, none missed across a reconnect (unlike a core subscription).
        """
        stream = subjects.scoped_stream(self._stack, stream)
        filter_subject = subjects.scoped_subject(self._stack, filter_subject)
        if caught_up is not None and not await self._holds_any(stream, filter_subject):
            caught_up.set()

        pending = CONSUMER_PENDING.labels(label)  # looked up once, not per message

        async def on_message(msg: Msg) -> None:
            await _deliver(label, msg, message_type, handler)
            left = stream_position(msg).pending
            pending.set(left)
            if caught_up is not None and left == 0:
                caught_up.set()

        await _hold(
            await self._jetstream.subscribe(
                filter_subject,
                stream=stream.name,
                cb=on_message,
                ordered_consumer=True,
                idle_heartbeat=REPLAY_HEARTBEAT_S,
                deliver_policy=_deliver_policy(from_now=from_now, from_last=from_last),
            )
        )

    async def replay_after(
        self,
        stream: subjects.StreamSpec,
        routes: Sequence[Route[Any]],
        *,
        label: str,
        after_sequence: int = 0,
    ) -> None:
        """``replay`` of the subjects of ``routes`` from the first message stored after stream
        sequence ``after_sequence``, in stream order across all of them (one ordered consumer
        filtering them all), handing each message with its stream sequence to its route's
        handler: for a reader that restores a checkpoint covering the stream through some
        sequence and reads on from there.

        A message that does not decode as its route's type is skipped and counted as ``replay``
        does; what a handler raises is counted and logged, so a handler that must not skip
        catches its own.
        """
        stream = subjects.scoped_stream(self._stack, stream)
        scoped = [(subjects.scoped_subject(self._stack, r.subject), r) for r in routes]
        pending = CONSUMER_PENDING.labels(label)

        async def on_message(msg: Msg) -> None:
            sequence, left = stream_position(msg)
            route = next((r for p, r in scoped if _subject_matches(msg.subject, p)), None)
            if route is None:  # the consumer filters these subjects: a server's mistake
                REJECTED.labels(label, RejectReason.WRONG_KIND.value).inc()
                log.warning("%s skipped a message on %s: no route for it", label, msg.subject)
                return
            await _deliver(label, msg, route.message_type, lambda m: route.handler(m, sequence))
            pending.set(left)

        config = ConsumerConfig(
            # One subject keeps the single filter every server knows; several need 2.10's list.
            filter_subjects=[pattern for pattern, _ in scoped] if len(scoped) > 1 else None,
            opt_start_seq=after_sequence + 1 if after_sequence else None,
        )
        await _hold(
            await self._jetstream.subscribe(
                scoped[0][0],
                stream=stream.name,
                cb=on_message,
                ordered_consumer=True,
                idle_heartbeat=REPLAY_HEARTBEAT_S,
                config=config,
                deliver_policy=(
                    DeliverPolicy.BY_START_SEQUENCE if after_sequence else DeliverPolicy.ALL
                ),
            )
        )

    async def _holds_any(self, stream: subjects.StreamSpec, filter_subject: str) -> bool:
        """Whether ``stream`` stores a message on ``filter_subject`` (a stream holding only
        other subjects, e.g. ORDERS with intents and no updates yet, has nothing to replay)."""
        try:
            info = await self._jetstream.stream_info(stream.name, subjects_filter=filter_subject)
        except _UNAVAILABLE as exc:
            raise BusUnavailable(f"cannot read {stream.name}'s state: {exc!r}") from exc
        finally:
            _stop_if_cancelled()
        return any((info.state.subjects or {}).values())

    async def last_sequence(self, stream: subjects.StreamSpec) -> int:
        """The sequence of the newest message ``stream`` holds (0 when it never held one): a
        reader that has handled that sequence has seen everything stored until now."""
        stream = subjects.scoped_stream(self._stack, stream)
        try:
            info = await self._jetstream.stream_info(stream.name)
        except _UNAVAILABLE as exc:
            raise BusUnavailable(f"cannot read {stream.name}'s state: {exc!r}") from exc
        finally:
            _stop_if_cancelled()
        return int(info.state.last_seq)

    async def last_message(
        self, stream: subjects.StreamSpec, subject: str, message_type: type[M]
    ) -> M | Undecodable | None:
        """The newest message stored on ``subject``, ``Undecodable`` if it does not decode, or
        None if there is none."""
        stream = subjects.scoped_stream(self._stack, stream)
        subject = subjects.scoped_subject(self._stack, subject)
        try:
            raw = await self._jetstream.get_last_msg(stream.name, subject)
        except nats.js.errors.NotFoundError:
            return None
        except _UNAVAILABLE as exc:
            raise BusUnavailable(f"cannot read the last message of {subject}: {exc!r}") from exc
        finally:
            _stop_if_cancelled()
        try:
            return decode(raw.data or b"", message_type)
        except MessageRejected as rejected:
            sequence = int(raw.seq or 0)
            found = Undecodable.of(rejected, source=subject, stored_revision=sequence)
            self._count_refused(f"last:{stream.name}", subject, sequence, found)
            return found

    async def stored_messages(
        self,
        stream: subjects.StreamSpec,
        subject: str,
        message_type: type[M],
        *,
        from_sequence: int = 1,
        to_sequence: int | None = None,
        limit: int | None = None,
    ) -> list[M]:
        """The messages stored on ``subject`` (a wildcard too) with a stream sequence from
        ``from_sequence`` through ``to_sequence``, oldest first (a pack's items in its place),
        at most ``limit``.

        One request per stored message: for reading a few at start (a resume point, a window to
        warm), not for following a stream. One that does not decode is left out, as consumers
        skip it, and logged and counted once.
        """
        found: list[M] = []
        async for group in self._stored(
            stream, subject, message_type, from_sequence=from_sequence, to_sequence=to_sequence
        ):
            found += group
            if limit is not None and len(found) >= limit:
                return found[:limit]
        return found

    async def stored_groups(
        self,
        stream: subjects.StreamSpec,
        subject: str,
        message_type: type[M],
        *,
        from_sequence: int = 1,
        to_sequence: int,
    ) -> list[list[M]]:
        """``stored_messages`` telling what each stored message carried (one message, or a
        pack's items), as ``consume_groups`` hands them over."""
        return [
            group
            async for group in self._stored(
                stream, subject, message_type, from_sequence=from_sequence, to_sequence=to_sequence
            )
        ]

    async def _stored(
        self,
        stream: subjects.StreamSpec,
        subject: str,
        message_type: type[M],
        *,
        from_sequence: int,
        to_sequence: int | None,
    ) -> AsyncIterator[list[M]]:
        stream = subjects.scoped_stream(self._stack, stream)
        subject = subjects.scoped_subject(self._stack, subject)
        sequence = max(1, from_sequence)
        while True:
            _stop_if_cancelled()
            raw = await self._next_stored(stream.name, subject, sequence)
            if raw is None or (to_sequence is not None and int(raw.seq or 0) > to_sequence):
                return
            stored_at = int(raw.seq or 0)
            sequence = stored_at + 1
            try:
                decoded = decode_all(raw.data or b"", message_type)
            except MessageRejected as whole:
                decoded = Decoded(messages=[], refused=[whole])
            refused = [
                Undecodable.of(rejected, source=subject, stored_revision=stored_at)
                for rejected in decoded.refused
            ]
            self._count_refused(f"read:{stream.name}", subject, stored_at, *refused)
            if decoded.messages:
                yield decoded.messages

    async def read_stored(
        self,
        stream: subjects.StreamSpec,
        subject: str,
        message_type: type[M],
        *,
        label: str,
        timeout_s: float = 60.0,
    ) -> list[M]:
        """Every message stored on ``subject`` now, oldest first; one that does not decode is
        left out and counted, as ``replay`` does. An ordered consumer, so thousands take a
        moment (``stored_messages`` asks once per message). Raises ``BusUnavailable`` when NATS
        cannot answer within ``timeout_s``."""
        found: list[M] = []
        caught_up = asyncio.Event()

        async def keep(message: M) -> None:
            found.append(message)

        reading = asyncio.create_task(
            self.replay(stream, subject, message_type, keep, label=label, caught_up=caught_up)
        )
        waiting = asyncio.create_task(caught_up.wait())
        try:
            done, _ = await asyncio.wait(
                {reading, waiting}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if reading in done:
                reading.result()  # it ended before catching up: what ended it
            if not done:
                raise BusUnavailable(f"{subject} not read within {timeout_s} s")
        except _UNAVAILABLE as exc:
            raise BusUnavailable(f"cannot read {subject}: {exc!r}") from exc
        finally:
            for task in (reading, waiting):
                task.cancel()
            await asyncio.gather(reading, waiting, return_exceptions=True)
        return found

    async def _next_stored(self, stream: str, subject: str, sequence: int) -> RawStreamMsg | None:
        """The first message on ``subject`` at or after ``sequence``, None if there is none."""
        try:
            return await self._jetstream.get_msg(stream, seq=sequence, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            return None
        except _UNAVAILABLE as exc:
            raise BusUnavailable(f"cannot read {subject} from {stream}: {exc!r}") from exc
        finally:
            _stop_if_cancelled()

    async def consumer_position(self, spec: subjects.ConsumerSpec) -> ConsumerPosition:
        """Where the durable consumer stands in its stream; zeros when it does not exist yet."""
        spec = subjects.scoped_consumer(self._stack, spec)
        try:
            info = await self._jetstream.consumer_info(spec.stream.name, spec.durable)
        except nats.js.errors.NotFoundError:
            return ConsumerPosition(acked_through=0, delivered_through=0)
        except _UNAVAILABLE as exc:
            raise BusUnavailable(f"cannot read consumer {spec.durable}: {exc!r}") from exc
        finally:
            _stop_if_cancelled()
        return ConsumerPosition(
            acked_through=0 if info.ack_floor is None else int(info.ack_floor.stream_seq),
            delivered_through=0 if info.delivered is None else int(info.delivered.stream_seq),
        )

    # --- key-value ---------------------------------------------------------------------------

    async def _bucket(self, bucket: str) -> KeyValue:
        """The bucket's handle, looked up once: a lookup is a server round trip, and the halt
        latch is written on the path whose latency matters most."""
        handle = self._buckets.get(bucket)
        if handle is None:
            handle = await self._jetstream.key_value(bucket)
            _stop_if_cancelled()
            self._buckets[bucket] = handle
        return handle

    async def kv_put(self, bucket: str, key: str, message: Message) -> int:
        key = subjects.scoped_key(self._stack, key)
        try:
            kv = await self._bucket(bucket)
            revision = int(await kv.put(key, message.encode()))
        except _UNAVAILABLE as exc:
            raise BusUnavailable(f"cannot write {bucket}/{key}: {exc!r}") from exc
        _stop_if_cancelled()
        return revision

    async def kv_get(self, bucket: str, key: str, message_type: type[M]) -> M | Undecodable | None:
        """The current value, ``Undecodable`` if it does not decode, None when the key was never
        written (or was deleted); BusUnavailable on outage."""
        key = subjects.scoped_key(self._stack, key)
        try:
            kv = await self._bucket(bucket)
            entry: KeyValue.Entry | None = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            entry = None
        except _UNAVAILABLE as exc:
            raise BusUnavailable(f"cannot read {bucket}/{key}: {exc!r}") from exc
        _stop_if_cancelled()
        return None if entry is None else self._decode_entry(bucket, key, entry, message_type)

    async def kv_watch(
        self, bucket: str, key: str, message_type: type[M]
    ) -> AsyncIterator[M | Undecodable | None]:
        """Every value written to ``key`` from now on (starting with the current one); a value
        that does not decode comes as ``Undecodable`` and a deletion as None (as ``kv_get``
        says of a deleted key), each in its place in the order."""
        key = subjects.scoped_key(self._stack, key)
        kv = await self._bucket(bucket)
        watcher = await kv.watch(key)
        try:
            while True:
                _stop_if_cancelled()
                try:
                    entry = await watcher.updates(timeout=1.0)  # type: ignore[no-untyped-call]  # untyped in nats-py
                except nats.errors.TimeoutError:
                    continue
                if entry is None or entry.value is None:
                    continue
                if entry.operation in (KV_DEL, KV_PURGE):
                    yield None
                    continue
                yield self._decode_entry(bucket, key, entry, message_type)
        finally:
            with contextlib.suppress(*_UNAVAILABLE):
                await watcher.stop()  # type: ignore[no-untyped-call]  # untyped in nats-py

    def _decode_entry(
        self, bucket: str, key: str, entry: KeyValue.Entry, message_type: type[M]
    ) -> M | Undecodable:
        """Decode one stored value; a bad one is logged and counted once per revision (a
        worker re-reads its control keys every second or so)."""
        revision = int(entry.revision or 0)
        try:
            return decode(entry.value or b"", message_type)
        except MessageRejected as rejected:
            found = Undecodable.of(rejected, source=f"{bucket}/{key}", stored_revision=revision)
            self._count_refused(f"kv:{bucket}", key, revision, found)
            return found

    def _count_refused(self, label: str, key: str, revision: int, *found: Undecodable) -> None:
        """Log and count a stored value that does not decode (or the refused items of a pack),
        once per revision of its key."""
        if found and revision > self._refused.get((label, key), -1):
            self._refused[(label, key)] = revision
            for each in found:
                REJECTED.labels(label, each.reason.value).inc()
                log.warning("%s", each)


async def _fetch(
    subscription: JetStreamContext.PullSubscription, batch: int, *, timeout_s: float
) -> list[Msg]:
    """Up to ``batch`` messages of a pull consumer: the first within ``timeout_s`` (raising
    ``nats.errors.TimeoutError`` when none comes), then at once what the consumer holds
    besides, never waiting for more.

    nats-py's ``fetch(batch > 1)`` with nothing buffered sends its no-wait probe with an
    ``expires``, which the server treats as a lingering pull: after the first message the fetch
    waits for more until the batch fills or the pull expires. At a light pace that held a
    step's signals until the next step came (100 ms at 10 steps/s, in half of the steps of the
    pipeline benchmark's latency run). A no-wait request without ``expires`` is answered at
    once: what is there, then a "no messages" status. It is asked only when the first message
    says more are waiting."""
    first = await subscription.fetch(1, timeout=timeout_s)
    waiting = stream_position(first[0]).pending  # what the stream holds for it after this one
    if batch == 1 or not waiting:  # at a light pace: no second round trip before handling
        return first
    limit = min(batch - 1, waiting)
    return first + await _take_available(subscription, limit, timeout_s=timeout_s)


async def _take_available(
    subscription: JetStreamContext.PullSubscription, limit: int, *, timeout_s: float
) -> list[Msg]:
    """At most ``limit`` messages the consumer can hand out now (nats-py has no call for it:
    the request is written to its pull subject and read from its inbox as its own fetch does).
    A status ends it; a late one is skipped by the next fetch, as nats-py skips those."""
    request = json.dumps({"batch": limit, "no_wait": True}).encode()
    await subscription._nc.publish(subscription._nms, request, reply=subscription._deliver)
    taken: list[Msg] = []
    while len(taken) < limit:
        try:
            msg = await subscription._sub.next_msg(timeout=timeout_s)
        except TimeoutError:  # the server did not answer: what came is all there is for now
            break
        if JetStreamContext.is_status_msg(msg) is None:
            taken.append(msg)
        else:  # "no messages" (or another status): nothing more now
            break
    return taken


def _waves(items: Sequence[tuple[str, Outgoing]]) -> list[list[tuple[str, Outgoing]]]:
    """``items`` cut, in order, into runs with no subject twice and at most ``_WAVE_LIMIT``."""
    waves: list[list[tuple[str, Outgoing]]] = [[]]
    subjects_in_wave: set[str] = set()
    for subject, message in items:
        if subject in subjects_in_wave or len(waves[-1]) >= _WAVE_LIMIT:
            waves.append([])
            subjects_in_wave = set()
        waves[-1].append((subject, message))
        subjects_in_wave.add(subject)
    return [wave for wave in waves if wave]


class StreamPosition(NamedTuple):
    """Where a delivered JetStream message is: its stream sequence, and how many messages the
    consumer has left after it."""

    sequence: int
    pending: int


_V1_ACK_DOTS = 8  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>


def stream_position(msg: Msg) -> StreamPosition:
    """``msg.metadata``'s stream sequence and pending count, read off the ack subject.

    A replay reads them for every message it delivers, where ``msg.metadata`` builds a datetime
    and three dataclasses each time (a tenth of the portfolio's CPU following the candles). The
    subject a server sends without a domain is read here; any other form (a domain's, a newer
    server's) goes to nats-py's parser, which raises ``NotJSMessageError`` for what is none."""
    reply = msg.reply
    if reply.startswith("$JS.ACK.") and reply.count(".") == _V1_ACK_DOTS:
        tokens = reply.split(".")
        return StreamPosition(sequence=int(tokens[5]), pending=int(tokens[8]))
    metadata = msg.metadata
    return StreamPosition(sequence=metadata.sequence.stream, pending=metadata.num_pending)


def _deliver_policy(*, from_now: bool, from_last: bool) -> DeliverPolicy:
    if from_now and from_last:
        raise ValueError("from_now and from_last exclude each other")
    if from_last:
        return DeliverPolicy.LAST_PER_SUBJECT
    return DeliverPolicy.NEW if from_now else DeliverPolicy.ALL


def _close_failed_attempt(client: Client) -> None:
    """Close the socket of a reconnect attempt nats-py has just reported failed.

    A hung broker's kernel still accepts connections, so an attempt connects, then gives up
    waiting for the INFO. nats-py 2.16 opens the next attempt's socket over that one without
    closing it: it would stay open until the collector freed it (a ResourceWarning). Only
    while not connected: an error reported on a live connection (a slow consumer) must not
    close it. Closing a socket already closed does nothing."""
    transport = getattr(client, "_transport", None)  # nats-py's; no public handle on it
    if transport is not None:
        transport.close()


def _stop_if_cancelled() -> None:
    """Re-raise a cancellation swallowed under a nats-py call, so the task ends as asked.

    Two ways it is lost: nats-py 2.16's ``_flush_pending`` ends in ``except CancelledError:
    pass``, so a task cancelled while a publish, a request (a KV read or write) or a connect's
    or close's flush waited in the flush queue would go on as if nothing happened (a heartbeat
    loop that never stops; a loop connecting, reading a key and closing ignored about one
    cancel in three). And Python 3.11's ``asyncio.wait_for``, which nats-py's requests and
    fetches await, returns a result that arrives as its task is cancelled and drops the
    cancellation (a replay cancelled while creating its consumer held it forever, one time in
    a few hundred). A loop around such calls checks at each turn; a wait that never ends by
    itself checks before it starts."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _close_client(client: Client) -> None:
    """Close a client in any state (connected, mid-handshake, reconnecting); never raises.

    Shielded: when the caller is being cancelled (a timeout, a shutdown) the close still runs
    to its end, so the socket is closed and the reconnect loop stopped, not abandoned halfway.
    """
    if client.is_closed:
        return
    await asyncio.shield(_close_quietly(client))


async def _close_quietly(client: Client) -> None:
    try:
        await client.close()
    except Exception as exc:  # e.g. the socket reset while flushing: it is closed all the same
        log.debug("closing the NATS connection: %r", exc)


@contextlib.asynccontextmanager
async def _working_on(msgs: Sequence[Msg], *, interval_s: float) -> AsyncIterator[None]:
    """Tell the server the messages are still being handled (``+WPI``) every ``interval_s``
    while their handler runs: a handler slower than the ack wait (an order whose outcome is
    being looked up) must not have its messages redelivered to another replica meanwhile.

    One timer for all of them, not a task per message: nearly every handler ends long before
    the first tick, and a task would cost a turn of the event loop to start and another to
    cancel, for every message of every consumer (a timer is about a quarter of its cost, and no
    turn); a batch of a fetch shares one (a timer and a context each cost as much as the rest of
    a message's delivery)."""
    loop = asyncio.get_running_loop()
    telling: set[asyncio.Task[None]] = set()
    timer: asyncio.TimerHandle

    async def tell() -> None:
        for msg in msgs:
            with contextlib.suppress(*_UNAVAILABLE):
                await msg.in_progress()

    def tick() -> None:
        nonlocal timer
        task = loop.create_task(tell())
        telling.add(task)
        task.add_done_callback(telling.discard)
        timer = loop.call_later(interval_s, tick)

    timer = loop.call_later(interval_s, tick)
    try:
        yield
    finally:
        timer.cancel()
        for task in list(telling):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _caught_up(
    durable: str, catch_up: Callable[[], Awaitable[None]], fetched: list[Msg]
) -> bool:
    """Run a consumer's catch-up after a lost connection; when it cannot run yet (NATS went
    again), hand the fetched messages back to be delivered after it, and say False."""
    try:
        await catch_up()
    except BusUnavailable as exc:
        log.warning("%s cannot read what was in flight yet (%s); retrying", durable, exc)
        for msg in fetched:
            await _settle(msg.nak(delay=1.0))
        await asyncio.sleep(0.2)
        return False
    return True


async def _settle(acknowledgement: Awaitable[Any]) -> None:
    """Send an ack/nak/term; if the connection is gone the server will redeliver anyway."""
    with contextlib.suppress(*_UNAVAILABLE, nats.errors.MsgAlreadyAckdError):
        await acknowledgement


def _decode_counted(label: str, msg: Msg, message_type: type[M]) -> list[M]:
    """The messages ``msg`` carries (one, or a pack's good items); each refused one, or the
    whole when it is refused, costs one log line and a count of the reason."""
    try:
        decoded = decode_all(msg.data, message_type)
    except MessageRejected as whole:
        decoded = Decoded(messages=[], refused=[whole])
    except Exception:  # decode raises nothing else; if it ever does, the input is still skipped
        REJECTED.labels(label, RejectReason.MALFORMED.value).inc()
        log.exception("%s skipped a message on %s: decoding failed", label, msg.subject)
        return []
    for rejected in decoded.refused:
        REJECTED.labels(label, rejected.reason.value).inc()
        log.warning("%s skipped a message on %s: %s", label, msg.subject, rejected)
    return decoded.messages


async def _deliver(label: str, msg: Msg, message_type: type[M], handler: Handler[M]) -> None:
    """Decode and handle what one message of a subscription that has no acks to give
    carries (a pack's items one by one)."""
    for message in _decode_counted(label, msg, message_type):
        try:
            await handler(message)
        except Exception:
            HANDLER_ERRORS.labels(label).inc()
            log.exception("%s failed to handle %s", label, msg.subject)


async def _hold(subscription: Subscription, *, first: Awaitable[None] | None = None) -> None:
    """Keep a callback subscription open until cancelled (awaiting ``first`` meanwhile, if
    given), then close it. A cancellation swallowed while subscribing ends it at once: it
    would otherwise hold the subscription, and whoever awaits its end, forever."""
    try:
        _stop_if_cancelled()
        if first is not None:
            await first
            _stop_if_cancelled()
        await asyncio.Event().wait()
    finally:
        with contextlib.suppress(*_UNAVAILABLE, nats.errors.BadSubscriptionError):
            await subscription.unsubscribe()


def _write_pending(client: Client) -> None:
    """Write the commands nats-py queued for its flusher task now, as that task would (its
    next turn then finds nothing): synchronous, so nothing can slip in between them and the
    PING written next. Nothing while reconnecting: the reconnect sends them itself."""
    transport = client._transport
    if not client.is_connected or transport is None:
        return
    if client._pending:
        transport.writelines(client._pending[:])
    client._pending = []
    client._pending_data_size = 0


def _subject_matches(subject: str, pattern: str) -> bool:
    """Whether ``subject`` is one of ``pattern``'s (NATS: ``*`` one token, ``>`` the rest)."""
    tokens, wanted = subject.split("."), pattern.split(".")
    for index, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > index
        if index >= len(tokens) or token not in ("*", tokens[index]):
            return False
    return len(tokens) == len(wanted)


def _family(subject: str) -> str:
    """``qtrader.market.candle.BTCUSDT`` -> ``market``: a bounded metric label."""
    parts = subject.split(".")
    return parts[1] if len(parts) > 1 else subject
