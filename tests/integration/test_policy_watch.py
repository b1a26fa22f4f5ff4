"""Live policy: a new revision reaches a running watcher at once, and the one in force is
re-read whenever it is older than the policy's own refresh interval."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from qtrader.bus.nats_bus import Bus
from qtrader.contracts.policy import parse_policy
from qtrader.health.contract import Status
from qtrader.local.control import publish_policy
from qtrader.local.nats_server import EmbeddedNats
from qtrader.policy_watch import PolicyWatcher

pytestmark = pytest.mark.integration


def policy(max_position: str) -> object:
    return {
        "apiVersion": "qtrader.dev/v1alpha1",
        "kind": "TradingPolicy",
        "metadata": {"name": "watch-test"},
        "spec": {
            "symbols": ["BTCUSDT"],
            "policyRefreshSeconds": 1,
            "risk": {"maxPositionUsd": max_position},
        },
    }


async def test_watcher_follows_new_revisions_and_re_reads_a_quiet_one(
    nats_server: EmbeddedNats,
) -> None:
    bus = Bus(url=nats_server.url, client_name="test-policy")
    await bus.connect()
    await bus.ensure_topology()
    watcher = PolicyWatcher(bus)
    assert (await watcher.check()).status is Status.DEGRADED  # no policy: not trading
    running = asyncio.create_task(watcher.run())
    try:
        await publish_policy(bus, parse_policy(policy("1000")))
        first = await asyncio.wait_for(watcher.wait(), timeout=5)
        await publish_policy(bus, parse_policy(policy("500")))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0  # applied live within a second
        while watcher.current is None or watcher.current.revision == first.revision:
            assert loop.time() < deadline, "the new revision did not arrive within a second"
            await asyncio.sleep(0.02)
        assert str(watcher.current.spec.risk.max_position_usd) == "500"

        # No new revision for 3.5 refresh intervals: the age must keep being reset by re-reads.
        ages = []
        for _ in range(14):
            await asyncio.sleep(0.25)
            ages.append(watcher.age_s())
        assert max(ages) < 1.5, ages
        assert (await watcher.check()).status is Status.OK
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await bus.close()
