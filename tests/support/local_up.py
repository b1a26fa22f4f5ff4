"""``qtrader up`` in its own process, as a person runs it, and its processes found as a person
would: by their command lines under ``qtrader up``'s process id."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QTRADER = str(Path(sys.executable).parent / "qtrader")
ROLES = ("marketdata", "inference", "execution", "portfolio")


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found += [child, *descendants(child)]
    return found


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def find_process(up_pid: int, what: str, *, timeout_s: float = 30.0) -> int:
    """The pid of the process under ``qtrader up`` whose command names ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for pid in descendants(up_pid):
            line = cmdline(pid)
            if any(Path(part).name == what for part in line) or (
                "qtrader" in line and what in line
            ):
                return pid
        time.sleep(0.2)
    raise AssertionError(f"no {what} process under qtrader up ({up_pid})")


@dataclass(frozen=True)
class LocalUp:
    """A running ``qtrader up``: its process, its directory and its ``.qtrader/up.json``."""

    process: subprocess.Popen[bytes]
    directory: Path
    state: dict[str, Any]

    def metrics_url(self, role: str) -> str:
        return str(self.state["health"][role]).removesuffix("/health") + "/metrics"

    def output(self) -> str:
        return (self.directory / "up.out").read_text(errors="replace")

    def cli(self, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
        """A ``qtrader`` command in the stack's directory (it finds the stack by up.json)."""
        return subprocess.run(
            [QTRADER, *args],
            cwd=self.directory,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )


@contextmanager
def running_up(directory: Path, *args: str, start_timeout_s: float = 30.0) -> Iterator[LocalUp]:
    """``qtrader up ARGS`` in ``directory`` until the context ends, then Ctrl-C (SIGINT), as a
    person stops it; killed if it has not stopped within a minute."""
    state_file = directory / ".qtrader" / "up.json"
    with (directory / "up.out").open("wb") as out:
        process = subprocess.Popen(
            [QTRADER, "up", *args], cwd=directory, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + start_timeout_s
        while not state_file.exists():
            assert process.poll() is None, (directory / "up.out").read_text()
            assert time.monotonic() < deadline, "qtrader up wrote no .qtrader/up.json"
            time.sleep(0.1)
        yield LocalUp(process, directory, json.loads(state_file.read_text()))
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
