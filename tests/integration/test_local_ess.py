"""Local mode's kill switch and live policy, end to end, as a person drives them.

The first half runs ``qtrader up`` as a real process (four workloads, embedded nats-server) in a
scratch directory, once for the module because its start is the slow part, and drives it with
``qtrader ess`` and ``qtrader policy`` in other processes, which find it through
``.qtrader/up.json``. Its EmergencyStop has a 3 s cooldown and requires a manual reset, so the
refusal and the reset after the cooldown both fit in a test. Each test brings the stop to the
state it needs first, so they do not depend on each other's order.

The second half runs ``LocalControlPlane`` in-process on a real nats-server, for what needs
control over the other side: a worker that never acknowledges, a restart, a latch left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    HaltAck,
    HaltLatch,
    OrderIntent,
    OrderStatus,
    OrderUpdate,
    PortfolioSnapshot,
    RefusedBy,
    RiskAlert,
    RiskAlertKind,
    TradingState,
)
from qtrader.control.ess_resource import EmergencyStop, parse_emergency_stop
from qtrader.control.ess_status import EssState, parse_time
from qtrader.local import ess_client
from qtrader.local.control import write_latch
from qtrader.local.control_plane import EssRecord, LocalControlPlane
from qtrader.local.nats_server import EmbeddedNats
from qtrader_tools import metrics
from support.streams import read_all

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
QTRADER = str(Path(sys.executable).parent / "qtrader")
# Long enough for a trip and the next CLI call (each a new process, over a second apiece on a
# loaded machine) to land inside it: a reset "inside the cooldown" must be inside it.
COOLDOWN_S = 7


def _policy_text(min_confidence: float) -> str:
    text = (ROOT / "examples/policy.yaml").read_text()
    return text.replace("minConfidence: 0.45", f"minConfidence: {min_confidence}")


def _ess_document(**spec: Any) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "examples/emergencystop.yaml").read_text())
    document["spec"].update(spec)
    return document


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.stdout}--- stderr\n{self.stderr}"


async def _qtrader(*args: str, cwd: Path) -> Result:
    """The CLI in its own process, without blocking the event loop (a control plane may run)."""
    process = await asyncio.create_subprocess_exec(
        QTRADER, *args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return Result(process.returncode, stdout.decode(), stderr.decode())


async def _eventually(
    check: Callable[[], Awaitable[bool]], *, timeout_s: float, what: str
) -> float:
    """Seconds until ``check`` held; fails after ``timeout_s``."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


def _ms(text: str) -> int:
    return round(parse_time(text).timestamp() * 1000)


async def _sleep_past(text: str) -> None:
    left = (parse_time(text) - datetime.now(UTC)).total_seconds()
    await asyncio.sleep(max(0.0, left) + 0.3)


# --- the stack: qtrader up in its own process ---------------------------------------------------


@dataclass(frozen=True)
class Stack:
    directory: Path
    state: dict[str, Any]

    @property
    def url(self) -> str:
        return str(self.state["nats_url"])

    async def cli(self, *args: str) -> Result:
        return await _qtrader(*args, cwd=self.directory)

    async def resource(self) -> dict[str, Any]:
        result = await self.cli("ess", "status", "--json")
        assert result.code == 0, result.output
        document: dict[str, Any] = json.loads(result.stdout)
        return document

    async def latch(self) -> HaltLatch:
        bus = Bus(url=self.url, client_name="test-latch")
        await bus.connect()
        try:
            latch = await bus.kv_get(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch)
        finally:
            await bus.close()
        assert latch is not None
        return latch

    def health(self, role: str) -> str:
        return httpx.get(self.state["health"][role], timeout=2.0).text

    def metric(self, role: str, name: str, **labels: str) -> float:
        url = str(self.state["health"][role]).replace("/health", "/metrics")
        return metrics.value(metrics.parse(httpx.get(url, timeout=2.0).text), name, **labels)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("up")
    (directory / "policy.yaml").write_text(_policy_text(0.0))
    ess = _ess_document(cooldownSeconds=COOLDOWN_S, requireManualReset=True, ackTimeoutSeconds=2)
    # This stack tests trips by hand: the synthetic market's drawdown (it reached 3.9%, beyond
    # the example's 3% trigger, in a full run) must not hold back a reset in between.
    ess["spec"]["triggers"]["drawdownPct"] = "50"
    (directory / "ess.yaml").write_text(yaml.safe_dump(ess))
    command = [
        QTRADER, "up",
        "--policy", "policy.yaml",
        "--ess", "ess.yaml",
        "--candles-per-second", "20",
        "--data-dir", str(directory / "run"),
    ]  # fmt: skip
    with (directory / "up.out").open("w") as out:
        process = subprocess.Popen(command, cwd=directory, stdout=out, stderr=subprocess.STDOUT)
    state_file = directory / ".qtrader" / "up.json"
    try:
        deadline = time.monotonic() + 30
        while not state_file.exists():
            assert process.poll() is None, (directory / "up.out").read_text()
            assert time.monotonic() < deadline, "qtrader up wrote no .qtrader/up.json"
            time.sleep(0.1)
        yield Stack(directory=directory, state=json.loads(state_file.read_text()))
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert not state_file.exists(), "qtrader up left .qtrader/up.json behind"


