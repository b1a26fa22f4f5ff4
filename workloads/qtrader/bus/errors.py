"""The bus's own error tree; nats-py exceptions never escape the bus package.

    BusError
    ├── BusUnavailable     the broker cannot be reached or did not answer in time (retryable)
    └── TopologyError      a stream, consumer or bucket could not be created as declared (fatal)

Callers decide on the type: a producer that gets ``BusUnavailable`` keeps the message (the
outbox's job, #5) instead of dropping it; ``TopologyError`` stops the process at start.
"""

from __future__ import annotations


class BusError(Exception):
    """Base of every error raised by the bus package."""


class BusUnavailable(BusError):
    """The broker is unreachable or slow; the same call may succeed later."""


class TopologyError(BusError):
    """The declared streams, consumers or buckets cannot be set up on this server."""
