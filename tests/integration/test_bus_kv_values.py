"""The bus hands a stored value that does not decode to its reader as ``Undecodable``, in order,
counted once per revision; a deleted key reads as None. Real nats-server, values written with
nats-py itself."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    HaltLatch,
    PortfolioSnapshot,
    RejectReason,
    TradingState,
    Undecodable,
)
from qtrader.local.nats_server import EmbeddedNats
from support.streams import kv_delete_raw, kv_put_raw, publish_raw

pytestmark = pytest.mark.integration

LATCH = HaltLatch(state=TradingState.ACTIVE, revision=1, issued_at_ms=1)


@pytest.fixture
async def bus(nats_server: EmbeddedNats) -> AsyncIterator[Bus]:
    connected = Bus(url=nats_server.url, client_name="test-kv-values")
    await connected.connect()
    await connected.ensure_topology()
    yield connected
    await connected.close()


def _rejected(consumer: str, reason: RejectReason) -> float:
    labels = {"consumer": consumer, "reason": reason.value}
    return REGISTRY.get_sample_value("qtrader_messages_rejected_total", labels) or 0.0


async def test_kv_get_when_value_does_not_decode_then_undecodable_counted_once(
    nats_server: EmbeddedNats, bus: Bus
) -> None:
    before = _rejected("kv:qtrader-halt", RejectReason.MALFORMED)
    revision = await kv_put_raw(nats_server.url, subjects.HALT_BUCKET, subjects.HALT_KEY, b"{")
    for _ in range(3):  # a worker re-reads: one count, one log line
        found = await bus.kv_get(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch)
        assert isinstance(found, Undecodable)
        assert (found.stored_revision, found.reason) == (revision, RejectReason.MALFORMED)
        assert found.source == f"{subjects.HALT_BUCKET}/{subjects.HALT_KEY}"
    assert _rejected("kv:qtrader-halt", RejectReason.MALFORMED) == before + 1
    await bus.kv_put(subjects.HALT_BUCKET, subjects.HALT_KEY, LATCH)
    assert await bus.kv_get(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch) == LATCH
    await kv_delete_raw(nats_server.url, subjects.HALT_BUCKET, subjects.HALT_KEY)
    assert await bus.kv_get(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch) is None


async def test_kv_watch_when_values_go_bad_and_good_then_each_in_order(
    nats_server: EmbeddedNats, bus: Bus
) -> None:
    seen: list[HaltLatch | Undecodable | None] = []

    async def watch() -> None:
        async for value in bus.kv_watch(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch):
            seen.append(value)

    await bus.kv_put(subjects.HALT_BUCKET, subjects.HALT_KEY, LATCH)
    watching = asyncio.create_task(watch())
    try:
        url = nats_server.url
        bad = await kv_put_raw(url, subjects.HALT_BUCKET, subjects.HALT_KEY, b"[" * 10_000)
        await bus.kv_put(subjects.HALT_BUCKET, subjects.HALT_KEY, LATCH)
        await kv_delete_raw(url, subjects.HALT_BUCKET, subjects.HALT_KEY)
        for _ in range(50):
            if len(seen) == 4:
                break
            await asyncio.sleep(0.1)
        assert len(seen) == 4, seen
        assert seen[0] == LATCH
        assert isinstance(seen[1], Undecodable)
        assert seen[1].stored_revision == bad
        assert seen[2] == LATCH
        assert seen[3] is None  # deleted
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)


async def test_last_message_when_it_does_not_decode_then_undecodable(
    nats_server: EmbeddedNats, bus: Bus
) -> None:
    await publish_raw(nats_server.url, subjects.PORTFOLIO_SNAPSHOT, b"\xff" * 10, msg_id="bad-1")
    found = await bus.last_message(
        subjects.PORTFOLIO, subjects.PORTFOLIO_SNAPSHOT, PortfolioSnapshot
    )
    assert isinstance(found, Undecodable)
    assert found.reason is RejectReason.MALFORMED
    assert found.source == subjects.PORTFOLIO_SNAPSHOT
