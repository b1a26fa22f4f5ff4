"""``qtrader up`` as a person runs it: its own process in a scratch directory, driven with the CLI.

``running_up`` starts it (four workloads on an embedded nats-server) and yields once it wrote
``.qtrader/up.json``; ``UpStack.cli`` runs ``qtrader ess ...`` / ``qtrader policy ...`` in that
directory, as another terminal would. Stopped with SIGINT (by pid) at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
QTRADER = str(Path(sys.executable).parent / "qtrader")


@dataclass(frozen=True)
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.stdout}--- stderr\n{self.stderr}"


async def qtrader_cli(*args: str, cwd: Path) -> CliResult:
    """The CLI in its own process, without blocking the event loop."""
    process = await asyncio.create_subprocess_exec(
        QTRADER, *args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return CliResult(process.returncode, stdout.decode(), stderr.decode())


@dataclass(frozen=True)
class UpStack:
    directory: Path
    state: dict[str, Any]
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        """The NATS server's URL."""
        return str(self.state["nats_url"])

    def base_url(self, role: str) -> str:
        """A workload's HTTP port (health contract, and the viewers' routes on the portfolio)."""
        return str(self.state["health"][role]).removesuffix("/health")

    async def cli(self, *args: str) -> CliResult:
        return await qtrader_cli(*args, cwd=self.directory)

    async def resource(self) -> dict[str, Any]:
        """The EmergencyStop as ``qtrader ess status --json`` prints it."""
        result = await self.cli("ess", "status", "--json")
        assert result.code == 0, result.output
        document: dict[str, Any] = json.loads(result.stdout)
        return document


def example_policy() -> str:
    return (ROOT / "examples/policy.yaml").read_text()


def example_stop(**spec: Any) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "examples/emergencystop.yaml").read_text())
    document["spec"].update(spec)
    return document


@contextlib.contextmanager
def running_up(
    directory: Path,
    *,
    policy: str,
    stop: Mapping[str, Any],
    candles_per_second: float = 20,
    start_timeout_s: float = 30,
) -> Iterator[UpStack]:
    (directory / "policy.yaml").write_text(policy)
    (directory / "ess.yaml").write_text(yaml.safe_dump(dict(stop)))
    command = [
        QTRADER, "up",
        "--policy", "policy.yaml",
        "--ess", "ess.yaml",
        "--candles-per-second", str(candles_per_second),
        "--data-dir", str(directory / "run"),
    ]  # fmt: skip
    with (directory / "up.out").open("w") as out:
        process = subprocess.Popen(command, cwd=directory, stdout=out, stderr=subprocess.STDOUT)
    state_file = directory / ".qtrader" / "up.json"
    try:
        deadline = time.monotonic() + start_timeout_s
        while not state_file.exists():
            assert process.poll() is None, (directory / "up.out").read_text()
            assert time.monotonic() < deadline, "qtrader up wrote no .qtrader/up.json"
            time.sleep(0.1)
        yield UpStack(
            directory=directory, state=json.loads(state_file.read_text()), process=process
        )
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
