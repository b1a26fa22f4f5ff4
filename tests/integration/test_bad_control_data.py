"""Control data that does not decode fails closed, in real worker processes on a real nats-server.

Values that no reader can decode are written with nats-py straight into the halt latch's and the
policy's KV keys of a running stack. The latch's bad value halts the execution worker at once
(``/health`` CRITICAL saying which revision and why; no order reaches the paper exchange), the
policy's leaves every workload on its last good policy (DEGRADED, naming the revision); nothing
exits, and a valid value written afterwards restores normal behaviour. The test plays the control
plane (policy, latch, heartbeats) and the upstream pipeline (candles and signals).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from asyncio.subprocess import PIPE
from pathlib import Path
from typing import Any

import pytest
import yaml

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    HaltLatch,
    MessageRejected,
    PolicyRevision,
    RefusedBy,
    TradingState,
)
from qtrader.contracts.policy import parse_policy
from qtrader.control.ess_resource import parse_emergency_stop
from qtrader.local import ess_client
from qtrader.local.control import heartbeat_forever, publish_policy, write_latch
from qtrader.local.control_plane import LocalControlPlane
from qtrader.local.nats_server import EmbeddedNats
from support.flow import flowing, order_updates
from support.streams import kv_delete_raw, kv_put_raw
from support.workers import Worker, eventually, start_worker, stop_pipeline

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
QTRADER = str(Path(sys.executable).parent / "qtrader")

POLICY = parse_policy(
    {
        "apiVersion": "qtrader.dev/v1alpha1",
        "kind": "TradingPolicy",
        "metadata": {"name": "bad-data-test"},
        "spec": {
            "symbols": ["BTCUSDT"],
            "policyRefreshSeconds": 1,
            "risk": {"minConfidence": 0.0, "maxPositionUsd": "1000"},
        },
    }
)


def bad_values(valid: dict[str, Any]) -> dict[str, bytes]:
    """One value per way a stored value can fail to decode; ``valid`` is a decodable body."""
    return {
        "not JSON": b"ACTIVE, trust me",
        "array nested 10,000 deep": b"[" * 10_000 + b"]" * 10_000,
        "wrong kind": json.dumps({**valid, "kind": "candle"}).encode(),
        "unknown schema version": json.dumps({**valid, "schema_version": 99}).encode(),
        "non-UTF-8 bytes": b'{"kind": "\xff\xfe\xfd", "state": "ACTIVE"}',
        "1 MB": json.dumps({**valid, "reason": "x" * 1_000_000}).encode(),
    }


def _dependency(worker: Worker, name: str) -> dict[str, Any]:
    dependencies: list[dict[str, Any]] = worker.health()["dependencies"]  # type: ignore[assignment]
    return next(d for d in dependencies if d["name"] == name)


async def _control(url: str) -> Bus:
    bus = Bus(url=url, client_name="test-control")
    await bus.connect()
    await bus.ensure_topology()
    await publish_policy(bus, POLICY)
    await write_latch(bus, state=TradingState.ACTIVE, reason="test", issued_by="test")
    return bus


async def test_latch_value_that_does_not_decode_halts_until_a_valid_one_is_written(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    url = nats_server.url
    bus = await _control(url)
    heartbeat = asyncio.create_task(heartbeat_forever(bus, issued_by="test", interval_s=0.2))
    portfolio = start_worker("portfolio", nats_url=url, log_dir=tmp_path)
    execution = start_worker(
        "execution", nats_url=url, log_dir=tmp_path, args=("--worker-id", "exec-bad-latch")
    )
    sent = lambda: execution.metric("qtrader_orders_sent_total", exchange="paper")  # noqa: E731
    halted_windows: list[tuple[str, int, int]] = []
    valid = HaltLatch(state=TradingState.ACTIVE, revision=1, issued_at_ms=1).model_dump(mode="json")
    values = bad_values(valid)
    try:
        async with flowing(bus):
            await eventually(lambda: sent() >= 1, timeout_s=30, what="orders", worker=execution)
            for name, payload in values.items():
                revision = await kv_put_raw(url, subjects.HALT_BUCKET, subjects.HALT_KEY, payload)
                said = f"halt latch revision {revision} in the bucket does not decode"
                await eventually(
                    lambda: said in str(execution.health()),  # noqa: B023  # awaited here
                    timeout_s=10,
                    what=f"the worker to refuse the latch ({name})",
                    worker=execution,
                )
                halted_at_ms = int(time.time() * 1000)
                assert execution.health()["status"] == "CRITICAL", name
                assert _dependency(execution, "halt-latch")["status"] == "CRITICAL", name
                denied = execution.metric("qtrader_signals_denied_total", reason="halted")
                await asyncio.sleep(1.5)  # signals keep coming: every one must be denied
                assert execution.metric("qtrader_signals_denied_total", reason="halted") > denied
                assert execution.process.poll() is None, f"execution exited on {name}"
                assert said in str(execution.health()), "the refusal must hold"
                before = sent()
                halted_windows.append((name, halted_at_ms, int(time.time() * 1000)))
                await write_latch(bus, state=TradingState.ACTIVE, reason="ok", issued_by="test")
                await eventually(
                    lambda: _dependency(execution, "halt-latch")["status"] == "OK",
                    timeout_s=10,
                    what=f"a valid latch to restore trading after {name}",
                    worker=execution,
                )
                await eventually(
                    lambda: sent() > before,  # noqa: B023  # awaited here
                    timeout_s=15,
                    what=f"orders again after {name}",
                    worker=execution,
                )
            # A deleted latch is no latch: halted as well, and a valid one restores.
            await kv_delete_raw(url, subjects.HALT_BUCKET, subjects.HALT_KEY)
            await eventually(
                lambda: "no halt latch could be read" in str(execution.health()),
                timeout_s=10,
                what="the worker to halt on a deleted latch",
                worker=execution,
            )
            deleted_at_ms = int(time.time() * 1000)
            await asyncio.sleep(0.2)  # an order sent before the halt may still be counting
            before = sent()
            await asyncio.sleep(1.0)
            assert sent() == before
            halted_windows.append(("deleted", deleted_at_ms, int(time.time() * 1000)))
            await write_latch(bus, state=TradingState.ACTIVE, reason="ok", issued_by="test")
            await eventually(
                lambda: sent() > before, timeout_s=15, what="orders again", worker=execution
            )
        refused = execution.metric("qtrader_halt_latch_refused_total")
        assert refused == len(values)
        assert (
            execution.metric(
                "qtrader_messages_rejected_total", consumer="kv:qtrader-halt", reason="too_large"
            )
            == 1
        )
        # An intent decided before the halt and refused by the gate after it never left: its
        # REJECTED update (refused_by halt-gate, "never sent") is the gate at work.
        sent_to_venue = [
            u
            for u in await order_updates(url)
            if u.exchange == "paper" and u.refused_by is not RefusedBy.HALT_GATE
        ]
        for name, start_ms, end_ms in halted_windows:
            during = [u for u in sent_to_venue if start_ms <= u.ts_ms <= end_ms]
            assert during == [], f"orders reached the venue while refusing ({name}): {during}"
        assert portfolio.process.poll() is None
    finally:
        heartbeat.cancel()
        await asyncio.gather(heartbeat, return_exceptions=True)
        await stop_pipeline((execution, portfolio), nats_url=url)
        await bus.close()


async def test_policy_value_that_does_not_decode_keeps_the_last_good_policy_in_every_workload(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    url = nats_server.url
    bus = await _control(url)
    heartbeat = asyncio.create_task(heartbeat_forever(bus, issued_by="test", interval_s=0.2))
    roles = ("marketdata", "inference", "execution", "portfolio")
    workers = [start_worker(role, nats_url=url, log_dir=tmp_path) for role in roles]
    good = await bus.kv_get(subjects.POLICY_BUCKET, subjects.POLICY_KEY, PolicyRevision)
    assert isinstance(good, PolicyRevision)
    values = bad_values(good.model_dump(mode="json", by_alias=True))
    try:
        for worker in workers:
            await eventually(
                lambda: _dependency(worker, "policy")["status"] == "OK",  # noqa: B023
                timeout_s=20,
                what="the first policy",
                worker=worker,
            )
        for name, payload in values.items():
            revision = await kv_put_raw(url, subjects.POLICY_BUCKET, subjects.POLICY_KEY, payload)
            said = f"revision {revision} refused"
            for worker in workers:
                await eventually(
                    lambda: said in _dependency(worker, "policy")["detail"],  # noqa: B023
                    timeout_s=10,
                    what=f"{worker.role} to refuse the policy ({name})",
                    worker=worker,
                )
            await asyncio.sleep(1.5)  # past a refresh of the policy: a re-read must not crash
            for worker in workers:
                assert worker.process.poll() is None, f"{worker.role} exited on {name}"
                policy = _dependency(worker, "policy")
                assert policy["status"] == "DEGRADED", (name, policy)
                assert f"revision {good.revision} stays in force" in policy["detail"]
                assert worker.metric("qtrader_policy_revision") == good.revision
        # A restart while the bucket holds only a bad value: up, no policy, not trading.
        fresh = start_worker(
            "execution", nats_url=url, log_dir=tmp_path, args=("--worker-id", "exec-fresh")
        )
        workers.append(fresh)
        await asyncio.sleep(2.5)
        assert fresh.process.poll() is None, fresh.log()
        policy = _dependency(fresh, "policy")
        assert policy["status"] == "DEGRADED"
        assert "no policy in force: not trading" in policy["detail"]
        # A valid value restores every workload.
        restored = await publish_policy(bus, POLICY)
        assert restored.revision > good.revision
        for worker in workers:
            await eventually(
                lambda: _dependency(worker, "policy")["status"] == "OK",  # noqa: B023
                timeout_s=10,
                what="the valid policy",
                worker=worker,
            )
            assert worker.metric("qtrader_policy_revision") == restored.revision
            assert worker.metric("qtrader_policy_refused_total") >= 1
    finally:
        heartbeat.cancel()
        await asyncio.gather(heartbeat, return_exceptions=True)
        await stop_pipeline(workers, nats_url=url)
        await bus.close()


async def test_stored_emergency_stop_that_does_not_decode_is_refused_and_nothing_stops(
    nats_server: EmbeddedNats,
) -> None:
    url = nats_server.url
    document = yaml.safe_load((ROOT / "examples/emergencystop.yaml").read_text())
    resource = parse_emergency_stop(document)
    bus = Bus(url=url, client_name="test-control-plane")
    await bus.connect()
    await bus.ensure_topology()
    control = LocalControlPlane(bus, resource=resource)
    await control.start()
    running = asyncio.create_task(control.run())
    try:
        good = await ess_client.read_record(bus, resource.name)
        latch = await bus.kv_get(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch)
        assert isinstance(latch, HaltLatch)
        for name, payload in bad_values(json.loads(good.encode())).items():
            revision = await kv_put_raw(url, subjects.ESS_BUCKET, resource.name, payload)
            with pytest.raises(MessageRejected, match=f"revision {revision}"):
                await ess_client.read_record(bus, resource.name)  # the CLI says it, exit 1
            await asyncio.sleep(0.7)  # past a round of the control plane
            assert not running.done(), f"the control plane stopped on {name}"
            kept = await bus.kv_get(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch)
            assert kept == latch, f"the latch changed on {name}"
        await bus.kv_put(subjects.ESS_BUCKET, resource.name, good)  # a valid record again
        outcome = await ess_client.trip(
            bus, name=resource.name, reason="after bad values", mode=None, tripped_by="cli:t",
            timeout_s=5,
        )  # fmt: skip
        assert outcome.verdict is ess_client.Verdict.TRIPPED, outcome
        halted = await bus.kv_get(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch)
        assert isinstance(halted, HaltLatch)
        assert halted.state is TradingState.HALTED
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await bus.close()


async def test_up_when_the_stored_emergency_stop_does_not_decode_then_starts_nothing(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "run"
    server = EmbeddedNats(store_dir=data_dir / "nats")
    server.start()
    try:
        bus = Bus(url=server.url, client_name="test-setup")
        await bus.connect()
        await bus.ensure_topology()
        await bus.close()
        await kv_put_raw(server.url, subjects.ESS_BUCKET, "main", b'{"kind": "ess_record"')
    finally:
        server.stop()
    command = [QTRADER, "up", "--policy", "examples/policy.yaml", "--data-dir", str(data_dir)]
    process = await asyncio.create_subprocess_exec(
        *command, "--duration", "20", cwd=ROOT, stdout=PIPE, stderr=PIPE
    )
    _, stderr_bytes = await asyncio.wait_for(process.communicate(), 120)
    stderr = stderr_bytes.decode()
    assert process.returncode == 2, stderr
    assert "the EmergencyStop stored in" in stderr
    assert "does not decode" in stderr
    assert "nothing started" in stderr  # no worker, so nothing can trade
    assert not (data_dir / "logs" / "execution.log").exists()
