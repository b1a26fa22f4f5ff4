"""Read what the pipeline wrote, straight from JetStream, independently of the workloads' code."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

from qtrader.contracts.messages import Message, MessageRejected, decode, decode_all

M = TypeVar("M", bound=Message)


async def read_all(url: str, *, stream: str, subject: str, message_type: type[M]) -> list[M]:
    """Every message stored on ``subject`` in ``stream``, oldest first."""
    messages: list[M] = []
    for data in await read_raw(url, stream=stream, subject=subject):
        decoded = decode_all(data, message_type)  # one message, or a pack's items
        if decoded.refused:
            raise decoded.refused[0]
        messages += decoded.messages
    return messages


async def read_decodable(
    url: str, *, stream: str, subject: str, message_type: type[M]
) -> tuple[list[M], int]:
    """What ``read_all`` reads, leaving out (and counting) what does not decode (a message, or
    an item of a pack), as the consumers do: a poison message a test put on a stream is not the
    pipeline's output."""
    messages: list[M] = []
    skipped = 0
    for data in await read_raw(url, stream=stream, subject=subject):
        try:
            decoded = decode_all(data, message_type)
        except MessageRejected:
            skipped += 1
            continue
        messages += decoded.messages
        skipped += len(decoded.refused)
    return messages, skipped


async def read_raw(url: str, *, stream: str, subject: str) -> list[bytes]:
    """The payloads stored on ``subject`` in ``stream``, oldest first; none when the stream
    does not exist (nothing was ever published to it)."""
    async with _connection(url) as connection:
        js = connection.jetstream(timeout=15)  # a loaded CI machine answers slowly
        try:
            if not await _holds_any(js, stream, subject):
                return []  # without waiting for a fetch to time out
        except nats.js.errors.NotFoundError:
            return []
        subscription = await js.pull_subscribe(
            subject,
            stream=stream,
            config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL),
        )
        payloads: list[bytes] = []
        while True:
            try:
                batch = await subscription.fetch(500, timeout=0.5)
            except nats.errors.TimeoutError:
                return payloads
            payloads.extend(m.data for m in batch)
            # Stop at what the stream held when we caught up, even while producers keep going.
            if batch and batch[-1].metadata.num_pending == 0:
                return payloads


async def last_stored(url: str, *, stream: str, subject: str, message_type: type[M]) -> M | None:
    """The newest message stored on ``subject`` (None when there is none)."""
    async with _connection(url) as connection:
        js = connection.jetstream(timeout=15)
        try:
            raw = await js.get_last_msg(stream, subject)
        except nats.js.errors.NotFoundError:
            return None
        return decode(raw.data or b"", message_type)


async def _holds_any(js: JetStreamContext, stream: str, subject: str) -> bool:
    info = await js.stream_info(stream, subjects_filter=subject)
    return any((info.state.subjects or {}).values())


async def publish_raw(url: str, subject: str, payload: bytes, *, msg_id: str) -> None:
    async with _connection(url) as connection:
        await connection.jetstream().publish(subject, payload, headers={"Nats-Msg-Id": msg_id})


async def purge_stream(url: str, stream: str) -> None:
    """Drop every message a stream stores (the stream itself stays)."""
    async with _connection(url) as connection:
        await connection.jetstream(timeout=15).purge_stream(stream)


async def kv_put_raw(url: str, bucket: str, key: str, value: bytes) -> int:
    """Write raw bytes into a KV key with nats-py itself; returns the value's revision."""
    async with _connection(url) as connection:
        kv = await connection.jetstream(timeout=15).key_value(bucket)
        return int(await kv.put(key, value))


async def kv_get_raw(url: str, bucket: str, key: str) -> bytes | None:
    """A KV key's current value; None when the bucket or the key does not exist (or was
    deleted)."""
    async with _connection(url) as connection:
        try:
            kv = await connection.jetstream(timeout=15).key_value(bucket)
            entry = await kv.get(key)
        except nats.js.errors.NotFoundError:  # no bucket, no key, or a deleted key
            return None
        return entry.value


async def kv_keys(url: str, bucket: str) -> list[str]:
    """The keys a KV bucket holds now (a deleted or purged key is not held); none when the
    bucket does not exist. Read from the bucket's stream: nats-py's ``keys()`` watches, and
    its watcher can say "no keys" while the first one is on its way to it (2.16: it trusts a
    consumer's zero pending before it has counted what it received)."""
    stream, prefix = _kv_stream(bucket)
    async with _connection(url) as connection:
        js = connection.jetstream(timeout=15)
        try:
            info = await js.stream_info(stream, subjects_filter=f"{prefix}>")
        except nats.js.errors.NotFoundError:
            return []
        held = []
        for subject in sorted(info.state.subjects or {}):
            last = await js.get_last_msg(stream, subject)
            if not _is_removal(last.headers):
                held.append(subject.removeprefix(prefix))
        return held


async def kv_history_raw(url: str, bucket: str, key: str) -> list[bytes | None]:
    """Every value the bucket still holds for ``key``, oldest first; None for a deletion or a
    purge. Read from the stream, message by message (nats-py's ``history()`` watches, as
    ``kv_keys`` explains, and may say "no keys found" of a key that has values)."""
    stream, prefix = _kv_stream(bucket)
    values: list[bytes | None] = []
    async with _connection(url) as connection:
        js = connection.jetstream(timeout=15)
        sequence = 1
        while True:
            try:
                found = await js.get_msg(stream, seq=sequence, subject=prefix + key, next=True)
            except nats.js.errors.NotFoundError:  # no bucket, or nothing after ``sequence``
                return values
            values.append(None if _is_removal(found.headers) else found.data or b"")
            sequence = int(found.seq or 0) + 1


def _kv_stream(bucket: str) -> tuple[str, str]:
    """A KV bucket's stream and the subject prefix of its keys (JetStream's KV layout)."""
    return f"KV_{bucket}", f"$KV.{bucket}."


def _is_removal(headers: dict[str, str] | None) -> bool:
    return (headers or {}).get("KV-Operation") in ("DEL", "PURGE")


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
