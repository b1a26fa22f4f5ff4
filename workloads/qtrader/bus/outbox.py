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

Disk faults (a full or read-only disk, an I/O error) are ``OutboxUnwritable``, naming the file and
SQLite's reason, from every call: the publisher treats them like a full outbox (back-pressure,
health CRITICAL), never as a crash. A transaction that failed changed nothing, so the same call
can simply be made again once the disk recovers.

Why ``clear``: in WAL mode a DELETE needs disk space too, so an outbox that filled its disk
could never remove what it replayed, and the producers it holds back would wait for good. So
replay goes on past an entry it could not remove (``oldest(after=...)``), and once every entry
was sent it empties the outbox by deleting its files (``clear``), which frees their space
without writing anything. A small ``wal_autocheckpoint`` keeps the WAL, which only grows until
a checkpoint, from eating the disk; an emptied outbox truncates it.

All calls are synchronous and short (one small transaction); the bus calls them from its event
loop. SQLite is in the standard library; nothing else is needed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Synchronous = Literal["FULL", "NORMAL"]

_WAL_AUTOCHECKPOINT_PAGES = 64

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


class OutboxUnwritable(Exception):
    """The outbox's file cannot be written or read (disk full, read-only, I/O error)."""

    def __init__(self, path: Path, error: sqlite3.Error | OSError) -> None:
        super().__init__(f"outbox {path}: {error}")
        self.path = path
        self.reason = str(error)


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
        self.path = path
        self._lock_fd = lock_fd
        self._closed = False
        self.capacity = capacity
        self._synchronous = synchronous
        self._db = self._open()
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
        self._execute(
            "INSERT INTO outbox (subject, msg_id, payload, created_at) VALUES (?, ?, ?, ?)",
            (subject, msg_id, payload, time.time()),
        )
        self._depth += 1

    def oldest(self, limit: int, *, after: int = 0) -> list[OutboxEntry]:
        """Up to ``limit`` entries with a sequence above ``after``, oldest first; they stay
        until ``remove`` or ``clear``."""
        rows = self._execute(
            "SELECT seq, subject, msg_id, payload, created_at FROM outbox WHERE seq > ? "
            "ORDER BY seq LIMIT ?",
            (after, limit),
        ).fetchall()
        return [OutboxEntry(*row) for row in rows]

    def remove(self, seq: int) -> None:
        """Remove the entry ``seq`` once the stream acknowledged it."""
        self._depth -= self._execute("DELETE FROM outbox WHERE seq = ?", (seq,)).rowcount
        if self._depth == 0:
            self._truncate_wal()

    def clear(self) -> None:
        """Empty the outbox by deleting its files (no disk space needed), then start a new one.
        Only for when every entry it holds has been acknowledged by the stream."""
        self._db.close()
        try:
            for suffix in ("-wal", "-shm", ""):  # the database last: what it holds was sent
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        except OSError as exc:
            self._db = self._open()
            self._depth = self._count()
            raise OutboxUnwritable(self.path, exc) from exc
        self._db = self._open()
        self._depth = 0

    def oldest_age_s(self) -> float:
        if self._closed:
            return 0.0  # a metric scrape after close must not fail
        try:
            row = self._db.execute("SELECT MIN(created_at) FROM outbox").fetchone()
        except sqlite3.Error:
            return 0.0  # a metric scrape; the failure itself is reported by the calls that write
        return 0.0 if row is None or row[0] is None else max(0.0, time.time() - row[0])

    def close(self) -> None:
        self._closed = True
        self._db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _open(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self._synchronous}")
            db.execute(f"PRAGMA wal_autocheckpoint={_WAL_AUTOCHECKPOINT_PAGES}")
            db.execute(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise OutboxUnwritable(self.path, exc) from exc
        return db

    def _truncate_wal(self) -> None:
        """Empty: give the WAL's space back (a failure here is harmless: the next try)."""
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _count(self) -> int:
        (count,) = self._execute("SELECT COUNT(*) FROM outbox", ()).fetchone()
        return int(count)

    def _execute(self, sql: str, parameters: tuple[object, ...]) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, parameters)
        except sqlite3.Error as exc:
            raise OutboxUnwritable(self.path, exc) from exc


def open_outbox(
    directory: Path, name: str, *, capacity: int = 100_000, synchronous: Synchronous = "FULL"
) -> Outbox:
    """``<name>.db`` in ``directory``, held by this process alone.

    A restarted worker with the same name (its pod name, or ``--worker-id``) opens the same file
    and replays what its previous run left. Were a live process holding it (two workers of one
    role on one host with the same name), this one takes ``<name>-<pid>.db`` instead: two
    processes replaying one file could reorder it.
    """
    for candidate in (name, f"{name}-{os.getpid()}"):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(directory / f"{candidate}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        except OSError as exc:
            raise OutboxUnwritable(directory / f"{candidate}.db", exc) from exc
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            continue
        path = directory / f"{candidate}.db"
        try:
            return Outbox(path, capacity=capacity, synchronous=synchronous, lock_fd=lock_fd)
        except OutboxUnwritable:
            os.close(lock_fd)
            raise
    raise RuntimeError(f"cannot lock an outbox file for {name} in {directory}")
