"""Read what the pipeline wrote, straight from JetStream, independently of the workloads' code."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TypeVar

import nats.errors
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from qtrader.contracts.messages import Message, decode

M = TypeVar("M", bound=Message)


async def read_all(url: str, *, stream: str, subject: str, message_type: type[M]) -> list[M]:
    """Every message stored on ``subject`` in ``stream``, oldest first."""
    async with _connection(url) as connection:
        js = connection.jetstream(timeout=15)  # a loaded CI machine answers slowly
        subscription = await js.pull_subscribe(
            subject,
            stream=stream,
            config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL),
        )
        messages: list[M] = []
        while True:
            try:
                batch = await subscription.fetch(500, timeout=0.5)
            except nats.errors.TimeoutError:
                return messages
            messages.extend(decode(m.data, message_type) for m in batch)
            # Stop at what the stream held when we caught up, even while producers keep going.
            if batch and batch[-1].metadata.num_pending == 0:
                return messages


async def publish_raw(url: str, subject: str, payload: bytes, *, msg_id: str) -> None:
    async with _connection(url) as connection:
        await connection.jetstream().publish(subject, payload, headers={"Nats-Msg-Id": msg_id})


async def kv_put_raw(url: str, bucket: str, key: str, value: bytes) -> int:
    """Write raw bytes into a KV key with nats-py itself; returns the value's revision."""
    async with _connection(url) as connection:
        kv = await connection.jetstream(timeout=15).key_value(bucket)
        return int(await kv.put(key, value))


async def kv_delete_raw(url: str, bucket: str, key: str) -> None:
    async with _connection(url) as connection:
        kv = await connection.jetstream(timeout=15).key_value(bucket)
        await kv.delete(key)


@contextlib.asynccontextmanager
async def _connection(url: str) -> AsyncIterator[Client]:
    """A connection closed on every path: also when a test's timeout cancels it mid-handshake
    (``nats.connect`` would drop the half-made client, its socket left to the collector)."""
    client = Client()
    try:
        await client.connect(url)
        yield client
    finally:
        # Shielded, so a second cancellation cannot stop the close halfway.
        await asyncio.shield(_close(client))


async def _close(client: Client) -> None:
    if not client.is_closed:
        with contextlib.suppress(Exception):  # the socket is closed even when a flush fails
            await client.close()
