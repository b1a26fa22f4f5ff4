"""The live viewer's fan-out hub: one publisher, many WebSocket viewers, none able to slow it.

``FanoutHub.publish`` is synchronous: it encodes the event to JSON once and appends the text to
each client's bounded queue. It never awaits, so a viewer that reads slowly (or not at all) can
never hold up the pipeline that publishes, nor the other viewers: each viewer has its own
``ClientFeed``, drained by that viewer's own sender task.

Per client:

- **Bounded queue, drop-oldest.** When a client's queue is full the oldest queued event is
  dropped to make room. A viewer shows the *present* (the ESS state, the latest portfolio
  snapshot); after a stall it should catch up with the newest events, not replay stale ones and
  then lose what happened since. The loss is never silent: it is counted per client, in the
  ``qtrader_viewer_dropped_total`` counter (no labels, so its cardinality stays fixed however
  many viewers come and go), and in the next batch's ``dropped`` field.
- **Batching window.** A batch is sent ``window_s`` (default 10 ms) after the first event it
  holds arrived, so one WebSocket message carries every event of a burst.
- **Rate cap.** The cap counts WebSocket *messages*, i.e. batches: consecutive batches to one
  client are at least ``1 / max_batches_per_s`` apart (default 50/s, so 20 ms), so any one-second
  interval holds at most ``max_batches_per_s + 1`` of them. Events are not capped separately:
  a batch holds at most ``queue_size`` events, which bounds a message's size.
- **Sequence numbers.** Batches are ``{"seq": n, "events": [...], "dropped": k}``; ``seq``
  starts at 1 and rises by one per batch to that client, and ``dropped`` is how many events were
  dropped for that client since its previous batch. So ``sum(len(events) + dropped)`` over a
  client's batches is exactly the number of events published since it attached: a gap in
  ``seq`` means a lost message, a non-zero ``dropped`` means lost events.

The clock and the sleep are injectable so the timing rules can be tested without waiting.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge

from qtrader.contracts.messages import Message

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

VIEWER_DROPPED = Counter(
    "qtrader_viewer_dropped_total",
    "Events dropped for live viewers whose queue was full (all viewers together).",
)
VIEWER_CLIENTS = Gauge("qtrader_viewer_clients", "Live viewers attached to the event stream.")
VIEWER_BATCHES = Counter(
    "qtrader_viewer_batches_total", "Batches handed to live viewers (all viewers together)."
)


class TooManyClients(Exception):
    """The hub already serves ``max_clients`` viewers; the newcomer is turned away."""


class FeedClosed(Exception):
    """The client was detached from the hub; no more batches will come."""


@dataclass(frozen=True)
class Batch:
    """One WebSocket message: ``events`` are the events' JSON texts, encoded once at publish."""

    seq: int
    events: tuple[str, ...]
    dropped: int

    def encode(self) -> str:
        """The wire text; the events are spliced in as they are, not re-encoded per client."""
        return f'{{"seq":{self.seq},"events":[{",".join(self.events)}],"dropped":{self.dropped}}}'

    def as_dict(self) -> dict[str, Any]:
        decoded: dict[str, Any] = json.loads(self.encode())
        return decoded


@dataclass(frozen=True, kw_only=True)
class ClientStats:
    client_id: str
    peer: str
    sent_batches: int
    sent_events: int
    dropped: int
    queued: int


class ClientFeed:
    """One viewer's queue, batching window and rate cap; drained by one consumer task."""

    def __init__(
        self,
        client_id: str,
        peer: str,
        *,
        queue_size: int,
        window_s: float,
        min_interval_s: float,
        clock: Clock,
        sleep: Sleep,
    ) -> None:
        self.client_id = client_id
        self.peer = peer
        self._queue: deque[str] = deque()
        self._queue_size = queue_size
        self._window = window_s
        self._min_interval = min_interval_s
        self._clock = clock
        self._sleep = sleep
        self._pending_since: float | None = None
        self._last_taken_at = -math.inf
        self._dropped_pending = 0
        self._seq = 0
        self._wakeup = asyncio.Event()
        self._closed = False
        self.sent_batches = 0
        self.sent_events = 0
        self.dropped = 0

    def offer(self, encoded: str) -> None:
        """Queue one event (already JSON); drop the oldest if full. Never blocks."""
        if self._closed:
            return
        if len(self._queue) >= self._queue_size:
            self._queue.popleft()
            self._dropped_pending += 1
            self.dropped += 1
            VIEWER_DROPPED.inc()
        self._queue.append(encoded)
        if self._pending_since is None:
            self._pending_since = self._clock()
        self._wakeup.set()

    def due_at(self) -> float | None:
        """When the next batch may go out (clock time), or None while there is nothing to send."""
        if self._pending_since is None:
            return None
        return max(self._pending_since + self._window, self._last_taken_at + self._min_interval)

    def take(self) -> Batch:
        """Everything queued, as the next batch; the caller checked ``due_at`` (or forces it)."""
        self._seq += 1
        batch = Batch(seq=self._seq, events=tuple(self._queue), dropped=self._dropped_pending)
        self._queue.clear()
        self._pending_since = None
        self._dropped_pending = 0
        self._last_taken_at = self._clock()
        self.sent_batches += 1
        self.sent_events += len(batch.events)
        VIEWER_BATCHES.inc()
        return batch

    async def next_batch(self) -> Batch:
        """Wait until a batch is due under the window and the cap, then take it."""
        while True:
            if self._closed:
                raise FeedClosed(self.client_id)
            due = self.due_at()
            if due is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            delay = due - self._clock()
            if delay > 0:
                await self._sleep(delay)
                continue
            return self.take()

    def close(self) -> None:
        self._closed = True
        self._queue.clear()
        self._wakeup.set()

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> ClientStats:
        return ClientStats(
            client_id=self.client_id,
            peer=self.peer,
            sent_batches=self.sent_batches,
            sent_events=self.sent_events,
            dropped=self.dropped,
            queued=len(self._queue),
        )


