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

Why a reserve file: in WAL mode a DELETE needs disk space too, so an outbox that filled its disk
could never drain it, and the producers it holds back would wait for good. At open the outbox
writes ``<name>.reserve`` (``RESERVE_BYTES``); when a removal fails, the reserve is given up and
the removal tried again, so replay can always empty the outbox. Once it is empty, the WAL is
truncated and the reserve written again. A small ``wal_autocheckpoint`` keeps the WAL, which
only grows, from eating the disk between checkpoints.

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

RESERVE_BYTES = 256 * 1024
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
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._db.execute(f"PRAGMA wal_autocheckpoint={_WAL_AUTOCHECKPOINT_PAGES}")
            self._db.execute(_SCHEMA)
            self._depth = self._count()
        except (sqlite3.Error, OSError) as exc:
            raise OutboxUnwritable(path, exc) from exc
        self._reserve = path.with_suffix(".reserve")
        self._restore_reserve()

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

    def oldest(self, limit: int) -> list[OutboxEntry]:
        """Up to ``limit`` entries, oldest first; they stay until ``remove``."""
        rows = self._execute(
            "SELECT seq, subject, msg_id, payload, created_at FROM outbox ORDER BY seq LIMIT ?",
            (limit,),
        ).fetchall()
        return [OutboxEntry(*row) for row in rows]

    def remove(self, seq: int) -> None:
        """Remove the entry ``seq`` once the stream acknowledged it (with the reserve's space
        if the disk is full: see the module docstring)."""
        statement = ("DELETE FROM outbox WHERE seq = ?", (seq,))
        try:
            removed = self._execute(*statement).rowcount
        except OutboxUnwritable:
            if not self._release_reserve():
                raise
            removed = self._execute(*statement).rowcount
        self._depth -= removed
        if self._depth == 0:
            self._compact()

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

    def _release_reserve(self) -> bool:
        """Give the reserve's space back to the disk; False when there was none to give."""
        try:
            self._reserve.unlink()
        except OSError:  # none left, or the directory itself cannot be written
            return False
        return True

    def _restore_reserve(self) -> None:
        """Write the reserve if it is missing; a disk too full for it is reported by the writes
        that follow, not here."""
        if self._reserve.exists():
            return
        try:
            with self._reserve.open("wb") as reserve:
                reserve.write(bytes(RESERVE_BYTES))
                reserve.flush()
                os.fsync(reserve.fileno())
        except OSError:
            self._reserve.unlink(missing_ok=True)

    def _compact(self) -> None:
        """Empty: give the WAL's space back, then take the reserve again."""
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            return  # the next empty outbox tries again
        self._restore_reserve()

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
