"""The local stack a scenario drives: nats-server, worker processes, the control plane.

``Rig`` starts an embedded nats-server in the scenario's work directory, connects a ``Bus`` of
its own (the scenario's eyes and hands: it publishes policies, latches, candles or signals and
reads the streams back), and starts worker processes as ``Children``. Leaving ``async with``
stops every task, process and server it started, in every case.

Everything is read back from the servers themselves (the streams, the workers' ``/metrics`` and
``/health``), never from the scenario's own bookkeeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import Fill, Message, TradingState
from qtrader.contracts.policy import TradingPolicy, parse_policy
from qtrader.control.ess_resource import EmergencyStop, parse_emergency_stop
from qtrader.local.control import heartbeat_forever, publish_policy, write_latch
from qtrader.local.control_plane import LocalControlPlane
from qtrader.local.nats_server import EmbeddedNats
from qtrader.local.supervisor import Supervisor
from qtrader_tools.metrics import Sample, parse, value
from qtrader_tools.processes import Child, Children
from qtrader_tools.stress.invariants import (
    check_exposure,
    from_paper_fills,
    judge_exposure,
    paper_limits,
)
from qtrader_tools.stress.result import ScenarioResult

M = TypeVar("M", bound=Message)

START_TIMEOUT_S = 60.0
READ_TIMEOUT_S = 30.0
ISSUER = "stress"


class ScenarioFailure(RuntimeError):
    """The scenario could not get to its measurement (a process died, a wait timed out)."""


def policy_document(name: str, **spec: Any) -> TradingPolicy:
    """A TradingPolicy from spec fields given in the YAML's camelCase (validated)."""
    return parse_policy(
        {
            "apiVersion": "qtrader.dev/v1alpha1",
            "kind": "TradingPolicy",
            "metadata": {"name": name},
            "spec": spec,
        }
    )


def emergency_stop(name: str = "main", **spec: Any) -> EmergencyStop:
    """An EmergencyStop resource from spec fields in camelCase (validated)."""
    return parse_emergency_stop(
        {
            "apiVersion": "qtrader.dev/v1alpha1",
            "kind": "EmergencyStop",
            "metadata": {"name": name},
            "spec": spec,
        }
    )


