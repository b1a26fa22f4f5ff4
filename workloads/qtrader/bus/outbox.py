"""A durable local outbox: what could not be published to JetStream waits here, in order.

SQLite in WAL mode, one file per worker process. An entry is the subject, the message's
``Nats-Msg-Id`` and its encoded bytes, appended in publish order; the bus replays entries oldest
first with their original ids, so JetStream's duplicate window drops a message that did reach the
stream before its acknowledgement was lost, and removes each entry only after the stream
acknowledged it.

Durability: ``synchronous=FULL`` by default, so an entry appended is on disk when ``append``
returns (survives a ``kill -9`` and a power loss); ``NORMAL`` (measured in ``qtrader bench
outbox``) survives a process crash only. The outbox is bounded: ``append`` raises ``OutboxFull``
when it holds ``capacity`` entries, which the bus turns into back-pressure on the producer:
nothing is dropped silently.

All calls are synchronous and short (one small transaction); the bus calls them from its event
loop. SQLite is in the standard library; nothing else is needed.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Synchronous = Literal["FULL", "NORMAL"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    subject TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_at REAL NOT NULL
)
"""


class OutboxFull(Exception):
    """The outbox holds ``capacity`` entries: the producer must stop taking work."""


@dataclass(frozen=True)
class OutboxEntry:
    seq: int
    subject: str
    msg_id: str
    payload: bytes
    created_at: float


class Outbox:
    def __init__(
        self,
        path: Path,
        *,
        capacity: int = 100_000,
        synchronous: Synchronous = "FULL",
        lock_fd: int | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"outbox capacity must be >= 1, got {capacity}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock_fd = lock_fd
        self._closed = False
        self.capacity = capacity
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute(_SCHEMA)
        self._depth = self._count()

    def __len__(self) -> int:
        return self._depth

    @property
    def full(self) -> bool:
        return self._depth >= self.capacity

    def append(self, subject: str, msg_id: str, payload: bytes) -> None:
        """Add one entry at the end; raises ``OutboxFull`` at capacity (nothing is written)."""
        if self.full:
            raise OutboxFull(f"outbox {self.path} holds {self._depth} entries (its capacity)")
        self._db.execute(
            "INSERT INTO outbox (subject, msg_id, payload, created_at) VALUES (?, ?, ?, ?)",
            (subject, msg_id, payload, time.time()),
        )
        self._depth += 1

    def oldest(self, limit: int) -> list[OutboxEntry]:
        """Up to ``limit`` entries, oldest first; they stay until ``remove``."""
        rows = self._db.execute(
            "SELECT seq, subject, msg_id, payload, created_at FROM outbox ORDER BY seq LIMIT ?",
            (limit,),
        ).fetchall()
        return [OutboxEntry(*row) for row in rows]

    def remove(self, seq: int) -> None:
        """Remove the entry ``seq`` once the stream acknowledged it."""
        removed = self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,)).rowcount
        self._depth -= removed

    def oldest_age_s(self) -> float:
        if self._closed:
            return 0.0  # a metric scrape after close must not fail
        row = self._db.execute("SELECT MIN(created_at) FROM outbox").fetchone()
        return 0.0 if row is None or row[0] is None else max(0.0, time.time() - row[0])

    def close(self) -> None:
        self._closed = True
        self._db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _count(self) -> int:
        (count,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        return int(count)


def open_outbox(
    directory: Path, name: str, *, capacity: int = 100_000, synchronous: Synchronous = "FULL"
) -> Outbox:
    """``<name>.db`` in ``directory``, held by this process alone.

    A restarted worker with the same name (its pod name, or ``--worker-id``) opens the same file
    and replays what its previous run left. Were a live process holding it (two workers of one
    role on one host with the same name), this one takes ``<name>-<pid>.db`` instead: two
    processes replaying one file could reorder it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for candidate in (name, f"{name}-{os.getpid()}"):
        lock_fd = os.open(directory / f"{candidate}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            continue
        path = directory / f"{candidate}.db"
        return Outbox(path, capacity=capacity, synchronous=synchronous, lock_fd=lock_fd)
    raise RuntimeError(f"cannot lock an outbox file for {name} in {directory}")
