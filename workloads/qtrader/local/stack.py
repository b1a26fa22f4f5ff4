"""``qtrader up``: the whole pipeline on one machine, on an embedded NATS server, in paper mode.

It starts nats-server with JetStream in a data directory, creates the topology, publishes the
policy revision and an ACTIVE halt latch (what the operator does in a cluster), then starts the
four workloads as separate processes, exactly as their containers run them. It shows a live
summary, and on Ctrl-C, SIGTERM or the end of ``--duration`` stops the workloads (SIGTERM, then
SIGKILL after a grace period) and the server, leaving nothing running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import httpx

from qtrader.bus.nats_bus import Bus
from qtrader.contracts.messages import TradingState
from qtrader.contracts.policy import TradingPolicy
from qtrader.local.control import heartbeat_forever, publish_policy, write_latch
from qtrader.local.nats_server import EmbeddedNats, free_port
from qtrader.local.observer import Observer, WorkloadHealth, render

ROLES = ("marketdata", "inference", "execution", "portfolio")
STOP_GRACE_S = 10.0


@dataclass(frozen=True, kw_only=True)
class StackConfig:
    policy: TradingPolicy
    marketdata_args: tuple[str, ...]
    duration_s: float | None = None
    data_dir: Path | None = None
    report_path: Path | None = None
    refresh_s: float = 1.0


@dataclass
class WorkerProcess:
    role: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/health"


class LocalStack:
    def __init__(self, config: StackConfig) -> None:
        self._config = config
        self._own_dir = config.data_dir is None
        self.data_dir = config.data_dir or Path(tempfile.mkdtemp(prefix="qtrader-"))
        self.nats = EmbeddedNats(store_dir=self.data_dir / "nats")
        self.workers: dict[str, WorkerProcess] = {}
        self._keep_dir = False  # kept when a workload died, so its log can be read
        self._stopped: set[str] = set()  # workloads this stack told to stop

    async def run(self, out: TextIO) -> int:
        """Run until stopped; returns the exit code (non-zero if a workload died)."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        bus = Bus(url=self.nats.url, client_name="qtrader-up")
        observer_tasks: list[asyncio.Task[None]] = []
        started = time.monotonic()
        try:
            self.nats.start()
            await bus.connect()
            await bus.ensure_topology()
            revision = await publish_policy(bus, self._config.policy)
            await write_latch(
                bus, state=TradingState.ACTIVE, reason="local stack started", issued_by="qtrader up"
            )
            observer_tasks.append(
                asyncio.create_task(
                    heartbeat_forever(bus, issued_by="qtrader up"), name="control-heartbeat"
                )
            )
            self._start_workers()
            observer = Observer(
                bus=bus, health_urls={r: w.health_url for r, w in self.workers.items()}
            )
            observer_tasks += observer.tasks()
            title = f"Quantum Trader (paper) policy {revision.name} rev {revision.revision}"
            await self._show(observer, stop, started=started, title=title, out=out)
            health = await self._final_health(observer)
            await self._drain(observer)
            crashed = self._crashed(interrupted=stop.is_set())
            report = self._report(
                observer, health, elapsed_s=time.monotonic() - started, crashed=crashed
            )
            _print_report(report, out)
            if self._config.report_path:
                self._config.report_path.write_text(json.dumps(report, indent=2, default=str))
            self._keep_dir = bool(crashed)
            return 1 if crashed else 0
        finally:
            for task in observer_tasks:
                task.cancel()
            await asyncio.gather(*observer_tasks, return_exceptions=True)
            await bus.close()
            self.stop()

    def _start_workers(self) -> None:
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for role in ROLES:
            port = free_port()
            extra = self._config.marketdata_args if role == "marketdata" else ()
            command = [
                sys.executable, "-m", "qtrader", role,
                "--nats-url", self.nats.url,
                "--health-host", "127.0.0.1",
                "--health-port", str(port),
                *extra,
            ]  # fmt: skip
            log_path = logs / f"{role}.log"
            with log_path.open("ab") as log_file:
                process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
            self.workers[role] = WorkerProcess(
                role=role, port=port, process=process, log_path=log_path
            )

    async def _show(
        self, observer: Observer, stop: asyncio.Event, *, started: float, title: str, out: TextIO
    ) -> None:
        interactive = out.isatty()
        deadline = started + self._config.duration_s if self._config.duration_s else None
        last_plain = 0.0
        while not stop.is_set():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return
            if interactive:
                out.write("\x1b[2J\x1b[H" + render(observer, elapsed_s=now - started, title=title))
                out.write("\n")
                out.flush()
            elif now - last_plain >= 5.0:
                counts = observer.counts
                out.write(
                    f"[{now - started:5.0f}s] candles {counts.candles} signals {counts.signals} "
                    f"intents {counts.intents} fills {counts.fills}\n"
                )
                out.flush()
                last_plain = now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._config.refresh_s)

    async def _drain(self, observer: Observer, *, timeout_s: float = 15.0) -> None:
        """Stop the feed, then let the candles already in flight become signals, orders and
        fills, so the final report is one consistent state (the portfolio has every fill)."""
        feed = self.workers["marketdata"].process
        self._stopped.add("marketdata")
        if feed.poll() is None:
            feed.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        last_seen: tuple[int, ...] = ()
        while time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            counts = observer.counts
            seen = (counts.candles, counts.signals, counts.intents, counts.fills)
            snapshot = observer.snapshot
            applied = snapshot.fills_applied if snapshot else 0
            if seen == last_seen and applied == counts.fills:
                return
            last_seen = seen

    def _crashed(self, *, interrupted: bool) -> list[str]:
        """Workloads that failed, or exited before anyone asked them to.

        A Ctrl-C in a terminal reaches the whole process group, so after an interrupt a
        workload that already stopped cleanly (exit 0) is not a crash.
        """
        crashed = []
        for role, worker in self.workers.items():
            code = worker.process.poll()
            asked = interrupted or role in self._stopped
            if code is not None and (code != 0 or not asked):
                crashed.append(role)
        return crashed

    async def _final_health(self, observer: Observer) -> dict[str, WorkloadHealth]:
        """Each workload's health at the end of the run, before anything is stopped."""
        async with httpx.AsyncClient(timeout=2.0) as client:
            await observer.refresh_health(client)
        return dict(observer.health)

    def _report(
        self,
        observer: Observer,
        health: dict[str, WorkloadHealth],
        *,
        elapsed_s: float,
        crashed: list[str],
    ) -> dict[str, Any]:
        counts = observer.counts
        snapshot = observer.snapshot
        return {
            "elapsed_s": round(elapsed_s, 1),
            "candles": counts.candles,
            "signals": counts.signals,
            "intents": counts.intents,
            "orders": dict(counts.order_statuses),
            "fills": counts.fills,
            "portfolio": snapshot.model_dump(mode="json") if snapshot else None,
            "health": {r: {"status": h.status, "detail": h.detail} for r, h in health.items()},
            "crashed": crashed,
            "processes": {
                **{role: w.process.pid for role, w in self.workers.items()},
                "nats-server": self.nats.pid,
            },
            "logs": str(self.data_dir / "logs"),
        }

    def stop(self) -> None:
        for worker in self.workers.values():
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for worker in self.workers.values():
            try:
                worker.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
        self.nats.stop()
        if self._own_dir and not self._keep_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def _print_report(report: dict[str, Any], out: TextIO) -> None:
    portfolio = report["portfolio"]
    lines = [
        "",
        f"Final report after {report['elapsed_s']}s",
        f"  candles {report['candles']}  signals {report['signals']}  intents {report['intents']}"
        f"  fills {report['fills']}",
        "  orders  " + (", ".join(f"{k} {v}" for k, v in sorted(report["orders"].items())) or "-"),
    ]
    if portfolio:
        lines += [
            f"  equity {portfolio['equity']}  realized {portfolio['realized_pnl']}  "
            f"unrealized {portfolio['unrealized_pnl']}  fees {portfolio['fees']}",
            f"  drawdown {portfolio['drawdown_pct']}%  "
            f"max drawdown {portfolio['max_drawdown_pct']}%",
        ]
    else:
        lines.append("  portfolio: no snapshot received")
    for role, health in report["health"].items():
        detail = f" ({health['detail']})" if health["detail"] else ""
        lines.append(f"  {role:<11} {health['status']}{detail}")
    if report["crashed"]:
        died = ", ".join(report["crashed"])
        lines.append(f"  workloads that died: {died}; logs in {report['logs']}")
    out.write("\n".join(lines) + "\n")
    out.flush()
