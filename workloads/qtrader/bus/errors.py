"""The bus's own error tree; nats-py exceptions never escape the bus package.

    BusError
    ├── BusUnavailable     the broker cannot be reached or did not answer in time (retryable)
    │   └── BusBackPressure    NATS is unreachable and the disk outbox is full: stop taking work
    └── TopologyError      a stream, consumer or bucket could not be created as declared (fatal)

    NotYet                 not an error: a consumer's handler asks for its message again later

Callers decide on the type. With an outbox a publish that NATS does not acknowledge is kept on
disk and replayed, and the caller sees no error; ``BusBackPressure`` says even the outbox is full,
so the producer must stop (a consumer's handler raising it leaves its message unacknowledged, to
be redelivered later). ``TopologyError`` stops the process at start.
"""

from __future__ import annotations


class BusError(Exception):
    """Base of every error raised by the bus package."""


class BusUnavailable(BusError):
    """The broker is unreachable or slow; the same call may succeed later."""


class TopologyError(BusError):
    """The declared streams, consumers or buckets cannot be set up on this server."""


class BusBackPressure(BusUnavailable):
    """NATS is unreachable and the outbox is at capacity: nothing more can be accepted."""


class NotYet(Exception):
    """Raised by a durable consumer's handler whose work on a message is not finished and must
    be taken up again in ``delay_s`` (an order whose outcome the venue cannot tell yet): the
    message stays unacknowledged on the server, so whichever replica receives it next, this
    one or a successor under another name, takes it up; kept only in a worker's memory, it
    would be lost with that worker. Not a failure: neither logged as one nor counted."""

    def __init__(self, reason: str, *, delay_s: float) -> None:
        super().__init__(reason)
        self.delay_s = delay_s