async def _order_updates(url: str) -> list[OrderUpdate]:
    return await read_all(
        url, stream="QT_ORDERS", subject="qtrader.order.update.*", message_type=OrderUpdate
    )


async def _intents(url: str) -> dict[str, OrderIntent]:
    intents = await read_all(
        url, stream="QT_ORDERS", subject="qtrader.order.intent.*", message_type=OrderIntent
    )
    return {i.client_order_id: i for i in intents}


async def _filled_after(url: str, ts_ms: int) -> list[OrderUpdate]:
    updates = await _order_updates(url)
    return [u for u in updates if u.status is OrderStatus.FILLED and u.ts_ms > ts_ms]


async def _wait_for_a_fill_after(stack: Stack, ts_ms: int) -> float:
    async def filled() -> bool:
        return bool(await _filled_after(stack.url, ts_ms))

    return await _eventually(filled, timeout_s=30, what=f"an order filled after {ts_ms}")


async def _ensure_armed(stack: Stack) -> None:
    status = (await stack.resource())["status"]
    if status["state"] == EssState.ARMED:
        return
    await _sleep_past(status["cooldownUntil"])
    result = await stack.cli("ess", "reset")
    assert result.code == 0, result.output


async def _trip(stack: Stack, *args: str) -> dict[str, Any]:
    """Trip from Armed (a fresh cooldown); returns the status after the command."""
    await _ensure_armed(stack)
    result = await stack.cli("ess", "trip", "--reason", "integration test", *args)
    assert result.code == 0, result.output
    status: dict[str, Any] = (await stack.resource())["status"]
    return status


def _the_execution_ack(status: dict[str, Any]) -> dict[str, Any]:
    (ack,) = status["acknowledgements"]  # qtrader up runs one execution worker
    assert ack["revision"] == status["latchRevision"], status
    assert status["pendingWorkers"] == []
    return dict(ack)


async def test_trip_while_orders_flow_then_tripped_halted_acked_and_nothing_filled_after_the_ack(
    stack: Stack,
) -> None:
    await _ensure_armed(stack)
    await _wait_for_a_fill_after(stack, 0)
    status = await _trip(stack)
    await asyncio.sleep(2.0)  # signals keep coming after the acknowledgement
    resource = await stack.resource()
    assert resource["status"]["state"] == "Tripped"
    assert resource["spec"]["tripped"] is True
    assert resource["metadata"]["annotations"]["qtrader.dev/tripped-by"].startswith("cli:")
    latch = await stack.latch()
    assert (latch.state, latch.revision) == (TradingState.HALTED, status["latchRevision"])
    ack = _the_execution_ack(status)
    assert ack["state"] == "HALTED"
    filled = [u for u in await _order_updates(stack.url) if u.status is OrderStatus.FILLED]
    assert {u.worker_id for u in filled} == {ack["worker"]}, "the worker that acked traded"
    assert [u.client_order_id for u in filled if u.ts_ms > _ms(ack["at"])] == []
    denied = "qtrader_signals_denied_total"
    assert stack.metric("execution", denied, reason="halted") > 0, (
        "signals after the trip were denied"
    )
    await _positions_shown_as_the_portfolio_holds_them(stack)


async def _positions_shown_as_the_portfolio_holds_them(stack: Stack) -> None:
    """``qtrader ess status`` shows the portfolio's open positions (no flatten here: the trip
    leaves them open), each with the quantity of the portfolio's last snapshot."""
    snapshots = await read_all(
        stack.url,
        stream=subjects.PORTFOLIO.name,
        subject=subjects.PORTFOLIO_SNAPSHOT,
        message_type=PortfolioSnapshot,
    )
    held = [f"{p.symbol} {p.quantity}" for p in snapshots[-1].positions if p.quantity]
    expected = f"Open: {'; '.join(held)}" if held else "Flat: no open position"

    async def shown() -> bool:
        result = await stack.cli("ess", "status")
        return f"  positions   {expected}" in result.output

    await _eventually(shown, timeout_s=10, what=f"qtrader ess status showing {expected}")


