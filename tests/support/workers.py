"""Start real workload processes (``python -m qtrader ROLE``) and talk to their health contract."""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import httpx

from qtrader.local.nats_server import free_port
from qtrader.local.stopping import stop_processes
from qtrader_tools import metrics
from support.invariants import settle_portfolio


@dataclass
class Worker:
    role: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    stack: str | None = None  # the stack it serves (``--stack``); None for the default one

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.base_url + path, timeout=3.0)

    def health(self) -> dict[str, object]:
        body: dict[str, object] = self.get("/health").json()
        return body

    def dependency(self, name: str) -> dict[str, object]:
        """One dependency of /health (status, detail, ...); empty when it is not listed."""
        dependencies = self.health().get("dependencies", [])
        assert isinstance(dependencies, list)
        found = [d for d in dependencies if d["name"] == name]
        return dict(found[0]) if found else {}

    def samples(self) -> list[metrics.Sample]:
        return metrics.parse(self.get("/metrics").text)

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample in /metrics (0.0 if the sample is not there yet)."""
        return metrics.value(self.samples(), name, **labels)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, *, kill: bool = False) -> None:
        stop_processes([self.process], grace_s=15, kill=kill)


async def stop_pipeline(workers: Iterable[Worker], *, nats_url: str) -> None:
    """Stop a test's workers as a test should before the end-of-test invariants: every producer
    first (an order in flight at SIGTERM still settles and publishes its fill), then each
    portfolio once it has applied every fill stored. A portfolio stopped first, or at once,
    leaves its last snapshot a fill behind: not a loss (a restart replays it), but the check
    then judges a snapshot the test cut short."""
    workers = list(workers)
    producers = [w for w in workers if w.role != "portfolio"]
    await asyncio.gather(*(asyncio.to_thread(w.stop) for w in producers))
    portfolios = [w for w in workers if w.role == "portfolio" and w.process.poll() is None]
    for stack in {w.stack for w in portfolios}:
        await settle_portfolio(nats_url, stack=stack)
    await asyncio.gather(*(asyncio.to_thread(w.stop) for w in portfolios))


def start_worker(
    role: str,
    *,
    nats_url: str,
    log_dir: Path,
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> Worker:
    port = free_port()
    log_path = log_dir / f"{role}-{port}.log"
    command = [
        sys.executable, "-m", "qtrader", role,
        "--nats-url", nats_url,
        "--health-host", "127.0.0.1",
        "--health-port", str(port),
        "--outbox-dir", str(log_dir / "outbox"),
        *args,
    ]  # fmt: skip
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    env = env or {}
    stack = args[args.index("--stack") + 1] if "--stack" in args else env.get("QTRADER_STACK")
    worker = Worker(role=role, port=port, process=process, log_path=log_path, stack=stack)
    wait_until(lambda: _alive(worker), timeout_s=20, what=f"{role} /healthz", worker=worker)
    return worker


def _alive(worker: Worker) -> bool:
    try:
        return worker.get("/healthz").status_code == 200
    except httpx.HTTPError:
        return False


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]],
    *,
    timeout_s: float,
    what: str,
    worker: Worker | None = None,
    interval_s: float = 0.1,
) -> None:
    """``wait_until`` for async tests: the event loop keeps running (heartbeats keep going);
    ``condition`` may be a coroutine function."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            met = condition()
            if inspect.isawaitable(met):
                met = await met
            if met:
                return
        except httpx.HTTPError:
            pass
        if worker is not None and worker.process.poll() is not None:
            raise AssertionError(f"{worker.role} exited while waiting for {what}:\n{worker.log()}")
        await asyncio.sleep(interval_s)
    detail = f"\n--- {worker.role} log ---\n{worker.log()[-4000:]}" if worker else ""
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}{detail}")


def wait_until(
    condition: Callable[[], bool],
    *,
    timeout_s: float,
    what: str,
    worker: Worker | None = None,
    interval_s: float = 0.1,
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except httpx.HTTPError:
            pass  # not listening (yet, or any more): the exit check below tells which
        if worker is not None and worker.process.poll() is not None:
            raise AssertionError(f"{worker.role} exited while waiting for {what}:\n{worker.log()}")
        time.sleep(interval_s)
    detail = f"\n--- {worker.role} log ---\n{worker.log()[-4000:]}" if worker else ""
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}{detail}")
