"""Child processes of a benchmark or a stress scenario: workloads and helpers, stopped on exit.

``Children`` is a context manager: leaving it stops every process it started (SIGTERM, then
SIGKILL after a grace period), whatever happened inside. Each child writes its output to its own
log file, whose tail goes into the error when it exits early.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from qtrader.local.nats_server import free_port
from qtrader.local.stopping import stop_processes

STOP_GRACE_S = 5.0


class ChildExited(RuntimeError):
    """A child process that should be running has exited."""


@dataclass(frozen=True, kw_only=True)
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    port: int = 0  # the health port of a workload, 0 for a helper

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"{self.base_url}/metrics"

    @property
    def running(self) -> bool:
        return self.process.poll() is None


class Children:
    """Every process started here; leaving the ``with`` block stops them all."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._children: dict[str, Child] = {}
        # How each was started, so a supervisor can start it again the same way.
        self._launches: dict[str, tuple[tuple[str, ...], int, Mapping[str, str] | None]] = {}
        self._supervised: set[str] = set()
        # Where the workloads' outboxes go: this run's, not a shared one (a scenario may put
        # it on a disk of its own).
        self.outbox_dir = log_dir / "outbox"

    def __enter__(self) -> Children:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop(list(self._children))

    def __getitem__(self, name: str) -> Child:
        return self._children[name]

    def names(self) -> list[str]:
        return list(self._children)

    def spawn(
        self,
        name: str,
        args: Sequence[str],
        *,
        port: int = 0,
        env: Mapping[str, str] | None = None,
    ) -> Child:
        self._log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self._log_dir / f"{name}.log"
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, *args],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )
        child = Child(name=name, process=process, log_path=log_path, port=port)
        self._children[name] = child
        self._launches[name] = (tuple(args), port, env)
        return child

    def respawn(self, name: str) -> Child:
        """Start ``name`` again with its first command, port and environment (its log goes
        on in the same file): what a supervisor does to a process that died."""
        args, port, env = self._launches[name]
        return self.spawn(name, args, port=port, env=env)

    def supervised(self, name: str) -> None:
        """``name`` may die: a supervisor starts it again, so ``check_alive`` passes it over."""
        self._supervised.add(name)

    def exit_code(self, name: str) -> int | None:
        """None while ``name`` runs; its exit code once it has exited."""
        return self._children[name].process.poll()

    def workload(
        self, role: str, name: str, url: str, *extra: str, env: Mapping[str, str] | None = None
    ) -> Child:
        """``qtrader ROLE`` on ``url`` with a free health port and this run's outbox directory."""
        port = free_port()
        args = ["-m", "qtrader", role, "--nats-url", url, "--health-host", "127.0.0.1"]
        args += ["--outbox-dir", str(self.outbox_dir)]
        return self.spawn(name, [*args, "--health-port", str(port), *extra], port=port, env=env)

    def stop(self, names: Iterable[str], *, kill: bool = False) -> None:
        """SIGTERM (or SIGKILL), then SIGKILL whatever still runs after the grace period."""
        children = [self._children.pop(n) for n in names if n in self._children]
        stop_processes((child.process for child in children), grace_s=STOP_GRACE_S, kill=kill)

    def check_alive(self) -> None:
        for child in self._children.values():
            if not child.running and child.name not in self._supervised:
                code = child.process.returncode
                raise ChildExited(f"{child.name} exited ({code}):\n{tail(child.log_path)}")

    def log_of(self, name: str) -> str:
        child = self._children.get(name)
        return tail(child.log_path) if child else ""


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