class FanoutHub:
    """Fans published events out to every attached viewer's ``ClientFeed``."""

    def __init__(
        self,
        *,
        window_s: float = 0.010,
        max_batches_per_s: float = 50.0,
        queue_size: int = 1024,
        max_clients: int = 64,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if not (math.isfinite(window_s) and window_s >= 0):
            raise ValueError(f"window_s must be a finite number >= 0, got {window_s!r}")
        if not (math.isfinite(max_batches_per_s) and max_batches_per_s > 0):
            raise ValueError(
                f"max_batches_per_s must be a finite number > 0, got {max_batches_per_s!r}"
            )
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size!r}")
        if max_clients < 1:
            raise ValueError(f"max_clients must be >= 1, got {max_clients!r}")
        self.window_s = window_s
        self.max_batches_per_s = max_batches_per_s
        self.queue_size = queue_size
        self.max_clients = max_clients
        self._clock = clock
        self._sleep = sleep
        self._clients: dict[str, ClientFeed] = {}
        self._ids = itertools.count(1)
        self.published = 0
        self._dropped_by_departed = 0
        # Whether the events reach the hub: its feed sets it once the server has confirmed every
        # subscription (an event published before then reaches no viewer).
        self.fed = False

    def publish(self, event: Mapping[str, Any]) -> None:
        """Encode ``event`` once and queue it for every viewer. Synchronous: never awaits.

        Raises ``TypeError`` for a non-mapping and ``ValueError`` for an event JSON cannot
        carry (a float NaN, a Decimal, an object), at the publisher, where the fault is.
        """
        if not isinstance(event, Mapping):
            raise TypeError(f"an event must be a mapping, got {type(event).__name__}")
        try:
            encoded = json.dumps(dict(event), separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"event is not JSON-serialisable: {exc}") from exc
        self.published += 1
        for feed in self._clients.values():
            feed.offer(encoded)

    def publish_message(self, message: Message) -> None:
        """Publish a wire message (an ESS transition, order, fill, alert, snapshot) as JSON."""
        self.publish(message.model_dump(mode="json"))

    def attach(self, peer: str = "") -> ClientFeed:
        """A new viewer; it receives the events published from now on."""
        if len(self._clients) >= self.max_clients:
            raise TooManyClients(f"the viewer stream already serves {self.max_clients} clients")
        feed = ClientFeed(
            f"c{next(self._ids)}",
            peer,
            queue_size=self.queue_size,
            window_s=self.window_s,
            min_interval_s=1.0 / self.max_batches_per_s,
            clock=self._clock,
            sleep=self._sleep,
        )
        self._clients[feed.client_id] = feed
        VIEWER_CLIENTS.inc()
        return feed

    def detach(self, feed: ClientFeed) -> None:
        """Forget a viewer (idempotent); its consumer's ``next_batch`` raises ``FeedClosed``."""
        if self._clients.pop(feed.client_id, None) is not None:
            self._dropped_by_departed += feed.dropped
            VIEWER_CLIENTS.dec()
        feed.close()

    @property
    def clients(self) -> int:
        return len(self._clients)

    @property
    def dropped_total(self) -> int:
        """Events dropped for any viewer since the hub started, departed viewers included."""
        return self._dropped_by_departed + sum(f.dropped for f in self._clients.values())

    def stats(self) -> list[ClientStats]:
        return [feed.stats() for feed in self._clients.values()]
