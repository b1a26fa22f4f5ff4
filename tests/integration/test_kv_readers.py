"""The checkers' KV readers read what the bucket holds, straight from its stream: every value of
a key in order with its deletions, and only the keys not deleted. Real nats-server; values
written by the bus's topology and nats-py itself."""

from __future__ import annotations

import pytest

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.local.nats_server import EmbeddedNats
from support.streams import kv_delete_raw, kv_history_raw, kv_keys, kv_put_raw

pytestmark = pytest.mark.integration

BUCKET = subjects.POLICY_BUCKET


async def _topology(url: str) -> None:
    bus = Bus(url=url, client_name="test-kv-readers")
    await bus.connect()
    try:
        await bus.ensure_topology()
    finally:
        await bus.close()


async def test_a_missing_bucket_holds_no_keys_and_no_history(nats_server: EmbeddedNats) -> None:
    assert await kv_keys(nats_server.url, BUCKET) == []
    assert await kv_history_raw(nats_server.url, BUCKET, "policy") == []


async def test_history_and_keys_are_what_was_written_and_deleted(nats_server: EmbeddedNats) -> None:
    url = nats_server.url
    await _topology(url)
    for value in (b"one", b"two"):
        await kv_put_raw(url, BUCKET, "a.policy", value)
    await kv_put_raw(url, BUCKET, "b.policy", b"kept")
    await kv_put_raw(url, BUCKET, "c.policy", b"gone")
    await kv_delete_raw(url, BUCKET, "c.policy")
    await kv_put_raw(url, BUCKET, "a.policy", b"three")

    assert await kv_history_raw(url, BUCKET, "a.policy") == [b"one", b"two", b"three"]
    assert await kv_history_raw(url, BUCKET, "c.policy") == [b"gone", None]
    assert await kv_history_raw(url, BUCKET, "d.policy") == []
    assert await kv_keys(url, BUCKET) == ["a.policy", "b.policy"]


async def test_a_key_read_at_once_after_its_first_write_has_its_value(
    nats_server: EmbeddedNats,
) -> None:
    """nats-py's watcher-based ``history()`` could answer "no keys found" here (it failed the HA
    test in CI): each read comes on a fresh connection right after the write."""
    url = nats_server.url
    await _topology(url)
    for n in range(50):
        key = f"s{n}.policy"
        await kv_put_raw(url, BUCKET, key, b"v")
        assert await kv_history_raw(url, BUCKET, key) == [b"v"], key
        assert key in await kv_keys(url, BUCKET)
