"""``qtrader up``: the whole pipeline on one machine, on an embedded NATS server, in paper mode.

It starts nats-server with JetStream in a data directory, creates the topology, publishes the
policy revision, and runs what the operator runs in a cluster: the EmergencyStop control plane
(``LocalControlPlane``: the resource in the ESS bucket, the halt latch, acknowledgements) and the
control heartbeat. Then it starts the four workloads as separate processes, exactly as their
containers run them, and keeps them and the server up as a kubelet would
(``supervisor.Supervisor``: a process that dies is started again the same way, with back-off,
and both summaries and the report say so). It writes ``.qtrader/up.json`` so ``qtrader ess`` and
``qtrader policy`` in another terminal find its NATS server. It shows a live summary, and on
Ctrl-C, SIGTERM or the end of ``--duration`` stops the workloads (SIGTERM, then SIGKILL after a
grace period) and the server, leaving nothing running and removing the state file. It exits
non-zero when a process was down at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx

from qtrader.bus.nats_bus import Bus
from qtrader.contracts.messages import MessageRejected, PortfolioSnapshot
from qtrader.contracts.policy import TradingPolicy
from qtrader.control.ess_resource import EmergencyStop
from qtrader.local import control_plane, up_state
from qtrader.local.control import heartbeat_forever, publish_policy
from qtrader.local.control_plane import LocalControlPlane
from qtrader.local.nats_server import EmbeddedNats, free_port
from qtrader.local.observer import Observer, WorkloadHealth, income_line, render
from qtrader.local.stopping import stop_processes
from qtrader.local.supervisor import Supervisor

ROLES = ("marketdata", "inference", "execution", "portfolio")
STOP_GRACE_S = 10.0


@dataclass(frozen=True, kw_only=True)
class StackConfig:
    policy: TradingPolicy
    ess: EmergencyStop
    marketdata_args: tuple[str, ...]
    duration_s: float | None = None
    data_dir: Path | None = None
    report_path: Path | None = None
    refresh_s: float = 1.0
    # Where .qtrader/up.json goes: the directory up runs in.
    state_dir: Path = field(default_factory=Path.cwd)


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
        self._log_handler: logging.Handler | None = None
        self.supervisor = Supervisor()

    async def run(self, out: TextIO, err: TextIO = sys.stderr) -> int:
        """Run until stopped; returns the exit code (non-zero if a workload died)."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        bus = Bus(url=self.nats.url, client_name="qtrader-up")
        tasks: list[asyncio.Task[None]] = []
        started = time.monotonic()
        try:
            self.nats.start()
            await bus.connect()
            await bus.ensure_topology()
            revision = await publish_policy(bus, self._config.policy)
            try:
                control = await self._start_control_plane(bus, err)
            except MessageRejected as exc:  # never replaced by the file: it may hold a trip
                err.write(
                    f"qtrader up: the EmergencyStop stored in {self.data_dir} does not decode "
                    f"({exc}); nothing started\n"
                )
                return 2
            tasks.append(asyncio.create_task(control.run(), name="control-plane"))
            tasks.append(
                asyncio.create_task(
                    heartbeat_forever(bus, issued_by="qtrader up"), name="control-heartbeat"
                )
            )
            self._start_workers()
            self.supervisor.add("nats-server", start=self.nats.start, exit_code=self._nats_exit)
            tasks.append(asyncio.create_task(self.supervisor.run(stop), name="supervisor"))
            self._claim_state_file(err)
            observer = Observer(
                bus=bus, health_urls={r: w.health_url for r, w in self.workers.items()}
            )
            tasks += observer.tasks()
            mode = revision.spec.mode.value  # paper, testnet or live: the title must not lie
            title = (
                f"Quantum Trader ({mode}) policy {revision.name} rev {revision.revision}"
                f"  console {self._console_url()}"
            )
            view = _View(
                observer=observer,
                control=control,
                supervisor=self.supervisor,
                title=title,
                started=started,
            )
            await self._show(view, stop, out=out)
            down = self._ending(interrupted=stop.is_set())
            health = await self._final_health(observer)
            await self._drain(observer)
            report = self._report(view, health, elapsed_s=time.monotonic() - started, down=down)
            _print_report(report, out)
            if self._config.report_path:
                self._config.report_path.write_text(json.dumps(report, indent=2, default=str))
            self._keep_dir = bool(down or any(self.supervisor.restarts.values()))
            return 1 if down else 0
        finally:
            up_state.release(self._config.state_dir, pid=os.getpid())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await bus.close()
            if self._log_handler is not None:
                control_plane.log.removeHandler(self._log_handler)
                self._log_handler.close()
            self.stop()

    async def _start_control_plane(self, bus: Bus, err: TextIO) -> LocalControlPlane:
        """Store the EmergencyStop (or keep the one a reused --data-dir holds), put its latch in
        force before any workload starts, and log its events to logs/control-plane.log."""
        self._log_handler = _log_to_file(
            control_plane.log, self.data_dir / "logs" / "control-plane.log"
        )
        control = LocalControlPlane(bus, resource=self._config.ess)
        if not await control.start():
            status = control.status
            err.write(
                f"qtrader up: kept the EmergencyStop {control.name!r} stored in the data "
                f"directory (state {status.state}, latch revision {status.latch_revision}); "
                "the --ess file's settings were not applied\n"
            )
        return control

    def _claim_state_file(self, err: TextIO) -> None:
        state = up_state.UpState(
            nats_url=self.nats.url,
            pid=os.getpid(),
            ess=self._config.ess.name,
            health={role: worker.health_url for role, worker in self.workers.items()},
            console=self._console_url(),
        )
        other = up_state.claim(state, self._config.state_dir)
        if other is not None:
            err.write(
                f"qtrader up: another stack (pid {other.pid}) owns {up_state.STATE_FILE} here; "
                "`qtrader ess` and `qtrader policy` reach this one with "
                f"--nats-url {self.nats.url}\n"
            )

    def _console_url(self) -> str:
        """The live console's page: the portfolio serves it beside the viewers' stream."""
        return f"http://127.0.0.1:{self.workers['portfolio'].port}/console"

    def _start_workers(self) -> None:
        for role in ROLES:
            port = free_port()
            self._spawn(role, port)
            self.supervisor.add(
                role,
                start=functools.partial(self._spawn, role, port),
                exit_code=functools.partial(self._worker_exit, role),
            )

    def _spawn(self, role: str, port: int) -> None:
        """Start ``role`` on ``port``: the same command, port, outbox and log at every restart."""
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        extra = self._config.marketdata_args if role == "marketdata" else ()
        command = [
            sys.executable, "-m", "qtrader", role,
            "--nats-url", self.nats.url,
            "--health-host", "127.0.0.1",
            "--health-port", str(port),
            "--outbox-dir", str(self.data_dir / "outbox"),
            *extra,
        ]  # fmt: skip
        log_path = logs / f"{role}.log"
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        self.workers[role] = WorkerProcess(role=role, port=port, process=process, log_path=log_path)

    def _worker_exit(self, role: str) -> int | None:
        return self.workers[role].process.poll()

    def _nats_exit(self) -> int | None:
        return self.nats.returncode

    async def _show(self, view: _View, stop: asyncio.Event, *, out: TextIO) -> None:
        interactive = out.isatty()
        started = view.started
        deadline = started + self._config.duration_s if self._config.duration_s else None
        last_plain = 0.0
        if not interactive:  # the full view carries the title; the plain lines need it once
            out.write(view.title + "\n")
            out.flush()
        while not stop.is_set():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return
            if interactive:
                out.write("\x1b[2J\x1b[H" + view.render(elapsed_s=now - started) + "\n")
                out.flush()
            elif now - last_plain >= 5.0:
                counts = view.observer.counts
                out.write(
                    f"[{now - started:5.0f}s] candles {counts.candles} signals {counts.signals} "
                    f"intents {counts.intents} fills {counts.fills} "
                    f"ess {view.control.status.state} {self.supervisor.summary()} "
                    f"health {_health_line(view.observer.health)}\n"
                )
                out.flush()
                last_plain = now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._config.refresh_s)

    async def _drain(self, observer: Observer, *, timeout_s: float = 15.0) -> None:
        """Stop the feed, then let the candles already in flight become signals, orders and
        fills, so the final report is one consistent state (the portfolio has every fill)."""
        feed = self.workers["marketdata"].process
        self.supervisor.hold("marketdata")
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

    def _ending(self, *, interrupted: bool) -> list[str]:
        """The run is over: restart nothing from now on, and name what is down.

        A Ctrl-C in a terminal reaches the whole process group, so after an interrupt a process
        that stopped cleanly on it (exit 0, or killed by SIGINT) is not down.
        """
        down = self.supervisor.down()
        self.supervisor.hold_all()
        codes = {role: worker.process.poll() for role, worker in self.workers.items()}
        codes["nats-server"] = self.nats.returncode
        return [n for n in down if not (interrupted and codes.get(n) in (0, -signal.SIGINT))]

    async def _final_health(self, observer: Observer) -> dict[str, WorkloadHealth]:
        """Each workload's health at the end of the run, before anything is stopped."""
        async with httpx.AsyncClient(timeout=2.0) as client:
            await observer.refresh_health(client)
        return dict(observer.health)

    def _report(
        self,
        view: _View,
        health: dict[str, WorkloadHealth],
        *,
        elapsed_s: float,
        down: list[str],
    ) -> dict[str, Any]:
        observer = view.observer
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
            "ess": view.control.summary(),
            "down": down,
            "restarts": self.supervisor.restarts,
            "supervisor_events": [
                {"at_s": round(e.at - view.started, 1), "process": e.service, "what": e.what}
                for e in self.supervisor.events
            ],
            "processes": {
                **{role: w.process.pid for role, w in self.workers.items()},
                "nats-server": self.nats.pid,
            },
            "logs": str(self.data_dir / "logs"),
        }

    def stop(self) -> None:
        stop_processes((w.process for w in self.workers.values()), grace_s=STOP_GRACE_S)
        self.nats.stop()
        if self._own_dir and not self._keep_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