async def test_reset_inside_the_cooldown_then_refused_exit_1_and_the_trip_stays(
    stack: Stack,
) -> None:
    before = await _trip(stack)
    result = await stack.cli("ess", "reset")
    assert result.code == 1, result.output
    assert "reset refused: the cooldown runs until" in result.stdout
    after = (await stack.resource())["status"]
    same = ("state", "tripCount", "resetCount", "latchRevision", "trippedAt", "cooldownUntil")
    assert {k: after[k] for k in same} == {k: before[k] for k in same}
    assert after["resetRefusedUntil"] == before["cooldownUntil"]
    spec = (await stack.resource())["spec"]
    assert (spec["tripped"], spec["reason"]) == (True, "integration test"), "set back to tripped"
    latch = await stack.latch()
    assert (latch.state, latch.revision) == (TradingState.HALTED, before["latchRevision"])


async def test_reset_after_the_cooldown_then_armed_and_orders_flow_again(stack: Stack) -> None:
    before = await _trip(stack)
    await _sleep_past(before["cooldownUntil"])
    result = await stack.cli("ess", "reset")
    assert result.code == 0, result.output
    assert "Reset: reset: trading allowed" in result.stdout
    status = (await stack.resource())["status"]
    assert status["state"] == "Armed"
    assert status["resetCount"] == before["resetCount"] + 1
    assert status["latchRevision"] == before["latchRevision"] + 1
    latch = await stack.latch()
    assert (latch.state, latch.revision) == (TradingState.ACTIVE, status["latchRevision"])
    ack = _the_execution_ack(status)
    assert ack["state"] == "ACTIVE"
    await _wait_for_a_fill_after(stack, _ms(ack["at"]))


def _pid_of(worker: str) -> int:
    """An execution worker's pid: its default id is ``<host>-<pid>``."""
    pid = int(worker.rsplit("-", 1)[1])
    assert b"execution" in Path(f"/proc/{pid}/cmdline").read_bytes(), worker
    return pid


def _ack_timeout_condition(status: dict[str, Any]) -> dict[str, Any]:
    (condition,) = [c for c in status["conditions"] if c["type"] == "AckTimeout"]
    return dict(condition)


async def test_trip_with_a_frozen_worker_then_pending_exit_3_and_nothing_sent_after_its_ack(
    stack: Stack,
) -> None:
    await _ensure_armed(stack)
    await _wait_for_a_fill_after(stack, 0)
    (ack,) = (await stack.resource())["status"]["acknowledgements"]
    worker = ack["worker"]
    pid = _pid_of(worker)
    os.kill(pid, signal.SIGSTOP)
    try:
        result = await stack.cli("ess", "trip", "--reason", "frozen worker")
        assert result.code == 3, result.output
        assert f"ack: {worker} did not acknowledge" in result.stdout
        await asyncio.sleep(5.0)  # frozen past the 5 s presence timeout: still pending
        status = (await stack.resource())["status"]
        assert status["state"] == "Tripped"
        assert status["pendingWorkers"] == [worker]
        assert _ack_timeout_condition(status)["status"] == "True"
        timeouts = [e for e in status["events"] if e["reason"] == "AckTimeout"]
        assert worker in timeouts[-1]["message"]
    finally:
        os.kill(pid, signal.SIGCONT)

    async def acknowledged() -> bool:
        status = (await stack.resource())["status"]
        return (
            not status["pendingWorkers"]
            and status["acknowledgements"][0]["revision"] == (status["latchRevision"])
        )

    await _eventually(acknowledged, timeout_s=10, what="the resumed worker's acknowledgement")
    await asyncio.sleep(2.0)  # signals keep coming after it
    status = (await stack.resource())["status"]
    acked_ms = _ms(_the_execution_ack(status)["at"])
    assert _ack_timeout_condition(status)["status"] == "False"
    updates = [u for u in await _order_updates(stack.url) if u.worker_id == worker]
    after = [u for u in updates if u.ts_ms > acked_ms]
    # After its acknowledgement the worker only refuses (the halt gate) or cancels: nothing sent.
    sent = [u for u in after if u.status not in (OrderStatus.REJECTED, OrderStatus.CANCELED)]
    assert sent == []
    assert all("HALTED" in (u.reason or "") for u in after if u.status is OrderStatus.REJECTED)
    assert [u for u in await _filled_after(stack.url, acked_ms) if u.worker_id == worker] == []


