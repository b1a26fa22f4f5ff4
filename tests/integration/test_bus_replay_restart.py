"""A replay goes on soon after the broker restarts (SIGTERM, started again on the same store).

A replay is an ordered consumer: ephemeral, so a restarted server has forgotten it, and the
client only finds out when the consumer's idle heartbeats stop (nats-py recreates it after two
missed ones). At nats-py's default of 5 s, every replay was blind for 10-20 s after a restart:
the portfolio applied no fill made meanwhile (a cluster test ended with 3 fills on FILLS and
none applied), and an execution replica's book did not see the others' intents and fills. The
bus asks for a heartbeat every ``REPLAY_HEARTBEAT_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from decimal import Decimal

import pytest

from qtrader.bus.nats_bus import REPLAY_HEARTBEAT_S, Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import Fill, Side
from qtrader.local.nats_server import EmbeddedNats

pytestmark = pytest.mark.integration

# Two missed heartbeats, a check's period more, and the reconnect: what a replay may be blind.
RESUMED_WITHIN_S = 4 * REPLAY_HEARTBEAT_S + 3


def _fill(index: int) -> Fill:
    return Fill(
        fill_id=f"restart-{index}",
        client_order_id=f"restart-order-{index}",
        symbol="BTCUSDT",
        side=Side.BUY,
        quantity=Decimal("0.001"),
        price=Decimal(30_000),
        fee=Decimal(0),
        ts_ms=int(time.time() * 1000),
    )


async def test_a_replay_delivers_again_soon_after_the_broker_restarts(
    nats_server: EmbeddedNats,
) -> None:
    bus = Bus(url=nats_server.url, client_name="test-replay-restart")
    await bus.connect()
    await bus.ensure_topology()
    seen: list[str] = []

    async def keep(fill: Fill) -> None:
        seen.append(fill.fill_id)

    replay = asyncio.create_task(
        bus.replay(subjects.FILLS, subjects.all_of(subjects.FILL_PREFIX), Fill, keep, label="t")
    )
    try:
        await bus.publish(subjects.fill_subject("BTCUSDT"), _fill(0))
        await _until(lambda: "restart-0" in seen, timeout_s=10, what="the first fill replayed")
        await asyncio.to_thread(nats_server.stop)
        await asyncio.to_thread(nats_server.start)
        await _until(lambda: bus.connected, timeout_s=15, what="the bus reconnected")
        await bus.publish(subjects.fill_subject("BTCUSDT"), _fill(1))
        published = time.monotonic()
        await _until(
            lambda: "restart-1" in seen,
            timeout_s=RESUMED_WITHIN_S,
            what="the fill published after the restart replayed",
        )
        print(f"\nreplayed {time.monotonic() - published:.1f} s after its publish")
        assert seen == ["restart-0", "restart-1"], "each once, in order"
    finally:
        replay.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await replay
        await bus.close()


async def _until(condition: object, *, timeout_s: float, what: str) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(0.05)