@dataclass(frozen=True, kw_only=True)
class _View:
    """What the live summary shows: the pipeline (observer) and the kill switch."""

    observer: Observer
    control: LocalControlPlane
    supervisor: Supervisor
    title: str
    started: float

    def render(self, *, elapsed_s: float) -> str:
        lines = [render(self.observer, elapsed_s=elapsed_s, title=self.title), ""]
        lines.append(self.control.render_line())
        for event in self.control.events[-3:]:
            lines.append(f"  {event['at']} {event['reason']}: {event['message']}")
        lines.append(f"processes: {self.supervisor.summary()}")
        for supervised in self.supervisor.events[-3:]:
            at_s = supervised.at - self.started
            lines.append(f"  [{at_s:5.0f}s] {supervised.service} {supervised.what}")
        return "\n".join(lines)


def _log_to_file(logger: logging.Logger, path: Path) -> logging.Handler:
    """Send a logger's lines to a file (the terminal belongs to the live summary)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return handler


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
            f"  {income_line(PortfolioSnapshot.model_validate(portfolio))}",
            f"  drawdown {portfolio['drawdown_pct']}%  "
            f"max drawdown {portfolio['max_drawdown_pct']}%",
        ]
    else:
        lines.append("  portfolio: no snapshot received")
    for role, health in report["health"].items():
        detail = f" ({health['detail']})" if health["detail"] else ""
        lines.append(f"  {role:<11} {health['status']}{detail}")
    ess = report["ess"]
    lines.append(
        f"  ess {ess['name']}: {ess['state']}  trips {ess['tripCount']}  resets {ess['resetCount']}"
        f"  latch rev {ess['latchRevision']} {ess['latch']}"
    )
    restarted = {name: n for name, n in report["restarts"].items() if n}
    if restarted:
        counts = ", ".join(f"{name} {n}x" for name, n in sorted(restarted.items()))
        lines.append(f"  restarted: {counts}; logs in {report['logs']}")
    if report["down"]:
        lines.append(f"  DOWN at the end: {', '.join(report['down'])}; logs in {report['logs']}")
    out.write("\n".join(lines) + "\n")
    out.flush()


def _health_line(health: Mapping[str, WorkloadHealth]) -> str:
    """``marketdata OK inference OK execution DEGRADED portfolio OK``: without a terminal this
    line is all a user sees, so a sick or unreachable workload must show in it."""
    return " ".join(f"{role} {h.status}" for role, h in health.items())