async def test_trip_in_reducing_mode_then_only_reduce_only_orders_are_sent(stack: Stack) -> None:
    await _ensure_armed(stack)
    await _wait_for_a_fill_after(stack, int(time.time() * 1000))  # trading, not just started
    denied = "qtrader_signals_denied_total"
    denied_before = stack.metric("execution", denied, reason="reducing_only")
    status = await _trip(stack, "--mode", "Reducing")
    assert status["state"] == "Reducing"
    ack = _the_execution_ack(status)
    assert ack["state"] == "REDUCING"
    assert (await stack.latch()).state is TradingState.REDUCING
    await asyncio.sleep(3.0)
    # The updates first: an intent is stored before its order is sent, so every update read
    # has its intent among those read after (reduce-only intents keep coming meanwhile).
    updates = await _order_updates(stack.url)
    intents = await _intents(stack.url)
    sent = [
        u for u in updates if u.refused_by is not RefusedBy.HALT_GATE and u.ts_ms > _ms(ack["at"])
    ]
    assert [u.client_order_id for u in sent if not intents[u.client_order_id].reduce_only] == []
    exercised = stack.metric("execution", denied, reason="reducing_only") > denied_before or sent
    assert exercised, "signals that would add exposure were denied, or reductions were sent"


async def _policy_revision(stack: Stack) -> int:
    result = await stack.cli("policy", "show")
    assert result.code == 0, result.output
    found = re.search(r"# revision (\d+)", result.stdout)
    assert found, result.stdout
    return int(found.group(1))


def _revision_in_health(stack: Stack) -> set[str]:
    shown = set()
    for role in stack.state["health"]:
        found = re.search(r"revision (\d+), age", stack.health(role))
        shown.add(found.group(1) if found else "none")
    return shown


async def test_policy_apply_then_every_workload_runs_the_new_revision_within_two_seconds(
    stack: Stack, tmp_path: Path
) -> None:
    before = await _policy_revision(stack)
    changed = tmp_path / "policy.yaml"
    changed.write_text(_policy_text(0.05))
    result = await stack.cli("policy", "apply", str(changed))
    assert result.code == 0, result.output
    assert f"revision {before + 1} published" in result.stdout

    async def applied() -> bool:
        return _revision_in_health(stack) == {str(before + 1)}

    await _eventually(applied, timeout_s=2.0, what="the new revision in every /health")
    assert "minConfidence: 0.05" in (await stack.cli("policy", "show")).stdout


async def test_policy_apply_when_the_file_is_invalid_then_exit_2_and_the_revision_stays(
    stack: Stack, tmp_path: Path
) -> None:
    before = await _policy_revision(stack)
    bad = tmp_path / "bad.yaml"
    bad.write_text(_policy_text(0.0).replace("maxPerCycle: 10", "maxPerCycle: 500"))
    result = await stack.cli("policy", "apply", str(bad))
    assert result.code == 2, result.output
    assert "maxPerCycle (500) exceeds signals.queueSize (100)" in result.stderr
    assert await _policy_revision(stack) == before
    assert _revision_in_health(stack) == {str(before)}


async def test_ess_status_when_no_stack_runs_here_then_says_so_and_exits_1(tmp_path: Path) -> None:
    result = await _qtrader("ess", "status", cwd=tmp_path)
    assert result.code == 1, result.output
    assert "no local stack is running here" in result.stderr


# --- the control plane in-process ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def _bus(url: str) -> AsyncIterator[Bus]:
    bus = Bus(url=url, client_name="test-control-plane")
    await bus.connect()
    await bus.ensure_topology()
    try:
        yield bus
    finally:
        await bus.close()


@contextlib.asynccontextmanager
async def _running(control: LocalControlPlane) -> AsyncIterator[LocalControlPlane]:
    await control.start()
    task = asyncio.create_task(control.run())
    try:
        yield control
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _resource(**spec: Any) -> EmergencyStop:
    return parse_emergency_stop(_ess_document(**spec))


async def _record(bus: Bus) -> EssRecord:
    return await ess_client.read_record(bus, "main")


