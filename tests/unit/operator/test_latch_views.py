"""A halt never waits for the Kubernetes API: the stops the operator knows are combined instead."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from qtrader.bus.nats_bus import Bus
from qtrader.contracts.messages import TradingState
from qtrader.control.ess import EssMode, EssSpec, EssStatus, reconcile
from qtrader.control.halt_channel import AckCollector
from qtrader.control.halt_combination import combine
from qtrader.local.nats_server import free_port
from qtrader_operator.handlers import _views_for_write
from qtrader_operator.kube import KubeApi, KubeEndpoint, KubeError
from qtrader_operator.runtime import OperatorConfig, OperatorRuntime
from qtrader_operator.stacks import Stacks

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def _tripped(mode: EssMode = EssMode.HALTED) -> EssStatus:
    spec = EssSpec(
        tripped=True,
        reason="why",
        mode=mode,
        cooldown_seconds=60,
        require_manual_reset=True,
        tripped_by="kubectl",
        flatten_on_trip=False,
    )
    return reconcile(spec=spec, status=EssStatus.initial(), now=T0).status


@pytest.fixture
async def unreachable_api() -> AsyncIterator[OperatorRuntime]:
    """An operator runtime whose Kubernetes API refuses connections (a closed local port)."""
    bus = Bus(url="nats://127.0.0.1:1", client_name="unused")
    kube = KubeApi(KubeEndpoint(server=f"http://127.0.0.1:{free_port()}", token="t"))
    config = OperatorConfig(namespace="t", nats_url="nats://127.0.0.1:1", workload_image="x")
    acks = AckCollector()

    async def no_alerts(_: object) -> None:
        raise AssertionError("no stack is served, so no alert arrives")

    stacks = Stacks(bus, acks=acks, on_alert=no_alerts, heartbeat_interval_s=1.0)
    runtime = OperatorRuntime(config=config, bus=bus, kube=kube, acks=acks, stacks=stacks)
    try:
        yield runtime
    finally:
        await kube.close()


async def test_views_when_the_api_is_down_and_the_decision_halts_then_known_stops_halt(
    unreachable_api: OperatorRuntime,
) -> None:
    unreachable_api.memory("other").status = _tripped(EssMode.REDUCING)
    views = await _views_for_write(unreachable_api, name="main", status=_tripped(), decided=True)
    combined = combine(views)
    assert (combined.state, combined.held_by) == (TradingState.HALTED, ("main", "other"))


@pytest.mark.parametrize("status", [EssStatus.initial(), _tripped(EssMode.REDUCING)])
async def test_views_when_the_api_is_down_and_the_decision_does_not_halt_then_it_waits(
    unreachable_api: OperatorRuntime, status: EssStatus
) -> None:
    with pytest.raises(KubeError):
        await _views_for_write(unreachable_api, name="main", status=status, decided=True)
