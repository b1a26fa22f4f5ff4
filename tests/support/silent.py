"""A TCP server that accepts connections and never says a word, in its own thread.

A NATS server speaks first (INFO), so a client connected here is stuck mid-handshake: the place
where a caller's timeout cuts a connection half made. The server counts the connections it
accepted and those the client closed (it reads until end of file), so a test can tell whether
a client closed its socket or left it to the garbage collector.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from types import TracebackType


class SilentServer:
    def __init__(self, *, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self._listener = socket.create_server((host, port or 0))  # 0: a free port, no race
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._accepted = 0
        self._closed_by_client = 0
        self._connections: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stopping = False

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def accepted(self) -> int:
        with self._lock:
            return self._accepted

    @property
    def closed_by_client(self) -> int:
        with self._lock:
            return self._closed_by_client

    def __enter__(self) -> SilentServer:
        self._spawn(self._accept_forever)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with self._lock:
            self._stopping = True
            connections = list(self._connections)
        # shutdown() wakes the threads blocked in accept() and recv(); close() alone may not.
        for sock in (self._listener, *connections):
            with contextlib.suppress(OSError):  # not connected, or already gone
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=10)
        for sock in (self._listener, *connections):
            sock.close()

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_forever(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return  # the listener was shut down
            with self._lock:
                if self._stopping:
                    connection.close()
                    return
                self._accepted += 1
                self._connections.append(connection)
            self._spawn(self._read_until_closed, connection)

    def _read_until_closed(self, connection: socket.socket) -> None:
        with contextlib.suppress(OSError):  # a reset is a close too
            while connection.recv(4096):
                pass
        with self._lock:
            if not self._stopping:
                self._closed_by_client += 1