async def test_control_plane_when_restarted_then_a_trip_survives_and_its_latch_is_kept(
    nats_server: EmbeddedNats,
) -> None:
    async with _bus(nats_server.url) as bus:
        resource = _resource(cooldownSeconds=60)
        async with _running(LocalControlPlane(bus, resource=resource)):
            latch = await bus.kv_get(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch)
            assert latch is not None
            assert (latch.state, latch.revision) == (TradingState.ACTIVE, 1)
            outcome = await ess_client.trip(
                bus, name="main", reason="restart test", mode=None, tripped_by="cli:t", timeout_s=3
            )
            assert outcome.verdict is ess_client.Verdict.TRIPPED
        restarted = LocalControlPlane(bus, resource=resource)  # the file still says armed
        assert await restarted.start() is False
        assert restarted.status.state is EssState.TRIPPED
        assert (await _record(bus)).spec.tripped is True
        latch = await bus.kv_get(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch)
        assert latch is not None
        assert (latch.state, latch.revision) == (TradingState.HALTED, 2)


async def test_control_plane_when_a_latch_is_left_from_another_run_then_a_higher_one_wins(
    nats_server: EmbeddedNats,
) -> None:
    async with _bus(nats_server.url) as bus:
        for _ in range(3):
            await write_latch(bus, state=TradingState.HALTED, reason="old", issued_by="old run")
        control = LocalControlPlane(bus, resource=_resource())
        assert await control.start() is True
        latch = await bus.kv_get(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch)
        assert latch is not None
        assert (latch.state, latch.revision) == (TradingState.ACTIVE, 4)
        assert (await _record(bus)).ess_status().latch_revision == 4


async def test_a_live_worker_that_never_acks_the_new_latch_is_pending_and_reported_once(
    nats_server: EmbeddedNats,
) -> None:
    async with _bus(nats_server.url) as bus:

        async def stuck_worker() -> None:
            """Answers as a worker that never puts a latch after revision 1 in force."""
            while True:
                ack = HaltAck(
                    worker_id="stuck-1",
                    revision=1,
                    state=TradingState.ACTIVE,
                    ts_ms=int(time.time() * 1000),
                )
                await bus.broadcast(subjects.CONTROL_HALT_ACK, ack)
                await asyncio.sleep(0.2)

        answering = asyncio.create_task(stuck_worker())
        control = LocalControlPlane(bus, resource=_resource(ackTimeoutSeconds=1))
        try:
            async with _running(control):

                async def present() -> bool:
                    return bool((await _record(bus)).list_in_status("acknowledgements"))

                await _eventually(present, timeout_s=3, what="the worker to be seen")
                await ess_client.trip(
                    bus, name="main", reason="ack test", mode=None, tripped_by="cli:t", timeout_s=3
                )

                async def reported() -> bool:
                    events = (await _record(bus)).list_in_status("events")
                    return any(e["reason"] == "AckTimeout" for e in events)

                await _eventually(reported, timeout_s=3, what="an AckTimeout event")
                await asyncio.sleep(1.0)  # it stays pending, and is reported once per revision
                record = await _record(bus)
        finally:
            answering.cancel()
            await asyncio.gather(answering, return_exceptions=True)
        assert record.list_in_status("pendingWorkers") == ["stuck-1"]
        timeouts = [e for e in record.list_in_status("events") if e["reason"] == "AckTimeout"]
        assert len(timeouts) == 1
        assert "stuck-1 did not acknowledge latch revision 2 within 1s" in timeouts[0]["message"]