class Rig:
    def __init__(self, work_dir: Path, *, nats_port: int | None = None) -> None:
        self.work_dir = work_dir
        self.nats = EmbeddedNats(store_dir=work_dir / "nats", port=nats_port)
        self.children = Children(work_dir / "logs")
        self.http = httpx.AsyncClient(timeout=5.0)
        self._bus: Bus | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self.control_plane: LocalControlPlane | None = None
        self.policy: TradingPolicy | None = None  # the last one published
        self.supervisor: Supervisor | None = None
        self._supervising = asyncio.Event()  # set: the supervisor stops restarting

    @property
    def url(self) -> str:
        return self.nats.url

    @property
    def bus(self) -> Bus:
        assert self._bus is not None, "the rig is not started"
        return self._bus

    async def __aenter__(self) -> Rig:
        self.nats.start()
        self._bus = Bus(url=self.nats.url, client_name="qtrader-stress")
        await self._bus.connect()
        await self._bus.ensure_topology()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._supervising.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.children.stop(self.children.names())
        if self._bus is not None:
            await self._bus.close()
        await self.http.aclose()
        self.nats.stop()

    def spawn_task(self, coroutine: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """A background task cancelled when the rig stops; its crash is raised by ``check``."""
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.append(task)
        return task

    def check(self) -> None:
        """Raise if a worker process or a background task died."""
        self.children.check_alive()
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise ScenarioFailure(f"task {task.get_name()} failed: {task.exception()!r}")

    def supervise(self, workers: list[Child]) -> Supervisor:
        """Keep ``workers`` and the nats-server up as ``qtrader up`` does (``Supervisor``): one
        that dies is started again with the same command, port, outbox and store. ``check``
        then passes over a dead worker; the scenario judges the supervisor's counts."""
        supervisor = Supervisor()
        for worker in workers:
            self.children.supervised(worker.name)
            supervisor.add(
                worker.name,
                start=functools.partial(self._respawn, worker.name),
                exit_code=functools.partial(self.children.exit_code, worker.name),
            )
        supervisor.add("nats-server", start=self.nats.start, exit_code=lambda: self.nats.returncode)
        self.spawn_task(supervisor.run(self._supervising), "supervisor")
        self.supervisor = supervisor
        return supervisor

    def _respawn(self, name: str) -> None:
        self.children.respawn(name)

    # --- control: policy, latch, heartbeats, the EmergencyStop --------------------------------

    async def publish_policy(self, policy: TradingPolicy) -> None:
        await publish_policy(self.bus, policy)
        self.policy = policy

    async def judge_exposure(self, result: ScenarioResult) -> None:
        """Safety invariant 1 from the paper exchange's own records (its fills), against the
        policy this rig published: a scenario that trades calls it at its end."""
        if self.policy is None:
            raise ScenarioFailure("no policy was published: no limits to judge exposure by")
        fills = await self.read_stream(subjects.FILLS, subjects.all_of(subjects.FILL_PREFIX), Fill)
        report = check_exposure(
            trades=from_paper_fills(fills), limits=paper_limits(self.policy.spec)
        )
        judge_exposure(result, report)

    async def arm_without_control_plane(self) -> None:
        """An ACTIVE latch and heartbeats, for scenarios that need no EmergencyStop."""
        await write_latch(self.bus, state=TradingState.ACTIVE, reason="stress", issued_by=ISSUER)
        self.spawn_task(heartbeat_forever(self.bus, issued_by=ISSUER), "heartbeats")

    async def start_control_plane(self, resource: EmergencyStop) -> LocalControlPlane:
        """Local mode's control plane on this rig's NATS, as ``qtrader up`` runs it."""
        control = LocalControlPlane(self.bus, resource=resource)
        await control.start()
        self.spawn_task(control.run(), "control-plane")
        self.spawn_task(heartbeat_forever(self.bus, issued_by="control-plane"), "heartbeats")
        self.control_plane = control
        return control

    # --- workers ------------------------------------------------------------------------------

    def workload(
        self, role: str, name: str | None = None, *extra: str, env: Mapping[str, str] | None = None
    ) -> Child:
        return self.children.workload(role, name or role, self.url, *extra, env=env)

    async def wait_healthy(self, workers: list[Child], *, path: str = "/healthz") -> None:
        async def all_up() -> bool:
            return all([await self._answers(w, path) for w in workers])

        await self.until(all_up, timeout_s=START_TIMEOUT_S, what=f"{path} of the workers")

    async def wait_trading(
        self, executions: list[Child], *, timeout_s: float = START_TIMEOUT_S
    ) -> None:
        """Until every execution worker trades: its ``halt-latch`` check OK (the latch in force
        and a control-plane heartbeat heard). ``/healthz`` answers before that, and a signal
        decided meanwhile is denied as halted: a scenario that counts on its first signals
        becoming orders waits for this first."""

        async def trading() -> bool:
            checks = [await self.checks(w) for w in executions]
            return all(c.get("halt-latch", ("", ""))[0] == "OK" for c in checks)

        await self.until(trading, timeout_s=timeout_s, what="the execution workers trading")

    async def _answers(self, worker: Child, path: str) -> bool:
        try:
            return (await self.http.get(worker.base_url + path)).status_code == 200
        except httpx.HTTPError:
            return False

    async def health(self, worker: Child) -> dict[str, Any]:
        body: dict[str, Any] = (await self.http.get(worker.base_url + "/health")).json()
        return body

    async def checks(self, worker: Child) -> dict[str, tuple[str, str]]:
        """Each dependency check of a worker's ``/health``: its status and detail, by name."""
        body = await self.health(worker)
        return {
            str(d.get("name")): (str(d.get("status")), str(d.get("detail")))
            for d in body.get("dependencies", [])
            if isinstance(d, dict)
        }

    async def scrape(self, worker: Child) -> list[Sample]:
        """Every sample of a worker's ``/metrics``."""
        return parse((await self.http.get(worker.metrics_url)).text)

    async def metric(self, worker: Child, name: str, **labels: str) -> float:
        """One sample of a worker's /metrics, ``name`` with exactly ``labels``; 0.0 when absent."""
        return value(await self.scrape(worker), name, **labels)

    async def until(
        self,
        condition: Callable[[], Awaitable[bool]],
        *,
        timeout_s: float,
        what: str,
        interval_s: float = 0.1,
    ) -> float:
        """Seconds until ``condition`` held; ``ScenarioFailure`` after ``timeout_s``."""
        started = time.monotonic()
        while True:
            self.check()
            with contextlib.suppress(httpx.HTTPError):
                if await condition():
                    return time.monotonic() - started
            if time.monotonic() - started > timeout_s:
                raise ScenarioFailure(f"timed out after {timeout_s:g} s waiting for {what}")
            await asyncio.sleep(interval_s)

    # --- reading back ------------------------------------------------------------------------

    async def read_stream(
        self, stream: subjects.StreamSpec, filter_subject: str, message_type: type[M]
    ) -> list[M]:
        """Every message stored on ``filter_subject`` when called, oldest first."""
        return await read_stream(self.bus, stream, filter_subject, message_type)


async def read_stream(
    bus: Bus, stream: subjects.StreamSpec, filter_subject: str, message_type: type[M]
) -> list[M]:
    messages: list[M] = []
    caught_up = asyncio.Event()

    async def collect(message: M) -> None:
        messages.append(message)

    reader = asyncio.create_task(
        bus.replay(
            stream, filter_subject, message_type, collect, label="stress-read", caught_up=caught_up
        )
    )
    try:
        await asyncio.wait_for(caught_up.wait(), READ_TIMEOUT_S)
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    return messages
