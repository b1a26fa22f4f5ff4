"""A real ``redis-server`` process: free loopback port, its own directory, no persistence.

Stopping and starting again reuses the port, which is how tests and stress scenarios make an
outage and a recovery. A restarted server is empty (``--save ""``), like a real restart of a
cache without persistence. The binary is Debian's ``redis-server`` on PATH.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qtrader.local.nats_server import free_port
from qtrader.local.stopping import stop_processes

INSTALL_HINT = "redis-server is not installed (Debian/Ubuntu: apt-get install -y redis-server)"


class RedisServerError(RuntimeError):
    """redis-server could not be started."""


def redis_server_binary() -> Path:
    """The redis-server binary on PATH; ``RedisServerError`` saying how to install it if none."""
    found = shutil.which("redis-server")
    if found is None:
        raise RedisServerError(INSTALL_HINT)
    return Path(found)


def ping(host: str, port: int, *, timeout_s: float = 0.5) -> bool:
    """True when a Redis server answers PING on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class EmbeddedRedis:
    """One redis-server process on a loopback port, with its files in ``work_dir``."""

    def __init__(
        self, *, work_dir: Path, binary: Path, port: int | None = None, host: str = "127.0.0.1"
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.work_dir = work_dir
        self.binary = binary
        self._process: subprocess.Popen[bytes] | None = None
        self.log_path = work_dir / f"redis-{self.port}.log"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, *, timeout_s: float = 10.0) -> None:
        if self.running:
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        command = [
            str(self.binary),
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.work_dir),
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        self._process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout_s
        while not ping(self.host, self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop(kill=True)
                raise RedisServerError(f"redis-server did not answer PING; see {self.log_path}")
            time.sleep(0.02)

    def stop(self, *, kill: bool = False, timeout_s: float = 10.0) -> None:
        if self._process is None:
            return
        stop_processes([self._process], grace_s=timeout_s, kill=kill)
        self._process = None

    def restart(self, *, timeout_s: float = 10.0) -> None:
        """Stop and start again on the same port (the data is gone: nothing is persisted)."""
        self.stop()
        self.start(timeout_s=timeout_s)


@contextmanager
def running_redis(
    work_dir: Path,
    *,
    binary: Path | None = None,
    port: int | None = None,
    timeout_s: float = 10.0,
) -> Iterator[EmbeddedRedis]:
    """A started redis-server (``timeout_s`` to answer PING), stopped on exit."""
    server = EmbeddedRedis(work_dir=work_dir, binary=binary or redis_server_binary(), port=port)
    server.start(timeout_s=timeout_s)
    try:
        yield server
    finally:
        server.stop()