async def test_reset_in_the_cooldown_without_manual_reset_then_deferred_and_completes_by_itself(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    url = ["--nats-url", nats_server.url]
    async with _bus(nats_server.url) as bus:
        # Long enough that the reset's own process starts inside it on a loaded machine
        # (a CLI start took over 2 s in a full run).
        resource = _resource(cooldownSeconds=8, requireManualReset=False)
        async with _running(LocalControlPlane(bus, resource=resource)):
            tripped = await _qtrader("ess", "trip", "--reason", "deferred test", *url, cwd=tmp_path)
            assert tripped.code == 0, tripped.output
            result = await _qtrader("ess", "reset", *url, cwd=tmp_path)
            assert result.code == 0, result.output
            assert "reset deferred" in result.stdout
            record = await _record(bus)
            assert record.ess_status().state is EssState.COOLING_DOWN
            latch = await bus.kv_get(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch)
            assert latch is not None
            assert latch.state is TradingState.HALTED

            async def armed() -> bool:
                return (await _record(bus)).ess_status().state is EssState.ARMED

            await _eventually(armed, timeout_s=15, what="the deferred reset to complete")
            events = [e["reason"] for e in (await _record(bus)).list_in_status("events")]
            assert events[-2:] == ["ResetDeferred", "CooldownEnded"]
            latch = await bus.kv_get(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch)
            assert latch is not None
            assert latch.state is TradingState.ACTIVE


def _alert(kind: RiskAlertKind, *, value: str, threshold: str = "3") -> RiskAlert:
    return RiskAlert(
        alert_id=f"{kind.value}-{time.monotonic_ns()}",
        alert_kind=kind,
        source="test",
        value=Decimal(value),
        threshold=Decimal(threshold),
        detail=f"{kind.value} {value}",
        ts_ms=1,  # a ban that ended long ago: it never holds a reset back here
    )


async def test_a_person_trips_after_an_automatic_trip_reset_itself_then_never_automatic(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    url = ["--nats-url", nats_server.url]
    async with _bus(nats_server.url) as bus:
        resource = _resource(cooldownSeconds=1, requireManualReset=False)
        async with _running(LocalControlPlane(bus, resource=resource)) as control:
            await control.on_alert(_alert(RiskAlertKind.EXCHANGE_BAN, value="5"))

            async def reset_itself() -> bool:
                status = (await _record(bus)).ess_status()
                return status.trip_count == 1 and status.reset_count == 1

            await _eventually(reset_itself, timeout_s=5, what="the automatic trip to reset")
            assert (await _record(bus)).tripped_by == ""
            result = await _qtrader("ess", "trip", "--reason", "by hand", *url, cwd=tmp_path)
            assert result.code == 0, result.output
            status = (await _record(bus)).ess_status()
            assert status.tripped_by.startswith("cli:")
            assert status.automatic is False
            await asyncio.sleep(2.0)  # past the 1 s cooldown: a person's trip stays
            record = await _record(bus)
            assert (record.ess_status().state, record.spec.tripped) == (EssState.TRIPPED, True)


def _snapshot(drawdown: str, sequence: int) -> PortfolioSnapshot:
    equity = Decimal(10_000) * (1 - Decimal(drawdown) / 100)
    return PortfolioSnapshot(
        sequence=sequence,
        ts_ms=1_700_000_000_000 + sequence,
        fills_applied=sequence,
        initial_capital=Decimal(10_000),
        realized_pnl=equity - 10_000,
        unrealized_pnl=Decimal(0),
        fees=Decimal(0),
        equity=equity,
        peak_equity=Decimal(10_000),
        drawdown_pct=Decimal(drawdown),
        max_drawdown_pct=Decimal(drawdown),
        positions=(),
    )


async def test_a_reset_while_the_drawdown_still_holds_is_refused_exit_1_and_the_latch_stays(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    url = ["--nats-url", nats_server.url]
    async with _bus(nats_server.url) as bus:
        resource = _resource(cooldownSeconds=1, triggers={"drawdownPct": "3"})
        async with _running(LocalControlPlane(bus, resource=resource)):
            await asyncio.sleep(0.5)  # the risk monitor's subscriptions are up
            await bus.publish(subjects.PORTFOLIO_SNAPSHOT, _snapshot("9.35", 1))

            async def tripped() -> bool:
                return (await _record(bus)).ess_status().state is EssState.TRIPPED

            await _eventually(tripped, timeout_s=5, what="the drawdown trip")
            await asyncio.sleep(1.2)  # past the cooldown: only the drawdown can refuse it
            result = await _qtrader("ess", "reset", *url, cwd=tmp_path)
            assert result.code == 1, result.output
            assert "drawdown 9.35% still beyond the 3% trigger" in result.stdout
            record = await _record(bus)
            assert (record.ess_status().state, record.spec.tripped) == (EssState.TRIPPED, True)
            assert record.status["heldBy"] == ["main"]
            latch = await bus.kv_get(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch)
            assert latch is not None
            assert (latch.state, latch.held_by) == (TradingState.HALTED, ("main",))

            await bus.publish(subjects.PORTFOLIO_SNAPSHOT, _snapshot("1.5", 2))
            await asyncio.sleep(0.3)
            result = await _qtrader("ess", "reset", *url, cwd=tmp_path)
            assert result.code == 0, result.output
            assert (await _record(bus)).ess_status().state is EssState.ARMED
